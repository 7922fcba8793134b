"""Range checks of a typed setting against its dataclass field's metadata (``min``, ``max``, ``choices``...).

Shared by the configuration layer (:mod:`clbench.config`, every ``--set``) and the methods that re-check their own
hyperparameters (:mod:`clbench.methods.keeplora`), so that methods never import the configuration layer.
"""

from __future__ import annotations

import typing
from typing import Any

from clbench.errors import UserError


def check_range(value: Any, meta: typing.Mapping, path: str) -> None:
    """Refuse ``value`` (or each item of a list) outside what ``meta`` allows, in one line naming ``path``."""
    values = value if isinstance(value, list) else [value]
    for v in values:
        if "choices" in meta and v not in meta["choices"]:
            raise UserError(f"{path}={v!r} is not allowed; choose one of {', '.join(map(str, meta['choices']))}")
        if "min" in meta and (v < meta["min"] or (meta.get("exclusive_min") and v == meta["min"])):
            op = ">" if meta.get("exclusive_min") else ">="
            raise UserError(f"{path}={v} is out of range; it must be {op} {meta['min']}")
        if "max" in meta and v > meta["max"]:
            raise UserError(f"{path}={v} is out of range; it must be <= {meta['max']}")
        if "choices_of" in meta and (not v or any(c not in meta["choices_of"] for c in v) or len(set(v)) != len(v)):
            raise UserError(f"{path}={v!r}: use distinct letters from {meta['choices_of']!r}")
        if "subset_of" in meta:
            parts = [p.strip() for p in str(v).split(",")]
            if not parts or any(p not in meta["subset_of"] for p in parts):
                raise UserError(f"{path}={v!r}: use a comma-separated subset of {', '.join(meta['subset_of'])}")
