"""Rich consoles for the command line: the terminal's width on a terminal, and no width at all (nothing cut to
80 columns, no "…") when the output goes to a file, a pipe or a SLURM log."""

from __future__ import annotations

import os
import sys

from rich.console import Console

UNBOUNDED = 100_000  # wide enough that no table or line is ever folded or truncated


def make_console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr); unbounded width unless it is a terminal or ``COLUMNS`` is set."""
    stream = sys.stderr if stderr else sys.stdout
    interactive = hasattr(stream, "isatty") and stream.isatty()
    width = None if interactive or os.environ.get("COLUMNS") else UNBOUNDED
    return Console(stderr=stderr, width=width)
