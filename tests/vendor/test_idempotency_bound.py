"""The replay store's size bound (`VENDOR_IDEMPOTENCY_MAX_BYTES_PER_KEY`), besides its TTL: when a
key's stored answers reach it, a request with a *new* Idempotency-Key is 429
`idempotency_store_full` and costs nothing; requests without one, and replays of stored answers,
are served as before; the space comes back when answers expire or are voided."""

from __future__ import annotations

import time

import pytest
import redis

from tests.conftest import run_sync
from vendor_api.errors import IdempotencyStoreFull
from vendor_api.key_admin import KeyAdmin
from vendor_api.metering import AccountKeys, Meter


def test_a_full_store_refuses_new_idempotency_keys_for_free_and_serves_the_rest(make_vendor):
    vendor = make_vendor(idempotency_max_bytes_per_key=1)  # full after one stored answer
    key = vendor.create_key(quota=50)
    body = {"model": vendor.model_id, "input": ["one", "two"]}
    with vendor.client(key) as client:
        first = client.post("/v1/embeddings", json=body, headers={"Idempotency-Key": "k1"})
        refused = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": ["three"]},
                              headers={"Idempotency-Key": "k2"})
        plain = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": ["three"]})
        replay = client.post("/v1/embeddings", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == plain.status_code == replay.status_code == 200
    assert replay.json() == first.json() and replay.headers["x-units-charged"] == "0"
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "idempotency_store_full"
    assert refused.headers["x-units-charged"] == "0"
    assert 86000 <= int(refused.headers["retry-after"]) <= 86400  # until the stored answer's TTL ends
    assert vendor.account().spent == 3
    assert [e["event"] for e in vendor.ledger()] == ["create", "debit", "debit", "replay"]
    store = redis.Redis.from_url(vendor.redis_url)
    try:
        stored = int(store.hget(AccountKeys(vendor.account().digest).account, "idem_bytes"))
    finally:
        store.close()
    assert stored == len(first.content)  # the count is the stored body's bytes


def test_space_comes_back_when_answers_expire_or_are_voided(redis_url):
    async def scenario() -> tuple[int, int]:
        meter = Meter.from_url(redis_url, idempotency_ttl_s=1, idempotency_max_bytes=150)
        try:
            keys = KeyAdmin(meter.redis)
            await keys.create_key("bounded", quota=100, rate_per_s=1000, burst=1000)
            account = await keys.get_account("bounded")
            bytes_of = lambda: meter.redis.hget(AccountKeys(account.digest).account, "idem_bytes")  # noqa: E731

            async def deliver(idem: str, size: int, outcome: str = "delivered") -> None:
                admitted = await meter.admit(account, units=1, fingerprint="f-" + idem, idempotency_key=idem)
                assert not hasattr(admitted, "body")
                debit = await meter.debit(account, units=1, images=0, texts=1, fingerprint="f-" + idem,
                                          idempotency_key=idem)
                await meter.settle(account, debit, outcome="delivered", idempotency_key=idem, body=b"x" * size,
                                   fingerprint="f-" + idem)
                if outcome == "void":
                    await meter.settle(account, debit, outcome="void", idempotency_key=idem, reason="client_disconnected")

            await deliver("a", 100)
            await deliver("b", 60)  # 100 < 150: admitted; now 160 >= 150
            with pytest.raises(IdempotencyStoreFull) as full:
                await meter.admit(account, units=1, fingerprint="f-c", idempotency_key="c")
            assert full.value.headers["Retry-After"] == "1"
            time.sleep(1.2)  # both answers expire: the next admission subtracts them
            await deliver("c", 140)
            after_expiry = int(await bytes_of())
            await deliver("e", 20, outcome="void")  # a voided answer is forgotten at once
            after_void = int(await bytes_of())
            await meter.admit(account, units=1, fingerprint="f-g", idempotency_key="g")  # 140 < 150
            return after_expiry, after_void
        finally:
            await meter.close()

    after_expiry, after_void = run_sync(scenario())
    assert after_expiry == 140 and after_void == 140
