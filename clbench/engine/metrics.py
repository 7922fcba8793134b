"""MTIL metrics from an accuracy matrix, exactly as ZSCL's notebook and KeepLoRA's ``cal_MTIL_metrics``.

``A[t, d]`` is the accuracy (percent) on dataset ``d`` after training task ``t``; rows and columns are both
in training order and the zero-shot row is not part of ``A``.

- Transfer_d = mean_{t<d} A[t, d] for d >= 2; Transfer = mean over those datasets (zero-shot ability on
  datasets not trained yet).
- Average_d = mean_t A[t, d]; Average = mean over all datasets.
- Last_d = A[T-1, d]; Last = mean over all datasets.
- BWT = mean_{d<T} (A[T-1, d] - A[d, d]) (backward transfer; negative = forgetting).

A one-task matrix has no Transfer: it is NaN in memory, ``null`` in ``metrics.json`` with the reason under
``undefined.transfer`` (:data:`TRANSFER_UNDEFINED`), and printed as undefined with that reason.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from clbench.errors import UserError


def mtil_metrics(matrix: np.ndarray, datasets: list[str]) -> dict:
    """Transfer / Average / Last / BWT (percent) plus per-dataset values, from a square matrix."""
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[1] != len(datasets):
        raise ValueError(f"need a square T x T matrix matching {len(datasets)} datasets, got {a.shape}")
    t = a.shape[0]
    transfer = {datasets[d]: float(a[:d, d].mean()) for d in range(1, t)}
    average = {datasets[d]: float(a[:, d].mean()) for d in range(t)}
    last = {datasets[d]: float(a[-1, d]) for d in range(t)}
    bwt = float(np.mean([a[-1, d] - a[d, d] for d in range(t - 1)])) if t > 1 else 0.0
    out = {
        "transfer": float(np.mean(list(transfer.values()))) if transfer else float("nan"),
        "average": float(np.mean(list(average.values()))),
        "last": float(np.mean(list(last.values()))),
        "bwt": bwt,
        "per_dataset": {"transfer": transfer, "average": average, "last": last},
    }
    if not transfer:
        out["undefined"] = {"transfer": TRANSFER_UNDEFINED}
    return out


# Why a one-task sequence has no Transfer (stored as ``undefined.transfer`` beside a null ``transfer``).
TRANSFER_UNDEFINED = ("needs 2+ tasks: Transfer averages the accuracy on each dataset before it is trained, and "
                      "the only dataset of a one-task sequence is trained first")


def undefined_text(metrics: dict, key: str) -> str | None:
    """The reason ``metrics[key]`` has no value (e.g. a one-task run's Transfer), or None when it has one."""
    reasons = metrics.get("undefined")
    reason = reasons.get(key) if isinstance(reasons, dict) else None
    value = metrics.get(key)
    if reason is None and (value is None or (isinstance(value, float) and value != value)):
        reason = TRANSFER_UNDEFINED if key == "transfer" else "undefined"
    return reason if reason is not None and not _finite(value) else None


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and bool(np.isfinite(value))


def metrics_from_json(data: dict) -> dict:
    """``metrics.json`` as read back: a null (undefined) headline metric becomes NaN, as :func:`mtil_metrics` gives."""
    out = dict(data)
    for key in ("transfer", "average", "last", "bwt"):
        if key in out and out[key] is None:
            out[key] = float("nan")
    return out


def matrix_from_frame(frame: pd.DataFrame, source: str = "matrix") -> tuple[np.ndarray, list[str]]:
    """Square matrix from an ``accuracy.csv`` frame, columns matched to rows by dataset name.

    Rows give the training order (``trained_on``); columns may come in any order and may include extra
    datasets never trained on, which are ignored. A trained dataset without a column is an error.
    """
    order = [str(x) for x in frame["trained_on"]]
    if len(set(order)) != len(order):
        raise UserError(f"{source}: trained_on repeats a dataset; each task must appear once")
    missing = [d for d in order if d not in frame.columns]
    if missing:
        raise UserError(f"{source}: no column for trained dataset(s) {', '.join(missing)}; "
                        "add one column per dataset named as in trained_on")
    values = frame[order].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values > 100)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        cell = values[row, col]
        what = "is empty or not a number" if np.isnan(cell) else f"is {cell:g}, outside 0-100"
        raise UserError(f"{source}: the accuracy after {order[row]} on {order[col]} {what} ({int(bad.sum())} such "
                        "cell(s)); every trained task needs an accuracy in percent (0-100) on every trained dataset")
    return values, order


def json_safe(value):
    """``value`` with every non-finite float as ``None`` (JSON ``null``): strict JSON has no NaN or Infinity,
    and a one-task matrix has no Transfer."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
