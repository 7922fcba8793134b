"""What a user with their own datasets and weights meets first (issue 28): preprocessing per pretrained tag, a
dataset selection, the class-count rule, ZSCL's reference-image stream, reports on partial sequences and the
undefined Transfer of a one-task run. Data tests use the fake MTIL tree (``tests/fake_mtil.py``)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from fake_mtil import FakeTree, build_fake_mtil
from fake_runs import write_fake_run
from PIL import Image

from clbench.cli.app import main
from clbench.config import RunConfig, build_config, method_run_config, run_id
from clbench.datasets.base import ImageSpec
from clbench.datasets.mtil import build_mtil, clip_transform, inspect_mtil
from clbench.errors import UserError

SMOKE = ["--preset", "smoke", "--backbone", "tiny", "--pretrained", "none", "--quiet", "--device", "cpu"]
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> FakeTree:
    return build_fake_mtil(tmp_path_factory.mktemp("mtil") / "data")


def _one_line_error(capsys: pytest.CaptureFixture, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.strip() and not x.startswith("note: ")]
    assert code == 2 and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- 1. preprocessing from each tag's open_clip config --------------------------------------------------------
TAGS = [("ViT-B-16", "openai"), ("ViT-L-14", "laion2b_s32b_b82k"), ("ViT-H-14-quickgelu", "dfn5b"),
        ("ViT-L-14-CLIPA", "datacomp1b"), ("ViT-B-16-SigLIP", "webli")]


def _images() -> list[Image.Image]:
    """A wide, a tall and a grey image: the resize modes differ exactly on such shapes."""
    rng = np.random.default_rng(0)
    wide = Image.fromarray((rng.random((40, 90, 3)) * 255).astype(np.uint8))
    tall = Image.fromarray((rng.random((70, 30, 3)) * 255).astype(np.uint8))
    grey = Image.fromarray((rng.random((50, 50)) * 255).astype(np.uint8), mode="L")
    return [wide, tall, grey]


@pytest.mark.filterwarnings("ignore:QuickGELU mismatch")  # the tiny stand-in architecture has no QuickGELU
@pytest.mark.parametrize(("name", "tag"), TAGS)
def test_transform_is_open_clips_for_the_tag(name: str, tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """open_clip's own ``create_model_and_transforms(name, pretrained=tag)``, with the weights step stubbed out
    and the tiny architecture built in place of the large one (the preprocessing comes from the tag's pretrained
    config, not from the weights): its evaluation transform must give our tensors exactly."""
    from open_clip import factory

    from clbench.models.backbones import _image_spec, tiny_model_config

    monkeypatch.setattr(factory, "get_model_config", lambda _name: tiny_model_config())
    monkeypatch.setattr(factory, "download_pretrained", lambda *a, **k: "not-downloaded")
    monkeypatch.setattr(factory, "load_checkpoint", lambda *a, **k: None)
    _, _, theirs = open_clip.create_model_and_transforms(name, pretrained=tag)
    size = tiny_model_config()["vision_cfg"]["image_size"]
    spec = _image_spec(SimpleNamespace(visual=SimpleNamespace(image_size=size)), name, tag)
    ours = clip_transform(spec)
    for image in _images():
        assert torch.equal(ours(image), theirs(image)), (name, tag, spec)
    assert spec.source == f"open_clip pretrained config {name}/{tag}"


def test_non_openai_tags_get_their_own_statistics() -> None:
    """Values written out from open_clip's pretrained table (not read through the code under test)."""
    from clbench.models.backbones import _image_spec

    clip = SimpleNamespace(visual=SimpleNamespace(image_size=224))
    laion = _image_spec(clip, "ViT-L-14", "laion2b_s32b_b82k")
    assert (laion.mean, laion.std, laion.resize_mode) == ((0.5,) * 3, (0.5,) * 3, "shortest")
    dfn = _image_spec(clip, "ViT-H-14-quickgelu", "dfn5b")
    assert (dfn.mean, dfn.resize_mode, dfn.interpolation) == (OPENAI_MEAN, "squash", "bicubic")
    clipa = _image_spec(clip, "ViT-L-14-CLIPA", "datacomp1b")
    assert (clipa.mean, clipa.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (clipa.interpolation, clipa.resize_mode, clipa.size) == ("bilinear", "squash", 224)


def test_local_weights_take_the_open_clip_config_beside_them(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from clbench.models.backbones import load_backbone

    model = load_backbone("tiny", "none")
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.clip.state_dict().items()}, str(weights))
    plain = load_backbone("tiny", str(weights))
    assert plain.image_spec.mean == OPENAI_MEAN and "no open_clip_config.json" in plain.image_spec.source
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {}, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                                             "interpolation": "bilinear", "resize_mode": "squash"}}))
    own = load_backbone("tiny", str(weights)).image_spec
    assert (own.mean, own.std, own.interpolation, own.resize_mode) == ((0.5,) * 3, (0.25,) * 3, "bilinear", "squash")
    assert own.source == str(tmp_path / "open_clip_config.json")


