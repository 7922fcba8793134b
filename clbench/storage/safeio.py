"""Reading files a user (or anyone who can write a results folder) controls: regular files only, with a size cap.

A path given to clbench may be a symlink to ``/dev/zero`` (endless), a FIFO (blocks forever), a directory,
or a huge file. :func:`read_bytes` opens without blocking, refuses anything that is not a regular file, and
reads at most ``limit`` bytes; every refusal is a one-line :class:`~clbench.errors.UserError` naming the file.
:func:`read_json` also turns JSON nested too deep for Python's parser into such a line.
"""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path
from typing import Any

from clbench.errors import UserError

MiB = 1 << 20
MAX_DEPTH = 64  # clbench's own JSON nests 4 levels; deeper input would only exhaust recursion later
TEXT_LIMIT = 64 * MiB  # manifests, configs, metrics, CSVs: a clbench run writes a few kB to a few MB


def _describe(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def os_reason(exc: OSError) -> str:
    """An OSError as a short phrase (``File name too long``), without the path Python appends."""
    return exc.strerror or type(exc).__name__


def check_regular(path: Path, what: str, fix: str) -> int:
    """The size of ``path`` if it is (or links to) a regular file; otherwise a one-line UserError."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UserError(f"cannot read {what} {path} ({os_reason(exc)}); {fix}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{what} {path} is {_describe(info.st_mode)}, not a regular file; {fix}")
    return info.st_size


def read_bytes(path: Path, what: str, fix: str, limit: int = TEXT_LIMIT) -> bytes:
    """The content of the regular file ``path`` (at most ``limit`` bytes), or a one-line UserError.

    Opened with ``O_NONBLOCK`` so a FIFO cannot hang the open, then checked on the open descriptor (no race
    between the check and the read)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise UserError(f"cannot read {what} {path} ({os_reason(exc)}); {fix}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{what} {path} is {_describe(info.st_mode)}, not a regular file; {fix}")
        if info.st_size > limit:
            raise UserError(f"{what} {path} is {info.st_size / MiB:.1f} MiB, over the {limit / MiB:.0f} MiB "
                            f"clbench reads for such a file; {fix}")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise UserError(f"cannot read {what} {path} ({os_reason(exc)}); {fix}") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # grew while being read
        raise UserError(f"{what} {path} is over the {limit / MiB:.0f} MiB clbench reads for such a file; {fix}")
    return data


def read_text(path: Path, what: str, fix: str, limit: int = TEXT_LIMIT) -> str:
    """:func:`read_bytes` decoded as UTF-8; bad bytes are a one-line UserError."""
    try:
        return read_bytes(path, what, fix, limit).decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text; {fix}") from None


def read_json(path: Path, what: str, fix: str, limit: int = TEXT_LIMIT) -> Any:
    """Parse the JSON file ``path``; unreadable, malformed or too deeply nested JSON is a one-line UserError."""
    text = read_text(path, what, fix, limit)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {path} is unreadable (corrupt JSON: {exc.msg} at line {exc.lineno}); "
                        f"{fix}") from None
    except RecursionError:
        raise UserError(f"{what} {path} is unreadable (JSON nested too deeply); {fix}") from None
    if _depth(value) > MAX_DEPTH:
        raise UserError(f"{what} {path} is unreadable (JSON nested over {MAX_DEPTH} levels deep); {fix}")
    return value


def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and dicts (iteratively: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:
                stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def text_stream(path: Path, what: str, fix: str, limit: int = TEXT_LIMIT) -> io.StringIO:
    """The file's text as a stream (for ``pandas.read_csv``), read with :func:`read_text`'s checks."""
    return io.StringIO(read_text(path, what, fix, limit))


def json_object(value: Any, path: Path, what: str, fix: str) -> dict:
    """``value`` if it is a JSON object, else a one-line UserError (a list or a number where a dict belongs)."""
    if not isinstance(value, dict):
        raise UserError(f"{what} {path} is not a JSON object (it holds a {type(value).__name__}); {fix}")
    return value


NAME_MAX = 255  # bytes in one file name on Linux and macOS file systems
PATH_MAX = 4096


def check_path(path: Path | str, what: str) -> Path:
    """``path`` if the OS can use it: no name longer than :data:`NAME_MAX` bytes, not too long as a whole, not a
    symlink loop. Otherwise a one-line UserError naming ``what`` (the option or key that gave it)."""
    path = Path(path)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            shown = part[:24] + "..." if len(part) > 24 else part
            raise UserError(f"{what}: the name {shown!r} in {_short(path)} is {size} bytes, too long for a file name "
                            f"(at most {NAME_MAX}); shorten it")
    if len(os.fsencode(str(path))) >= PATH_MAX:
        raise UserError(f"{what}: the path {_short(path)} is too long for the OS (at most {PATH_MAX - 1} bytes); "
                        "shorten it")
    try:
        path.resolve()
    except RuntimeError:  # pathlib's report of a symlink loop
        raise UserError(f"{what} {path} is a symlink loop; point it at a real folder or file") from None
    except OSError as exc:
        raise UserError(f"{what} {_short(path)} cannot be used ({os_reason(exc)}); give another path") from None
    return path


def _short(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 120 else text[:60] + "..." + text[-40:]


def is_regular(path: Path) -> bool:
    """Whether ``path`` exists and is (or links to) a regular file; never raises."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def exists(path: Path) -> bool:
    """``path.exists()`` that treats an unusable path (too long, a symlink loop) as absent instead of raising."""
    try:
        os.stat(path)
    except (OSError, ValueError):
        return False
    return True


__all__ = ["TEXT_LIMIT", "check_path", "check_regular", "exists", "is_regular", "json_object", "os_reason",
           "read_bytes", "read_json", "read_text", "text_stream"]
