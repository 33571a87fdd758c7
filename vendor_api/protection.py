"""IP-restriction modes: transforms applied to teacher outputs before they leave the server.

A registry keyed by mode name; each account record names its mode (set by the vendor, never by
the key holder). `none` is exact embeddings. Further modes (noise, quantize, truncate, rotate,
b4b, watermark, probabilities) register here without touching the request path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from .errors import InvalidRequest


@dataclass(frozen=True)
class ProtectionContext:
    """What a mode may use: the account's identity (for per-key secrets) and the inputs' hashes."""

    account_digest: str
    input_hashes: list[str]


class ProtectionMode(Protocol):
    name: str

    def apply(self, embeddings: np.ndarray, context: ProtectionContext) -> np.ndarray: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class NoProtection:
    """Exact, L2-normalised teacher embeddings."""

    name: str = "none"

    def apply(self, embeddings: np.ndarray, context: ProtectionContext) -> np.ndarray:
        return embeddings

    def describe(self) -> str:
        return self.name


ModeFactory = Callable[[str | None], ProtectionMode]


def _no_param(factory: Callable[[], ProtectionMode]) -> ModeFactory:
    def build(param: str | None) -> ProtectionMode:
        if param:
            raise InvalidRequest(f"protection mode takes no parameter (got {param!r})")
        return factory()

    return build


PROTECTION_MODES: dict[str, ModeFactory] = {
    "none": _no_param(NoProtection),
}


def parse_protection(spec: str) -> ProtectionMode:
    """`MODE` or `MODE:PARAM` -> a mode instance; unknown modes are a clear error."""
    name, _, param = spec.strip().partition(":")
    factory = PROTECTION_MODES.get(name)
    if factory is None:
        raise InvalidRequest(f"unknown protection mode {name!r}; known: {', '.join(sorted(PROTECTION_MODES))}")
    return factory(param or None)
