"""The method registry: ``@register_method("name")`` next to the class it names (timm style)."""

from __future__ import annotations

import warnings

from clbench.errors import UserError
from clbench.methods.base import Method

_METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator registering a :class:`Method` subclass under ``name``."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _METHODS and _METHODS[name] is not cls:
            warnings.warn(f"method {name!r} re-registered by {cls.__qualname__}", stacklevel=2)
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type[Method]:
    if name not in _METHODS:
        raise UserError(f"unknown method {name!r}; available: {', '.join(list_methods())} (see 'clbench methods')")
    return _METHODS[name]
