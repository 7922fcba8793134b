"""``clbench report``: numbers against an independent pandas computation, emphasis placement, the three
formats carrying the same cells, external matrices, the literature block, figures, costs and bad input.

The LaTeX is checked structurally here (booktabs rules, column count, balanced braces, ``\\textbf`` /
``\\underline`` on the right cells); tests/reports/test_latex_compiles.py compiles it with pdflatex."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fake_runs import DATASETS, write_external_csv, write_fake_run

import clbench
from clbench.cli.app import main
from clbench.reports.names import abbreviate_dataset

BLOCKS = ["Transfer", "Average", "Last"]
DISPLAY = {"lora": "LoRA", "inflora": "InfLoRA", "finetune": "Fine-tune"}


# ---------------------------------------------------------------- independent expectations (pandas only)

def expected_cells(matrix_csv: Path) -> dict[tuple[str, str], float]:
    """Transfer / Average / Last per dataset and their means, straight from the definition."""
    a = pd.read_csv(matrix_csv).set_index("trained_on")
    a = a[list(a.index)]
    out: dict[tuple[str, str], float] = {}
    for d, name in enumerate(a.columns):
        out[("Transfer", name)] = a.iloc[:d, d].mean() if d > 0 else np.nan  # nothing unseen before task 1
        out[("Average", name)] = a.iloc[:, d].mean()
        out[("Last", name)] = a.iloc[-1, d]
    for block in BLOCKS:
        out[(block, "Mean")] = np.mean([v for (b, _), v in out.items() if b == block and not np.isnan(v)])
    return out


def expected_table(run_dirs: dict[str, list[Path]]) -> pd.DataFrame:
    """Mean and sample std over seeds per (method, block, dataset)."""
    rows = []
    for label, dirs in run_dirs.items():
        seeds = pd.DataFrame([expected_cells(d / "accuracy.csv") for d in dirs])
        for block, dataset in seeds.columns:
            col = seeds[(block, dataset)]
            rows.append({"method": label, "block": block, "dataset": dataset, "mean": col.mean(),
                         "std": col.std() if len(dirs) > 1 else np.nan})
    return pd.DataFrame(rows)


def expected_emphasis(table: pd.DataFrame) -> dict[tuple[str, str, str], str]:
    """best / second on the printed (one-decimal) means, per block and dataset; bold needs two values,
    underline three."""
    out = {}
    for (block, dataset), cells in table.groupby(["block", "dataset"]):
        shown = cells.set_index("method")["mean"].map(lambda v: float(f"{v:.1f}"))  # as printed
        ordered = sorted(set(shown), reverse=True)
        for method, value in shown.items():
            best = len(shown) >= 2 and value == ordered[0]
            second = len(shown) >= 3 and len(ordered) > 1 and value == ordered[1]
            out[(method, block, dataset)] = "best" if best else "second" if second else ""
    return out


SHORT = {"Aircraft": "Aircraft", "Caltech101": "Caltech", "CIFAR100": "CIFAR", "OxfordPet": "Pets", "Mean": "Mean"}


def expected_cell_lookup(run_dirs: dict[str, list[Path]]) -> dict[tuple[str, str, str], tuple[float, float, str]]:
    """(method, block, short column) -> (mean, std, emphasis), all computed independently of clbench."""
    table = expected_table(run_dirs)
    marks = expected_emphasis(table.dropna(subset=["mean"]))
    return {(r.method, r.block, SHORT[r.dataset]): (r.mean, r.std, marks.get((r.method, r.block, r.dataset), ""))
            for r in table.itertuples()}


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def results(tmp_path: Path) -> tuple[Path, dict[str, list[Path]]]:
    """Three methods x two seeds (complete), one unfinished run that must be skipped."""
    out = tmp_path / "results"
    dirs = {DISPLAY[m]: [write_fake_run(out, m, s, with_state=m == "inflora") for s in (0, 1)]
            for m in ("lora", "inflora", "finetune")}
    write_fake_run(out, "zscl", 0, status="running")
    return out, dirs


def read_csv_report(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    frame["emphasis"] = frame["emphasis"].fillna("")
    return frame


# ---------------------------------------------------------------- the comparison table

def test_csv_numbers_rows_blocks_and_emphasis(results, tmp_path, capsys):
    res, dirs = results
    code, out, err = run(["report", res, "--format", "csv", "--out", tmp_path / "rep"], capsys)
    assert code == 0, err
    assert "skipping" in err and "zscl" in err and "running" in err
    got = read_csv_report(tmp_path / "rep" / "synthetic-order1.csv")
    assert list(dict.fromkeys(got["block"])) == BLOCKS
    assert set(got["method"]) == set(dirs) and "ZSCL" not in set(got["method"])
    assert (got["seeds"] == 2).all() and set(got["section"]) == {"run here"}
    want = expected_table(dirs)
    merged = got.merge(want, on=["method", "block", "dataset"], suffixes=("", "_want"), how="outer",
                       indicator=True)
    assert (merged["_merge"] == "both").all()
    first = merged["dataset"] == DATASETS[0]
    assert merged.loc[first & (merged["block"] == "Transfer"), "mean"].isna().all()
    np.testing.assert_allclose(merged["mean"], merged["mean_want"], atol=2e-4, equal_nan=True)
    np.testing.assert_allclose(merged["std"], merged["std_want"], atol=2e-4, equal_nan=True)
    marks = expected_emphasis(want.dropna(subset=["mean"]))
    for rec in got.dropna(subset=["mean"]).itertuples():
        assert rec.emphasis == marks[(rec.method, rec.block, rec.dataset)], rec
    assert {"best", "second"} <= set(got["emphasis"])
    assert list(got["column"].unique()) == [abbreviate_dataset(d) for d in DATASETS] + ["Mean"]
    assert list(got["column"].unique())[:4] == ["Aircraft", "Caltech", "CIFAR", "Pets"]


def latex_rows(tex: str) -> list[list[str]]:
    body = tex.split("\\midrule", 1)[1].split("\\bottomrule")[0]
    return [[c.strip() for c in re.split(r"(?<!\\)&", line.strip()[:-2])] for line in body.splitlines()
            if line.strip().endswith("\\\\")]


def unwrap(cell: str) -> tuple[str, str]:
    for mark, cmd in (("best", "\\textbf{"), ("second", "\\underline{")):
        if cell.startswith(cmd):
            assert cell.endswith("}")
            return cell[len(cmd):-1], mark
    return cell, ""


def assert_balanced(tex: str) -> None:
    depth = 0
    for ch in re.sub(r"\\[{}]", "", tex):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0


def test_latex_structure_cells_and_emphasis(results, tmp_path, capsys):
    res, dirs = results
    assert run(["report", res, "--format", "latex", "--out", tmp_path / "rep"], capsys)[0] == 0
    tex = (tmp_path / "rep" / "synthetic-order1.tex").read_text()
    want = expected_cell_lookup(dirs)
    for rule in ("\\toprule", "\\midrule", "\\bottomrule"):
        assert rule in tex
    assert "\\cline" not in tex and "\\hline" not in tex
    assert_balanced(tex)
    spec = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", tex).group(1)
    assert spec == "ll" + "r" * (len(DATASETS) + 1)
    header = tex.split("\\toprule", 1)[1].split("\\\\")[0]
    assert [c.strip() for c in header.split("&")][2:] == ["Aircraft", "Caltech", "CIFAR", "Pets", "Mean"]
    rows = latex_rows(tex)
    assert len(rows) == 3 * 3 and all(len(r) == len(spec) for r in rows)
    block = None
    for row in rows:
        if row[0]:
            block = re.fullmatch(r"\\multirow\[t\]\{3\}\{\*\}\{(\w+)\}", row[0]).group(1)
        method = re.fullmatch(r"(.+) \(2 seeds\)", row[1]).group(1)
        for column, cell in zip(["Aircraft", "Caltech", "CIFAR", "Pets", "Mean"], row[2:], strict=True):
            mean, std, emphasis = want[(method, block, column)]
            text, mark = unwrap(cell)
            assert mark == emphasis, (method, block, column)
            assert text == ("--" if np.isnan(mean) else f"{mean:.1f}{{\\scriptsize$\\pm${std:.1f}}}")
    assert [r[0] != "" for r in rows].count(True) == 3  # one multirow label per block


def test_markdown_carries_the_same_cells(results, tmp_path, capsys):
    res, dirs = results
    assert run(["report", res, "--format", "markdown", "--out", tmp_path / "rep"], capsys)[0] == 0
    md = (tmp_path / "rep" / "synthetic-order1.md").read_text().splitlines()
    want = expected_cell_lookup(dirs)
    header = [c.strip() for c in md[0].strip("|").split("|")]
    assert header == ["Block", "Method", "Aircraft", "Caltech", "CIFAR", "Pets", "Mean"]
    block, checked = None, 0
    for line in md[2:11]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        block = cells[0] or block
        method = cells[1].removesuffix(" (2 seeds)")
        for column, cell in zip(header[2:], cells[2:], strict=True):
            mean, std, emphasis = want[(method, block, column)]
            mark = "best" if cell.startswith("**") else "second" if cell.startswith("<ins>") else ""
            text = re.sub(r"^\*\*|\*\*$|^<ins>|</ins>$", "", cell)
            assert mark == emphasis, (method, block, column)
            assert text == ("–" if np.isnan(mean) else f"{mean:.1f} ± {std:.1f}")
            checked += 1
    assert checked == 9 * 5


def test_runs_differing_in_settings_are_separate_rows(tmp_path, capsys):
    res = tmp_path / "results"
    write_fake_run(res / "a", "lora", 0, hparams={"rank": 4})
    write_fake_run(res / "b", "lora", 0, hparams={"rank": 8})
    code, _, err = run(["report", res, "--format", "csv", "--out", tmp_path / "rep"], capsys)
    assert code == 0, err
    got = read_csv_report(tmp_path / "rep" / "synthetic-order1.csv")
    assert set(got["method"]) == {"LoRA (rank=4)", "LoRA (rank=8)"}
    assert (got["seeds"] == 1).all()


# ---------------------------------------------------------------- external matrices

def test_external_matrices_become_labelled_rows(results, tmp_path, capsys):
    res, dirs = results
    first = write_external_csv(tmp_path / "official_keeplora.csv", rng_seed=3, shuffle_columns=True)
    second = write_external_csv(tmp_path / "other_lab.csv", rng_seed=4)
    code, _, err = run(["report", res, first, second, "--label", "KeepLoRA (official)", "--format", "csv",
                        "--out", tmp_path / "rep"], capsys)
    assert code == 0, err
    got = read_csv_report(tmp_path / "rep" / "synthetic-order1.csv")
    ext = got[got["section"] == "external matrix"]
    assert list(dict.fromkeys(ext["method"])) == ["KeepLoRA (official)", "other_lab"]
    assert ext["seeds"].isna().all() and ext["std"].isna().all()
    for label, path in (("KeepLoRA (official)", first), ("other_lab", second)):
        cells = expected_cells(path)
        for rec in ext[ext["method"] == label].itertuples():
            want = cells.get((rec.block, rec.dataset), np.nan)
            assert (np.isnan(rec.mean) and np.isnan(want)) or abs(rec.mean - want) < 2e-4
    # external rows are ranked with the runs
    table = pd.concat([expected_table(dirs)] + [
        pd.DataFrame([{"method": lab, "block": b, "dataset": d, "mean": v} for (b, d), v in expected_cells(p).items()])
        for lab, p in (("KeepLoRA (official)", first), ("other_lab", second))])
    marks = expected_emphasis(table)
    for rec in got.dropna(subset=["mean"]).itertuples():
        assert rec.emphasis == marks[(rec.method, rec.block, rec.dataset)]


# ---------------------------------------------------------------- literature

LITERATURE = Path(clbench.__file__).parent / "data" / "literature.csv"
ORDER_I = ["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet",
           "StanfordCars", "SUN397"]


def test_literature_block_matches_benchmark_and_order(tmp_path, capsys):
    res = tmp_path / "results"
    write_fake_run(res, "lora", 0, datasets=ORDER_I, benchmark="mtil", order=1, sections=("train",))
    write_fake_run(res, "keeplora", 0, datasets=ORDER_I, benchmark="mtil", order=1, sections=("train",))
    for fmt in ("csv", "latex"):
        code, _, err = run(["report", res, "--with-literature", "--format", fmt, "--out", tmp_path / "rep"], capsys)
        assert code == 0, err
    got = read_csv_report(tmp_path / "rep" / "mtil-order1.csv")
    lit = pd.read_csv(LITERATURE, keep_default_na=False, na_values=[""])
    lit1 = lit[(lit["benchmark"] == "mtil") & (lit["order"] == 1)]
    reported = got[got["section"] == "reported (not re-run)"]
    names = {m.removesuffix(" (secondary)") for m in reported["method"]}
    assert names == set(lit1["method"])
    assert (reported["emphasis"] == "").all() and reported["std"].isna().all()
    for rec in lit1.itertuples():
        dataset = rec.dataset if isinstance(rec.dataset, str) and rec.dataset else "Mean"
        rows = reported[(reported["method"].str.removesuffix(" (secondary)") == rec.method)
                        & (reported["dataset"] == dataset)]
        for block, value in (("Transfer", rec.transfer), ("Average", rec.average), ("Last", rec.last)):
            shown = rows[rows["block"] == block]["mean"].iloc[0]
            assert (np.isnan(value) and np.isnan(shown)) or shown == pytest.approx(value)
    zs = reported[(reported["method"] == "Zero-shot CLIP (prompt ensemble)") & (reported["dataset"] == "Mean")]
    assert zs[zs["block"] == "Transfer"]["mean"].iloc[0] == pytest.approx(69.4)  # Order I, not II's 65.4
    measured = got[got["section"] == "run here"]
    assert set(measured["method"]) == {"LoRA", "KeepLoRA"} and "best" in set(measured["emphasis"])
    tex = (tmp_path / "rep" / "mtil-order1.tex").read_text()
    assert "{*}{reported}" in tex and "{*}{run}" in tex  # compact LaTeX: short section names, the caption says more
    assert "Reported rows are copied from their sources, not re-run" in tex
    assert_balanced(tex)


def test_literature_on_another_benchmark_warns_and_adds_nothing(results, tmp_path, capsys):
    res, _ = results
    code, _, err = run(["report", res, "--with-literature", "--format", "csv", "--out", tmp_path / "rep"], capsys)
    assert code == 0
    assert "no literature rows" in err
    assert set(read_csv_report(tmp_path / "rep" / "synthetic-order1.csv")["section"]) == {"run here"}


def test_literature_file_is_self_consistent():
    """Per-dataset rows average to the reported means (to the papers' one-decimal rounding)."""
    lit = pd.read_csv(LITERATURE, keep_default_na=False, na_values=[""])
    assert list(lit.columns) == ["method", "benchmark", "order", "dataset", "transfer", "average", "last",
                                 "source", "verified"]
    assert lit["source"].str.len().gt(0).all() and set(lit["verified"]) <= {"yes", "secondary", "derived"}
    checked = 0
    for (method, order), group in lit.groupby(["method", "order"]):
        means = group[group["dataset"].isna()]
        per = group[group["dataset"].notna()]
        assert len(means) == 1
        for block in ("transfer", "average", "last"):
            values = per[block].dropna()
            if len(values) >= 10:
                assert values.mean() == pytest.approx(means[block].iloc[0], abs=0.06), (method, order, block)
                checked += 1
    assert checked >= 15


# ---------------------------------------------------------------- figures and costs

@pytest.mark.slow  # ~4 s idle, ~10 s on a loaded 2-core machine: six figures in two formats
def test_figures_written_and_non_empty(tmp_path, capsys):
    res = tmp_path / "results"
    short = DATASETS[:3]
    write_fake_run(res, "lora", 0, datasets=short)
    write_fake_run(res, "inflora", 0, datasets=short, with_state=True)
    code, out, err = run(["report", res, "--figures", "--format", "markdown", "--out", tmp_path / "rep"], capsys)
    assert code == 0, err
    figs = tmp_path / "rep" / "figures"
    stems = ["heatmap_LoRA_seed0", "heatmap_InfLoRA_seed0", "metrics", "costs", "state_growth",
             "accuracy_over_tasks"]
    for stem in stems:
        png = figs / f"synthetic-order1_{stem}.png"
        pdf = figs / f"synthetic-order1_{stem}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, stem
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2000, stem
    assert len(list(figs.iterdir())) == 2 * len(stems)


def test_heatmap_has_zero_shot_row_and_marked_diagonal(tmp_path):
    from clbench.reports.figures import heatmap
    from clbench.reports.loading import collect

    path = write_fake_run(tmp_path, "lora", 0, datasets=DATASETS[:3])
    m = collect([tmp_path]).matrices[0]
    ax = heatmap(m).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["zero-shot", "after Aircraft", "after Caltech",
                                                             "after CIFAR"]
    assert ax.get_xlabel() and ax.get_ylabel()
    image = ax.get_images()[0].get_array()
    zeroshot = pd.read_csv(path / "zeroshot.csv").iloc[0, 1:].to_numpy(float)
    np.testing.assert_allclose(image[0], zeroshot, atol=1e-3)
    corners = sorted({p.get_xy() for p in ax.patches if p.get_width() == 1})
    assert corners == [(t - 0.5, t + 1 - 0.5) for t in range(3)]  # one box per task, on the diagonal below zero-shot


def test_costs_table_against_profiles(results, tmp_path, capsys):
    res, dirs = results
    for fmt in ("csv", "latex", "markdown"):
        code, _, err = run(["report", res, "--costs", "--format", fmt, "--out", tmp_path / "rep"], capsys)
        assert code == 0, err
    got = pd.read_csv(tmp_path / "rep" / "synthetic-order1_costs.csv")
    for label, run_dirs in dirs.items():
        per_seed = []
        for d in run_dirs:
            prof = pd.read_csv(d / "profile.csv")
            g = prof.groupby("section")
            per_seed.append(pd.DataFrame({"seconds_mean": g["seconds"].mean(), "seconds_total": g["seconds"].sum(),
                                          "peak_mib_mean": g["peak_bytes"].mean() / 2**20,
                                          "peak_mib_max": g["peak_bytes"].max() / 2**20}))
        want = pd.concat(per_seed).groupby(level=0).mean()
        mine = got[got["method"] == label].set_index("section")
        assert set(mine.index) == {"setup", "eval", "train", "merge"} == set(want.index)
        assert (mine["seeds"] == 2).all()
        assert mine.loc["eval", "tasks"] == len(DATASETS) + 1  # zero-shot pass + one per task
        for col in want.columns:
            np.testing.assert_allclose(mine.loc[want.index, col], want[col], rtol=1e-4)
    tex = (tmp_path / "rep" / "synthetic-order1_costs.tex").read_text()
    md = (tmp_path / "rep" / "synthetic-order1_costs.md").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "\\cline" not in tex
    assert_balanced(tex)
    lora_train = got[(got["method"] == "LoRA") & (got["section"] == "train")].iloc[0]
    for text in (tex, md):
        assert f"{lora_train['seconds_mean']:.2f}" in text and f"{lora_train['seconds_total']:.1f}" in text
        assert "CPU process RSS" in text


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

def _corrupt_metrics(res: Path) -> None:
    (next(res.rglob("metrics.json"))).write_text("{ not json")


def _inconsistent_metrics(res: Path) -> None:
    path = next(res.rglob("metrics.json"))
    data = json.loads(path.read_text())
    data["average"] += 3.0
    path.write_text(json.dumps(data))


def _corrupt_accuracy(res: Path) -> None:
    (next(res.rglob("accuracy.csv"))).write_text("trained_on,Aircraft\nAircraft,not-a-number\n")


def _missing_metrics(res: Path) -> None:
    next(res.rglob("metrics.json")).unlink()


@pytest.mark.parametrize("damage, message", [
    (_corrupt_metrics, "corrupt"),
    (_inconsistent_metrics, "disagrees"),
    (_corrupt_accuracy, "accuracy"),
    (_missing_metrics, "without metrics.json"),
])
def test_damaged_run_is_an_error(tmp_path, capsys, damage, message):
    res = tmp_path / "results"
    for m in ("lora", "inflora"):
        write_fake_run(res, m, 0)
    damage(res)
    assert_user_error(["report", res, "--out", tmp_path / "rep"], message, tmp_path / "rep", capsys)


def assert_user_error(args, message: str, out: Path, capsys) -> None:
    code, stdout, err = run(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert "Traceback" not in err and not stdout.strip()
    assert not out.exists()


def test_bad_inputs(tmp_path, capsys):
    out = tmp_path / "rep"
    assert_user_error(["report", "--out", out], "no input", out, capsys)
    (tmp_path / "empty").mkdir()
    assert_user_error(["report", tmp_path / "empty", "--out", out], "no runs", out, capsys)
    assert_user_error(["report", tmp_path / "missing", "--out", out], "does not exist", out, capsys)
    running = tmp_path / "running"
    write_fake_run(running, "lora", 0, status="running")
    write_fake_run(running, "inflora", 0, status="failed")
    assert_user_error(["report", running, "--out", out], "no complete runs", out, capsys)
    mixed = tmp_path / "mixed"
    write_fake_run(mixed, "lora", 0, order=1)
    write_fake_run(mixed, "lora", 0, order=2)
    assert_user_error(["report", mixed, "--out", out], "report each apart", out, capsys)
    one = tmp_path / "one"
    write_fake_run(one, "lora", 0)
    other = write_external_csv(tmp_path / "other.csv", datasets=["A", "B", "C"])
    assert_user_error(["report", one, other, "--out", out], "one task list", out, capsys)
    assert_user_error(["report", one, "--label", "x", "--out", out], "--label", out, capsys)
    assert_user_error(["report", one, "--format", "html", "--out", out], "--format", out, capsys)
    assert_user_error(["report", one, one / "synthetic-order1" / "lora" / "seed0" / "config.json", "--out", out],
                      "neither", out, capsys)
    twin = tmp_path / "twin"
    write_fake_run(twin, "lora", 0)
    assert_user_error(["report", one, twin, "--out", out], "pass only one", out, capsys)
    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("")
    assert_user_error(["report", one, empty_csv, "--out", out], "cannot read", out, capsys)


def test_booktabs_rules_replaces_clines():
    from clbench.reports.tables import booktabs_rules

    tex = "a \\\\\n\\cline{1-5} \\cline{2-5}\nb \\\\\n\\cline{2-5}\nc \\\\\n\\cline{1-5}\n\\bottomrule\n"
    assert booktabs_rules(tex) == "a \\\\\n\\midrule\nb \\\\\n\\cmidrule(l){2-5}\nc \\\\\n\\bottomrule\n"


# the standard MTIL rows: the display name of each registered method is its name in literature.csv
MTIL_BASELINES = {"lwf": "LwF", "lwf-vr": "LwF-VR", "icarl": "iCaRL", "wise-ft": "WiSE-FT",
                  "moe-adapters": "MoE-Adapters", "diki": "DIKI"}
ORDER_II = ["StanfordCars", "Food", "MNIST", "OxfordPet", "Flowers", "SUN397", "Aircraft", "Caltech101", "DTD",
            "EuroSAT", "CIFAR100"]


def markdown_rows(text: str) -> list[tuple[str, str]]:
    """(block, method label) of every body row of a Markdown report table, blocks carried down."""
    out, block = [], ""
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")][2:]  # header and alignment rows
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        block = cells[0] or block
        label = cells[2] if cells[1] in ("", "run here", "reported (not re-run)", "reference") else cells[1]
        out.append((block, label))
    return out


@pytest.mark.parametrize("order", [1, 2])
def test_literature_row_sits_right_below_the_run_of_the_same_name(tmp_path, capsys, monkeypatch, order):
    from clbench.methods import Method
    from clbench.methods.registry import _METHODS
    from clbench.reports.names import method_display

    for name in MTIL_BASELINES:  # methods of other branches: a placeholder class where one is not registered yet
        if name not in _METHODS:
            monkeypatch.setitem(_METHODS, name, type(name, (Method,), {"__doc__": "placeholder"}))
    assert {n: method_display(n) for n in MTIL_BASELINES} == MTIL_BASELINES
    res = tmp_path / "results"
    for name in ["lora", *MTIL_BASELINES]:
        write_fake_run(res, name, 0, datasets=ORDER_I if order == 1 else ORDER_II, benchmark="mtil", order=order,
                       sections=("train",))
    code, _, err = run(["report", res, "--with-literature", "--format", "markdown", "--out", tmp_path / "rep"],
                       capsys)
    assert code == 0, err
    rows = markdown_rows((tmp_path / "rep" / f"mtil-order{order}.md").read_text())
    lit = pd.read_csv(LITERATURE, keep_default_na=False)
    published = set(lit[(lit["benchmark"] == "mtil") & (lit["order"] == order)]["method"])
    paired = [d for d in MTIL_BASELINES.values() if d in published]
    assert len(paired) == (6 if order == 1 else 4)
    for block in BLOCKS:
        labels = [label for b, label in rows if b == block]
        for display in paired:
            at = labels.index(f"{display} (1 seed)")
            assert labels[at + 1].removesuffix(" (secondary)") == display, (block, labels)
        # published rows without a run here stay after every measured row
        unpaired = [m for m in labels if m.removesuffix(" (secondary)") in published - set(paired)]
        last_run = max(i for i, m in enumerate(labels) if m.endswith("(1 seed)"))
        assert unpaired and all(labels.index(m) > last_run for m in unpaired)
