"""The protection-mode contract, its registry and the keyed randomness every mode draws from.

A mode is parsed from the key's spec string (`MODE[:PARAM]`) on each request: the spec is the
only state the account record holds, so a mode change by the vendor takes effect on the very
next request and no mode object outlives it. Modes that need secrets get them through
`ProtectionContext` (`context`); none reads settings or the environment itself. Nothing here
imports a concrete mode: they import this, and register themselves.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Callable, ClassVar, Protocol

import numpy as np

from shared.protocol import OUTPUT_EMBEDDINGS, OutputKind

from ..errors import InvalidRequest
from .context import ProtectionContext


class ProtectionMode(Protocol):
    """One output transform. Every embedding mode returns L2-normalised float32 rows."""

    name: str
    output: OutputKind
    needs_input_hashes: bool
    needs_secret: bool
    needs_calibration: bool

    def spec(self) -> str: ...

    def output_dim(self, teacher_dim: int) -> int: ...

    def top_k(self) -> int | None: ...

    async def apply(self, embeddings: np.ndarray, context: ProtectionContext) -> np.ndarray: ...

    async def state(self, context: ProtectionContext) -> dict[str, float]: ...

    async def scoring_rows(self, embeddings: np.ndarray, context: ProtectionContext) -> np.ndarray: ...


class BaseMode:
    """Defaults shared by the modes: embeddings out, same dimension, no state, no secrets."""

    name: ClassVar[str] = "base"
    output: ClassVar[OutputKind] = OUTPUT_EMBEDDINGS
    needs_input_hashes: ClassVar[bool] = False
    needs_secret: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = False

    def param(self) -> str | None:
        return None

    def spec(self) -> str:
        param = self.param()
        return self.name if param is None else f"{self.name}:{param}"

    def output_dim(self, teacher_dim: int) -> int:
        return teacher_dim

    def top_k(self) -> int | None:
        return None

    async def apply(self, embeddings: np.ndarray, context: ProtectionContext) -> np.ndarray:
        raise NotImplementedError

    async def state(self, context: ProtectionContext) -> dict[str, float]:
        return {}

    async def scoring_rows(self, embeddings: np.ndarray, context: ProtectionContext) -> np.ndarray:
        """The rows `/v1/classifications` scores for this key: by default exactly what the key's own
        embeddings of those inputs would be (`apply`), so class probabilities never reveal more
        than the key's embeddings do (the first version scored clean rows for every key, which let
        any embedding-mode key read its clean embeddings back out of the probabilities)."""
        return await self.apply(embeddings, context)


ModeFactory = Callable[[str | None], ProtectionMode]
PROTECTION_MODES: dict[str, ModeFactory] = {}


def register(name: str) -> Callable[[ModeFactory], ModeFactory]:
    """Add a mode to the registry under `name` (the part of the spec before ':')."""

    def add(factory: ModeFactory) -> ModeFactory:
        PROTECTION_MODES[name] = factory
        return factory

    return add


def parse_protection(spec: str) -> ProtectionMode:
    """`MODE` or `MODE:PARAM` -> a mode instance; unknown modes and bad parameters are a clear
    `InvalidRequest` (400 on admin routes, one line from vendor-admin)."""
    name, _, param = spec.strip().partition(":")
    factory = PROTECTION_MODES.get(name)
    if factory is None:
        raise InvalidRequest(f"unknown protection mode {name!r}; known: {', '.join(sorted(PROTECTION_MODES))}")
    return factory(param.strip() or None)


def validate_protection(spec: str, teacher_dim: int | None) -> ProtectionMode:
    """Parse `spec` and, when the teacher's dimension is known, check the mode fits it."""
    mode = parse_protection(spec)
    if teacher_dim is not None:
        try:
            mode.output_dim(teacher_dim)
        except ValueError as exc:
            raise InvalidRequest(f"protection {spec!r}: {exc}") from exc
    return mode


# ---------------------------------------------------------------- parameter parsing
def no_param(name: str, param: str | None) -> None:
    if param is not None:
        raise InvalidRequest(f"protection mode {name!r} takes no parameter (got {param!r})")


def float_param(name: str, param: str | None, default: float, *, low: float, high: float) -> float:
    """A float in (low, high]; the message names the mode and the allowed range."""
    if param is None:
        return default
    try:
        value = float(param)
    except ValueError:
        raise InvalidRequest(f"protection {name}:{param}: parameter must be a number") from None
    if not (np.isfinite(value) and low < value <= high):
        raise InvalidRequest(f"protection {name}:{param}: parameter must be in ({low:g}, {high:g}]")
    return value


def int_param(name: str, param: str | None, default: int | None, *, low: int, high: int) -> int:
    if param is None:
        if default is None:
            raise InvalidRequest(f"protection mode {name!r} needs a parameter: {name}:N")
        return default
    try:
        value = int(param)
    except ValueError:
        raise InvalidRequest(f"protection {name}:{param}: parameter must be an integer") from None
    if not low <= value <= high:
        raise InvalidRequest(f"protection {name}:{param}: parameter must be in [{low}, {high}]")
    return value


# ---------------------------------------------------------------- keyed randomness
def keyed_seed(secret: bytes, *parts: str) -> int:
    """A 256-bit seed from HMAC(secret, parts): unpredictable without the secret, and the same
    on every replica and after every restart that shares it."""
    message = b"\x1f".join(p.encode() for p in parts)
    return int.from_bytes(hmac.new(secret, message, hashlib.sha256).digest(), "big")


def keyed_rng(secret: bytes, *parts: str) -> np.random.Generator:
    return np.random.default_rng(keyed_seed(secret, *parts))


def keyed_unit_vector(secret: bytes, dim: int, *parts: str) -> np.ndarray:
    vector = keyed_rng(secret, *parts, str(dim)).standard_normal(dim)
    return (vector / np.linalg.norm(vector)).astype(np.float64)


def normalize_rows(rows: np.ndarray) -> np.ndarray:
    """L2-normalise every row (a zero row stays zero rather than becoming NaN)."""
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)
