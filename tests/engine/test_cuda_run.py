"""The CUDA paths end to end (skipped without a CUDA device): every subspace method and ZSCL run on the GPU in
float32 and under ``--precision amp`` (autocast + GradScaler in training, autocast in evaluation and in the
methods' own passes), finish with finite metrics, and profile CUDA memory. ``benchmarks/gpu_check.sh`` runs these
with the GPU ratios in one prepared command."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from clbench.cli.app import main
from clbench.models.backbones import load_backbone

METHODS = ["lora", "keeplora", "keeplora+", "keeplora++", "inflora", "loda", "zscl"]
SMOKE = ["--preset", "smoke", "--pretrained", "none", "--quiet", "--set", "data.num_tasks=2"]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("precision", ["fp32", "amp"])
def test_methods_run_on_cuda(tmp_path: Path, precision: str) -> None:
    out = tmp_path / "out"
    args = ["run", "--methods", ",".join(METHODS), "--device", "cuda", "--precision", precision, "--out", str(out)]
    assert main([*args, *SMOKE]) == 0
    for method in METHODS:
        run = out / "synthetic-order1" / method / "seed0"
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["status"] == "complete", method
        metrics = json.loads((run / "metrics.json").read_text())
        assert all(math.isfinite(metrics[k]) for k in ("transfer", "average", "last")), method
        profile = pd.read_csv(run / "profile.csv")
        assert set(profile["memory_kind"]) == {"cuda_peak_allocated"}, method
        assert (profile["peak_bytes"] > 0).all(), method


@pytest.mark.parametrize("backbone", ["tiny", "ViT-B-16"])
def test_cuda_and_cpu_compute_the_same_features_in_float32(backbone: str, monkeypatch) -> None:
    """One random-initialised backbone on both devices (TF32 off): image and class-text features agree."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    cpu = load_backbone(backbone, "none", "cpu").eval()
    cuda = copy.deepcopy(cpu).to("cuda")
    size = cpu.image_spec.size
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = cpu.tokenize(["a photo of a cat.", "a photo of a dog.", "a photo of a 7."])
    with torch.no_grad():
        for encode, x in ((lambda m, v: m.encode_image(v), images), (lambda m, v: m.encode_text(v), tokens)):
            on_cpu, on_cuda = encode(cpu, x), encode(cuda, x.to("cuda")).cpu()
            torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-4, atol=1e-4)
