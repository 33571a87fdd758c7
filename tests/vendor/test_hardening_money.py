"""Issue 12, money: nobody pays for an answer they did not get, and nobody gets one they did not
pay for. Real uvicorn servers on 127.0.0.1, real Redis, real sockets that hang up at each point
of the metered path, the official openai SDK timing out, leases outliving their requests."""

from __future__ import annotations

import asyncio
import threading
import time

import openai
import pytest
import redis

from tests.conftest import vendor_on_own_redis
from tests.support.hardening import Gate, events, gated_tower, hang_up, net_units, raw_request, read_response, wait_for
from tests.support.imaging import image_item, random_image


def _images(vendor, n: int, seed: int = 0) -> dict:
    return {"model": vendor.model_id, "input": [image_item(random_image(seed + i)) for i in range(n)]}


def _service(vendor):
    return vendor.server.config.app.state.service


def _refunded(vendor, name: str = "client"):
    return lambda: any(e["event"] == "refund" for e in vendor.ledger(name))


# ---------------------------------------------------------------- 1. clients that hang up
def test_client_gone_while_its_images_decode_is_never_debited(make_vendor):
    vendor = make_vendor(preprocess_workers=1)
    key = vendor.create_key(quota=100)
    service, gate = _service(vendor), Gate()
    original = service._prepare_image

    def slow_decode(payload, param):
        gate.wait_blocking()
        return original(payload, param)

    service._prepare_image = slow_decode
    try:
        sock = raw_request(vendor.base_url, "POST", "/v1/embeddings", _images(vendor, 20),
                           {"Authorization": f"Bearer {key}"})
        gate.wait_reached()
        hang_up(sock)
        time.sleep(0.3)  # the server sees the disconnect while the first image still decodes
    finally:
        gate.open()
    time.sleep(0.5)
    service._prepare_image = original
    assert vendor.account().spent == 0
    assert [e["event"] for e in vendor.ledger()] == ["create"]  # not even a debit


@pytest.mark.parametrize("point", ["queue wait", "inference"])
def test_client_gone_while_queued_or_inferring_is_refunded(make_vendor, point):
    vendor = make_vendor(max_wait_ms=1)
    victim_key, other_key = vendor.create_key(quota=100), vendor.create_key(name="other", quota=100)
    service, gate = _service(vendor), Gate()
    undo = gated_tower(service, "image", gate)
    blocker = None
    try:
        if point == "queue wait":  # another key's batch holds the model; the victim waits behind it
            blocker = raw_request(vendor.base_url, "POST", "/v1/embeddings", _images(vendor, 1, seed=50),
                                  {"Authorization": f"Bearer {other_key}"})
            gate.wait_reached()
        sock = raw_request(vendor.base_url, "POST", "/v1/embeddings", _images(vendor, 3),
                           {"Authorization": f"Bearer {victim_key}"})
        if point == "inference":
            gate.wait_reached()
        else:
            wait_for(lambda: service.batcher.depth >= 3, what="the victim's items in the queue")
        wait_for(lambda: vendor.account().spent == 3, what="the victim's debit")
        hang_up(sock)
        wait_for(_refunded(vendor), what="the refund")
    finally:
        gate.open()
        undo()
    assert vendor.account().spent == 0
    assert events(vendor.ledger()) == [("create", "100", ""), ("debit", "3", ""),
                                       ("refund", "3", "client_disconnected")]
    if blocker is not None:  # the other key was served and charged, as it should be
        assert read_response(blocker)[0] == 200
        assert vendor.account("other").spent == 1


def test_client_gone_after_inference_before_the_answer_is_written_is_refunded(make_vendor):
    vendor = make_vendor()
    key = vendor.create_key(quota=100)
    service, gate = _service(vendor), Gate()
    original = service._infer

    async def infer_then_wait(prepared):
        rows = await original(prepared)
        await gate.wait()
        return rows

    service._infer = infer_then_wait
    try:
        sock = raw_request(vendor.base_url, "POST", "/v1/embeddings", _images(vendor, 2),
                           {"Authorization": f"Bearer {key}", "Idempotency-Key": "after-inference"})
        gate.wait_reached()
        hang_up(sock)
        wait_for(_refunded(vendor), what="the refund")
    finally:
        gate.open()
        service._infer = original
    assert vendor.account().spent == 0
    assert [e[0] for e in events(vendor.ledger())] == ["create", "debit", "refund"]
    with vendor.client(key) as client:  # the idempotency slot was released: a retry runs and pays once
        r = client.post("/v1/embeddings", json=_images(vendor, 2), headers={"Idempotency-Key": "after-inference"})
    assert r.status_code == 200 and "idempotent-replayed" not in r.headers and vendor.account().spent == 2


