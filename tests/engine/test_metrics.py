"""MTIL metrics against ZSCL's own Order-I matrix, and `clbench metrics` column alignment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clbench.cli.app import main
from clbench.engine.metrics import matrix_from_frame, mtil_metrics

GOLDEN = Path(__file__).parents[1] / "data" / "golden_zscl_order1.csv"


def test_golden_zscl_order1() -> None:
    matrix, names = matrix_from_frame(pd.read_csv(GOLDEN))
    m = mtil_metrics(matrix, names)
    assert (round(m["transfer"], 1), round(m["average"], 1), round(m["last"], 1)) == (68.1, 75.4, 83.6)


def test_definitions_on_a_small_matrix() -> None:
    a = np.array([[10.0, 20.0, 30.0], [11.0, 40.0, 33.0], [9.0, 35.0, 50.0]])
    m = mtil_metrics(a, ["a", "b", "c"])
    assert m["transfer"] == pytest.approx(np.mean([20.0, np.mean([30.0, 33.0])]))
    assert m["average"] == pytest.approx(a.mean(0).mean())
    assert m["last"] == pytest.approx(a[-1].mean())
    assert m["bwt"] == pytest.approx(np.mean([9.0 - 10.0, 35.0 - 40.0]))
    assert set(m["per_dataset"]["transfer"]) == {"b", "c"}


def test_cli_metrics_aligns_columns_by_name(tmp_path: Path, capsys) -> None:
    frame = pd.read_csv(GOLDEN)
    shuffled = frame[["trained_on"] + list(reversed(frame.columns[1:]))]
    path = tmp_path / "shuffled.csv"
    shuffled.to_csv(path, index=False)
    assert main(["metrics", str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    expected = mtil_metrics(*matrix_from_frame(frame))
    assert got["transfer"] == pytest.approx(expected["transfer"])
    assert got["last"] == pytest.approx(expected["last"])


def test_cli_metrics_missing_column_is_one_line_error(tmp_path: Path, capsys) -> None:
    frame = pd.read_csv(GOLDEN).drop(columns=["DTD"])
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    assert main(["metrics", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "DTD" in err and len(err.splitlines()) == 1 and "Traceback" not in err
