"""The MCIT setting: LLaVA continual instruction tuning on UCIT, MLLM-DCL and the embedded ``synthetic-mcit``.

Its implementation is :mod:`clbench.settings.mcit` (backbone, tasks, loop, methods, metrics, report), imported here only
inside the methods below, so that the core of clbench imports without the ``mcit`` extra (transformers,
tokenizers) and a command of this setting without it ends in one line naming ``pip install 'clbench[mcit]'``.
"""

from __future__ import annotations

from pathlib import Path

from clbench.errors import UserError
from clbench.settings.base import RunOptions, Setting, SweepOptions, SweepPlan
from clbench.settings.mcit import BENCHMARKS, LAYOUT
from clbench.storage.layout import ResultLayout

# Options of the CLIP setting only: the LLaVA setting loads local llava-hf folders (no download, no TorchScript),
# has one task order, one evaluation rule, no few-shot or dataset selection.
RUN_REFUSED = frozenset({"--pretrained", "--precision", "--eval", "--shots", "--skip-bad-images", "--order",
                         "--allow-download", "--trust-torchscript", "--datasets", "--allow-incomplete"})
SWEEP_REFUSED = frozenset({"--orders", "--eval", "--pretrained", "--precision", "--shots", "--skip-bad-images",
                           "--datasets", "--allow-incomplete"})


class McitSetting(Setting):
    name = "mcit"
    title = "MCIT"
    family = "LLaVA"
    benchmarks = BENCHMARKS
    embedded = ("synthetic-mcit",)
    extra = "mcit"
    refuses = {"run": RUN_REFUSED, "sweep": SWEEP_REFUSED}

    def describe(self) -> str:
        return "LLaVA setting"

    def refusal(self, command: str, flags: list[str], benchmark: str) -> str:
        if command == "sweep":
            return (f"{', '.join(flags)} belong to CLIP sweeps; an MCIT sweep ({benchmark}) runs the LLaVA setting "
                    "in one task order and does not take them")
        return f"{', '.join(flags)} belong to the CLIP setting; the MCIT setting ({benchmark}) does not take them"

    def listing_title(self) -> str:
        return "MCIT setting, LLaVA"

    def method_names(self) -> list[str]:
        from clbench.settings.mcit.methods import list_mcit_methods

        return list_mcit_methods()

    def method_class(self, name: str) -> type:
        from clbench.settings.mcit.methods import get_mcit_method

        return get_mcit_method(name)

    def print_card(self, console, name: str, preset: str, order: int) -> None:
        if order != 1:
            raise UserError("--order: the MCIT benchmarks have one task order; drop --order with --setting mcit")
        from clbench.settings.mcit.cli import print_mcit_card

        print_mcit_card(console, name, preset or "default")

    def run(self, options: RunOptions, console, out_console) -> None:
        from clbench.settings.mcit.cli import run_command

        run_command(options.benchmark, options.methods, options.out, options.seed, options.preset,
                    options.backbone, options.data_root, options.device, options.sets, options.quiet,
                    resume=options.resume, track=options.track)

    def plan_sweep(self, options: SweepOptions, console) -> SweepPlan:
        from clbench.settings.mcit import sweep as mcit_sweep
        from clbench.storage.safeio import check_path
        from clbench.sweeps.plan import int_list

        for name in options.methods:
            self.method_class(name)  # a method without an LLaVA form: one line
        axes = mcit_sweep.parse_grid(options.grid, options.methods)
        out_dir = check_path(options.out, "--out").resolve()
        specs = mcit_sweep.expand(options.benchmark, options.methods, int_list(options.seeds, "--seeds"), axes,
                                  options.sets, options.preset, options.backbone, options.data_root,
                                  options.device, out_dir, options.cpus_per_job)
        return SweepPlan(specs, out_dir,
                         lambda: mcit_sweep.prepare_backbone(options.backbone, options.preset, options.quiet),
                         self.metric_columns())

    def profiles(self, backbone: str) -> bool:
        # the LLaVA shapes of clbench.settings.mcit.costs.SHAPES (an unknown one: one line)
        return backbone.startswith("llava")

    def profile(self, backbone: str, methods: list[str], sets: list[str], seed: int, device: str,
                out: Path | None, layers: int | None, svd_max_dim: int | None) -> None:
        from clbench.settings.mcit.cli import profile_command

        profile_command(backbone, methods, sets, seed, device, out, layers, svd_max_dim)

    def data_check(self, data_root: str, benchmark: str, allow_incomplete: bool, console) -> None:
        from clbench.datasets.mtil import resolve_data_root
        from clbench.settings.mcit.cli import data_check

        data_check(resolve_data_root(data_root, benchmark), benchmark)

    def metrics(self, matrix, names: list[str]) -> dict:
        from clbench.settings.mcit.metrics import mcit_metrics

        return mcit_metrics(matrix, names)

    def metric_columns(self) -> list[tuple[str, str]]:
        from clbench.settings.mcit.metrics import LABELS, ORDER

        return [(LABELS[k], k) for k in ORDER]

    def register_report(self) -> None:
        import clbench.settings.mcit.report  # noqa: F401  (registers the MCIT (LLaVA) table on import)

    @property
    def layout(self) -> ResultLayout:
        return LAYOUT


MCIT = McitSetting()
