"""MCITlib's aggregate metrics (MFT, MFN, MAA, BWT) and an MTIL-style Transfer from a full T x T score matrix.

``A[t, i]`` is the score (percent) of task ``i`` after training task ``t``, rows and columns in training order;
caption tasks use their averaged caption score. The four MCITlib metrics (Guo et al., arXiv 2508.07307) use the
lower triangle and diagonal; Transfer uses the upper triangle, which KeepLoRA evaluates too (every task after every
task):

- MFT = (1/T) sum_i A[i, i]                       mean fine-tune score (each task right after training it)
- MFN = (1/T) sum_i A[T, i]                       mean final score (HiDe-LLaVA's "Last")
- MAA = (1/T) sum_t (1/t) sum_{i<=t} A[t, i]      mean average accuracy over the seen tasks, after every task
- BWT = (1/(T-1)) sum_{i<T} (A[T, i] - A[i, i])   backward transfer (negative = forgetting)
- Transfer = mean over tasks i >= 2 of mean_{t<i} A[t, i]   (ZSCL's MTIL Transfer on the upper triangle)
"""

from __future__ import annotations

import numpy as np

LABELS = {"mft": "MFT", "mfn": "MFN", "maa": "MAA", "bwt": "BWT", "transfer": "Transfer"}
ORDER = ("mft", "mfn", "maa", "bwt", "transfer")


def mcit_metrics(matrix: np.ndarray, tasks: list[str]) -> dict:
    """MFT / MFN / MAA / BWT / Transfer (percent) and per-task values from a square T x T matrix.

    The upper triangle is needed only for Transfer; where it holds NaN (not evaluated), Transfer is NaN.
    """
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[1] != len(tasks):
        raise ValueError(f"need a square T x T matrix matching {len(tasks)} tasks, got {a.shape}")
    t = a.shape[0]
    lower = a[np.tril_indices(t)]
    if np.isnan(lower).any():
        raise ValueError("the diagonal and lower triangle must be complete (every seen task scored after every task)")
    diag = np.diag(a)
    transfer = {tasks[i]: float(a[:i, i].mean()) for i in range(1, t)}
    return {
        "mft": float(diag.mean()),
        "mfn": float(a[-1].mean()),
        "maa": float(np.mean([a[k, : k + 1].mean() for k in range(t)])),
        "bwt": float(np.mean(a[-1, :-1] - diag[:-1])) if t > 1 else 0.0,
        "transfer": float(np.mean(list(transfer.values()))) if transfer else float("nan"),
        "per_task": {"finetune": dict(zip(tasks, map(float, diag), strict=True)),
                     "final": dict(zip(tasks, map(float, a[-1]), strict=True)),
                     "transfer": transfer},
    }
