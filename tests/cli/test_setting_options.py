"""Every option of ``clbench run`` and ``clbench sweep`` either works in each setting or is refused there in one line.

The runners are replaced by recorders of what reaches them (the resolved configuration or the arguments of the
LLaVA runner, the launcher settings, the torch thread count, the progress and tracking hooks): an option "works"
when the record differs from the same command without it, and is "refused" when the command exits 2 with one line
naming it and nothing reaches a runner. A new option must be added to the tables below, or the coverage test fails.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import typer

from clbench.cli.app import app, main

WORKS, REFUSED = "works", "refused"
SETTINGS = {"clip": "synthetic", "mcit": "synthetic-mcit"}
SELECTORS = {"--methods", "--benchmark", "--help"}  # what picks the setting and the methods, in every command

# option -> ({setting: arguments}, {setting: expected}); one value that differs from the default
RUN_OPTIONS: dict[str, tuple[dict[str, list[str]], dict[str, str]]] = {
    "--order": ({"clip": ["--order", "2"], "mcit": ["--order", "2"]}, {"clip": WORKS, "mcit": REFUSED}),
    "--seed": ({"clip": ["--seed", "3"], "mcit": ["--seed", "3"]}, {"clip": WORKS, "mcit": WORKS}),
    "--out": ({"clip": ["--out", "{tmp}/other"], "mcit": ["--out", "{tmp}/other"]}, {"clip": WORKS, "mcit": WORKS}),
    "--preset": ({"clip": ["--preset", "smoke"], "mcit": ["--preset", "smoke"]}, {"clip": WORKS, "mcit": WORKS}),
    "--backbone": ({"clip": ["--backbone", "ViT-B-16"], "mcit": ["--backbone", "{tmp}/llava"]},
                   {"clip": WORKS, "mcit": WORKS}),
    "--pretrained": ({"clip": ["--backbone", "ViT-B-16", "--pretrained", "openai"],
                      "mcit": ["--pretrained", "openai"]}, {"clip": WORKS, "mcit": REFUSED}),
    "--data-root": ({"clip": ["--data-root", "{tmp}"], "mcit": ["--data-root", "{tmp}"]},
                    {"clip": REFUSED, "mcit": WORKS}),
    "--device": ({"clip": ["--device", "cpu"], "mcit": ["--device", "cpu"]}, {"clip": WORKS, "mcit": WORKS}),
    "--precision": ({"clip": ["--precision", "amp"], "mcit": ["--precision", "amp"]},
                    {"clip": WORKS, "mcit": REFUSED}),
    "--eval": ({"clip": ["--eval", "union"], "mcit": ["--eval", "union"]}, {"clip": WORKS, "mcit": REFUSED}),
    # the embedded CLIP benchmark is drawn in memory: --data-root, --shots, --skip-bad-images are for the real ones
    "--shots": ({"clip": ["--shots", "5"], "mcit": ["--shots", "5"]}, {"clip": REFUSED, "mcit": REFUSED}),
    "--datasets": ({"clip": ["--datasets", "mnist"], "mcit": ["--datasets", "mnist"]},
                   {"clip": REFUSED, "mcit": REFUSED}),
    "--allow-incomplete": ({"clip": ["--allow-incomplete"], "mcit": ["--allow-incomplete"]},
                           {"clip": REFUSED, "mcit": REFUSED}),
    "--skip-bad-images": ({"clip": ["--skip-bad-images"], "mcit": ["--skip-bad-images"]},
                          {"clip": REFUSED, "mcit": REFUSED}),
    "--set": ({"clip": ["--set", "train.lr=0.001"], "mcit": ["--set", "loop.epochs=2"]},
              {"clip": WORKS, "mcit": WORKS}),
    "--threads": ({"clip": ["--threads", "{threads}"], "mcit": ["--threads", "{threads}"]},
                  {"clip": WORKS, "mcit": WORKS}),
    "--quiet": ({"clip": ["--quiet"], "mcit": ["--quiet"]}, {"clip": WORKS, "mcit": WORKS}),
    "--resume": ({"clip": ["--resume"], "mcit": ["--resume"]}, {"clip": WORKS, "mcit": WORKS}),
    "--trust-torchscript": ({"clip": ["--trust-torchscript"], "mcit": ["--trust-torchscript"]},
                            {"clip": WORKS, "mcit": REFUSED}),
    "--track": ({"clip": ["--track", "tensorboard"], "mcit": ["--track", "tensorboard"]},
                {"clip": WORKS, "mcit": WORKS}),
    "--allow-download": ({"clip": ["--allow-download"], "mcit": ["--allow-download"]},
                         {"clip": WORKS, "mcit": REFUSED}),
}

SWEEP_OPTIONS: dict[str, tuple[dict[str, list[str]], dict[str, str]]] = {
    "--orders": ({"clip": ["--orders", "1,2"], "mcit": ["--orders", "1,2"]}, {"clip": WORKS, "mcit": REFUSED}),
    "--seeds": ({"clip": ["--seeds", "0,1"], "mcit": ["--seeds", "0,1"]}, {"clip": WORKS, "mcit": WORKS}),
    "--grid": ({"clip": ["--grid", "lora.rank=2,4"], "mcit": ["--grid", "lora.rank=2,4"]},
               {"clip": WORKS, "mcit": WORKS}),
    "--eval": ({"clip": ["--eval", "union"], "mcit": ["--eval", "union"]}, {"clip": WORKS, "mcit": REFUSED}),
    "--out": ({"clip": ["--out", "{tmp}/other"], "mcit": ["--out", "{tmp}/other"]}, {"clip": WORKS, "mcit": WORKS}),
    "--preset": ({"clip": ["--preset", "smoke"], "mcit": ["--preset", "smoke"]}, {"clip": WORKS, "mcit": WORKS}),
    "--backbone": ({"clip": ["--backbone", "ViT-B-16"], "mcit": ["--backbone", "{tmp}/llava"]},
                   {"clip": WORKS, "mcit": WORKS}),
    "--pretrained": ({"clip": ["--backbone", "ViT-B-16", "--pretrained", "openai"],
                      "mcit": ["--pretrained", "openai"]}, {"clip": WORKS, "mcit": REFUSED}),
    "--data-root": ({"clip": ["--data-root", "{tmp}"], "mcit": ["--data-root", "{tmp}"]},
                    {"clip": REFUSED, "mcit": WORKS}),
    "--device": ({"clip": ["--device", "cpu"], "mcit": ["--device", "cpu"]}, {"clip": WORKS, "mcit": WORKS}),
    "--precision": ({"clip": ["--precision", "amp"], "mcit": ["--precision", "amp"]},
                    {"clip": WORKS, "mcit": REFUSED}),
    "--shots": ({"clip": ["--shots", "5"], "mcit": ["--shots", "5"]}, {"clip": REFUSED, "mcit": REFUSED}),
    "--datasets": ({"clip": ["--datasets", "mnist"], "mcit": ["--datasets", "mnist"]},
                   {"clip": REFUSED, "mcit": REFUSED}),
    "--allow-incomplete": ({"clip": ["--allow-incomplete"], "mcit": ["--allow-incomplete"]},
                           {"clip": WORKS, "mcit": REFUSED}),
    "--skip-bad-images": ({"clip": ["--skip-bad-images"], "mcit": ["--skip-bad-images"]},
                          {"clip": REFUSED, "mcit": REFUSED}),
    "--set": ({"clip": ["--set", "train.lr=0.001"], "mcit": ["--set", "loop.epochs=2"]},
              {"clip": WORKS, "mcit": WORKS}),
    "--launcher": ({"clip": ["--launcher", "inline"], "mcit": ["--launcher", "inline"]},
                   {"clip": WORKS, "mcit": WORKS}),
    "--jobs": ({"clip": ["--jobs", "3"], "mcit": ["--jobs", "3"]}, {"clip": WORKS, "mcit": WORKS}),
    "--cpus-per-job": ({"clip": ["--cpus-per-job", "2"], "mcit": ["--cpus-per-job", "2"]},
                       {"clip": WORKS, "mcit": WORKS}),
    "--gpus-per-job": ({"clip": ["--gpus-per-job", "1"], "mcit": ["--gpus-per-job", "1"]},
                       {"clip": WORKS, "mcit": WORKS}),
    "--ray-address": ({"clip": ["--ray-address", "auto"], "mcit": ["--ray-address", "auto"]},
                      {"clip": WORKS, "mcit": WORKS}),
    "--partition": ({"clip": ["--partition", "gpu"], "mcit": ["--partition", "gpu"]}, {"clip": WORKS, "mcit": WORKS}),
    "--time": ({"clip": ["--time", "10"], "mcit": ["--time", "10"]}, {"clip": WORKS, "mcit": WORKS}),
    "--slurm-param": ({"clip": ["--slurm-param", "account=lab"], "mcit": ["--slurm-param", "account=lab"]},
                      {"clip": WORKS, "mcit": WORKS}),
    "--submitit-cluster": ({"clip": ["--submitit-cluster", "local"], "mcit": ["--submitit-cluster", "local"]},
                           {"clip": WORKS, "mcit": WORKS}),
    "--dry-run": ({"clip": ["--dry-run"], "mcit": ["--dry-run"]}, {"clip": WORKS, "mcit": WORKS}),
    "--quiet": ({"clip": ["--quiet"], "mcit": ["--quiet"]}, {"clip": WORKS, "mcit": WORKS}),
}


def _options(command: str) -> set[str]:
    click_command = typer.main.get_command(app).commands[command]
    return {max(p.opts, key=len) for p in click_command.params} - SELECTORS


@pytest.mark.parametrize(("command", "table"), [("run", RUN_OPTIONS), ("sweep", SWEEP_OPTIONS)])
def test_every_option_is_declared_for_every_setting(command: str, table: dict) -> None:
    assert set(table) == _options(command)
    for option, (args, expected) in table.items():
        assert set(args) == set(expected) == set(SETTINGS), option


def _plain(value):
    """A comparable record: callables by what they are bound to (progress, tracker), the rest as is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if callable(value):
        owner = getattr(value, "__self__", None)
        return (type(owner).__name__, getattr(owner, "quiet", None))
    return value