def test_client_gone_while_its_answer_is_being_settled_is_refunded(make_vendor):
    """The last point: the client hangs up during the settle's own Redis round trip. The
    answer is not written, and its delivered debit is voided."""
    vendor = make_vendor()
    key = vendor.create_key(quota=100)
    service, gate = _service(vendor), Gate()
    meter = service.meter
    original = meter.settle

    async def slow_settle(account, debit, *, outcome, **kw):
        if outcome == "delivered":
            await gate.wait()
        return await original(account, debit, outcome=outcome, **kw)

    meter.settle = slow_settle
    try:
        sock = raw_request(vendor.base_url, "POST", "/v1/embeddings", _images(vendor, 2),
                           {"Authorization": f"Bearer {key}", "Idempotency-Key": "while-settling"})
        gate.wait_reached()
        hang_up(sock)
        time.sleep(0.3)
        gate.open()
        wait_for(_refunded(vendor), what="the void refund")
    finally:
        gate.open()
        meter.settle = original
    assert vendor.account().spent == 0
    assert events(vendor.ledger())[-1] == ("refund", "2", "client_disconnected")
    store = redis.Redis.from_url(vendor.redis_url)
    assert not [k for k in store.keys("*:idem:*")], "the voided answer must not be replayable"
    store.close()


def test_openai_sdk_timeouts_and_retries_are_never_charged(make_vendor):
    """The SDK (no Idempotency-Key) times out after 1 s and retries twice: three requests, each
    cancelled and refunded when its connection closes."""
    vendor = make_vendor()
    key = vendor.create_key(quota=100)
    service = _service(vendor)
    original = service.batcher.towers["text"]
    release = threading.Event()

    def slow(batch):
        release.wait(2.5)
        return original.encode(batch)

    service.batcher.towers["text"] = type(original)("text", slow)
    try:
        client = openai.OpenAI(base_url=vendor.base_url + "/v1", api_key=key, timeout=1.0, max_retries=2)
        with pytest.raises(openai.APITimeoutError):
            client.embeddings.create(model=vendor.model_id, input=["a slow request"])
        wait_for(lambda: sum(e["event"] == "refund" for e in vendor.ledger()) == 3, timeout=15,
                 what="three refunds")
    finally:
        release.set()
        service.batcher.towers["text"] = original
    ledger = vendor.ledger()
    assert [e["event"] for e in ledger].count("debit") == 3
    assert vendor.account().spent == net_units(ledger) == 0


# ---------------------------------------------------------------- 2. leases that outlive requests
def test_a_live_request_renews_its_lease_and_is_charged_once(make_vendor):
    vendor = make_vendor(inflight_lease_s=1, max_wait_ms=1)
    key = vendor.create_key(quota=100)
    service = _service(vendor)
    original = service.batcher.towers["image"]

    def slow(batch):
        time.sleep(2.5)  # 2.5 leases
        return original.encode(batch)

    service.batcher.towers["image"] = type(original)("image", slow)
    result: dict = {}

    def slow_request() -> None:
        with vendor.client(key) as client:
            result["r"] = client.post("/v1/embeddings", json=_images(vendor, 2))

    thread = threading.Thread(target=slow_request)
    try:
        thread.start()
        time.sleep(1.6)  # past the first lease: this key's next debit runs the reaper
        with vendor.client(key) as client:
            assert client.post("/v1/embeddings", json={"model": vendor.model_id, "input": "reap?"}).status_code == 200
        thread.join(20)
    finally:
        service.batcher.towers["image"] = original
    assert result["r"].status_code == 200 and result["r"].headers["x-units-charged"] == "2"
    ledger = vendor.ledger()
    assert not any(e.get("reason") == "lease_expired" for e in ledger), events(ledger)
    assert vendor.account().spent == net_units(ledger) == 3


