"""``METHODS``: method name -> class. Methods add themselves with :func:`register`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from client_distiller.training.methods.base import HparamError, MethodError, UnknownMethodError

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


def parse_hparams(pairs: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, float]]:
    """`vl2v-adip.lr=1e-3` -> {"vl2v-adip": {"lr": 0.001}}, for the methods being run; unknown
    methods or names are errors (every command that takes `--hparam` parses it here)."""
    out: dict[str, dict[str, float]] = {}
    for pair in pairs:
        target, sep, value = pair.partition("=")
        method, dot, name = target.rpartition(".")
        if not sep or not dot or method not in methods:
            raise HparamError(f"--hparam {pair!r}: expected METHOD.NAME=VALUE with METHOD one of {', '.join(methods)}")
        known = get_method(method).HPARAMS
        if name not in known:
            raise HparamError(f"--hparam {pair!r}: {method} has no hyperparameter {name!r} (known: {', '.join(known)})")
        try:
            out.setdefault(method, {})[name] = float(value)
        except ValueError:
            raise HparamError(f"--hparam {pair!r}: {value!r} is not a number") from None
    return out
