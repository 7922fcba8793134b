"""One ``clbench run`` of the CLIP setting: build the benchmark and backbone once, then run each method over the
sequence and write its results directory (the results contract in :mod:`clbench.storage.results`). The run's control
flow is the engine's, shared with the LLaVA setting (:mod:`clbench.engine.session`); this module supplies its
:class:`ClipRunJob`.

Order of events: every input is validated (nothing written yet); each run folder is locked
(:mod:`clbench.storage.lock`); a run's first write happens when its first task ends (``config.json``, ``manifest.json``
with status ``running``, the partial CSVs and the resume checkpoint of :mod:`clbench.storage.checkpoint`), or when it
fails for a reason other than a user error; the manifest becomes ``complete`` (and the checkpoint is deleted)
or ``failed``. A user error (e.g. an unreadable image) before the first task ends leaves the folder as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from clbench.config import RunConfig, method_run_config, run_id, train_config_for
from clbench.costs.profiler import Profiler
from clbench.datasets.base import Benchmark, ImageSpec, Task, duplicate_classnames
from clbench.engine.harness import Hooks, SequenceResult, check_precision, resolve_device, run_sequence
from clbench.engine.metrics import json_safe, metrics_from_json, mtil_metrics
from clbench.engine.rundir import (
    RunPlan,
    bad_checkpoint,
    check_something_to_resume,
    decide_start,
    make_checkpoint,
    read_run_json,
    restore_model,
    restore_profiler_and_rng,
)
from clbench.engine.session import RunJob, RunOutcome, run_jobs
from clbench.errors import UserError
from clbench.methods import get_method
from clbench.methods.state_checks import StateMismatch
from clbench.models.backbones import load_backbone
from clbench.models.clip import ClipModel
from clbench.storage.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
)
from clbench.storage.results import (
    accuracy_frame,
    atomic_write_csv,
    atomic_write_json,
    environment_info,
    missing_results,
    run_dir,
)


def build_benchmark(cfg: RunConfig, spec: ImageSpec) -> Benchmark:
    """The task sequence named by ``cfg.benchmark`` in ``cfg.order``."""
    if cfg.benchmark == "synthetic":
        from clbench.datasets.synthetic import build_synthetic

        return build_synthetic(cfg.order, spec, cfg.data.train_per_class, cfg.data.test_per_class, cfg.data.seed,
                               num_tasks=cfg.data.num_tasks or None)
    if cfg.benchmark == "mtil":
        try:
            from clbench.datasets.mtil import build_mtil
        except ImportError:
            raise UserError("--benchmark mtil is not available in this version; use --benchmark synthetic") from None
        return build_mtil(cfg, spec)
    if cfg.benchmark == "xtail":
        from clbench.datasets.xtail import build_xtail

        return build_xtail(cfg, spec)
    raise UserError(f"unknown benchmark {cfg.benchmark!r}")


def load_model(cfg: RunConfig, device: torch.device, on_pretrain_step=None,
               allow_torchscript: bool = False, allow_download: bool = False) -> ClipModel:
    return load_backbone(cfg.backbone, cfg.pretrained or None, device, allow_torchscript=allow_torchscript,
                         on_pretrain_step=on_pretrain_step, allow_download=allow_download)


def write_results(path: Path, result: SequenceResult, profiler: Profiler) -> dict:
    names = result.datasets
    trained_on = names[: len(result.rows)]
    atomic_write_csv(path / "zeroshot.csv", accuracy_frame([result.zeroshot], ["zeroshot"], names))
    atomic_write_csv(path / "accuracy.csv", accuracy_frame(result.rows, trained_on, names))
    if result.zeroshot_recall is not None:  # union evaluation: task-selection recall beside the accuracy
        atomic_write_csv(path / RECALL_NAME, accuracy_frame([result.zeroshot_recall, *result.recall_rows],
                                                           ["zeroshot", *trained_on], names))
    atomic_write_csv(path / "profile.csv", profiler.frame())
    state = profiler.state_frame()
    if len(state):
        atomic_write_csv(path / "state_bytes.csv", state)
    if len(result.rows) != len(names):
        return {}
    import numpy as np

    metrics = mtil_metrics(np.array(result.rows), names)
    metrics["zeroshot"] = dict(zip(names, result.zeroshot, strict=True))
    metrics["eval"] = "union" if result.zeroshot_recall is not None else "task"
    if result.zeroshot_recall is not None:
        last_recall = dict(zip(names, result.recall_rows[-1], strict=True))
        metrics["selection_recall"] = {"last": float(np.mean(result.recall_rows[-1])), "per_dataset": last_recall}
    atomic_write_json(path / "metrics.json", json_safe(metrics))  # strict JSON: an undefined Transfer is null
    return metrics


def run_methods(
    cfg: RunConfig,
    methods: list[str],
    out: Path,
    hooks_for: Callable[[str], Hooks] | None = None,
    on_pretrain_step=None,
    resume: bool = False,
    allow_torchscript: bool = False,
    notify: Callable[[str], None] | None = None,
    allow_download: bool = False,
) -> list[RunOutcome]:
    """Run every method in ``methods`` on the configured benchmark; one results directory each.

    Everything is checked before anything is written: method names, hyperparameter ranges (adapter ranks
    against the backbone's width), the output folder, the weights, the data, each method's own
    ``validate()``, and with ``resume`` the run found in each folder (same ``run_id``). Then every run
    folder is locked (:class:`~clbench.storage.lock.RunLock`) and the methods run one after the other, saving a
    resume checkpoint after each task (:mod:`clbench.storage.checkpoint`), deleted once the run is complete.
    """
    notify = notify or _print_notice
    check_path_options(cfg, Path(out))
    check_method_names(methods)
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    paths = {m: run_dir(out, cfg.benchmark, cfg.order, m, cfg.seed, eval_rule=cfg.eval, datasets=cfg.data.datasets)
             for m in methods}
    _check_writable(Path(out))
    check_adapter_widths(cfg, methods)
    if resume:
        check_something_to_resume(paths, "--out/--seed/--order")
    if cfg.benchmark == "mtil":  # absent data surfaces before a (slow) model load
        from clbench.datasets.mtil import preflight

        preflight(cfg)
    if cfg.benchmark == "xtail":
        from clbench.datasets.xtail import preflight as xtail_preflight

        xtail_preflight(cfg)
    torch.manual_seed(cfg.seed)  # random-init backbones (--pretrained none) are seeded too
    base_model = load_model(cfg, device, on_pretrain_step, allow_torchscript, allow_download)
    benchmark = build_benchmark(cfg, base_model.image_spec)
    notes: list[str] = []  # said once everything is checked and locked, so an error stays the only line
    plans = [plan_run(cfg, name, base_model, benchmark, device, paths[name], resume, notes.append)
             for name in methods]
    if cfg.benchmark == "synthetic":
        notes.insert(0, "no MTIL data configured: running the embedded default (synthetic sequence)")
    jobs = [ClipRunJob(cfg, plan, base_model, benchmark, device, hooks_for) for plan in plans]
    return run_jobs(jobs, notify, notes)


def check_path_options(cfg: RunConfig, out: Path) -> None:
    """``--out``, ``--data-root`` and a ``--pretrained`` file must be paths the OS can use (no over-long name,
    no symlink loop): a one-line error now rather than an OSError mid-run."""
    from clbench.storage.safeio import check_path

    check_path(out, "--out")
    if cfg.data_root:
        check_path(cfg.data_root, "--data-root")
    if cfg.pretrained and (os.sep in cfg.pretrained or Path(cfg.pretrained).suffix):
        check_path(cfg.pretrained, "--pretrained")


def _print_notice(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def check_method_names(methods: list[str]) -> None:
    """Every name registered, none twice (two runs of one method would share a folder)."""
    for name in methods:
        get_method(name)
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise UserError(f"--methods lists {', '.join(twice)} more than once; name each method once")


def backbone_widths(backbone: str) -> dict[str, int]:
    """Width of the attention layers of each encoder of ``backbone``, from its open_clip config (before
    any weight is loaded); encoders whose width the config does not say (timm / HF towers) are left out."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from clbench.models.backbones import TINY, tiny_model_config

    config = tiny_model_config() if backbone == TINY else open_clip.get_model_config(backbone)
    if not config:
        return {}
    widths = {}
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if not vision.get("timm_model_name"):
        widths["vision"] = int(vision.get("width", CLIPVisionCfg().width))
    if not text.get("hf_model_name"):
        widths["text"] = int(text.get("width", CLIPTextCfg().width))
    return widths


def check_adapter_widths(cfg: RunConfig, methods: list[str]) -> None:
    """Hyperparameters marked ``max_width`` (adapter ranks) must not exceed the adapted layers' width."""
    widths = backbone_widths(cfg.backbone)
    for name in methods:
        hp = cfg.methods[name]
        encoders = [e.strip() for e in str(hp.get("encoders", "vision,text")).split(",") if e.strip()]
        known = [widths[e] for e in encoders if e in widths]
        if not known:
            continue
        width = min(known)
        for f in dataclasses.fields(get_method(name).Hparams):
            if f.metadata.get("max_width") and hp.get(f.name, 0) > width:
                raise UserError(f"{name}.{f.name}={hp[f.name]} exceeds the width {width} of {cfg.backbone}'s "
                                f"adapted attention layers; use --set {name}.{f.name}=<value <= {width}>")


def plan_run(cfg: RunConfig, name: str, base_model: ClipModel, benchmark: Benchmark, device: torch.device,
             path: Path, resume: bool, notify: Callable[[str], None]) -> RunPlan:
    """Validate one method's run (its ``validate()`` on a copy of the model) and decide how it starts."""
    method_cls = get_method(name)
    resolved = method_run_config(cfg, name)
    resolved["datasets"] = benchmark.task_names
    plan = RunPlan(name, path, resolved, run_id(resolved), list(benchmark.task_names))
    method = method_cls(copy.deepcopy(base_model), method_cls.Hparams(**cfg.methods[name]), Profiler(device=device))
    method.benchmark = cfg.benchmark
    validate = getattr(method, "validate", None)
    if validate is not None:
        validate()
    del method
    return decide_start(plan, resume, notify, lambda folder: missing_results(folder, plan.tasks),
                        union=cfg.eval == "union")


def _check_writable(out: Path) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not _can_write(probe):
        raise UserError(f"output folder {out} is not writable; pass --out to a folder you can write")


def _can_write(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


RECALL_NAME = "selection_recall.csv"
STALE = (RECALL_NAME, "accuracy.csv", "zeroshot.csv", "metrics.json", "profile.csv", "state_bytes.csv", CHECKPOINT_NAME)


class ClipRunJob(RunJob):
    """One CLIP method's run over the benchmark (the shared control flow is :func:`clbench.engine.session.execute`):
    a copy of the base model, the method, the harness's task loop, and the CLIP result files."""

    stale = STALE

    def __init__(self, cfg: RunConfig, plan: RunPlan, base_model: ClipModel, benchmark: Benchmark,
                 device: torch.device, hooks_for: Callable[[str], Hooks] | None = None) -> None:
        super().__init__(plan)
        self.cfg, self.base_model, self.benchmark, self.device = cfg, base_model, benchmark, device
        self.hooks_for = hooks_for
        self.hooks = Hooks()
        self.result: SequenceResult | None = None

    def checkpoint_checks(self) -> dict:
        return {"union": self.cfg.eval == "union"}

    def start(self, started: float) -> dict:
        cfg, benchmark, base_model, name = self.cfg, self.benchmark, self.base_model, self.plan.name
        # the progress and tracking hooks of this method, made when its run starts (a tracker opens the method's
        # log here and closes the previous method's, so each log holds its own method's rows and metrics)
        self.hooks = self.hooks_for(name) if self.hooks_for else Hooks()
        method_cls = get_method(name)
        torch.manual_seed(cfg.seed)
        self.model = copy.deepcopy(base_model)
        self.profiler = Profiler(device=self.device)
        self.method = method_cls(self.model, method_cls.Hparams(**cfg.methods[name]), self.profiler)
        self.method.benchmark = cfg.benchmark
        manifest = {"status": "running", "run_id": self.plan.run_id, "method": name, "seed": cfg.seed,
                    "benchmark": cfg.benchmark, "order": cfg.order, "started": started,
                    "environment": environment_info(self.device),
                    "weights": getattr(base_model, "weights", cfg.pretrained or "embedded"),
                    "evaluation": evaluation_info(cfg.eval, benchmark), "benchmark_info": benchmark.info,
                    "classes": {t.name: len(t.classnames) for t in benchmark.tasks},
                    "preprocess": dataclasses.asdict(base_model.image_spec),
                    "datasets": benchmark.task_names, "selection": cfg.data.datasets}
        expected = {t.name: t.info["expected_classes"] for t in benchmark.tasks if "expected_classes" in t.info}
        if expected:  # real data: the protocol's class count beside the one found (they differ only when allowed)
            manifest["expected_classes"] = expected
        return manifest

    def resume(self, ckpt: Checkpoint) -> None:
        self.profiler.task = -1
        self.method.setup()  # on the pretrained weights, as the interrupted run did; then its state replaces it
        self.result = restore(ckpt, self.model, self.method, self.profiler,
                              self.benchmark.tasks[: ckpt.completed], self.plan.path / CHECKPOINT_NAME)

    def run(self, on_task_end: Callable[[int], None]) -> None:
        def task_end(index: int, res: SequenceResult) -> None:
            self.result = res
            on_task_end(index + 1)

        cfg = self.cfg
        self.result = run_sequence(self.method, self.benchmark, train_config_for(cfg, self.plan.name), self.profiler,
                                   self.device, cfg.seed, cfg.data.prompt, cfg.precision, self.hooks,
                                   start_task=self.plan.completed, result=self.result, on_task_end=task_end,
                                   eval_rule=cfg.eval)

    def capture(self) -> Checkpoint:
        return capture(self.plan.run_id, self.result, self.model, self.method, self.profiler)

    def write_partial(self) -> None:
        write_results(self.plan.path, self.result, self.profiler)

    def write_results(self) -> dict:
        return write_results(self.plan.path, self.result, self.profiler)

    def on_failure(self) -> None:
        atomic_write_csv(self.plan.path / "profile.csv", self.profiler.frame())

    def done_metrics(self) -> dict | None:
        path = self.plan.path / "metrics.json"
        return metrics_from_json(read_run_json(path)) if path.exists() else None


def capture(run: str, result: SequenceResult, model: ClipModel, method, profiler: Profiler) -> Checkpoint:
    """The state after ``len(result.rows)`` tasks, as a :class:`~clbench.storage.checkpoint.Checkpoint`."""
    recall = ({"zeroshot": list(result.zeroshot_recall), "rows": [list(r) for r in result.recall_rows]}
              if result.zeroshot_recall is not None else {})
    return make_checkpoint(run, result.datasets, result.zeroshot, result.rows, model, method.state_dict(),
                           method.extra_state(), profiler, recall)


def restore(ckpt: Checkpoint, model: ClipModel, method, profiler: Profiler, tasks: list[Task],
            path: Path | None = None) -> SequenceResult:
    """Put ``ckpt`` back: method state (checked by the method's ``check_state`` against the model and the
    ``tasks`` done, then tensors on the model's device, then JSON), model weights (strict, every shape checked),
    profiler records, generator states; returns the results so far. A checkpoint that does not fit (edited
    tensors, another method's state) is a one-line UserError naming ``path`` and the entry."""
    device = model.device
    where = path or Path(CHECKPOINT_NAME)
    try:
        method.check_state(ckpt.method, ckpt.method_extra, list(tasks))
    except StateMismatch as exc:
        raise bad_checkpoint(where, f"its {method.name} state does not fit this run: {exc.entry} {exc.why}") from None
    try:
        method.load_state_dict({k: v.to(device) for k, v in ckpt.method.items()})
        method.load_extra_state(ckpt.method_extra)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise bad_checkpoint(where, f"its {method.name} state does not fit ({type(exc).__name__}: "
                                    f"{' '.join(str(exc).split())[:200]})") from None
    restore_model(model, ckpt.model, where)
    restore_profiler_and_rng(ckpt, profiler, where)
    recall = ckpt.recall or {}
    return SequenceResult(list(ckpt.datasets), list(ckpt.zeroshot), [list(r) for r in ckpt.rows],
                          zeroshot_recall=list(recall["zeroshot"]) if recall else None,
                          recall_rows=[list(r) for r in recall.get("rows", [])])


def evaluation_info(rule: str, benchmark: Benchmark) -> dict:
    """The manifest's record of how the run was evaluated: the rule, and under the union rule the size of the
    label space and the class names that several datasets share (reported, not merged)."""
    info: dict = {"rule": rule}
    if rule == "union":
        info["classes"] = sum(len(t.classnames) for t in benchmark.tasks)
        info["duplicate_classnames"] = duplicate_classnames(benchmark.tasks)
    return info


def config_summary(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
