"""Published MTIL numbers (package data ``clbench/data/literature.csv``), shown as "reported (not re-run)".

File format, one row per (method, benchmark, order, dataset):
``method, benchmark, order, dataset, transfer, average, last, source, verified``. An empty ``dataset``
holds the paper's means (the table's Mean column); a named dataset holds that dataset's Transfer /
Average / Last (empty where the source gives none). ``verified`` is ``yes`` where the numbers were
recomputed from the authors' own result files, ``secondary`` where only a later paper cites them, and
``derived`` where they follow from verified numbers by the protocol's own formula (the Order-II
zero-shot row: the same zero-shot accuracies, reordered).
"""

from __future__ import annotations

from importlib import resources

import pandas as pd

from clbench.reports.names import normalise

COLUMNS = ["method", "benchmark", "order", "dataset", "transfer", "average", "last", "source", "verified"]


def load_literature() -> pd.DataFrame:
    """The packaged literature table, ``dataset`` as a string ('' for the means rows)."""
    with (resources.files("clbench") / "data" / "literature.csv").open() as fh:
        frame = pd.read_csv(fh, dtype={"dataset": str, "method": str, "source": str, "verified": str})
    frame["dataset"] = frame["dataset"].fillna("")
    return frame[COLUMNS]


def literature_for(benchmark: str | None, order: int | None, own_rule: bool = True) -> pd.DataFrame:
    """Rows for one benchmark and order (none when either is unknown, or when the runs were evaluated under
    another rule than the benchmark's own, e.g. MTIL under ``--eval union``: the published numbers would not
    compare)."""
    frame = load_literature()
    if benchmark is None or order is None or not own_rule:
        return frame.iloc[0:0]
    return frame[(frame["benchmark"] == benchmark) & (frame["order"] == int(order))].reset_index(drop=True)


def match_datasets(rows: pd.DataFrame, datasets: list[str]) -> pd.DataFrame:
    """Rename per-dataset rows to the table's dataset names (matched by normalised name); rows whose
    dataset is not in the table are dropped."""
    by_key = {normalise(d): d for d in datasets}
    rows = rows.copy()
    rows["dataset"] = [d if d == "" else by_key.get(normalise(d)) for d in rows["dataset"]]
    return rows[rows["dataset"].notna()].reset_index(drop=True)
