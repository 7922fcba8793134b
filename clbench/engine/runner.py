"""One ``clbench run``: build the benchmark and backbone once, then run each method over the sequence and
write its results directory (the results contract in :mod:`clbench.storage.results`).

Order of events: every input is validated (nothing written yet); each run folder is locked
(:mod:`clbench.storage.lock`); a run's first write happens when its first task ends (``config.json``, ``manifest.json``
with status ``running``, the partial CSVs and the resume checkpoint of :mod:`clbench.storage.checkpoint`), or when it
fails for a reason other than a user error; the manifest becomes ``complete`` (and the checkpoint is deleted)
or ``failed``. A user error (e.g. an unreadable image) before the first task ends leaves the folder as it was.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from clbench.config import RunConfig, method_run_config, run_id, train_config_for
from clbench.costs.profiler import Profiler, SectionRecord
from clbench.datasets.base import Benchmark, ImageSpec, Task, duplicate_classnames
from clbench.engine.harness import DivergenceError, Hooks, SequenceResult, check_precision, resolve_device, run_sequence
from clbench.engine.interrupt import RunInterrupted, critical, handling_signals, mark_interrupted
from clbench.engine.metrics import json_safe, metrics_from_json, mtil_metrics
from clbench.errors import UserError
from clbench.methods import get_method
from clbench.methods.state_checks import StateMismatch
from clbench.models.backbones import load_backbone
from clbench.models.clip import ClipModel
from clbench.storage.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    capture_rng,
    check_info,
    check_rng_tensors,
    load_checkpoint,
    read_info,
    restore_rng,
    save_checkpoint,
)
from clbench.storage.lock import LOCK_NAME, RunLock
from clbench.storage.results import (
    accuracy_frame,
    atomic_write_csv,
    atomic_write_json,
    environment_info,
    missing_results,
    remove_temporaries,
    run_dir,
)


@dataclass
class MethodOutcome:
    method: str
    path: Path
    status: str
    metrics: dict | None
    error: str | None = None


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
) -> list[MethodOutcome]:
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
        _check_something_to_resume(paths)
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
    # a complete run is locked only to tidy what a kill left (a checkpoint, temporaries, a stale lock)
    locks, made = _lock_all([p for p in plans if p.mode != "done" or _leftovers(p.path)], notes.append)
    if cfg.benchmark == "synthetic":
        notes.insert(0, "no MTIL data configured: running the embedded default (synthetic sequence)")
    for note in notes:
        notify(note)
    by_path = {lock.folder: lock for lock in locks}
    outcomes = []
    try:
        with handling_signals():
            for plan in plans:
                try:
                    outcomes.append(_run_one(cfg, plan, base_model, benchmark, device,
                                             hooks_for(plan.name) if hooks_for else Hooks(), notify))
                finally:  # a finished run keeps no lock while the next method runs
                    lock = by_path.pop(plan.path, None)
                    if lock is not None:
                        lock.release()
        return outcomes
    finally:
        for lock in by_path.values():
            lock.release()
        _remove_empty(made)  # folders made for a lock whose run wrote nothing (a user error in its first task)


def _leftovers(path: Path) -> bool:
    """Whether a complete run's folder holds files a kill left behind."""
    return (path / CHECKPOINT_NAME).exists() or (path / LOCK_NAME).exists() or any(path.glob(".*.tmp"))


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


def _has_run(path: Path) -> bool:
    """A run was started here: it wrote a manifest or a checkpoint, or it holds (or a kill left) the lock."""
    return any((path / name).exists() for name in ("manifest.json", CHECKPOINT_NAME, LOCK_NAME))


def _check_something_to_resume(paths: dict[str, Path]) -> None:
    """``--resume`` needs a run of at least one of the methods (the others, never started, start now)."""
    if not any(_has_run(p) for p in paths.values()):
        first = next(iter(paths.values()))
        raise UserError(f"--resume: no run to resume in {first.parent.parent} (no run of {', '.join(paths)} "
                        "there); check --out/--seed/--order, or drop --resume to start the run")


@dataclass
class RunPlan:
    """One (method, run folder) after validation: how it starts (``fresh``, ``resume`` after ``completed``
    tasks, ``restart`` a run that completed no task, or ``done`` already)."""

    name: str
    path: Path
    resolved: dict
    run_id: str
    mode: str = "fresh"
    completed: int = 0


