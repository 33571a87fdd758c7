"""A vendor process SIGKILLed mid-request, after the debit and before the answer.

The client (the product's `TeacherClient`, whose retries keep the Idempotency-Key) keeps retrying
through the outage; a restarted vendor on the same Redis first answers 409 (the dead request's
idempotency record is still "in flight"), then, once the dead request's lease expires, the next
request of that key refunds it (`lease_expired`) and the retry is charged afresh: one charge in
total, and the units of the undelivered work came back.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import redis

from client_distiller.buying.local_vendor import LocalVendor
from client_distiller.buying.teacher_client import TeacherClient
from tests.conftest import free_port
from vendor_api.metering import AccountKeys

LEASE_S = 2


def _vendor(tmp_path: Path, name: str, teacher_dir: Path, redis_url: str, port: int, **env: str) -> LocalVendor:
    extra = {"REDIS_URL": redis_url, "VENDOR_INFLIGHT_LEASE_S": str(LEASE_S), "VENDOR_TORCH_THREADS": "1", **env}
    return LocalVendor(tmp_path / name, teacher=f"local-dir:{teacher_dir}", port=port, extra_env=extra,
                       startup_timeout_s=60)


def test_vendor_killed_mid_request_charges_once_and_refunds_the_lost_work(tiny_teacher_dir, redis_url, tmp_path):
    port = free_port()
    # A long batching wait holds the request between its debit and its answer, so the kill lands there.
    first = _vendor(tmp_path, "a", tiny_teacher_dir, redis_url, port,
                    VENDOR_MAX_WAIT_MS="4000", VENDOR_MAX_BATCH_SIZE="256").start()
    second = _vendor(tmp_path, "b", tiny_teacher_dir, redis_url, port)
    store = redis.Redis.from_url(redis_url)
    try:
        key = first.create_key("acme", 100)
        digest = store.hget("vendor:names", "acme").decode()
        client = TeacherClient(first.url, key, timeout_s=30, max_attempts=60, backoff_max_s=0.5)
        model = client.model_card().id
        result: dict[str, object] = {}
        caller = threading.Thread(target=lambda: result.update(
            answer=client.embed(model, ["a photo of a cat", "a photo of a dog", "a sketch"], idempotency_key="batch-7")))
        caller.start()
        deadline = time.monotonic() + 20
        while not store.zcard(AccountKeys(digest).inflight):  # debited, waiting for its batch
            assert time.monotonic() < deadline, "the request was never debited"
            time.sleep(0.01)
        first.process.kill()  # SIGKILL: no settle, no refund, no answer
        first.process.wait()
        assert int(store.hget(AccountKeys(digest).account, "spent")) == 3
        second.start()  # same port, same Redis
        caller.join(timeout=60)
        assert not caller.is_alive()
        answer = result["answer"]
        assert answer.vectors.shape[0] == 3 and answer.units_charged == 3 and not answer.replayed
        again = client.embed(model, ["a photo of a cat", "a photo of a dog", "a sketch"], idempotency_key="batch-7")
        assert again.replayed and np.array_equal(again.vectors, answer.vectors)  # the stored answer, free
        client.close()
    finally:
        first.stop()
        second.stop()
    ledger = [(fields[b"event"].decode(), int(fields[b"units"]), fields.get(b"reason", b"").decode())
              for _, fields in store.xrange(AccountKeys(digest).ledger)]
    spent = int(store.hget(AccountKeys(digest).account, "spent"))
    store.close()
    # the replay is a ledger event too (0 units), so billing exports see every answer given
    assert ledger == [("create", 100, ""), ("debit", 3, ""), ("refund", 3, "lease_expired"), ("debit", 3, ""),
                      ("replay", 0, "")]
    assert spent == 3  # charged once for the one delivered answer
