"""The registry of settings: which setting serves a ``--benchmark``, and each setting by its name.

The command line looks a setting up here and calls it (:class:`clbench.settings.base.Setting`); it never tests a
benchmark's name. Adding a setting: one module with a ``Setting`` subclass, and one line in ``SETTINGS`` below.
Importing this package imports no setting's implementation (nor its optional extra).
"""

from __future__ import annotations

from clbench.errors import UserError
from clbench.settings.base import RunOptions, Setting, SweepOptions, SweepPlan
from clbench.settings.clip import CLIP
from clbench.settings.mcit.setting import MCIT

SETTINGS: tuple[Setting, ...] = (CLIP, MCIT)  # the first is the default (``--benchmark`` default, ``--setting``)

__all__ = ["SETTINGS", "RunOptions", "Setting", "SweepOptions", "SweepPlan", "all_benchmarks", "get_setting",
           "setting_for_benchmark", "setting_for_profile", "setting_names"]


def all_benchmarks() -> list[str]:
    """Every ``--benchmark`` value, setting by setting."""
    return [b for s in SETTINGS for b in s.benchmarks]


def setting_names() -> list[str]:
    return [s.name for s in SETTINGS]


def setting_for_benchmark(benchmark: str) -> Setting:
    """The setting that serves ``benchmark``; an unknown one is one line naming those known."""
    for setting in SETTINGS:
        if benchmark in setting.benchmarks:
            return setting
    raise UserError(f"--benchmark {benchmark!r} is unknown; use one of {', '.join(all_benchmarks())}")


def setting_for_profile(backbone: str) -> Setting | None:
    """The setting other than the default whose ``clbench profile`` shapes include ``backbone`` (``None``: the
    default setting's, an open_clip model)."""
    return next((s for s in SETTINGS[1:] if s.profiles(backbone)), None)


def get_setting(name: str) -> Setting:
    """The setting named ``name`` (or one of its aliases); an unknown name is one line naming those known."""
    for setting in SETTINGS:
        if name == setting.name or name in setting.aliases:
            return setting
    known = [s.name + (f" ({', '.join(s.aliases)})" if s.aliases else "") for s in SETTINGS]
    raise UserError(f"--setting {name!r} is unknown; use {' or '.join(known)}")


def benchmark_help() -> str:
    """``--benchmark``'s help: each setting's benchmarks, the embedded default first."""
    parts = []
    for s in SETTINGS:
        names = [f"{b} (embedded{' default' if s is SETTINGS[0] else ''})" if b in s.embedded else b
                 for b in s.benchmarks]
        parts.append(f"{s.family}: {', '.join(names)}")
    return "; ".join(parts)


def setting_help() -> str:
    """``--setting``'s help: each setting and its benchmarks."""
    return "; ".join(f"{s.name}: {s.family} on {', '.join(s.benchmarks)}" for s in SETTINGS)
