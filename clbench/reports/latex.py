"""Page layouts for the LaTeX tables, as papers set them: ``compact`` (the default: small type, tight column
spacing, the standard deviation in script size) or ``full`` (normal size, natural width); a ``table`` float for
one column or ``table*`` across both columns of a two-column paper; and a width the tabular is shrunk to when it
is wider (``adjustbox``'s ``max width``: never enlarged), or ``natural`` for none.

With the defaults a table fits one column of an article: 11 MTIL datasets with reported rows included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from clbench.errors import UserError

LAYOUTS = ("compact", "full")
NATURAL = "natural"
_LENGTH = re.compile(r"^(\\(linewidth|textwidth|columnwidth|hsize)|\d*\.?\d+\s*(pt|cm|mm|in|em|ex|bp))$")
_SCALED_WIDTH = re.compile(r"^\d*\.?\d+\\(linewidth|textwidth|columnwidth)$")


@dataclass(frozen=True)
class LatexLayout:
    """How a LaTeX table is set: ``layout`` compact/full, ``star`` for ``table*``, ``width`` a TeX length the
    tabular may not exceed (default ``\\linewidth``, ``\\textwidth`` with ``table*``) or ``natural``."""

    layout: str = "compact"
    star: bool = False
    width: str | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise UserError(f"--layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.width is not None and self.width != NATURAL:
            width = self.width.strip()
            if not (_LENGTH.match(width) or _SCALED_WIDTH.match(width)):
                raise UserError(f"--width {self.width!r} is not a TeX length; give e.g. '\\linewidth', "
                                "'0.9\\textwidth', '12cm', or 'natural'")

    @property
    def compact(self) -> bool:
        return self.layout == "compact"

    @property
    def max_width(self) -> str | None:
        if self.width == NATURAL:
            return None
        return self.width or (r"\textwidth" if self.star else r"\linewidth")

    @property
    def packages(self) -> str:
        return "booktabs,multirow" + (",adjustbox" if self.max_width else "")


def std_format(layout: LatexLayout) -> tuple[str, str]:
    """(text before, text after) the standard deviation in a ``mean ± std`` cell."""
    return (r"{\scriptsize$\pm$", "}") if layout.compact else (r" $\pm$ ", "")


def set_table(tex: str, layout: LatexLayout) -> str:
    """Apply ``layout`` to a ``Styler.to_latex`` table float: float kind, type size, column spacing, width."""
    env = "table*" if layout.star else "table"
    tex = tex.replace(r"\begin{table}", rf"\begin{{{env}}}", 1).replace(r"\end{table}", rf"\end{{{env}}}", 1)
    settings = [r"\small", r"\setlength{\tabcolsep}{3pt}"] if layout.compact else []
    if settings:
        tex = tex.replace(r"\centering", r"\centering" + "\n" + "\n".join(settings), 1)
    if layout.max_width:
        tex = tex.replace(r"\begin{tabular}", rf"\begin{{adjustbox}}{{max width={layout.max_width}}}" + "\n"
                          + r"\begin{tabular}", 1)
        tex = tex.replace(r"\end{tabular}", r"\end{tabular}" + "\n" + r"\end{adjustbox}", 1)
    return f"% needs \\usepackage{{{layout.packages}}}\n" + tex
