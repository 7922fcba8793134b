"""The user's clbench config file (TOML): where the real datasets live, so that --data-root can be left out.

Where the file is: ``$CLBENCH_CONFIG`` if set (it must then exist), else ``$XDG_CONFIG_HOME/clbench/config.toml``
(``~/.config/clbench/config.toml`` when ``XDG_CONFIG_HOME`` is unset or not absolute). A missing default file is
the same as an empty one. The file is read only when a real benchmark needs a data root that neither
``--data-root`` nor ``$CLBENCH_DATA_ROOT`` gave. Keys::

    data_root = "/data/clbench"            # every real benchmark (mtil, xtail)

    [data_root_by_benchmark]               # optional: one benchmark's own root, which wins over data_root
    xtail = "/data/xtail-coop"             # (X-TAIL uses the CoOp layout, MTIL the torchvision one)

Paths may start with ``~``; a relative path is relative to the config file's folder. Unknown keys, wrong types
and bad TOML are one-line :class:`~clbench.errors.UserError`s naming the file.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from clbench.datasets import BENCHMARKS
from clbench.errors import UserError
from clbench.storage.safeio import check_path, exists, read_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as tomli
    import tomli as tomllib

CONFIG_ENV = "CLBENCH_CONFIG"
REAL_BENCHMARKS = tuple(b for b in BENCHMARKS if b != "synthetic")
KEYS = ("data_root", "data_root_by_benchmark")


@dataclass(frozen=True)
class UserConfig:
    """The parsed config file; empty values mean "not set"."""

    path: Path
    data_root: str = ""
    data_root_by_benchmark: dict[str, str] = field(default_factory=dict)

    def data_root_for(self, benchmark: str) -> tuple[Path, str] | None:
        """``(folder, source)`` for ``benchmark`` (its own entry first, then ``data_root``), or ``None``.

        ``source`` says where the value came from, for error messages: ``"data_root in /home/u/.../config.toml"``.
        """
        if benchmark in self.data_root_by_benchmark:
            raw, key = self.data_root_by_benchmark[benchmark], f"data_root_by_benchmark.{benchmark}"
        elif self.data_root:
            raw, key = self.data_root, "data_root"
        else:
            return None
        folder = Path(raw).expanduser()
        if not folder.is_absolute():
            folder = self.path.parent / folder
        return folder.absolute(), f"{key} in {self.path}"


def config_path() -> Path:
    """The config file's path (it may not exist): ``$CLBENCH_CONFIG``, else the XDG location."""
    explicit = os.environ.get(CONFIG_ENV, "")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".config"
    return base / "clbench" / "config.toml"


def load_user_config(path: Path | None = None) -> UserConfig:
    """Read and check the config file at ``path`` (default :func:`config_path`); a missing default file is empty."""
    path = check_path(path or config_path(), "clbench config")
    if not exists(path):
        if os.environ.get(CONFIG_ENV):
            raise UserError(f"{CONFIG_ENV}={path}: no such file; point it at a TOML config file or unset it")
        return UserConfig(path)
    fix = f"fix the file or set {CONFIG_ENV} to another one"
    raw = read_bytes(path, "clbench config", fix, limit=1 << 20)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        detail = " ".join(str(exc).split())
        raise UserError(f"clbench config {path} is not valid TOML ({detail}); {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"clbench config {path} is not UTF-8 text; save it as UTF-8 TOML") from None
    except RecursionError:
        raise UserError(f"clbench config {path} nests tables or arrays too deeply to read; {fix}") from None
    return _checked(path, data)


def _checked(path: Path, data: dict) -> UserConfig:
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise UserError(f"clbench config {path}: unknown key {unknown[0]!r}; known keys: data_root, "
                        "[data_root_by_benchmark]")
    data_root = _folder_value(path, "data_root", data.get("data_root"))
    table = data.get("data_root_by_benchmark", {})
    if not isinstance(table, dict):
        raise UserError(f"clbench config {path}: data_root_by_benchmark must be a table, e.g. "
                        '[data_root_by_benchmark] then xtail = "/data/xtail"')
    by_benchmark = {}
    for name, value in table.items():
        if name not in REAL_BENCHMARKS:
            raise UserError(f"clbench config {path}: [data_root_by_benchmark] has unknown benchmark {name!r}; "
                            f"use {' or '.join(REAL_BENCHMARKS)}")
        by_benchmark[name] = _folder_value(path, f"data_root_by_benchmark.{name}", value)
    return UserConfig(path, data_root, by_benchmark)


def _folder_value(path: Path, key: str, value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise UserError(f'clbench config {path}: {key} must be a folder path in quotes, e.g. {key} = "/data/mtil" '
                        f"(got {value!r})")
    return value.strip()
