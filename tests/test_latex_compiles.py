"""The LaTeX that ``clbench report`` writes compiles with pdflatex (booktabs + multirow, as its header says), for
the names that need care in TeX: methods with ``+``, hyperparameters and X-TAIL domains with ``_``, literature
rows, the cost table and the sensitivity table. Skipped where pdflatex is missing; ``.ci/run`` installs it from
Debian's texlive packages so CI compiles every table."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from fake_runs import write_fake_run

from clbench.cli import main
from clbench.datasets import mtil_names, xtail_names

PDFLATEX = shutil.which("pdflatex")
# .ci/run sets this: there a missing pdflatex is a failure, not a skip.
REQUIRED = os.environ.get("CLBENCH_REQUIRE_PDFLATEX") == "1"
pytestmark = pytest.mark.skipif(PDFLATEX is None and not REQUIRED, reason="pdflatex is not installed (Debian: "
                                "texlive-latex-base, texlive-latex-recommended, texlive-latex-extra)")

PREAMBLE = "\n".join([r"\documentclass{article}", r"\usepackage[T1]{fontenc}", r"\usepackage{booktabs,multirow}",
                      r"\usepackage[a3paper,landscape,margin=1cm]{geometry}", r"\begin{document}"])


def compile_table(table: Path, work: Path) -> str:
    """Compile ``table`` inside a minimal article; returns the log. Fails with the log's error lines."""
    assert PDFLATEX, "pdflatex is required here (CLBENCH_REQUIRE_PDFLATEX=1) but not installed"
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(table, work / "table.tex")
    (work / "doc.tex").write_text(PREAMBLE + "\n\\input{table.tex}\n\\end{document}\n")
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
