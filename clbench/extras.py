"""Optional extras: the packages each one brings, and the one-line error that names its install command.

Every optional import of clbench goes through :func:`require` (or :func:`require_extra` at the entry of a command
that needs a whole extra), so a missing package is one ``UserError`` line, ``... pip install 'clbench[EXTRA]'``, exit
status 2, never a ``ModuleNotFoundError`` traceback. :func:`extra_of` lets the command line turn an import that
slipped past them into the same line (its last resort).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from clbench.errors import UserError

# extra -> the importable packages it installs (pyproject.toml's [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "mcit": ("transformers", "tokenizers"),
    "ray": ("ray",),
    "slurm": ("submitit",),
    "tracking": ("tensorboard", "wandb"),
}
MODULE_EXTRA = {module: extra for extra, modules in EXTRAS.items() for module in modules}


def install_hint(module: str) -> str:
    """``pip install 'clbench[EXTRA]'`` for the extra that brings ``module`` (a top-level package name)."""
    return f"pip install 'clbench[{MODULE_EXTRA[module]}]'"


def missing(module: str, what: str) -> UserError:
    """The one-line error: ``what`` needs ``module``, which is not installed."""
    return UserError(f"{what} needs the optional package {module!r}, which is not installed; install it with "
                     f"{install_hint(module)}")


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` (a package of an extra, or one of its submodules), or the one-line error."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing(module.partition(".")[0], what) from None


def require_extra(extra: str, what: str) -> None:
    """Check that every package of ``extra`` imports, before a command starts work that needs them."""
    for module in EXTRAS[extra]:
        require(module, what)


def extra_of(exc: ImportError) -> str | None:
    """The extra whose missing package ``exc`` is about (``None``: not an extra's package)."""
    name = getattr(exc, "name", None) or ""
    return MODULE_EXTRA.get(name.partition(".")[0])
