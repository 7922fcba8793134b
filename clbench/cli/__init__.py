"""The ``clbench`` command line: ``app`` (the Typer application, clbench/cli/app.py), its shared option types
(options), consoles, and the ``sweep`` command (sweep). Imported lazily so that ``clbench.cli.consoles`` stays light.
"""

from __future__ import annotations

from typing import Any


def main(argv: list[str] | None = None) -> int:
    """The console entry point (``clbench = "clbench.cli:main"``): parse ``argv`` and run the command."""
    from clbench.cli.app import main as app_main

    return app_main(argv)


def __getattr__(name: str) -> Any:
    if name == "app":
        from clbench.cli.app import app

        return app
    raise AttributeError(f"module 'clbench.cli' has no attribute {name!r}")