@pytest.fixture
def recorded(monkeypatch, capsys):
    """Run ``clbench <args>`` with the runners replaced by recorders; returns (exit status, record, stderr)."""
    import clbench.cli.sweep as sweep_cli
    import clbench.engine.runner as runner
    import clbench.settings.mcit.runner as mcit_runner

    calls: list = []

    def clip_run(cfg, names, out, **kwargs):
        calls.append(("clip", _plain(cfg), names, str(out), _plain(kwargs), torch.get_num_threads()))
        return []

    def mcit_run(*args, **kwargs):
        kwargs["on_task"]("lora", 0, "task", [50.0])  # what --quiet silences
        calls.append(("mcit", _plain(list(args)), _plain({k: v for k, v in kwargs.items()
                                                           if k not in ("on_task", "notify")}),
                      torch.get_num_threads()))
        return []

    def launch(specs, out, dry_run, quiet, launch, prepare, columns):
        calls.append(("sweep", [_plain({k: v for k, v in vars(s).items() if k != "runner"}) for s in specs],
                      str(out), dry_run, quiet, launch))

    monkeypatch.setattr(runner, "run_methods", clip_run)
    monkeypatch.setattr(mcit_runner, "run_mcit", mcit_run)
    monkeypatch.setattr(sweep_cli, "_launch", launch)
    threads = torch.get_num_threads()

    def go(args: list[str]):
        try:
            code = main(args)
        finally:
            torch.set_num_threads(threads)
        err = capsys.readouterr().err
        return code, (calls.pop() if calls else None), err

    yield go
    torch.set_num_threads(threads)


