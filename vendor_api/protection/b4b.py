"""`b4b`: noise that grows with how much of the embedding space a key has covered (B4B,
NeurIPS 2023).

Every clean output is hashed into one of 4096 buckets by 12 secret random hyperplanes
(sign pattern = bucket id). Each key's buckets are a Redis SET under its hash tag
(`vendor:{digest}:b4b`), so replicas share it and it survives restarts.

    coverage = distinct buckets / 4096
    sigma    = sigma_max * min(1, coverage / FULL_NOISE_COVERAGE)

A legitimate single-task key stays in a few buckets and gets almost exact answers; a key sweeping
the whole space for extraction pays in quality. The sigma of a request is computed *after* its
own buckets are added, so one huge, diverse request cannot slip through at the old, low noise;
`/v1/usage` reports the sigma at the current coverage, the least the next request will get.
The noise direction is fixed per (secret, key, LSH cells of the clean output), as in `noise`
(`lsh`): re-encodings and re-spellings of one input cannot be averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np
import redis.asyncio as aioredis

from ..accounts import AccountKeys
from ..redis_calls import fail_closed
from .base import BaseMode, float_param, keyed_rng, normalize_rows, register
from .context import ProtectionContext
from .transforms import keyed_lsh_noise

PLANES = 12
BUCKETS = 2 ** PLANES
FULL_NOISE_COVERAGE = 0.05  # ~205 buckets: sigma_max from here on
DEFAULT_SIGMA_MAX = 0.5


class RedisBucketStore:
    """The `context.BucketStore`: a SET per key; SADD + SCARD in one transaction (one slot: the
    account's hash tag)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client

    @fail_closed
    async def add(self, digest: str, buckets: list[int]) -> int:
        key = AccountKeys(digest).b4b_buckets
        async with self.redis.pipeline(transaction=True) as pipe:
            if buckets:
                pipe.sadd(key, *sorted(set(buckets)))
            pipe.scard(key)
            results = await pipe.execute()
        return int(results[-1])

    @fail_closed
    async def count(self, digest: str) -> int:
        return int(await self.redis.scard(AccountKeys(digest).b4b_buckets))


@lru_cache(maxsize=8)
def hyperplanes(secret: bytes, dim: int) -> np.ndarray:
    """The vendor's 12 secret hyperplanes (one set for all keys, so coverages are comparable)."""
    return keyed_rng(secret, "b4b-planes", str(dim)).standard_normal((PLANES, dim))


def bucket_ids(embeddings: np.ndarray, secret: bytes) -> list[int]:
    bits = (embeddings.astype(np.float64) @ hyperplanes(secret, embeddings.shape[1]).T) > 0
    return [int(b) for b in bits.astype(np.int64) @ (1 << np.arange(PLANES))]


def noise_for(coverage: float, sigma_max: float) -> float:
    return sigma_max * min(1.0, coverage / FULL_NOISE_COVERAGE)


@dataclass(frozen=True)
class B4B(BaseMode):
    name: ClassVar[str] = "b4b"
    needs_secret: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    sigma_max: float = DEFAULT_SIGMA_MAX

    def param(self) -> str | None:
        return f"{self.sigma_max:g}"

    async def apply(self, embeddings: np.ndarray, context: ProtectionContext) -> np.ndarray:
        if context.store is None:
            raise RuntimeError("b4b needs a bucket store")
        count = await context.store.add(context.account_digest, bucket_ids(embeddings, context.secret))
        sigma = noise_for(count / BUCKETS, self.sigma_max)
        if sigma == 0.0:
            return embeddings
        return normalize_rows(embeddings + sigma * keyed_lsh_noise(embeddings, context, "b4b"))

    async def state(self, context: ProtectionContext) -> dict[str, float]:
        if context.store is None:
            return {}
        coverage = await context.store.count(context.account_digest) / BUCKETS
        return {"coverage": coverage, "noise": noise_for(coverage, self.sigma_max)}


@register("b4b")
def _b4b(param: str | None) -> B4B:
    return B4B(float_param("b4b", param, DEFAULT_SIGMA_MAX, low=0.0, high=100.0))