def _stalled_request(vendor, key, body):
    """A request whose heartbeat is frozen (as in a replica whose event loop stalled) while its
    forward pass outlives the lease, and another request of the key that reaps it meanwhile."""
    service = _service(vendor)

    async def frozen(account, debit):
        await asyncio.sleep(3600)

    service._keep_alive = frozen
    original = service.batcher.towers["image"]

    def slow(batch):
        time.sleep(2.0)
        return original.encode(batch)

    service.batcher.towers["image"] = type(original)("image", slow)
    result: dict = {}

    def run() -> None:
        with vendor.client(key) as client:
            result["r"] = client.post("/v1/embeddings", json=body)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.3)
    with vendor.client(key) as client:
        reaper = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": "the reaper"})
    thread.join(20)
    service.batcher.towers["image"] = original
    return result["r"], reaper


def test_an_answer_whose_lease_was_reaped_is_paid_again_before_delivery(make_vendor):
    vendor = make_vendor(inflight_lease_s=1)
    key = vendor.create_key(quota=100)
    r, reaper = _stalled_request(vendor, key, _images(vendor, 2))
    assert reaper.status_code == 200
    assert r.status_code == 200 and r.headers["x-units-charged"] == "2"
    ledger = vendor.ledger()
    reasons = [(e["event"], e.get("reason", "")) for e in ledger]
    assert ("refund", "lease_expired") in reasons and ("debit", "redebit_after_lease_expired") in reasons
    assert vendor.account().spent == net_units(ledger) == 3  # 2 for the answer, 1 for the reaper


def test_an_answer_whose_lease_was_reaped_and_cannot_be_paid_is_not_delivered(make_vendor):
    vendor = make_vendor(inflight_lease_s=1)
    key = vendor.create_key(quota=2)
    r, reaper = _stalled_request(vendor, key, _images(vendor, 2))  # the reaper takes 1 of the 2 units back
    assert reaper.status_code == 200
    assert r.status_code == 503 and r.json()["error"]["code"] == "debit_lapsed" and "data" not in r.json()
    assert r.headers["x-units-charged"] == "0"
    assert vendor.account().spent == net_units(vendor.ledger()) == 1  # only the reaper's own text


# ---------------------------------------------------------------- 6. a retry after a Redis blip
def test_a_retry_after_redis_came_back_runs_instead_of_waiting_out_the_lease(teacher, tmp_path):
    with vendor_on_own_redis(teacher, tmp_path / "r", redis_timeout_s=0.5, inflight_lease_s=300) as (vendor, own):
        key = vendor.create_key(quota=100)
        time.sleep(1.1)  # the account is on disk before the kill
        service, gate = _service(vendor), Gate()
        undo = gated_tower(service, "image", gate)
        body = _images(vendor, 3)
        result: dict = {}

        def first() -> None:
            with vendor.client(key) as client:
                result["r"] = client.post("/v1/embeddings", json=body, headers={"Idempotency-Key": "blip"})

        thread = threading.Thread(target=first)
        thread.start()
        gate.wait_reached()  # debited, inside the forward pass
        time.sleep(0.2)
        own.kill()
        gate.open()  # the answer is ready, but its settle cannot be written
        thread.join(20)
        undo()
        assert result["r"].status_code == 503 and result["r"].json()["error"]["code"] == "metering_unavailable"
        own.start()
        came_back = time.monotonic()
        statuses = []
        with vendor.client(key) as client:
            while True:
                r = client.post("/v1/embeddings", json=body, headers={"Idempotency-Key": "blip"})
                statuses.append(r.status_code)
                if r.status_code != 409 and r.status_code != 503:
                    break
                assert time.monotonic() - came_back < 10, statuses  # never the 300 s lease
                time.sleep(float(r.headers.get("retry-after", "1")) / 4)
        assert r.status_code == 200 and r.headers["x-units-charged"] == "3", r.text
        ledger = vendor.ledger()
        assert events(ledger)[1:] == [("debit", "3", ""), ("refund", "3", "settle_failed"), ("debit", "3", "")]
        assert vendor.account().spent == net_units(ledger) == 3