def test_squash_and_longest_resize_as_open_clip() -> None:
    """Hand-checked shapes: squash keeps no aspect ratio, longest pads; both end at size x size."""
    from open_clip.transform import image_transform

    for mode in ("squash", "longest", "shortest"):
        spec = ImageSpec(24, (0.5,) * 3, (0.5,) * 3, interpolation="bicubic", resize_mode=mode, fill_color=0)
        ref = image_transform(24, is_train=False, mean=spec.mean, std=spec.std, resize_mode=mode)
        for image in _images():
            out = clip_transform(spec)(image)
            assert out.shape == (3, 24, 24) and torch.equal(out, ref(image)), mode
    with pytest.raises(UserError, match="resize mode 'crop'"):
        clip_transform(ImageSpec(24, (0.5,) * 3, (0.5,) * 3, resize_mode="crop"))


# ---- 2. a dataset selection ----------------------------------------------------------------------------------
def _cfg(*sets: str, benchmark: str = "mtil") -> RunConfig:
    return build_config("smoke", {"benchmark": benchmark}, list(sets), ["lora"])


def test_selection_takes_the_protocols_names_in_the_users_order() -> None:
    assert _cfg("data.datasets=mnist, EUROSAT").data.datasets == "MNIST,EuroSAT"
    assert _cfg("data.datasets=sun397,aircraft").data.datasets == "SUN397,Aircraft"
    assert _cfg("data.datasets=oxford_PETS", benchmark="xtail").data.datasets == "oxford_pets"


@pytest.mark.parametrize(("sets", "needles"), [
    (("data.datasets=mnist,imagenet",), ("'imagenet' is not a MTIL dataset", "MNIST", "SUN397")),
    (("data.datasets=mnist,MNIST",), ("names MNIST twice",)),
    (("data.datasets=mnist", "data.num_tasks=2"), ("both choose the tasks",)),
])
def test_bad_selections_are_one_line(sets: tuple[str, ...], needles: tuple[str, ...]) -> None:
    with pytest.raises(UserError) as err:
        _cfg(*sets)
    assert "\n" not in str(err.value) and all(n in str(err.value) for n in needles), str(err.value)


def test_selection_on_the_synthetic_benchmark_is_refused() -> None:
    with pytest.raises(UserError, match="--datasets chooses among a real benchmark's datasets"):
        _cfg("data.datasets=mnist", benchmark="synthetic")
    with pytest.raises(UserError, match="--allow-incomplete is for real datasets"):
        _cfg("data.allow_incomplete=true", benchmark="synthetic")


def test_run_ids_change_only_when_the_new_settings_are_set() -> None:
    """The id of a run without a selection is the sha256 of its config without the two new keys, as before."""
    resolved = method_run_config(_cfg(), "lora")
    before = {k: v for k, v in resolved.items() if k not in ("device", "recipe")}
    before["data"] = {k: v for k, v in before["data"].items() if k not in ("datasets", "allow_incomplete")}
    expected = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:12]
    assert run_id(resolved) == expected
    assert run_id(method_run_config(_cfg("data.datasets=mnist"), "lora")) != expected
    assert run_id(method_run_config(_cfg("data.allow_incomplete=true"), "lora")) != expected


def test_benchmark_follows_the_selection(tree: FakeTree) -> None:
    cfg = RunConfig(benchmark="mtil", data_root=str(tree.root))
    cfg.data.datasets = "MNIST,EuroSAT"
    bench = build_mtil(cfg, ImageSpec(32, OPENAI_MEAN, OPENAI_MEAN))
    assert bench.task_names == ["MNIST", "EuroSAT"]
    assert bench.info["order"] == ["MNIST", "EuroSAT"] and bench.info["selection"] == ["MNIST", "EuroSAT"]


