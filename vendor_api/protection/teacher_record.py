"""The served teacher's embedding size, recorded in Redis so `vendor-admin` (which loads no
model) can refuse a mode that does not fit it, e.g. `truncate:1024` on a 512-d teacher."""

from __future__ import annotations

import redis.asyncio as aioredis

from ..redis_calls import fail_closed

TEACHER_KEY = "vendor:teacher"


@fail_closed
async def record_teacher_dim(client: aioredis.Redis, model_id: str, embed_dim: int) -> None:
    await client.hset(TEACHER_KEY, mapping={"model_id": model_id, "embed_dim": embed_dim})


@fail_closed
async def read_teacher_dim(client: aioredis.Redis) -> int | None:
    """None until a vendor has started against this Redis (then requests check the mode)."""
    raw = await client.hget(TEACHER_KEY, "embed_dim")
    return int(raw) if raw is not None else None
