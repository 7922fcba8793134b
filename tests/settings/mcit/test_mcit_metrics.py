"""MCITlib metrics against values worked out by hand on a 3 x 3 matrix, and the ``clbench metrics --setting mcit``
command on a matrix file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clbench.settings.mcit.metrics import mcit_metrics

# rows: after task t; columns: task i (upper triangle = not yet trained)
A = np.array([[80.0, 10.0, 20.0],
              [60.0, 90.0, 30.0],
              [50.0, 70.0, 100.0]])


def test_metrics_by_hand():
    m = mcit_metrics(A, ["a", "b", "c"])
    assert m["mft"] == pytest.approx((80 + 90 + 100) / 3)
    assert m["mfn"] == pytest.approx((50 + 70 + 100) / 3)
    assert m["maa"] == pytest.approx((80 + (60 + 90) / 2 + (50 + 70 + 100) / 3) / 3)
    assert m["bwt"] == pytest.approx(((50 - 80) + (70 - 90)) / 2)
    assert m["transfer"] == pytest.approx((10 + (20 + 30) / 2) / 2)


def test_missing_upper_triangle_gives_nan_transfer_but_missing_lower_is_an_error():
    b = A.copy()
    b[0, 1] = np.nan
    assert np.isnan(mcit_metrics(b, ["a", "b", "c"])["transfer"])
    b = A.copy()
    b[2, 0] = np.nan
    with pytest.raises(ValueError, match="lower triangle"):
        mcit_metrics(b, ["a", "b", "c"])


def test_metrics_command_with_mcit_setting(tmp_path, capsys):
    from clbench.cli.app import main

    path = tmp_path / "accuracy.csv"
    path.write_text("trained_on,a,b,c\na,80,10,20\nb,60,90,30\nc,50,70,100\n")
    assert main(["metrics", str(path), "--setting", "mcit", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mft"] == pytest.approx(90.0) and out["bwt"] == pytest.approx(-25.0)
    assert main(["metrics", str(path), "--setting", "mcit"]) == 0
    text = capsys.readouterr().out
    assert "MFT" in text and "MAA" in text
    assert main(["metrics", str(path), "--setting", "nope"]) == 2
