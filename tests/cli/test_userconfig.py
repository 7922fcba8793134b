"""The data root from --data-root, $CLBENCH_DATA_ROOT or the user's TOML config file, and its error messages.

Every test points CLBENCH_CONFIG / XDG_CONFIG_HOME / HOME at temporary folders: the real home config is never read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from clbench.datasets.mtil import resolve_data_root
from clbench.errors import UserError
from clbench.userconfig import config_path, load_user_config


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch) -> Path:
    """No data root from the environment; the config file defaults to ``<tmp>/xdg/clbench/config.toml``."""
    for name in ("CLBENCH_CONFIG", "CLBENCH_DATA_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return tmp_path


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "xdg" / "clbench" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _folders(tmp_path: Path, *names: str) -> list[Path]:
    out = []
    for name in names:
        (tmp_path / name).mkdir()
        out.append((tmp_path / name).absolute())
    return out


def test_where_the_config_file_is(tmp_path: Path, monkeypatch) -> None:
    assert config_path() == tmp_path / "xdg" / "clbench" / "config.toml"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")  # not absolute: ignored, as the XDG spec says
    assert config_path() == tmp_path / "home" / ".config" / "clbench" / "config.toml"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert config_path() == tmp_path / "home" / ".config" / "clbench" / "config.toml"
    monkeypatch.setenv("CLBENCH_CONFIG", str(tmp_path / "elsewhere.toml"))
    assert config_path() == tmp_path / "elsewhere.toml"


def test_precedence_flag_then_environment_then_config_file(tmp_path: Path, monkeypatch) -> None:
    flag, env, conf = _folders(tmp_path, "flag", "env", "conf")
    _config(tmp_path, f'data_root = "{conf}"\n')
    monkeypatch.setenv("CLBENCH_DATA_ROOT", str(env))
    assert resolve_data_root(str(flag)) == flag  # the one-argument call other callers make still works
    assert resolve_data_root("") == env
    monkeypatch.delenv("CLBENCH_DATA_ROOT")
    assert resolve_data_root("") == conf
    assert resolve_data_root("", benchmark="xtail") == conf  # data_root serves every real benchmark


def test_a_benchmarks_own_root_wins_over_data_root(tmp_path: Path) -> None:
    mtil, xtail = _folders(tmp_path, "mtil", "xtail")
    _config(tmp_path, f'data_root = "{mtil}"\n\n[data_root_by_benchmark]\nxtail = "{xtail}"\n')
    assert resolve_data_root("", "xtail") == xtail
    assert resolve_data_root("", "mtil") == mtil


def test_only_a_benchmarks_own_root(tmp_path: Path) -> None:
    (xtail,) = _folders(tmp_path, "xtail")
    path = _config(tmp_path, f'[data_root_by_benchmark]\nxtail = "{xtail}"\n')
    assert resolve_data_root("", "xtail") == xtail
    with pytest.raises(UserError, match="--benchmark mtil needs its datasets") as exc:
        resolve_data_root("", "mtil")
    assert str(path) in str(exc.value)


def test_relative_and_home_paths_in_the_config_file(tmp_path: Path) -> None:
    path = _config(tmp_path, 'data_root = "data"\n[data_root_by_benchmark]\nxtail = "~/xtail"\n')
    (path.parent / "data").mkdir()
    (tmp_path / "home" / "xtail").mkdir(parents=True)
    assert resolve_data_root("") == path.parent / "data"  # relative to the config file's folder
    assert resolve_data_root("", "xtail") == tmp_path / "home" / "xtail"


@pytest.mark.parametrize("bench, key", [("mtil", "data_root"), ("xtail", "data_root_by_benchmark.xtail")])
def test_a_bad_path_from_the_config_file_names_the_file_and_key(tmp_path: Path, bench: str, key: str) -> None:
    path = _config(tmp_path, f'data_root = "{tmp_path}/gone"\n[data_root_by_benchmark]\nxtail = "{tmp_path}/x"\n')
    with pytest.raises(UserError) as exc:
        resolve_data_root("", bench)
    message = str(exc.value)
    assert message.startswith(f"data root {tmp_path}/") and f"(from {key} in {path}) does not exist" in message
    assert "\n" not in message


def test_a_bad_path_from_the_flag_or_environment_names_that_source(tmp_path: Path, monkeypatch) -> None:
    _config(tmp_path, f'data_root = "{tmp_path}"\n')  # valid, but the sources above it win
    with pytest.raises(UserError, match=r"^data root .*/nope \(from --data-root\) does not exist"):
        resolve_data_root(str(tmp_path / "nope"))
    monkeypatch.setenv("CLBENCH_DATA_ROOT", str(tmp_path / "nada"))
    with pytest.raises(UserError, match=r"^data root .*/nada \(from CLBENCH_DATA_ROOT\) does not exist"):
        resolve_data_root("")


def test_nothing_configured_says_all_three_ways(tmp_path: Path) -> None:
    with pytest.raises(UserError) as exc:
        resolve_data_root("")
    message = str(exc.value)
    for needle in ("--data-root DIR", "CLBENCH_DATA_ROOT=DIR", str(tmp_path / "xdg" / "clbench" / "config.toml")):
        assert needle in message


@pytest.mark.parametrize("text, needles", [
    ("data_root = /data\n", ("not valid TOML", "line 1")),
    ("data_root = [\n", ("not valid TOML",)),
    ('dataroot = "/data"\n', ("unknown key 'dataroot'", "data_root")),
    ("data_root = 3\n", ("data_root must be a folder path", "got 3")),
    ('data_root = ""\n', ("data_root must be a folder path",)),
    ('data_root_by_benchmark = "/data"\n', ("data_root_by_benchmark must be a table",)),
    ('[data_root_by_benchmark]\nsynthetic = "/data"\n', ("unknown benchmark 'synthetic'", "mtil or xtail")),
    ("[data_root_by_benchmark]\nxtail = false\n", ("data_root_by_benchmark.xtail must be a folder path",)),
])
def test_a_malformed_config_file_is_one_line_naming_the_file(tmp_path: Path, text: str, needles: tuple) -> None:
    path = _config(tmp_path, text)
    with pytest.raises(UserError) as exc:
        resolve_data_root("")
    message = str(exc.value)
    assert str(path) in message and "\n" not in message
    for needle in needles:
        assert needle in message


def test_a_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = _config(tmp_path, "")
    path.write_bytes(b'data_root = "\xff\xfe"\n')
    with pytest.raises(UserError, match="not UTF-8") as exc:
        load_user_config()
    assert str(path) in str(exc.value)


def test_the_config_file_is_not_read_when_a_higher_source_is_given(tmp_path: Path, monkeypatch) -> None:
    (flag,) = _folders(tmp_path, "flag")
    _config(tmp_path, "this is not toml")
    assert resolve_data_root(str(flag)) == flag
    monkeypatch.setenv("CLBENCH_DATA_ROOT", str(flag))
    assert resolve_data_root("") == flag


def test_clbench_config_names_the_file(tmp_path: Path, monkeypatch) -> None:
    (root,) = _folders(tmp_path, "root")
    _config(tmp_path, 'data_root = "/ignored"\n')  # the XDG file is not read when CLBENCH_CONFIG is set
    other = tmp_path / "other.toml"
    other.write_text(f'data_root = "{root}"\n')
    monkeypatch.setenv("CLBENCH_CONFIG", str(other))
    assert resolve_data_root("") == root
    monkeypatch.setenv("CLBENCH_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(UserError, match=r"^CLBENCH_CONFIG=.*missing\.toml: no such file"):
        resolve_data_root("")


def test_a_missing_default_file_is_an_empty_config(tmp_path: Path) -> None:
    config = load_user_config()
    assert config.path == tmp_path / "xdg" / "clbench" / "config.toml"
    assert config.data_root_for("mtil") is None and config.data_root_for("xtail") is None


def test_cli_run_reports_the_config_file_as_the_source(tmp_path: Path, capsys) -> None:
    from clbench.cli.app import main

    path = _config(tmp_path, f'data_root = "{tmp_path}/missing"\n')
    out = tmp_path / "out"
    code = main(["run", "--methods", "lora", "--benchmark", "mtil", "--preset", "smoke", "--pretrained", "none",
                 "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: data root {tmp_path}/missing (from data_root in {path}) does not exist")
    assert not out.exists()
