"""Synthetic metering load shared by the Redis benchmarks: the Redis work of one paid request
(admit.lua, debit.lua, settle.lua, through the server's own `Meter`), without a model or HTTP, so
what is measured is the meter and Redis.

Why without the server: on a CPU the model is the bottleneck long before Redis is
(`vendor_load.md`), so an HTTP load would measure the model; these benchmarks ask what Redis does
(how fast debits go on 1 node against 3, how its memory behaves over a long run).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from vendor_api.key_admin import KeyAdmin
from vendor_api.metering import Account, Meter


@dataclass
class LoadResult:
    requests: int = 0
    seconds: float = 0.0

    @property
    def per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


async def create_accounts(meter: Meter, prefix: str, count: int) -> list[Account]:
    keys, accounts = KeyAdmin(meter.redis), []
    for i in range(count):
        await keys.create_key(f"{prefix}-{i}", quota=10**15, rate_per_s=1_000_000, burst=1_000_000)
        accounts.append(await keys.get_account(f"{prefix}-{i}"))
    return accounts


async def paid_request(meter: Meter, account: Account, body: bytes, idempotent: bool) -> None:
    """admit -> debit -> settle 'delivered', with a fresh Idempotency-Key when `idempotent` (the
    answer `body` is then stored for replays until the meter's TTL)."""
    idem = uuid.uuid4().hex if idempotent else None
    await meter.admit(account, units=4, fingerprint="bench", idempotency_key=idem)
    debit = await meter.debit(account, units=4, images=2, texts=2, fingerprint="bench", idempotency_key=idem)
    await meter.settle(account, debit, outcome="delivered", idempotency_key=idem, body=body, fingerprint="bench")


async def run_load(meter: Meter, accounts: list[Account], *, concurrency: int, duration_s: float, body: bytes,
                   idempotent: bool, stop: asyncio.Event | None = None) -> LoadResult:
    """`concurrency` tasks, each sending paid requests back to back (round-robin over the
    accounts) for `duration_s` seconds (or until `stop` is set)."""
    result = LoadResult()
    deadline = time.monotonic() + duration_s

    async def worker(index: int) -> None:
        n = index
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            await paid_request(meter, accounts[n % len(accounts)], body, idempotent)
            result.requests += 1
            n += concurrency

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    result.seconds = time.monotonic() - started
    return result
