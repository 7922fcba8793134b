"""``clbench run --benchmark synthetic-mcit`` end to end (smoke size), its results folder, and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("transformers", reason="the MCIT setting needs transformers (pip install 'clbench[mcit]')")

from clbench.cli import main  # noqa: E402
from clbench.mcit.metrics import mcit_metrics  # noqa: E402


@pytest.mark.slow
def test_run_lora_and_keeplora_end_to_end(tmp_path, capsys):
    out = tmp_path / "results"
    rc = main(["run", "--methods", "lora,keeplora", "--benchmark", "synthetic-mcit", "--preset", "smoke",
               "--out", str(out), "--quiet", "--set", "data.n_train=16", "--set", "data.n_test=4"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "MFT" in text and "MAA" in text
    for method in ("lora", "keeplora"):
        path = out / "synthetic-mcit-order1" / method / "seed0"
        frame = pd.read_csv(path / "accuracy.csv")
        names = ["shape-qa", "colour-mc", "caption", "count-math", "side-qa"]
        assert list(frame["trained_on"]) == names and list(frame.columns[1:]) == names
        matrix = frame[names].to_numpy()
        assert matrix.shape == (5, 5) and not np.isnan(matrix).any()  # upper triangle evaluated too
        metrics = json.loads((path / "metrics.json").read_text())
        assert metrics["mft"] == pytest.approx(mcit_metrics(matrix, names)["mft"])
        assert metrics["details"][0][2]["averaged"] == ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr"]
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["environment"]["transformers"]
        assert manifest["hparams"]["rank"] == 8
        sections = set(pd.read_csv(path / "profile.csv")["section"])
        assert {"train", "eval", "merge"} <= sections
    keep = set(pd.read_csv(out / "synthetic-mcit-order1" / "keeplora" / "seed0" / "profile.csv")["section"])
    assert {"pretrained_svd", "grad_estimation", "grad_svd", "feature_stats", "feature_svd"} <= keep


@pytest.mark.parametrize("args, message", [
    (["--methods", "zscl"], "no LLaVA form"),
    (["--methods", "lora", "--shots", "5"], "--shots belong to the CLIP setting"),
    (["--methods", "lora", "--set", "lora.nope=1"], "<method>.<field>"),
    (["--methods", "lora", "--preset", "paper"], "unknown for the MCIT setting"),
])
def test_refusals_are_one_line(tmp_path, capsys, args, message):
    rc = main(["run", "--benchmark", "synthetic-mcit", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_real_benchmark_without_data_is_one_line(tmp_path, capsys):
    rc = main(["run", "--methods", "lora", "--benchmark", "ucit", "--data-root", str(tmp_path / "none"),
               "--out", str(tmp_path)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_profile_llava_shapes(tmp_path, capsys):
    csv = tmp_path / "costs.csv"
    rc = main(["profile", "--methods", "keeplora", "--backbone", "llava-tiny", "--set", "keeplora.rank=8",
               "--out", str(csv)])
    assert rc == 0
    frame = pd.read_csv(csv)
    assert list(frame["matrix"]) == ["q/k/v/o", "gate/up", "down"]
    assert list(frame["count"]) == [8, 4, 2]  # 4 + 2 + 1 matrices per layer, 2 layers
    assert list(frame["gradient_bytes"]) == [4 * 64 * 64, 4 * 128 * 64, 4 * 64 * 128]
    assert (frame["basis_columns"] <= frame["d_in"]).all()
    assert "whole model" in capsys.readouterr().out
    assert main(["profile", "--methods", "lora", "--backbone", "llava-tiny"]) == 2
    assert main(["profile", "--methods", "keeplora", "--backbone", "llava-99b"]) == 2
