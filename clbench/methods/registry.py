"""Method registries: ``@register("name")`` next to the class it names (timm style).

:class:`Registry` is the generic part, shared by the CLIP methods here and the LLaVA (MCIT) methods of
:mod:`clbench.settings.mcit.methods`; each setting keeps its own registry, so one name (``lora``, ``keeplora``)
can name a method of the same family on either setting.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Generic, TypeVar

from clbench.errors import UserError
from clbench.methods.base import Method

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes by name; ``unknown(name, available)`` words the one-line error for a name not registered."""

    def __init__(self, unknown: Callable[[str, list[str]], str]):
        self.classes: dict[str, T] = {}
        self.unknown = unknown

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator registering ``cls`` under ``name`` (sets ``cls.name``); re-registering warns."""

        def wrap(cls: T) -> T:
            if name in self.classes and self.classes[name] is not cls:
                warnings.warn(f"method {name!r} re-registered by {cls.__qualname__}", stacklevel=2)
            cls.name = name
            self.classes[name] = cls
            return cls

        return wrap

    def names(self) -> list[str]:
        return sorted(self.classes)

    def __contains__(self, name: object) -> bool:
        return name in self.classes

    def get(self, name: str) -> T:
        if name not in self.classes:
            raise UserError(self.unknown(name, self.names()))
        return self.classes[name]


CLIP_METHODS: Registry[type[Method]] = Registry(
    lambda name, available: f"unknown method {name!r}; available: {', '.join(available)} (see 'clbench methods')")
_METHODS = CLIP_METHODS.classes  # the name -> class table itself (tests patch it)


def register_method(name: str):
    """Class decorator registering a CLIP :class:`Method` subclass under ``name``."""
    return CLIP_METHODS.register(name)


def list_methods() -> list[str]:
    return CLIP_METHODS.names()


def get_method(name: str) -> type[Method]:
    return CLIP_METHODS.get(name)
