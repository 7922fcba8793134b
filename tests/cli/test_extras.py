"""A missing optional extra is one line naming ``pip install 'clbench[EXTRA]'``, exit status 2, no traceback.

Absence is simulated as tests/conftest.py's ``without_launcher_extras`` does, by patching the import machinery, here
every door a package comes in by: ``import`` statements (``builtins.__import__``), ``importlib.import_module`` and
``importlib.util.find_spec`` (a module already in ``sys.modules`` still goes through ``__import__``).
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
from pathlib import Path

import pytest

from clbench.cli.app import main
from clbench.extras import EXTRAS, MODULE_EXTRA, extra_of

FAST = ["--preset", "smoke", "--seeds", "0", "--orders", "1"]


@pytest.fixture
def without(monkeypatch):
    """``without("tokenizers", ...)``: those top-level packages (and their submodules) cannot be imported."""

    def hide(*names: str) -> None:
        gone = set(names)

        def absent(name: str) -> bool:
            return name.partition(".")[0] in gone

        real_import, real_import_module, real_find_spec = builtins.__import__, importlib.import_module, \
            importlib.util.find_spec

        def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
            if level == 0 and absent(name):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name.partition(".")[0])
            return real_import(name, globals, locals, fromlist, level)

        def fake_import_module(name, package=None):
            if absent(name):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name.partition(".")[0])
            return real_import_module(name, package)

        def fake_find_spec(name, package=None):
            return None if absent(name) else real_find_spec(name, package)

        monkeypatch.setattr(builtins, "__import__", fake_import)
        monkeypatch.setattr(importlib, "import_module", fake_import_module)
        monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)

    return hide


def one_line_error(capsys, extra: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and f"pip install 'clbench[{extra}]'" in err, err
    return err


def test_every_extra_of_pyproject_is_declared() -> None:
    """The table of extras is pyproject's (no extra forgotten, no package of one left out)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    declared = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for extra, modules in EXTRAS.items():
        names = {d.split(">")[0].split("<")[0].split("=")[0].strip().lower() for d in declared[extra]}
        assert set(modules) <= names, (extra, modules, names)
    assert {"mcit", "ray", "slurm", "tracking"} <= set(EXTRAS)


@pytest.mark.parametrize("module", ["tokenizers", "transformers"])
def test_mcit_without_its_extra(tmp_path: Path, capsys, without, module: str) -> None:
    without(module)
    out = tmp_path / "results"
    assert main(["run", "--methods", "lora", "--benchmark", "synthetic-mcit", "--out", str(out)]) == 2
    assert repr(module) in one_line_error(capsys, "mcit")
    assert not out.exists()
    assert main(["sweep", "--methods", "lora", "--benchmark", "synthetic-mcit", "--out", str(out)]) == 2
    one_line_error(capsys, "mcit")
    assert not out.exists()


@pytest.mark.parametrize(("launcher", "extra", "args"), [("ray", "ray", []), ("slurm", "slurm", ["--time", "10"])])
def test_launchers_without_their_extra(tmp_path: Path, capsys, without, launcher: str, extra: str,
                                       args: list[str]) -> None:
    without(*EXTRAS[extra])
    out = tmp_path / "results"
    assert main(["sweep", "--methods", "lora", *FAST, "--out", str(out), "--launcher", launcher, *args]) == 2
    assert f"--launcher {launcher}" in one_line_error(capsys, extra)
    assert not any(p.name == "seed0" for p in out.rglob("*"))


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_tracking_without_its_extra(tmp_path: Path, capsys, without, backend: str) -> None:
    without(backend)
    out = tmp_path / "results"
    assert main(["run", "--methods", "zeroshot", "--preset", "smoke", "--out", str(out), "--track", backend]) == 2
    assert f"--track {backend}" in one_line_error(capsys, "tracking")
    assert not out.exists()


@pytest.mark.parametrize("module", sorted(MODULE_EXTRA))
def test_an_import_no_check_caught_is_still_one_line(monkeypatch, capsys, module: str) -> None:
    """The command line's last resort: any extra's package missing deep inside a command."""
    import clbench.settings.clip_commands as clip_commands

    def deep(*a, **k):
        raise ModuleNotFoundError(f"No module named '{module}.sub'", name=f"{module}.sub")

    monkeypatch.setattr(clip_commands, "print_summary", deep)
    monkeypatch.setattr("clbench.engine.runner.run_methods", lambda *a, **k: [])
    assert main(["run", "--methods", "zeroshot", "--preset", "smoke", "--out", "unused"]) == 2
    assert repr(module) in one_line_error(capsys, MODULE_EXTRA[module])


def test_other_import_errors_are_not_disguised() -> None:
    assert extra_of(ModuleNotFoundError("No module named 'numpyy'", name="numpyy")) is None
    assert extra_of(ModuleNotFoundError("x", name="wandb.sdk")) == "tracking"
    assert extra_of(ImportError("cannot import name")) is None
