"""ZSCL's reference-image stream: a new loader (and new worker processes) every pass, as before issue 28, against
clbench's stream now (a small set read once into memory; a large one through one loader with persistent workers).

    python -m benchmarks.zscl_reference_loader                  # 20 images, 224 px, batch 64, 4 workers, 30 steps
    python -m benchmarks.zscl_reference_loader --images 200 --steps 20 --workers 2

With fewer images than the batch, every step is a new pass, so the old stream started ``--workers`` processes at
every step. All three streams are timed in this process on the same folder (fastest of ``--repeats``), and each
side's batches are checked to hold the same images (the new streams give identical batches). The old stream is
re-implemented here as the code was (a ``DataLoader(shuffle=True, generator=...)`` built per pass).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets

from clbench.datasets.base import ImageSpec
from clbench.datasets.mtil import ImageView, clip_transform
from clbench.methods.zscl import ReferenceImages

OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


class PerPassStream:
    """The stream before issue 28: one ``DataLoader`` (with ``workers`` new processes) per pass over the set."""

    def __init__(self, data: torch.utils.data.Dataset, batch_size: int, seed: int, workers: int) -> None:
        self.data, self.batch_size, self.workers = data, batch_size, workers
        self.gen = torch.Generator().manual_seed(seed)
        self._it: Iterator | None = None

    def _epoch(self) -> Iterator[torch.Tensor]:
        loader = torch.utils.data.DataLoader(self.data, batch_size=self.batch_size, shuffle=True, generator=self.gen,
                                             num_workers=self.workers, drop_last=len(self.data) >= self.batch_size)
        for images, _ in loader:
            yield images

    def next(self) -> torch.Tensor:
        for _ in range(2):
            if self._it is None:
                self._it = self._epoch()
            batch = next(self._it, None)
            if batch is not None:
                return batch
            self._it = None
        raise RuntimeError("empty")

    def close(self) -> None:
        """End the pass in progress (its workers stop now, not in some later forked process's garbage collection)."""
        self._it = None


def make_folder(root: Path, n: int, side: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((side, side + 16, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def timed(make: Callable[[], object], steps: int) -> tuple[float, list[torch.Tensor]]:
    """Seconds for building the stream and drawing ``steps`` batches, and the batches."""
    start = time.perf_counter()
    stream = make()
    batches = [stream.next() for _ in range(steps)]
    seconds = time.perf_counter() - start
    stream.close()  # ReferenceImages: as ZSCL does after each task
    return seconds, batches


def image_sets(batches: list[torch.Tensor]) -> list[list[float]]:
    """Each batch as the sorted per-image sums: which images it holds, whatever their order."""
    return [sorted(round(float(x), 3) for x in b.flatten(1).sum(1)) for b in batches]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--size", type=int, default=224, help="the backbone's image side (ViT-B-16: 224)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    spec = ImageSpec(args.size, *OPENAI)
    with tempfile.TemporaryDirectory() as tmp:
        folder = datasets.ImageFolder(str(make_folder(Path(tmp), args.images, args.size + 32)))
        view = ImageView("ref", folder, list(range(len(folder))), clip_transform(spec))
        sides = {
            "per-pass loader (before)": lambda: PerPassStream(view, args.batch, 7, args.workers),
            "read once into memory (now, small set)": lambda: ReferenceImages(view, args.batch, 7, args.workers),
            "persistent workers (now, large set)": lambda: ReferenceImages(view, args.batch, 7, args.workers,
                                                                           memory_bytes=0),
        }
        best: dict[str, float] = {}
        batches: dict[str, list[torch.Tensor]] = {}
        for _ in range(args.repeats):  # interleaved, fastest kept: the machine is shared
            for name, make in sides.items():
                seconds, drawn = timed(make, args.steps)
                best[name] = min(best.get(name, float("inf")), seconds)
                batches[name] = drawn
    now = list(sides)[1:]
    same = all(torch.equal(a, b) for a, b in zip(batches[now[0]], batches[now[1]], strict=True))
    sizes = {name: [len(b) for b in drawn] for name, drawn in batches.items()}
    print(f"{args.images} images at {args.size} px, batch {args.batch}, {args.workers} workers, {args.steps} steps "
          f"(torch threads {torch.get_num_threads()})")
    base = best[list(sides)[0]]
    for name, seconds in best.items():
        print(f"  {name:40s} {seconds:8.2f} s   {base / seconds:6.1f}x   batch sizes {sorted(set(sizes[name]))}")
    print(f"  the two new streams give identical batches: {same}")
    every = set(map(tuple, image_sets(batches[list(sides)[0]]))) | set(map(tuple, image_sets(batches[now[0]])))
    print(f"  distinct image sets drawn (all images each step when the set is below a batch): {len(every)}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