def test_run_on_a_selection_end_to_end(tree: FakeTree, tmp_path: Path) -> None:
    out = tmp_path / "results"
    code = main(["run", "--benchmark", "mtil", "--data-root", str(tree.root), "--datasets", "mnist,EuroSAT",
                 "--methods", "zeroshot", "--out", str(out), *SMOKE])
    assert code == 0
    folder = out / "mtil-mnist+eurosat" / "zeroshot" / "seed0"
    frame = pd.read_csv(folder / "accuracy.csv")
    assert list(frame.columns) == ["trained_on", "MNIST", "EuroSAT"] and list(frame["trained_on"]) == ["MNIST",
                                                                                                        "EuroSAT"]
    a = frame[["MNIST", "EuroSAT"]].to_numpy()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["transfer"] == pytest.approx(a[0, 1], abs=1e-3)  # the one cell before EuroSAT is trained
    assert metrics["last"] == pytest.approx(a[1].mean(), abs=1e-3)
    assert metrics["average"] == pytest.approx(a.mean(), abs=1e-3)
    config = json.loads((folder / "config.json").read_text())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert config["data"]["datasets"] == "MNIST,EuroSAT" and manifest["selection"] == "MNIST,EuroSAT"
    assert manifest["datasets"] == ["MNIST", "EuroSAT"]
    assert manifest["preprocess"]["mean"] == list(OPENAI_MEAN) and manifest["preprocess"]["resize_mode"] == "shortest"
    assert manifest["classes"] == {"MNIST": 10, "EuroSAT": 10}
    assert manifest["expected_classes"] == {"MNIST": 10, "EuroSAT": 10}


def test_sweep_plans_a_selection_in_its_own_folder(tree: FakeTree, tmp_path: Path, capsys) -> None:
    from clbench.sweeps.plan import SweepRequest, expand

    sets = ("data.datasets=eurosat,mnist",)
    options = (("benchmark", "mtil"), ("data_root", str(tree.root)), ("backbone", "tiny"), ("pretrained", "none"))
    (spec,) = expand(SweepRequest(("lora",), [1], [0], [], "smoke", options, sets, str(tmp_path / "out"), 1))
    assert spec.datasets == "EuroSAT,MNIST" and Path(spec.folder).parts[-3] == "mtil-eurosat+mnist"
    code = main(["sweep", "--benchmark", "mtil", "--data-root", str(tree.root), "--datasets", "nope", "--methods",
                 "lora", "--out", str(tmp_path / "o"), "--dry-run", "--quiet"])
    _one_line_error(capsys, code, "--datasets: 'nope' is not a MTIL dataset")


# ---- 3. class counts against the protocol's ------------------------------------------------------------------
def test_data_check_refuses_a_partial_dataset(tree: FakeTree, capsys: pytest.CaptureFixture) -> None:
    cars = next(s for s in inspect_mtil(tree.root) if s.name == "StanfordCars")
    assert not cars.usable and cars.problem == (
        "StanfordCars: 3 classes found, the protocol has 196; complete the dataset, or pass --allow-incomplete to "
        "use it as it is (both counts are recorded in the run's manifest)")
    mnist = next(s for s in inspect_mtil(tree.root) if s.name == "MNIST")
    assert mnist.usable  # 10 of 10
    assert main(["data", "check", "--data-root", str(tree.root)]) == 2
    captured = capsys.readouterr()
    assert "StanfordCars: 3 classes found, the protocol has 196" in captured.err and "incomplete" in captured.out
    assert len(captured.err.strip().splitlines()) == 1
    assert main(["data", "check", "--data-root", str(tree.root), "--allow-incomplete"]) == 0


