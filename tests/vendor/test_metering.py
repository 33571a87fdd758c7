"""The meter under concurrency and on every refusal path: real Redis, real HTTP."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from shared.hashing import fingerprint_json
from shared.protocol import EmbeddingRequest
from tests.conftest import run_sync, vendor_on_own_redis
from tests.support.imaging import image_item, random_image
from vendor_api.key_admin import KeyAdmin
from vendor_api.metering import Meter


def _body(vendor, n_images: int = 2, seed: int = 0) -> dict:
    return {"model": vendor.model_id, "input": [image_item(random_image(seed + i)) for i in range(n_images)]}


def test_concurrent_clients_never_exceed_quota_and_every_item_is_charged_once(make_vendor):
    vendor = make_vendor(max_wait_ms=2)
    key = vendor.create_key(quota=50)
    served, statuses, lock = [0], [], threading.Lock()

    def worker(worker_id: int) -> None:
        with vendor.client(key) as client:
            for attempt in range(10):
                r = client.post("/v1/embeddings", json=_body(vendor, 3, seed=worker_id * 100 + attempt))
                with lock:
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        served[0] += len(r.json()["data"])
                if r.status_code == 402:
                    return

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(worker, range(12)))
    account = vendor.account()
    debits = [e for e in vendor.ledger() if e["event"] == "debit"]
    assert set(statuses) == {200, 402}
    assert served[0] == account.spent == sum(int(e["units"]) for e in debits)
    assert 48 <= account.spent <= 50  # 3 units a request: 16 fit into 50, the 17th is refused
    assert statuses.count(200) == len(debits) == 16


def test_idempotent_retry_replays_without_a_second_charge(vendor):
    key = vendor.create_key(quota=20)
    body = _body(vendor, 2)
    with vendor.client(key) as client:
        first = client.post("/v1/embeddings", json=body, headers={"Idempotency-Key": "batch-1"})
        again = client.post("/v1/embeddings", json=body, headers={"Idempotency-Key": "batch-1"})
        other = client.post("/v1/embeddings", json=_body(vendor, 2, seed=7), headers={"Idempotency-Key": "batch-1"})
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true" and again.headers["x-units-charged"] == "0"
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert vendor.account().spent == 2
    assert [e["event"] for e in vendor.ledger()] == ["create", "debit", "replay"]  # the replay is free, but recorded


def test_same_idempotency_key_in_flight_is_409(vendor):
    key = vendor.create_key(quota=20)
    body = _body(vendor, 1)
    account = vendor.account()

    async def hold_debit() -> None:
        meter = Meter.from_url(vendor.redis_url)
        try:
            await meter.debit(account, units=1, images=1, texts=0, idempotency_key="busy",
                              fingerprint=fingerprint_json(EmbeddingRequest.model_validate(body).model_dump(mode="json")))
        finally:
            await meter.close()

    run_sync(hold_debit())
    with vendor.client(key) as client:
        r = client.post("/v1/embeddings", json=body, headers={"Idempotency-Key": "busy"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_request_in_flight"
    assert "retry-after" in r.headers
    assert vendor.account().spent == 1  # only the held debit


def test_exhausted_quota_is_402_and_serves_nothing(vendor):
    key = vendor.create_key(quota=3)
    with vendor.client(key) as client:
        assert client.post("/v1/embeddings", json=_body(vendor, 2)).status_code == 200
        r = client.post("/v1/embeddings", json=_body(vendor, 2))
    assert r.status_code == 402
    assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "insufficient_quota",
                                 "code": "insufficient_quota", "param": None}
    assert r.headers["x-units-remaining"] == "1" and r.headers["x-units-charged"] == "0"
    assert "data" not in r.json()
    assert vendor.account().spent == 2


def test_rate_limit_is_429_with_retry_after_and_costs_nothing(vendor):
    key = vendor.create_key(quota=100, rate=0.5, burst=2)
    with vendor.client(key) as client:
        codes = [client.post("/v1/embeddings", json={"model": vendor.model_id, "input": "x"}) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    limited = codes[2]
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert vendor.account().spent == 2


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "Bearer vk-not-a-real-key", "Bearer sk-openai-style"])
def test_missing_or_unknown_keys_are_401(vendor, header):
    vendor.create_key(quota=5)
    with vendor.client() as client:
        headers = {"Authorization": header} if header else {}
        r = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert client.get("/v1/usage", headers=headers).status_code == 401
    assert vendor.account().spent == 0


def test_revoked_key_is_401(vendor):
    key = vendor.create_key(name="gone", quota=5)

    async def revoke() -> None:
        keys = KeyAdmin.from_url(vendor.redis_url)
        await keys.revoke("gone")
        await keys.close()

    run_sync(revoke())
    with vendor.client(key) as client:
        r = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_revoked"


def test_one_key_never_sees_or_spends_another_quota(vendor):
    alice = vendor.create_key(name="alice", quota=10)
    bob = vendor.create_key(name="bob", quota=10)
    with vendor.client(alice) as client:
        client.post("/v1/embeddings", json={"model": vendor.model_id, "input": ["a", "b", "c"]})
        assert client.get("/v1/usage").json()["name"] == "alice"
    with vendor.client(bob) as client:
        usage = client.get("/v1/usage").json()
    assert usage["name"] == "bob" and usage["spent"] == 0
    assert vendor.account("alice").spent == 3 and vendor.account("bob").spent == 0


def test_api_keys_are_stored_only_as_hashes(vendor):
    key = vendor.create_key(quota=5)
    client = redis.Redis.from_url(vendor.redis_url)
    dump = b"".join(
        b"".join(k + v for k, v in client.hgetall(name).items()) if client.type(name) == b"hash" else name
        for name in client.keys("*")
    )
    client.close()
    assert key.encode() not in dump and key[3:].encode() not in dump


def test_failed_inference_is_refunded(vendor):
    key = vendor.create_key(quota=10)
    service = vendor.server.config.app.state.service
    original = service.batcher.towers["image"]

    def broken(_):
        raise RuntimeError("GPU fell over")

    service.batcher.towers["image"] = type(original)("image", broken)
    try:
        with vendor.client(key) as client:
            r = client.post("/v1/embeddings", json=_body(vendor, 2), headers={"Idempotency-Key": "k"})
    finally:
        service.batcher.towers["image"] = original
    assert r.status_code == 500 and r.json()["error"]["code"] == "inference_failed"
    assert vendor.account().spent == 0
    events = [(e["event"], e["units"]) for e in vendor.ledger()]
    assert events == [("create", "10"), ("debit", "2"), ("refund", "2")]
    with vendor.client(key) as client:  # the refunded key is free again and the retry is charged once
        assert client.post("/v1/embeddings", json=_body(vendor, 2), headers={"Idempotency-Key": "k"}).status_code == 200
    assert vendor.account().spent == 2


def test_full_queue_is_503_with_retry_after_before_any_charge(make_vendor):
    vendor = make_vendor(max_queue_items=4, max_items_per_request=4)
    key = vendor.create_key(quota=10)
    batcher = vendor.server.config.app.state.service.batcher
    with batcher.reserve(3):  # three items already waiting
        with vendor.client(key) as client:
            r = client.post("/v1/embeddings", json=_body(vendor, 2))
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_overloaded"
    assert r.headers["retry-after"] == "1"
    assert vendor.account().spent == 0
    with vendor.client(key) as client:
        assert client.post("/v1/embeddings", json=_body(vendor, 2)).status_code == 200


def test_redis_down_is_503_never_unmetered_and_recovers_without_restart(teacher, tmp_path):
    with vendor_on_own_redis(teacher, tmp_path / "r", redis_timeout_s=0.5) as (vendor, own_redis):
        key = vendor.create_key(quota=10)
        with vendor.client(key) as client:
            assert client.post("/v1/embeddings", json={"model": vendor.model_id, "input": "x"}).status_code == 200
            time.sleep(1.2)  # let appendfsync everysec flush the debit
            own_redis.kill()
            down = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": "x"})
            assert down.status_code == 503 and down.json()["error"]["code"] == "metering_unavailable"
            assert "data" not in down.json()
            assert client.get("/readyz").status_code == 503
            own_redis.start()
            redis.Redis.from_url(own_redis.url).script_flush()  # as after a real restart: scripts gone
            deadline = time.monotonic() + 10
            while (r := client.post("/v1/embeddings", json={"model": vendor.model_id, "input": "y"})).status_code != 200:
                assert time.monotonic() < deadline, r.text
                time.sleep(0.2)
            assert client.get("/readyz").status_code == 200
        assert vendor.account().spent == 2  # the pre-crash debit survived in the AOF, plus the new one


def test_debits_of_a_crashed_request_are_refunded_when_its_lease_expires(vendor):
    key = vendor.create_key(quota=10)
    account = vendor.account()

    async def crash_mid_request() -> None:
        meter = Meter.from_url(vendor.redis_url, inflight_lease_s=0)
        await meter.debit(account, units=4, images=4, texts=0, fingerprint="f", idempotency_key="lost")
        await meter.close()

    run_sync(crash_mid_request())
    assert vendor.account().spent == 4
    time.sleep(0.01)
    with vendor.client(key) as client:  # the next request of this key reaps the dead debit
        assert client.post("/v1/embeddings", json={"model": vendor.model_id, "input": "x"}).status_code == 200
    assert vendor.account().spent == 1
    assert ("refund", "4") in [(e["event"], e["units"]) for e in vendor.ledger()]
