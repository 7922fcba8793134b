"""``clbench sweep`` on an MCIT benchmark: every (method, seed, grid point) as one :class:`clbench.sweeps.plan.RunSpec`.

The plan is the MCIT setting's own (its ``--grid`` keys, its run ids); everything else is the CLIP sweep's
machinery, shared rather than copied: the launchers of :mod:`clbench.sweeps.launchers` (``--launcher local|ray|slurm|
inline``) call :func:`clbench.sweeps.plan.execute_run`, which runs an MCIT spec through :func:`run_spec`; the statuses
and the skip / resume rules of :func:`clbench.sweeps.plan.run_status`; ``--dry-run``, the live view and the summary of
:mod:`clbench.cli.sweep`.

- **Folders** as in CLIP sweeps: ``<out>/<benchmark>-order1/<method>[,key=value...]/seed<s>`` (the grid point in
  the method folder's name, :func:`clbench.sweeps.plan.folder_name`).
- **Ids.** A run's id is the run id ``clbench run`` gives the same configuration (:func:`clbench.settings.mcit.runner.
  resolved_config`: hyperparameters, loop, backbone, data sizes or data files' SHA-256, tasks, seed).
- **Skip, resume, replace** (:func:`clbench.sweeps.plan.run_status`): a folder whose manifest says ``complete``, whose
  ``config.json`` has this run's id and whose files back it is skipped; a run that failed or was stopped after a
  task resumes after it from its checkpoint in the sweep's staging folder (``<out>/.sweep/runs/<id>``, the
  checkpoint of :mod:`clbench.settings.mcit.resume`); anything else (new, failed before its first task, other settings)
  runs and replaces the folder. A failed run is recorded in its folder (``manifest.json``, ``error.txt``) and
  the sweep goes on.
- Options of CLIP runs (``--orders``, ``--eval``, ``--pretrained``, ``--precision``, ``--shots``,
  ``--skip-bad-images``) are refused in one line.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from pathlib import Path

from clbench.engine.session import RunOutcome
from clbench.errors import UserError
from clbench.sweeps.plan import GridAxis, RunSpec


def parse_grid(items: list[str], methods: list[str]) -> tuple[GridAxis, ...]:
    """``--grid key=v1,v2``: ``<method>.<hyperparameter>`` of a method in ``--methods``, ``loop.<field>`` or
    ``data.n_train`` / ``data.n_test``; each key once, each value once."""
    from clbench.settings.mcit.loop import LoopConfig
    from clbench.settings.mcit.methods import get_mcit_method
    from clbench.sweeps.plan import GridAxis, split_list

    axes: list[GridAxis] = []
    for item in items:
        key, sep, raw = (s.strip() for s in item.partition("="))
        head, _, rest = key.partition(".")
        if not sep:
            raise UserError(f"--grid {item!r}: expected key=v1,v2,..., e.g. --grid keeplora.rank=4,8")
        if head in ("loop", "data"):
            known = ("n_train", "n_test") if head == "data" else tuple(f.name for f in dataclasses.fields(LoopConfig))
            if rest not in known:
                raise UserError(f"--grid {key}: {head} has no setting {rest!r}; known: {', '.join(known)}")
            method, label = None, key
        else:
            if head not in methods:
                raise UserError(f"--grid {key}: {head!r} is not in --methods (nor loop / data); add it or drop the "
                                "axis")
            fields = [f.name for f in dataclasses.fields(get_mcit_method(head).Hparams)]
            if rest not in fields:
                raise UserError(f"--grid {key}: {head} (LLaVA form) has no hyperparameter {rest!r}; known: "
                                f"{', '.join(fields)}")
            method, label = head, rest
        values = tuple(split_list(raw, f"--grid {key}="))
        if len(set(values)) != len(values):
            raise UserError(f"--grid {item!r} repeats a value; give each once")
        if any(a.key == key for a in axes):
            raise UserError(f"--grid {key} is given twice; give all its values in one --grid")
        axes.append(GridAxis(key, values, method, label))
    return tuple(axes)


def expand(benchmark: str, methods: list[str], seeds: tuple[int, ...], axes: tuple[GridAxis, ...],
           sets: list[str], preset: str, backbone: str, data_root: str, device: str, out: Path,
           threads: int = 1) -> list[RunSpec]:
    """Every run, in order (seed, method, grid point), with its run id and final folder; every run's settings are
    checked before any runs (a bad value is a UserError)."""
    from clbench.config import load_preset, run_id
    from clbench.settings.mcit import LAYOUT
    from clbench.settings.mcit.loop import LoopConfig
    from clbench.settings.mcit.methods import get_mcit_method
    from clbench.settings.mcit.runner import PRESETS, SETTING, apply_sets, data_identity, resolved_config
    from clbench.storage.results import run_dir
    from clbench.sweeps.plan import _check_distinct, folder_name

    load_preset(preset, "mcit", SETTING)  # an unknown preset: one line
    swept = {a.key for a in axes}
    for item in sets:
        if item.partition("=")[0].strip() in swept:
            raise UserError(f"{item.partition('=')[0]} is both in --set and --grid; keep it in one of them")
    if backbone != "tiny":
        backbone = str(Path(backbone).expanduser().absolute())  # workers may start elsewhere
    if data_root:
        data_root = str(Path(data_root).expanduser().absolute())
    identities: dict[str, tuple[list[str], dict]] = {}  # the data files are hashed once per sweep
    specs = []
    for seed, method in itertools.product(seeds, methods):
        mine = [a for a in axes if a.method in (None, method)]
        others = {m for m in methods if m != method}
        base_sets = [s for s in sets if s.partition(".")[0] not in others]
        for values in itertools.product(*(a.values for a in mine)):
            run_sets = (*base_sets, *(f"{a.key}={v}" for a, v in zip(mine, values, strict=True)))
            p = PRESETS[preset]
            loop, hparams = LoopConfig(**p["loop"]), {method: get_mcit_method(method).Hparams()}
            sizes = {"n_train": p["n_train"], "n_test": p["n_test"]}
            apply_sets(list(run_sets), loop, hparams, sizes)  # a bad value fails now, not mid-sweep
            key = repr(sorted(sizes.items()))
            if key not in identities:
                identities[key] = data_identity(benchmark, sizes, data_root)
            names, data_info = identities[key]
            rid = run_id(resolved_config(benchmark, method, seed, preset, backbone, hparams[method], loop, data_info,
                                         names))
            point = tuple((a.label, v) for a, v in zip(mine, values, strict=True))
            options = (("benchmark", benchmark), ("backbone", backbone), ("data_root", data_root),
                       ("device", device), ("order", 1), ("seed", seed))
            folder = run_dir(out, benchmark, 1, folder_name(method, point), seed)
            specs.append(RunSpec(rid, method, 1, seed, point, preset, options, run_sets, benchmark, str(out),
                                 str(folder), threads, layout=LAYOUT, runner=run_spec))
    _check_distinct(specs)
    return specs


def run_spec(spec: RunSpec, out: Path) -> RunOutcome:
    """Run one MCIT spec in ``out`` (the sweep's staging folder), resuming after the last completed task of an
    earlier attempt there; called by :func:`clbench.sweeps.plan.execute_run` in the launcher's worker."""
    from clbench.settings.mcit.runner import run_mcit
    from clbench.sweeps.plan import CHECKPOINT, staged_folder

    opts = dict(spec.options)
    (again,) = expand(spec.benchmark, [spec.method], (spec.seed,), (), list(spec.sets), spec.preset,
                      opts["backbone"], opts["data_root"], opts["device"], Path(spec.out))
    if again.id != spec.id:
        raise UserError(f"run id {again.id} differs from the planned {spec.id}: this worker resolves the "
                        "configuration differently (another clbench version, or data files changed?); install the "
                        "same version everywhere")
    (outcome,) = run_mcit(spec.benchmark, [spec.method], out, spec.seed, spec.preset, opts["backbone"],
                          opts["data_root"], opts["device"], list(spec.sets),
                          notify=lambda m: print(f"note: {m}", flush=True),
                          resume="auto" if (staged_folder(spec) / CHECKPOINT).exists() else False)
    return outcome


def prepare_backbone(backbone: str, preset: str, quiet: bool) -> None:
    """Pre-train the embedded tiny LLaVA once here, so parallel runs do not each pre-train it."""
    if backbone != "tiny":
        return
    from clbench.settings.mcit.pretrain import ensure_tiny_llava, tiny_llava_path
    from clbench.settings.mcit.runner import PRESETS

    steps = PRESETS[preset]["pretrain_steps"]
    if not tiny_llava_path(steps).exists() and not quiet:
        print(f"note: pre-training the tiny LLaVA ({steps} steps, cached afterwards)", file=sys.stderr, flush=True)
    ensure_tiny_llava(steps=steps)