def test_run_refuses_a_partial_dataset_unless_asked(tree: FakeTree, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["run", "--benchmark", "mtil", "--data-root", str(tree.root), "--datasets", "mnist,stanfordcars",
            "--methods", "zeroshot", "--out", str(out), *SMOKE]
    _one_line_error(capsys, main(args), "StanfordCars: 3 classes found, the protocol has 196", "--allow-incomplete")
    assert not out.exists()
    assert main([*args, "--allow-incomplete"]) == 0
    (manifest_path,) = out.rglob("manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["classes"] == {"MNIST": 10, "StanfordCars": 3}
    assert manifest["expected_classes"] == {"MNIST": 10, "StanfordCars": 196}
    assert manifest["benchmark_info"]["splits"]["StanfordCars"]["expected_classes"] == 196


# ---- 5. reports on fewer tasks than the protocol --------------------------------------------------------------
MTIL_3 = ["Aircraft", "Caltech101", "CIFAR100"]


def test_literature_is_refused_beside_a_partial_sequence(tmp_path: Path) -> None:
    from clbench.reports.report import build_report

    write_fake_run(tmp_path / "r", "lora", 0, datasets=MTIL_3, benchmark="mtil")
    with pytest.raises(UserError) as err:
        build_report([tmp_path / "r"], "markdown", with_literature=True)
    assert "3 of the 11 tasks of MTIL Order I ran" in str(err.value) and "drop --with-literature" in str(err.value)
    text = next(iter(build_report([tmp_path / "r"], "markdown").files.values()))
    assert "3 of the protocol's 11 tasks ran (Aircraft, Caltech101, CIFAR100)" in text


def test_full_sequence_keeps_its_literature(tmp_path: Path) -> None:
    from clbench.datasets.mtil_names import ORDER_I
    from clbench.reports.report import build_report

    write_fake_run(tmp_path / "r", "lora", 0, datasets=list(ORDER_I), benchmark="mtil")
    text = next(iter(build_report([tmp_path / "r"], "markdown", with_literature=True).files.values()))
    assert "reported" in text.lower() and "of the protocol's" not in text


# ---- 6. a one-task run: Transfer undefined, with the reason ----------------------------------------------------
def test_one_task_run_shows_transfer_undefined(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code = main(["run", "--methods", "zeroshot", "--out", str(out), *SMOKE, "--set", "data.num_tasks=1"])
    assert code == 0
    summary = capsys.readouterr().out
    assert "nan" not in summary and "undefined" in summary
    assert "Transfer undefined: needs 2+ tasks" in " ".join(summary.split())
    (metrics_path,) = out.rglob("metrics.json")
    raw = metrics_path.read_text()
    assert "NaN" not in raw
    metrics = json.loads(raw)
    assert metrics["transfer"] is None and metrics["undefined"]["transfer"].startswith("needs 2+ tasks")
    from clbench.reports.report import build_report

    text = next(iter(build_report([out], "markdown").files.values()))
    assert "Transfer is undefined for a one-task sequence" in text and "nan" not in text.lower()


def test_metrics_command_on_a_one_task_matrix(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "one.csv"
    path.write_text("trained_on,A\nA,50.0\n")
    assert main(["metrics", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "transfer undefined (needs 2+ tasks" in out and "nan" not in out


# ---- 4. ZSCL's reference images: one loader, or read once ------------------------------------------------------
def _folder(root: Path, n: int) -> Path:
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + i, 16), (10 * i, 90, 200)).save(root / f"c{i % 2}" / f"{i}.png")
    return root


@pytest.mark.parametrize("workers", [0, 1])
def test_reference_stream_reads_a_small_set_once(tmp_path: Path, workers: int) -> None:
    from torchvision import datasets

    from clbench.datasets.mtil import ImageView
    from clbench.methods.zscl import ReferenceImages

    folder = datasets.ImageFolder(str(_folder(tmp_path / "ref", 6)))
    view = ImageView("ref", folder, list(range(len(folder))), clip_transform(ImageSpec(8, (0.5,) * 3, (0.5,) * 3)))
    cached = ReferenceImages(view, 4, seed=3, workers=workers)
    streamed = ReferenceImages(view, 4, seed=3, workers=workers, memory_bytes=0)
    assert isinstance(cached.data, torch.Tensor) and not isinstance(streamed.data, torch.Tensor)
    # the same batches: torch.randperm(6) of the stream's generator, cut at 4, the partial batch dropped
    gen = torch.Generator().manual_seed(3)
    everything = torch.stack([view[i][0] for i in range(len(view))])
    loaders = set()
    for _ in range(3):
        order = torch.randperm(6, generator=gen)[:4]
        a, b = cached.next(), streamed.next()
        assert torch.equal(a, everything[order]) and torch.equal(b, everything[order])
        loaders.add(id(streamed._loader))
    assert len(loaders) == 1  # one loader (persistent workers) for every pass
    streamed.reseed(3)
    cached.reseed(3)
    assert torch.equal(streamed.next(), cached.next())
    streamed.close()  # ZSCL's after_task: the workers stop, the stream goes on with a new loader
    assert streamed._loader is None and streamed.next().shape == (4, 3, 8, 8)
    streamed.close()


def test_reference_workers_are_bounded_by_threads() -> None:
    from clbench.methods.zscl import reference_workers

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert reference_workers(4) == 2 and reference_workers(1) == 1 and reference_workers(0) == 0
    finally:
        torch.set_num_threads(before)
    assert not math.isnan(before)


def test_zscl_setup_keeps_a_small_reference_folder_in_memory(tmp_path: Path) -> None:
    from clbench.costs.profiler import Profiler
    from clbench.methods import get_method
    from clbench.models.backbones import load_backbone

    (tmp_path / "cc.csv").write_text("title\na dog\na red car\n")
    model = load_backbone("tiny", "none")
    cls = get_method("zscl")
    hp = cls.Hparams(ref_images=str(_folder(tmp_path / "ref", 5)), ref_captions=str(tmp_path / "cc.csv"),
                     ref_batch_size=2)
    method = cls(model, hp, Profiler())
    method.benchmark = "mtil"
    method.setup()
    assert isinstance(method.ref_images.data, torch.Tensor) and method.ref_images.data.shape == (5, 3, 32, 32)
    assert method.ref_images.workers <= torch.get_num_threads()
    shutil.rmtree(tmp_path / "ref")  # read once: the stream no longer needs the files
    assert method.ref_images.next().shape == (2, 3, 32, 32)
