"""The LaTeX that ``clbench report`` writes compiles with pdflatex (booktabs + multirow, as its header says), for
the names that need care in TeX: methods with ``+``, hyperparameters and X-TAIL domains with ``_``, literature
rows, the cost table and the sensitivity table. Skipped where pdflatex is missing; ``.ci/run`` installs it from
Debian's texlive packages so CI compiles every table."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fake_runs import write_fake_run

from clbench.cli.app import main
from clbench.datasets import mtil_names, xtail_names

PDFLATEX = shutil.which("pdflatex")
# .ci/run sets this: there a missing pdflatex is a failure, not a skip.
REQUIRED = os.environ.get("CLBENCH_REQUIRE_PDFLATEX") == "1"
pytestmark = pytest.mark.skipif(PDFLATEX is None and not REQUIRED, reason="pdflatex is not installed (Debian: "
                                "texlive-latex-base, texlive-latex-recommended, texlive-latex-extra)")

# A wide page, so that only compile errors fail here; the page-width tests below use a paper's page.
PREAMBLE = "\n".join([r"\documentclass{article}", r"\usepackage[T1]{fontenc}",
                      r"\usepackage[a3paper,landscape,margin=1cm]{geometry}"])
ONE_COLUMN = "\n".join([r"\documentclass{article}", r"\usepackage[T1]{fontenc}",
                        r"\usepackage[a4paper,margin=2cm]{geometry}"])
TWO_COLUMN = "\n".join([r"\documentclass[twocolumn]{article}", r"\usepackage[T1]{fontenc}",
                        r"\usepackage[a4paper,margin=2cm]{geometry}"])


def needed_packages(tex: str) -> str:
    """The packages a table's first line says it needs (``% needs \\usepackage{...}``)."""
    found = re.search(r"% needs \\usepackage\{([^}]*)\}", tex)
    return found.group(1) if found else "booktabs"


