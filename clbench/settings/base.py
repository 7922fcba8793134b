"""What a *setting* declares: its benchmarks, the extra it needs, the options it refuses, its methods, how it runs
and plans sweeps, its metrics and its report table.

A setting is one backbone family with its own benchmarks, task loop and metrics (CLIP classification on MTIL /
X-TAIL; LLaVA instruction tuning on UCIT / MLLM-DCL). The command line never tests a benchmark's or a setting's
name: it asks the registry (:mod:`clbench.settings`) for the setting of ``--benchmark`` and calls it. The shape
follows mammoth's ``SETTING`` / ``COMPATIBILITY`` declarations (``datasets/utils/continual_dataset.py``) and
open_clip's task classes (``task/base_task.py`` with ``clip_task.py`` and ``clap_task.py``): one base, one
subclass per setting. A new setting is one module with a :class:`Setting` subclass and one line in the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from clbench.errors import UserError


@dataclass
class CommandOptions:
    """The options ``clbench run`` and ``clbench sweep`` share, as parsed (the command line's defaults when not
    given); each command adds its own below."""

    methods: list[str]
    benchmark: str
    out: Path = Path("results")
    preset: str = "default"
    backbone: str = "tiny"
    pretrained: str = ""
    data_root: str = ""
    device: str = "auto"
    precision: str | None = None
    eval: str | None = None
    shots: int | None = None
    skip_bad_images: bool = False
    datasets: str = ""
    allow_incomplete: bool = False
    sets: list[str] = field(default_factory=list)
    quiet: bool = False


@dataclass
class RunOptions(CommandOptions):
    """The options of ``clbench run``."""

    order: int = 1
    seed: int = 0
    resume: bool = False
    trust_torchscript: bool = False
    track: str = ""
    allow_download: bool = False


@dataclass
class SweepOptions(CommandOptions):
    """The options of ``clbench sweep`` that plan its runs (the launcher's are the command line's)."""

    orders: str = "1"
    seeds: str = "0"
    grid: list[str] = field(default_factory=list)
    cpus_per_job: int = 1


@dataclass
class SweepPlan:
    """A planned sweep: its runs, the folder they go under, what to prepare once before launching (e.g. pre-train
    an embedded backbone), and the summary's metric columns ``(label, metrics key)``."""

    specs: list
    out: Path
    prepare: Callable[[], None]
    columns: list[tuple[str, str]]


class Setting:
    """Base of every setting; subclasses fill the class attributes and the methods."""

    name: ClassVar[str] = ""  # the setting's id: manifests' ``"setting"``, ``--setting`` of methods / metrics
    title: ClassVar[str] = ""  # how messages name it ("CLIP", "MCIT")
    family: ClassVar[str] = ""  # its backbone family, as help texts name it ("CLIP", "LLaVA")
    aliases: ClassVar[tuple[str, ...]] = ()  # other names ``--setting`` accepts (``mtil`` for CLIP's metrics)
    benchmarks: ClassVar[tuple[str, ...]] = ()  # ``--benchmark`` values it serves; the first is its default
    embedded: ClassVar[tuple[str, ...]] = ()  # those drawn in memory (no data to check)
    extra: ClassVar[str | None] = None  # the optional extra (clbench/extras.py) it needs
    # command -> options it refuses, each refused in one line (tests/cli/test_setting_options.py tables them)
    refuses: ClassVar[dict[str, frozenset[str]]] = {}

    # ---- declarations checked before any work --------------------------------------------------------------
    def require(self, benchmark: str) -> None:
        """Check the setting's extra is installed: one line naming the install command otherwise."""
        if self.extra is not None:
            from clbench.extras import require_extra

            require_extra(self.extra, f"--benchmark {benchmark} (the {self.describe()})")

    def describe(self) -> str:
        return f"{self.title} setting"

    def refusal(self, command: str, flags: list[str], benchmark: str) -> str:
        """The one line refusing ``flags`` of ``command`` on ``benchmark``."""
        return f"{', '.join(flags)} are not options of the {self.describe()} ({benchmark}); drop them"

    def check_options(self, command: str, given: dict[str, Any], benchmark: str) -> None:
        """Refuse, in one line, the options of ``command`` given (a true value) that this setting does not take."""
        used = [flag for flag, value in given.items() if value and flag in self.refuses.get(command, ())]
        if used:
            raise UserError(self.refusal(command, used, benchmark))

    # ---- methods ----------------------------------------------------------------------------------------------
    def method_names(self) -> list[str]:
        raise NotImplementedError

    def method_class(self, name: str) -> type:
        """The class of method ``name`` in this setting; an unknown (or other-setting-only) name is one line."""
        raise NotImplementedError

    def print_methods(self, console) -> None:
        """``clbench methods``: a header line naming the setting and its benchmarks, then one line per method."""
        console.print(f"{self.listing_title()} (--benchmark {', '.join(self.benchmarks)}):", highlight=False)
        for method in self.method_names():
            console.print(f"  {method:12s} {self.method_class(method).summary}", highlight=False)

    def listing_title(self) -> str:
        return f"{self.title} setting"

    def print_card(self, console, name: str, preset: str, order: int) -> None:
        """``clbench methods NAME --setting S``: the method's hyperparameters and the recipe of ``preset``."""
        raise NotImplementedError

    # ---- running ----------------------------------------------------------------------------------------------
    def run(self, options: RunOptions, console, out_console) -> None:
        """``clbench run``: run every method, print the summary; exit status 1 when a run failed."""
        raise NotImplementedError

    def plan_sweep(self, options: SweepOptions, console) -> SweepPlan:
        """``clbench sweep``: every run of the sweep, checked before any runs."""
        raise NotImplementedError

    def data_check(self, data_root: str, benchmark: str, allow_incomplete: bool, console) -> None:
        """``clbench data check``: a table of the benchmark's tasks on disk; one line (exit 2) if one is unusable."""
        raise NotImplementedError

    # ---- cost profile ------------------------------------------------------------------------------------------
    def profiles(self, backbone: str) -> bool:
        """Whether ``clbench profile --backbone BACKBONE`` is this setting's (the first setting is the default)."""
        return False

    def profile(self, backbone: str, methods: list[str], sets: list[str], seed: int, device: str,
                out: Path | None, layers: int | None, svd_max_dim: int | None) -> None:
        """``clbench profile`` on this setting's backbone shapes."""
        raise NotImplementedError

    @property
    def layout(self):
        """What a complete run folder of this setting holds (:class:`clbench.storage.results.ResultLayout`)."""
        from clbench.storage.layout import CLIP_LAYOUT

        return CLIP_LAYOUT

    # ---- metrics and reports -----------------------------------------------------------------------------------
    def metrics(self, matrix, names: list[str]) -> dict:
        """The setting's metrics of an accuracy matrix (rows = after task, columns = task)."""
        raise NotImplementedError

    def metric_columns(self) -> list[tuple[str, str]]:
        """The summary tables' metrics, ``(label, metrics key)`` in order."""
        raise NotImplementedError

    def metric_lines(self, result: dict) -> list[str]:
        """``clbench metrics``: one line per metric."""
        return [f"{label:9s} {result[key]:6.2f}" for label, key in self.metric_columns()]

    def register_report(self) -> None:
        """Declare the setting's ``clbench report`` table (runs whose manifest names this setting)."""
