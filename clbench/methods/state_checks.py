"""Checks of a method's restored state against the model it is attached to, before the state is loaded.

A resume checkpoint's digest proves the file is the one written, not that its method state fits the run: a file
rewritten with a fresh digest, or state from another backbone, would otherwise fail deep inside the method's
algebra (a shape error in a projection, a Cholesky of NaNs) mid-run. :meth:`clbench.methods.base.Method.check_state`
uses these helpers; each refusal is a :class:`StateMismatch` naming the entry as the checkpoint stores it
(``method/<key>`` for a tensor, ``method_extra.<key>`` for JSON).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


class StateMismatch(ValueError):
    """One entry of a restored method state that does not fit; ``entry`` names it, ``why`` says how."""

    def __init__(self, entry: str, why: str) -> None:
        super().__init__(f"{entry} {why}")
        self.entry, self.why = entry, why


def tensor_entry(key: str) -> str:
    return f"method/{key}"


def extra_entry(key: str) -> str:
    return f"method_extra.{key}"


def describe(value: Tensor) -> str:
    """``float32 (128, 28)``."""
    return f"{str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}"


def expect_keys(found: Iterable[str], expected: Iterable[str], entry: Callable[[str], str] = tensor_entry) -> None:
    """``found`` must be exactly ``expected``: the first unexpected, else the first missing key is refused."""
    found, expected = set(found), set(expected)
    unexpected, missing = sorted(found - expected), sorted(expected - found)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise StateMismatch(entry(unexpected[0]), f"is not part of this method's state{more}")
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise StateMismatch(entry(missing[0]), f"is missing{more}")


def expect_tensor(key: str, value, *, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None,
                  floating: bool = False, finite: bool = False) -> None:
    """A tensor of ``shape`` and ``dtype`` (or any floating-point dtype with ``floating``), finite with ``finite``."""
    if not isinstance(value, Tensor):
        raise StateMismatch(tensor_entry(key), f"is a {type(value).__name__}, not a tensor")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise StateMismatch(tensor_entry(key), f"is {describe(value)}, expected shape {tuple(shape)}")
    if dtype is not None and value.dtype != dtype:
        raise StateMismatch(tensor_entry(key), f"is {describe(value)}, expected {str(dtype).removeprefix('torch.')}")
    if floating and not value.dtype.is_floating_point:
        raise StateMismatch(tensor_entry(key), f"is {describe(value)}, expected a floating-point tensor")
    if finite and value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
        raise StateMismatch(tensor_entry(key), f"is {describe(value)} with non-finite values (NaN or infinity)")


def expect_basis(key: str, value, rows: int) -> None:
    """A basis of a layer of width ``rows``: a finite floating-point ``rows × k`` matrix with ``k ≤ rows``."""
    expect_tensor(key, value, floating=True)
    if value.dim() != 2 or value.shape[0] != rows or value.shape[1] > rows:
        raise StateMismatch(tensor_entry(key), f"is {describe(value)}, expected a basis of the layer's width: "
                                               f"{rows} rows and at most {rows} columns")
    expect_tensor(key, value, finite=True)


def expect_like(value, fresh, entry: str) -> None:
    """JSON ``value`` shaped like ``fresh``: objects with the same keys, lists of the same length, scalars of the
    same type (an integer where a float is expected is fine; a bool is not a number)."""
    if isinstance(fresh, dict):
        if not isinstance(value, dict):
            raise StateMismatch(entry, f"is {_json_kind(value)}, expected an object")
        expect_keys(value, fresh, entry=lambda k: f"{entry}.{k}")
        for key in fresh:
            expect_like(value[key], fresh[key], f"{entry}.{key}")
    elif isinstance(fresh, list):
        if not isinstance(value, list) or len(value) != len(fresh):
            raise StateMismatch(entry, f"is {_json_kind(value)}, expected a list of {len(fresh)}")
        for i, (v, f) in enumerate(zip(value, fresh, strict=True)):
            expect_like(v, f, f"{entry}[{i}]")
    elif isinstance(fresh, bool) or isinstance(value, bool):
        if type(value) is not type(fresh):
            raise StateMismatch(entry, f"is {_json_kind(value)}, expected {_json_kind(fresh)}")
    elif isinstance(fresh, int):  # a count
        if not isinstance(value, int):
            raise StateMismatch(entry, f"is {_json_kind(value)}, expected an integer")
    elif isinstance(fresh, float):
        if not isinstance(value, int | float):
            raise StateMismatch(entry, f"is {_json_kind(value)}, expected a number")
    elif type(value) is not type(fresh):
        raise StateMismatch(entry, f"is {_json_kind(value)}, expected {_json_kind(fresh)}")


def _json_kind(value) -> str:
    if isinstance(value, dict):
        return f"an object of {len(value)}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if value is None:
        return "null"
    return f"a {type(value).__name__} ({value!r:.40})"


def check_like_fresh(state: dict[str, Tensor], extra: dict, fresh_state: dict[str, Tensor], fresh_extra: dict) -> None:
    """The default check: the same tensor names, shapes and dtypes as the method's own state now (finite where
    floating), and JSON shaped like its own ``extra_state()``."""
    expect_keys(state, fresh_state)
    for key, mine in fresh_state.items():
        expect_tensor(key, state[key], shape=tuple(mine.shape), dtype=mine.dtype, finite=True)
    if not isinstance(extra, dict):
        raise StateMismatch("method_extra", f"is {_json_kind(extra)}, expected an object")
    expect_keys(extra, fresh_extra, entry=extra_entry)
    for key in fresh_extra:
        expect_like(extra[key], fresh_extra[key], extra_entry(key))
