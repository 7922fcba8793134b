"""``clbench run --benchmark synthetic-mcit`` end to end (smoke size), its results folder, and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("transformers", reason="the MCIT setting needs transformers (pip install 'clbench[mcit]')")

from clbench.cli.app import main  # noqa: E402
from clbench.settings.mcit.metrics import mcit_metrics  # noqa: E402


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
    (["--methods", "keeplora", "--set", "keeplora.energy=0"], "keeplora.energy=0.0 is out of range; it must be > 0"),
    (["--methods", "lora", "--set", "loop.epochs=1,0"], "loop.epochs=0 is out of range"),
    (["--methods", "lora", "--set", "data.n_train=0"], "data.n_train=0 is out of range"),
    (["--methods", "lora", "--set", "loop.caption_max_chars=x"], "'x' is not a valid int"),
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
    """Reduced shapes (llava-tiny: hidden 64, MLP 128, 2 decoder and 2 vision layers) built and timed, then
    extrapolated: counts are the matrices / layers of the whole model, one built layer stands for two."""
    csv = tmp_path / "costs.csv"
    rc = main(["profile", "--methods", "keeplora", "--backbone", "llava-tiny", "--set", "keeplora.rank=8",
               "--layers", "1", "--out", str(csv)])
    assert rc == 0
    frame = pd.read_csv(csv)
    grad = frame[frame["section"] == "grad_estimation"].set_index("part")
    assert grad.loc["decoder layer, fwd+bwd", "count"] == 2 and grad.loc["vision layer, fwd", "count"] == 2
    assert grad.loc["decoder layer, fwd+bwd", "how"] == "1 built, x2"
    assert (grad["seconds"] > 0).all()
    svd = frame[frame["section"] != "grad_estimation"]
    assert set(svd["section"]) == {"pretrained_svd", "grad_svd", "feature_svd"}
    per_kind = svd.drop_duplicates("part").set_index("part")
    assert list(per_kind.index) == ["q/k/v/o", "gate/up", "down"]
    assert list(per_kind["count"]) == [8, 4, 2]  # 4 + 2 + 1 matrices per layer, 2 layers
    assert list(zip(per_kind["d_out"], per_kind["d_in"], strict=True)) == [(64, 64), (128, 64), (64, 128)]
    assert frame["total_seconds"].to_numpy() == pytest.approx((frame["seconds"] * frame["count"]).to_numpy(),
                                                              abs=1e-3)  # the CSV keeps 4 decimals
    feature = svd[svd["section"] == "feature_svd"]
    assert (feature["basis_columns"] <= feature["d_in"]).all() and (feature["basis_columns"] > 0).all()
    out = capsys.readouterr().out
    assert "whole model, extrapolated from 1 built decoder layer(s) to 2" in out


def test_profile_llava_extrapolates_wide_svds_and_says_so(capsys):
    from clbench.settings.mcit.costs import profile_llava

    costs = profile_llava("llava-tiny", layers=2, rank=4, svd_max_dim=64)
    down = {c.section: c for c in costs if c.part == "down"}
    gate = {c.section: c for c in costs if c.part == "gate/up"}
    assert set(down) == {"pretrained_svd", "grad_svd", "feature_svd"}
    for section, cost in down.items():  # (128 / 64)^3 = 8 times gate/up: the widest measured (d_in 64, d_out 128)
        assert cost.how.startswith("EXTRAPOLATED: gate/up")
        assert cost.seconds == pytest.approx(8 * gate[section].seconds)
    assert not any(c.how.startswith("EXTRAPOLATED") for c in costs if c.part != "down")
    assert main(["profile", "--methods", "keeplora", "--backbone", "llava-tiny", "--svd-max-dim", "64"]) == 0
    assert "the SVD sections of down are extrapolated, not measured" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "needle"), [
    (["--methods", "lora", "--backbone", "llava-tiny"], "add keeplora"),
    (["--methods", "keeplora", "--backbone", "llava-99b"], "LLaVA shapes known"),
    (["--methods", "keeplora", "--backbone", "llava-tiny", "--layers", "3"], "between 1 and 2"),
    (["--methods", "keeplora", "--backbone", "llava-tiny", "--svd-max-dim", "8"], "--svd-max-dim 8"),
    (["--methods", "keeplora", "--backbone", "tiny", "--layers", "2"], "apply to LLaVA shapes"),
])
def test_profile_llava_refusals(args, needle, capsys):
    assert main(["profile", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_track_logs_each_methods_rows_and_mcitlib_metrics(tmp_path):
    """``--track tensorboard`` in the LLaVA setting: every task's row under the task names, and MCITlib's metrics
    (MFT / MFN / MAA / BWT) equal to the run's own metrics.json, for each of two methods."""
    pytest.importorskip("tensorboard", reason="--track tensorboard needs the tracking extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "results"
    assert main(["run", "--methods", "lora,keeplora", "--benchmark", "synthetic-mcit", "--preset", "smoke",
                 "--out", str(out), "--quiet", "--track", "tensorboard", "--set", "data.n_train=16",
                 "--set", "data.n_test=4"]) == 0
    for method in ("lora", "keeplora"):
        path = out / "synthetic-mcit-order1" / method / "seed0"
        logdir = out / "tracking" / "tensorboard" / "synthetic-mcit-order1" / method / "seed0"
        events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0}).Reload()
        frame = pd.read_csv(path / "accuracy.csv").set_index("trained_on")
        for task in frame.columns:
            points = [(e.step, e.value) for e in events.Scalars(f"accuracy/{task}")]
            assert [s for s, _ in points] == list(range(1, len(frame) + 1))
            assert [v for _, v in points] == pytest.approx(frame[task].tolist(), abs=1e-4)
        metrics = json.loads((path / "metrics.json").read_text())
        for key in ("mft", "mfn", "maa", "bwt"):
            assert events.Scalars(f"metrics/{key}")[-1].value == pytest.approx(metrics[key], abs=1e-4), (method, key)
