"""``METHODS``: method name -> class. Methods add themselves with :func:`register`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from client_distiller.training.methods.base import MethodError, UnknownMethodError

if TYPE_CHECKING:
    from client_distiller.training.methods.base import Method

METHODS: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: add a method under its ``name`` (names are unique)."""
    if not cls.name:
        raise MethodError(f"{cls.__name__} has no name")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise MethodError(f"method name {cls.name!r} is already registered by {METHODS[cls.name].__name__}")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type["Method"]:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}") from None
