"""The CLIP setting: image classification with CLIP on MTIL, X-TAIL and the embedded ``synthetic`` sequence.

Its implementation is the core of clbench (:mod:`clbench.engine`, :mod:`clbench.methods`, :mod:`clbench.datasets`,
:mod:`clbench.models`); its parts of the shared commands are :mod:`clbench.settings.clip_commands`.
"""

from __future__ import annotations

from clbench.datasets import BENCHMARKS
from clbench.settings.base import RunOptions, Setting, SweepOptions, SweepPlan


class ClipSetting(Setting):
    name = "clip"
    title = "CLIP"
    family = "CLIP"
    aliases = ("mtil",)  # ``clbench metrics --setting mtil`` (the metric family's name)
    benchmarks = BENCHMARKS
    embedded = ("synthetic",)
    extra = None
    refuses = {}  # every option of run and sweep applies (those a benchmark refuses, the configuration refuses)

    def method_names(self) -> list[str]:
        from clbench.methods import list_methods

        return list_methods()

    def method_class(self, name: str) -> type:
        from clbench.methods import get_method

        return get_method(name)

    def print_card(self, console, name: str, preset: str, order: int) -> None:
        from clbench.settings.clip_commands import print_card

        print_card(console, name, preset or "paper", order)

    def run(self, options: RunOptions, console, out_console) -> None:
        from clbench.settings.clip_commands import run

        run(options, console, out_console)

    def plan_sweep(self, options: SweepOptions, console) -> SweepPlan:
        from clbench.settings.clip_commands import plan_sweep

        return plan_sweep(options, console)

    def data_check(self, data_root: str, benchmark: str, allow_incomplete: bool, console) -> None:
        from clbench.settings.clip_commands import data_check

        data_check(data_root, benchmark, allow_incomplete, console)

    def metrics(self, matrix, names: list[str]) -> dict:
        from clbench.engine.metrics import mtil_metrics

        return mtil_metrics(matrix, names)

    def metric_columns(self) -> list[tuple[str, str]]:
        return [("transfer", "transfer"), ("average", "average"), ("last", "last"), ("bwt", "bwt")]

    def metric_lines(self, result: dict) -> list[str]:
        """One line per metric; an undefined one (a one-task matrix's Transfer) says why."""
        from clbench.engine.metrics import undefined_text

        lines = []
        for label, key in self.metric_columns():
            reason = undefined_text(result, key)
            lines.append(f"{label:9s} {result[key]:6.2f}" if reason is None else f"{label:9s} undefined ({reason})")
        return lines

    def register_report(self) -> None:
        """The CLIP table is :mod:`clbench.reports`' own."""


CLIP = ClipSetting()
