"""`/readyz`, cheap and honest.

Why not a forward pass per call: `/readyz` is public, so every call that runs the model is model
work anyone can order for free (300 anonymous calls were 300 encodings), and on a busy replica
the probe waited behind real work and timed out, so an orchestrator pulled a healthy replica out
of rotation. Instead the batcher records when a batch last succeeded or failed:

- the model is ready if a batch succeeded within `fresh_s` and none failed since;
- if a batch is running (the queue is busy) and started less than `stall_s` ago, it is ready:
  being busy is not being broken;
- otherwise (idle, or the last batch failed) one probe, a single short text, runs, at most
  every `probe_interval_s` however many callers ask; callers in between get the last probe's
  answer.

Redis is checked with one PING per call, which costs Redis as little as any rejected request.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .service import EmbeddingService

_PROBE_TIMEOUT_S = 10.0


class Readiness:
    def __init__(self, service: "EmbeddingService", *, probe_interval_s: float = 5.0, fresh_s: float = 10.0,
                 stall_s: float = 120.0) -> None:
        self.service = service
        self.probe_interval_s = probe_interval_s
        self.fresh_s = fresh_s
        self.stall_s = stall_s
        self.probes = 0  #: forward passes run for readiness (tests and metrics read it)
        self._last_probe_at: float | None = None
        self._last_probe_result = "failed: not probed yet"
        self._probe_lock = asyncio.Lock()

    async def check(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(self.service.meter.ping(), _PROBE_TIMEOUT_S)
            checks["redis"] = "ok"
        except Exception as exc:  # noqa: BLE001 - readiness reports, never raises
            checks["redis"] = f"failed: {type(exc).__name__}"
        checks["model"] = await self._model()
        return checks

    async def _model(self) -> str:
        batcher = self.service.batcher
        if not batcher.alive:
            return "failed: the batcher is not running"
        now = time.monotonic()
        ok, failed = batcher.last_success, batcher.last_failure
        if ok is not None and now - ok < self.fresh_s and (failed is None or failed < ok):
            return "ok"
        running = batcher.running_since
        if running is not None and now - running < self.stall_s and (failed is None or (ok or 0) > failed):
            return "ok"
        if running is not None and now - running >= self.stall_s:
            return f"failed: a batch has been running for {now - running:.0f}s"
        return await self._probe()

    async def _probe(self) -> str:
        async with self._probe_lock:  # one probe at a time; the others read its result
            now = time.monotonic()
            if self._last_probe_at is not None and now - self._last_probe_at < self.probe_interval_s:
                return self._last_probe_result
            self._last_probe_at = now
            self.probes += 1
            try:
                tokens = self.service.teacher.tokenize(["ready"])
                await asyncio.wait_for(self.service.batcher.submit("text", list(tokens)), _PROBE_TIMEOUT_S)
                self._last_probe_result = "ok"
            except Exception as exc:  # noqa: BLE001
                self._last_probe_result = f"failed: {type(exc).__name__}"
            return self._last_probe_result