def compile_table(table: Path, work: Path, preamble: str = PREAMBLE) -> str:
    """Compile ``table`` inside a minimal article; returns the log. Fails with the log's error lines."""
    assert PDFLATEX, "pdflatex is required here (CLBENCH_REQUIRE_PDFLATEX=1) but not installed"
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(table, work / "table.tex")
    packages = needed_packages(table.read_text())
    (work / "doc.tex").write_text(preamble + f"\n\\usepackage{{{packages}}}\n\\begin{{document}}\n"
                                  "\\input{table.tex}\n\\end{document}\n")
    done = subprocess.run([PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape", "doc.tex"],
                          cwd=work, capture_output=True, text=True, timeout=120)
    log = (work / "doc.log").read_text(errors="replace") if (work / "doc.log").exists() else done.stdout
    errors = [line for line in log.splitlines() if line.startswith("!") or "Missing character" in line]
    assert done.returncode == 0 and not errors, f"{table.name} does not compile:\n" + "\n".join(
        errors or log.splitlines()[-30:])
    assert (work / "doc.pdf").read_bytes()[:4] == b"%PDF"
    return log


def written_tables(out: Path) -> list[Path]:
    tables = sorted(out.rglob("*.tex"))
    assert tables, f"no .tex written under {out}"
    return tables


def test_results_and_cost_tables_compile(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for method in ("keeplora+", "keeplora++", "lora", "inflora"):
        for seed in (0, 1):
            write_fake_run(runs, method, seed, with_state=method == "inflora")
    assert main(["report", str(runs), "--format", "latex", "--costs", "--out", str(tmp_path / "rep")]) == 0
    tables = written_tables(tmp_path / "rep")
    assert len(tables) >= 2  # accuracy table and cost table
    for table in tables:
        compile_table(table, tmp_path / "tex" / table.stem)


@pytest.mark.parametrize("bench_name, names", [("mtil", mtil_names.ORDER_I), ("xtail", xtail_names.ORDER_I)])
def test_tables_with_literature_compile(tmp_path: Path, bench_name: str, names: list[str]) -> None:
    runs = tmp_path / "runs"
    for method in ("keeplora", "zscl"):
        write_fake_run(runs, method, 0, datasets=list(names), benchmark=bench_name, order=1, sections=("train",))
    assert main(["report", str(runs), "--format", "latex", "--with-literature", "--out", str(tmp_path / "rep")]) == 0
    for table in written_tables(tmp_path / "rep"):
        compile_table(table, tmp_path / "tex" / table.stem)


def test_sensitivity_table_compiles(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for i, (rank, eps) in enumerate((r, e) for r in (4, 8) for e in (0.9, 0.95)):
        for seed in (0, 1):
            write_fake_run(runs / f"k{i}", "keeplora", seed, hparams={"rank": rank, "eps_f": eps},
                           rng_seed=10 * i + seed)
    for key in ("keeplora.eps_f", "keeplora.rank"):
        out = tmp_path / key
        assert main(["report", str(runs), "--sensitivity", key, "--format", "latex", "--out", str(out)]) == 0
        for table in written_tables(out):
            compile_table(table, tmp_path / "tex" / table.stem)


def test_the_check_fails_on_tex_that_does_not_compile(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tex"
    bad.write_text("\\begin{tabular}{ll}\n\\toprule\nrank_eps & 1 \\\\\n\\bottomrule\n\\end{tabular}\n")
    with pytest.raises(AssertionError, match="does not compile"):
        compile_table(bad, tmp_path / "tex")


def overfull(log: str) -> list[float]:
    """Points by which each overfull line of the log is too wide."""
    return [float(x) for x in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide\)", log)]


EIGHT = ["Shapes", "Digits", "Colours", "Patterns", "Textures", "Glyphs", "Scenes", "Symbols"]
NINE_METHODS = ("zeroshot", "finetune", "lora", "zscl", "inflora", "loda", "keeplora", "keeplora+", "keeplora++")


@pytest.fixture(scope="module")
def paper_inputs(tmp_path_factory) -> dict[str, Path]:
    """Nine methods x two seeds on eight datasets (with nested cost sections), and MTIL runs for literature."""
    root = tmp_path_factory.mktemp("paper")
    for method in NINE_METHODS:
        for seed in (0, 1):
            write_fake_run(root / "eight", method, seed, datasets=EIGHT,
                           sections=("pretrained_svd", "grad_estimation", "train", "reference_forward", "merge"))
    for method in ("lora", "zscl", "keeplora"):
        write_fake_run(root / "mtil", method, 0, datasets=list(mtil_names.ORDER_I), benchmark="mtil", order=1)
    return {"eight": root / "eight", "mtil": root / "mtil"}


PAGES = [([], ONE_COLUMN), (["--table-star"], TWO_COLUMN), (["--layout", "full"], ONE_COLUMN)]


@pytest.mark.parametrize("options, preamble", PAGES, ids=["default-one-column", "table-star", "full"])
@pytest.mark.parametrize("inputs, extra", [("eight", ["--costs"]), ("mtil", ["--with-literature"])])
def test_tables_fit_the_page(paper_inputs, tmp_path: Path, options, preamble, inputs, extra) -> None:
    """Compiled on an A4 article with 2 cm margins (one column, or two with table*): no overfull box."""
    out = tmp_path / "rep"
    assert main(["report", str(paper_inputs[inputs]), "--out", str(out), *extra, *options]) == 0
    for table in written_tables(out):
        log = compile_table(table, tmp_path / "tex" / table.stem, preamble)
        assert overfull(log) == [], f"{table.name} is too wide: {overfull(log)} pt"
        if "--table-star" in options:
            assert "\\begin{table*}" in table.read_text()


def test_natural_width_overflows_and_the_check_sees_it(paper_inputs, tmp_path: Path) -> None:
    """Without the width limit the 8-dataset table is wider than a column: the check above would see that."""
    out = tmp_path / "rep"
    assert main(["report", str(paper_inputs["eight"]), "--out", str(out), "--width", "natural"]) == 0
    (table,) = written_tables(out)
    assert "adjustbox" not in table.read_text()
    assert overfull(compile_table(table, tmp_path / "tex", ONE_COLUMN))


def test_mcit_table_and_costs_compile(tmp_path: Path) -> None:
    """MCIT runs (LLaVA): MCITlib's columns with mean ± std cells, bold and underline, and the cost table."""
    from test_mcit_report import HAND, KEEP0, LORA0, LORA1, write_run

    results = tmp_path / "results"
    write_run(results, "lora", 0, LORA0, HAND["LORA0"])
    write_run(results, "lora", 1, LORA1, HAND["LORA1"])
    write_run(results, "keeplora", 0, KEEP0, HAND["KEEP0"])
    out = tmp_path / "rep"
    assert main(["report", str(results), "--costs", "--out", str(out)]) == 0
    tables = written_tables(out)
    assert [t.name for t in tables] == ["synthetic-mcit.tex", "synthetic-mcit_costs.tex"]
    for table in tables:
        compile_table(table, tmp_path / "tex" / table.stem)