def _check(recorded, tmp_path: Path, command: str, setting: str, option: str, table: dict) -> None:
    args, expected = table[option]
    fill = {"tmp": str(tmp_path), "threads": str(torch.get_num_threads() + 1)}  # a count other than the current
    extra = [a.format(**fill) for a in args[setting]]
    base = [command, "--methods", "lora", "--benchmark", SETTINGS[setting], "--out", str(tmp_path / "results")]
    code0, record0, err0 = recorded(base)
    assert code0 == 0 and record0 is not None, err0
    code, record, err = recorded(base + extra)
    if expected[setting] == WORKS:  # it reaches the runner, or changes what the command prints
        assert code == 0, err
        assert record is not None and (record != record0 or err != err0), \
            f"{option} changes nothing in the {setting} setting"
    else:
        lines = err.strip().splitlines()
        assert code == 2 and record is None, (code, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], err


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("option", sorted(RUN_OPTIONS))
def test_run_options_work_or_are_refused(recorded, tmp_path: Path, setting: str, option: str) -> None:
    if option == "--track":
        pytest.importorskip("tensorboard", reason="--track tensorboard needs the tracking extra")
    _check(recorded, tmp_path, "run", setting, option, RUN_OPTIONS)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("option", sorted(SWEEP_OPTIONS))
def test_sweep_options_work_or_are_refused(recorded, tmp_path: Path, setting: str, option: str) -> None:
    _check(recorded, tmp_path, "sweep", setting, option, SWEEP_OPTIONS)