def plan_run(cfg: RunConfig, name: str, base_model: ClipModel, benchmark: Benchmark, device: torch.device,
             path: Path, resume: bool, notify: Callable[[str], None]) -> RunPlan:
    """Validate one method's run (its ``validate()`` on a copy of the model) and decide how it starts."""
    method_cls = get_method(name)
    resolved = method_run_config(cfg, name)
    resolved["datasets"] = benchmark.task_names
    plan = RunPlan(name, path, resolved, run_id(resolved))
    method = method_cls(copy.deepcopy(base_model), method_cls.Hparams(**cfg.methods[name]), Profiler(device=device))
    method.benchmark = cfg.benchmark
    validate = getattr(method, "validate", None)
    if validate is not None:
        validate()
    del method
    if resume:
        plan.mode, plan.completed = _resume_mode(plan, notify)
    elif (path / CHECKPOINT_NAME).exists():
        notify(f"{name}: starting over in {path}; its unfinished run is discarded (pass --resume to continue it)")
    return plan


def _resume_mode(plan: RunPlan, notify: Callable[[str], None]) -> tuple[str, int]:
    path, ckpt = plan.path, plan.path / CHECKPOINT_NAME
    if not _has_run(path):
        notify(f"{plan.name}: no run to resume in {path}; starting it")
        return "fresh", 0
    manifest = _read_json(path / "manifest.json") if (path / "manifest.json").exists() else {}
    datasets = plan.resolved["datasets"]
    if manifest.get("status") == "complete" and manifest.get("run_id") == plan.run_id \
            and missing_results(path, datasets) is None:  # a checkpoint left beside it is a kill's leftover
        notify(f"{plan.name}: already complete in {path}; nothing to resume")
        return "done", len(datasets)
    info = read_info(ckpt) if ckpt.exists() else None
    found = info.get("run_id") if info else manifest.get("run_id")
    if found is None and not manifest and info is None:  # only a lock: killed before its first task ended
        notify(f"{plan.name}: {path} was stopped before its first task ended; starting it from the first task")
        return "restart", 0
    if found != plan.run_id:
        raise UserError(f"--resume: the run in {path} was made with another configuration ({_config_diff(plan)}); "
                        "rerun with the same options, or drop --resume to start over")
    if manifest.get("status") == "complete":
        notify(f"{plan.name}: {path} says complete but {missing_results(path, datasets)}; running what is missing")
    if info is not None:
        done = check_info(ckpt, info, plan.run_id, datasets, plan.resolved.get("eval") == "union")
        notify(f"{plan.name}: resuming {path} after task {done} of {len(datasets)}")
        return "resume", done
    notify(f"{plan.name}: {path} has no completed task to resume from; starting it from the first task")
    return "restart", 0


def _config_diff(plan: RunPlan) -> str:
    """The settings that differ between the stored run's config.json and now, for the error message."""
    stored_path = plan.path / "config.json"
    stored = _flatten(_read_json(stored_path)) if stored_path.exists() else {}
    now = _flatten(plan.resolved)
    keys = sorted(k for k in set(stored) | set(now)
                  if k != "device" and not k.startswith("recipe.") and stored.get(k) != now.get(k))
    if not keys:
        return "its run id differs"
    shown = ", ".join(f"{k}: {stored.get(k, '-')!s} then, {now.get(k, '-')!s} now" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _flatten(data, prefix: str = "") -> dict:
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    out: dict = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _read_json(path: Path) -> dict:
    from clbench.storage.safeio import json_object, read_json

    fix = "delete that run folder, or drop --resume"
    return json_object(read_json(path, "run file", fix), path, "run file", fix)


def _lock_all(plans: list[RunPlan], notify: Callable[[str], None]) -> tuple[list[RunLock], list[Path]]:
    """Lock every run folder or none: on a failure, release what was taken and remove folders made here.
    Returns the locks and the folders made for them (outermost first)."""
    locks: list[RunLock] = []
    made: list[Path] = []
    try:
        for plan in plans:
            made += _missing_dirs(plan.path)
            lock = RunLock(plan.path)
            lock.acquire(notify)
            locks.append(lock)
    except BaseException:
        for lock in locks:
            lock.release()
        _remove_empty(made)
        raise
    return locks, made


def _remove_empty(folders: list[Path]) -> None:
    """Remove those of ``folders`` (outermost first) that are empty, innermost first."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, outermost first."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing[::-1]


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


def _run_one(cfg: RunConfig, plan: RunPlan, base_model: ClipModel, benchmark: Benchmark, device: torch.device,
             hooks: Hooks, notify: Callable[[str], None]) -> MethodOutcome:
    name, path = plan.name, plan.path
    if plan.mode == "done":
        if (path / LOCK_NAME).exists():  # locked by us (to tidy): a kill's leftovers are not results
            (path / CHECKPOINT_NAME).unlink(missing_ok=True)
            remove_temporaries(path)
        metrics = metrics_from_json(_read_json(path / "metrics.json")) if (path / "metrics.json").exists() else None
        return MethodOutcome(name, path, "complete", metrics)
    remove_temporaries(path)  # under the lock: temporaries of writes a kill interrupted
    method_cls = get_method(name)
    train = train_config_for(cfg, name)
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(base_model)
    profiler = Profiler(device=device)
    method = method_cls(model, method_cls.Hparams(**cfg.methods[name]), profiler)
    method.benchmark = cfg.benchmark
    started = time.time()
    ckpt_path = path / CHECKPOINT_NAME
    result = None
    env = environment_info(device)
    manifest = {"status": "running", "run_id": plan.run_id, "method": name, "seed": cfg.seed,
                "benchmark": cfg.benchmark, "order": cfg.order, "started": started, "environment": env,
                "weights": getattr(base_model, "weights", cfg.pretrained or "embedded"),
                "evaluation": evaluation_info(cfg.eval, benchmark), "benchmark_info": benchmark.info,
                "classes": {t.name: len(t.classnames) for t in benchmark.tasks},
                "preprocess": dataclasses.asdict(base_model.image_spec),
                "datasets": benchmark.task_names, "selection": cfg.data.datasets}
    expected = {t.name: t.info["expected_classes"] for t in benchmark.tasks if "expected_classes" in t.info}
    if expected:  # real data: the protocol's class count beside the one found (they differ only when allowed)
        manifest["expected_classes"] = expected
    if plan.mode == "resume":
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.run_id != plan.run_id or ckpt.completed != plan.completed:
            raise UserError(f"{ckpt_path} changed while this run was starting; rerun with --resume")
        check_info(ckpt_path, ckpt.info(), plan.run_id, plan.resolved["datasets"], cfg.eval == "union")
        check_rng_tensors(ckpt_path, ckpt.rng)
        stored = _read_json(path / "manifest.json") if (path / "manifest.json").exists() else {}
        for key in ("error", "traceback", "finished", "seconds", "failed_task", "failed_step"):
            stored.pop(key, None)
        manifest = {**manifest, **stored, "status": "running", "run_id": plan.run_id}
        manifest["resumed"] = [*stored.get("resumed", []), {"after_task": ckpt.completed, "at": started,
                                                            "environment": env}]
        profiler.task = -1
        method.setup()  # on the pretrained weights, as the interrupted run did; then its state replaces it
        result = restore(ckpt, model, method, profiler, benchmark.tasks[: ckpt.completed], ckpt_path)
        del ckpt
    written = False

    def commit() -> None:
        """First write of this run: clear what a previous run left, then config.json and the manifest."""
        nonlocal written
        if not written:
            with critical():
                # the manifest says running before anything of an earlier run is removed, so a kill in between
                # never leaves an old "complete" beside missing results
                atomic_write_json(path / "manifest.json", manifest)
                if plan.mode != "resume":
                    for stale in STALE:
                        (path / stale).unlink(missing_ok=True)
                atomic_write_json(path / "config.json", plan.resolved)
            written = True

    if plan.mode == "resume":
        commit()

    def on_task_end(index: int, res: SequenceResult) -> None:
        commit()
        with critical():
            write_results(path, res, profiler)
            save_checkpoint(ckpt_path, capture(plan.run_id, res, model, method, profiler))
            manifest["completed_tasks"] = index + 1
            atomic_write_json(path / "manifest.json", manifest)

    try:
        result = run_sequence(method, benchmark, train, profiler, device, cfg.seed, cfg.data.prompt,
                              cfg.precision, hooks, start_task=plan.completed, result=result,
                              on_task_end=on_task_end, eval_rule=cfg.eval)
        commit()
        with critical():
            metrics = write_results(path, result, profiler)
            manifest.update(status="complete", finished=time.time(), seconds=time.time() - manifest["started"])
            atomic_write_json(path / "manifest.json", manifest)
            ckpt_path.unlink(missing_ok=True)  # complete: every result is on disk, the checkpoint is not needed
        return MethodOutcome(name, path, "complete", metrics)
    except RunInterrupted as exc:
        commit()
        mark_interrupted(exc, manifest, path, name, len(benchmark.task_names), plan.completed)
        raise
    except DivergenceError as exc:
        commit()
        atomic_write_csv(path / "profile.csv", profiler.frame())
        manifest.update(status="failed", error=str(exc), failed_task=exc.task, failed_step=exc.step,
                        finished=time.time())
        atomic_write_json(path / "manifest.json", manifest)
        return MethodOutcome(name, path, "failed", None, str(exc))
    except UserError:
        if not written:  # e.g. an unreadable image in the first task: the folder stays as it was
            raise
        manifest.update(status="failed", error=str(sys.exc_info()[1]), finished=time.time())
        atomic_write_json(path / "manifest.json", manifest)
        raise
    except BaseException as exc:
        commit()
        manifest.update(status="failed", error=f"{type(exc).__name__}: {exc}", finished=time.time(),
                        traceback=traceback.format_exc())
        atomic_write_json(path / "manifest.json", manifest)
        raise


def capture(run: str, result: SequenceResult, model: ClipModel, method, profiler: Profiler) -> Checkpoint:
    """The state after ``len(result.rows)`` tasks, as a :class:`~clbench.storage.checkpoint.Checkpoint`."""
    rng, rng_extra = capture_rng()
    recall = ({"zeroshot": list(result.zeroshot_recall), "rows": [list(r) for r in result.recall_rows]}
              if result.zeroshot_recall is not None else {})
    return Checkpoint(run_id=run, completed=len(result.rows), datasets=list(result.datasets),
                      zeroshot=list(result.zeroshot), rows=[list(r) for r in result.rows], recall=recall,
                      model=model.state_dict(), method=method.state_dict(), method_extra=method.extra_state(),
                      profile=[dataclasses.asdict(r) for r in profiler.records],
                      state_bytes=[dict(r) for r in profiler.state_bytes], rng=rng, rng_extra=rng_extra)


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
        raise _bad_checkpoint(where, f"its {method.name} state does not fit this run: {exc.entry} {exc.why}") from None
    try:
        method.load_state_dict({k: v.to(device) for k, v in ckpt.method.items()})
        method.load_extra_state(ckpt.method_extra)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise _bad_checkpoint(where, f"its {method.name} state does not fit ({type(exc).__name__}: "
                                     f"{' '.join(str(exc).split())[:200]})") from None
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(ckpt.model)), sorted(set(ckpt.model) - set(expected))
    if missing or unexpected:
        raise _bad_checkpoint(where, f"its model does not fit the model built now (missing {missing[:3]}, "
                                     f"unexpected {unexpected[:3]})")
    for key, tensor in expected.items():
        stored = ckpt.model[key]
        if stored.shape != tensor.shape or stored.dtype.is_floating_point != tensor.dtype.is_floating_point:
            raise _bad_checkpoint(where, f"its model/{key} is {stored.dtype} {tuple(stored.shape)}, the model needs "
                                         f"{tensor.dtype} {tuple(tensor.shape)}")
    model.load_state_dict(ckpt.model, strict=True)
    known = {f.name for f in dataclasses.fields(SectionRecord)}
    try:
        profiler.records = [SectionRecord(**{k: v for k, v in r.items() if k in known}) for r in ckpt.profile]
    except TypeError as exc:
        raise _bad_checkpoint(where, f"its profile records are garbled ({exc})") from None
    profiler.state_bytes = [dict(r) for r in ckpt.state_bytes]
    restore_rng(ckpt.rng, ckpt.rng_extra)
    recall = ckpt.recall or {}
    return SequenceResult(list(ckpt.datasets), list(ckpt.zeroshot), [list(r) for r in ckpt.rows],
                          zeroshot_recall=list(recall["zeroshot"]) if recall else None,
                          recall_rows=[list(r) for r in recall.get("rows", [])])


def _bad_checkpoint(path: Path, why: str) -> UserError:
    return UserError(f"cannot resume from {path}: {why}; delete it and rerun without --resume to start over")


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
