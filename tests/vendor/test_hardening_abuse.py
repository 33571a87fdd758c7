"""Issue 12, abuse: an unpaid request costs the vendor no real work, the failed-authentication
guard can neither be dodged nor aimed at someone else, and /readyz is cheap and honest."""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from client_distiller.buying.local_vendor import LocalVendor
from tests.support.hardening import Gate, gated_tower, raw_request, read_response
from tests.support.imaging import image_item, random_image
from vendor_api.auth_guard import parse_trusted_proxies, resolve_client_address


def _service(vendor):
    return vendor.server.config.app.state.service


class _Counted:
    """Counts the model work and image decodes a server does (wraps the real functions)."""

    def __init__(self, service) -> None:
        self.decodes = 0
        self.encoded: dict[str, int] = {"image": 0, "text": 0}
        self._service = service
        self._prepare = service._prepare_image
        self._towers = dict(service.batcher.towers)

        def prepare(payload, param):
            self.decodes += 1
            return self._prepare(payload, param)

        service._prepare_image = prepare
        for name, tower in self._towers.items():
            def encode(batch, _name=name, _tower=tower):
                self.encoded[_name] += len(batch)
                return _tower.encode(batch)
            service.batcher.towers[name] = type(tower)(name, encode)

    def undo(self) -> None:
        self._service._prepare_image = self._prepare
        self._service.batcher.towers.update(self._towers)


# ---------------------------------------------------------------- 4. no work before the money checks
def test_a_key_without_balance_costs_no_decoding_and_its_402s_spend_the_rate_limit(make_vendor):
    vendor = make_vendor()
    key = vendor.create_key(quota=0, rate=0.5, burst=1)
    body = {"model": vendor.model_id, "input": [image_item(random_image(i, size=256)) for i in range(16)]}
    counted = _Counted(_service(vendor))
    try:
        with vendor.client(key) as client:
            statuses = [client.post("/v1/embeddings", json=body) for _ in range(3)]
            classify = client.post("/v1/classifications", json={
                "model": vendor.model_id, "input": body["input"][:2], "classes": [f"new class {i}" for i in range(16)]})
    finally:
        counted.undo()
    assert [r.status_code for r in statuses] == [402, 429, 429]  # the 402 spent the only slot
    assert statuses[0].json()["error"]["code"] == "insufficient_quota"
    assert classify.status_code == 429
    assert counted.decodes == 0 and counted.encoded == {"image": 0, "text": 0}
    assert [e["event"] for e in vendor.ledger()] == ["create"]


def test_a_classification_without_balance_tokenises_nothing(make_vendor):
    vendor = make_vendor()
    key = vendor.create_key(quota=0)
    teacher = _service(vendor).teacher
    counted, calls = _Counted(_service(vendor)), []
    original = teacher.count_tokens
    teacher.count_tokens = lambda text: calls.append(text) or original(text)
    try:
        with vendor.client(key) as client:
            r = client.post("/v1/classifications", json={
                "model": vendor.model_id, "input": [image_item(random_image(i)) for i in range(2)],
                "classes": [f"a rather long class name number {i}" for i in range(16)]})
    finally:
        del teacher.count_tokens
        counted.undo()
    assert r.status_code == 402
    assert calls == [] and counted.decodes == 0 and counted.encoded == {"image": 0, "text": 0}


def test_class_prompts_are_encoded_only_when_paid_and_bounded_by_what_is_paid(make_vendor):
    vendor = make_vendor(class_prompts_per_image=4)
    key = vendor.create_key(quota=100)
    images = [image_item(random_image(i)) for i in range(3)]
    counted = _Counted(_service(vendor))

    def classify(client, n_images, classes):
        return client.post("/v1/classifications", json={"model": vendor.model_id, "input": images[:n_images],
                                                         "classes": classes})

    try:
        with vendor.client(key) as client:
            many = [f"thing {i}" for i in range(1000)]
            refused = classify(client, 1, many)  # 1,000 text encodings for 1 unit: no
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "too_many_new_classes"
            assert "250 images" in refused.json()["error"]["message"]
            assert counted.encoded["text"] == 0 and vendor.account().spent == 0
            ok = classify(client, 2, [f"animal {i}" for i in range(8)])  # 8 new prompts for 2 images: fine
            assert ok.status_code == 200 and ok.headers["x-units-charged"] == "2"
            assert counted.encoded["text"] == 8
            again = classify(client, 1, [f"animal {i}" for i in range(8)])  # cached: no new prompt, any size
            assert again.status_code == 200 and counted.encoded["text"] == 8
            mixed = classify(client, 1, [f"animal {i}" for i in range(8)] + ["plant 1", "plant 2"])
            assert mixed.status_code == 200 and counted.encoded["text"] == 10  # only the 2 new ones
    finally:
        counted.undo()
    assert vendor.account().spent == 4


# ---------------------------------------------------------------- 5. the failed-authentication guard
def test_forwarded_headers_are_ignored_by_a_real_vendor_process(tiny_teacher_dir, redis_url, tmp_path):
    """`vendor-api serve`: rotating X-Forwarded-For no longer dodges the guard, forging someone
    else's address no longer locks that address out, and no header becomes a Redis key."""
    env = {"REDIS_URL": redis_url, "VENDOR_AUTH_MAX_FAILURES": "3", "VENDOR_TORCH_THREADS": "1"}
    with LocalVendor(tmp_path / "v", teacher=f"local-dir:{tiny_teacher_dir}", extra_env=env,
                     startup_timeout_s=60) as vendor:
        key = vendor.create_key("honest", 10)
        with httpx.Client(base_url=vendor.url, timeout=30) as client:
            codes = [client.get("/v1/models", headers={"Authorization": f"Bearer vk-guess-{i}",
                                                       "X-Forwarded-For": f"10.0.{i}.{i}"}).status_code
                     for i in range(6)]
            forged = client.get("/v1/models", headers={"Authorization": "Bearer vk-x", "X-Forwarded-For": "x" * 5000})
            valid = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert codes == [401, 401, 401, 429, 429, 429]
    assert forged.status_code == 429
    assert valid.status_code == 200  # the locked address's valid key still gets through
    store = redis.Redis.from_url(redis_url)
    guard_keys = sorted(k.decode() for k in store.keys("vendor:authfail:*"))
    store.close()
    assert guard_keys == ["vendor:authfail:{127.0.0.1}"]


def test_forwarded_for_is_believed_only_from_configured_proxies(make_vendor):
    vendor = make_vendor(trusted_proxies="127.0.0.1", auth_max_failures=2)
    with vendor.client() as client:
        def guess(forwarded):
            return client.get("/v1/usage", headers={"Authorization": "Bearer vk-guess", "X-Forwarded-For": forwarded})
        assert [guess("203.0.113.7").status_code for _ in range(3)] == [401, 401, 429]
        assert guess("198.51.100.1, 203.0.113.8").status_code == 401  # the right-most untrusted hop counts
        assert guess("garbage" * 800).status_code == 401  # unparsable: the proxy itself
    store = redis.Redis.from_url(vendor.redis_url)
    keys = sorted(k.decode() for k in store.keys("vendor:authfail:*"))
    store.close()
    assert keys == ["vendor:authfail:{127.0.0.1}", "vendor:authfail:{203.0.113.7}", "vendor:authfail:{203.0.113.8}"]


@pytest.mark.parametrize("peer, forwarded, trusted, expected", [
    ("127.0.0.1", "10.1.1.1", "", "127.0.0.1"),
    ("10.0.0.2", "10.1.1.1", "10.0.0.0/8", "10.0.0.2"),  # every hop trusted: the peer
    ("10.0.0.2", "192.0.2.9, 10.0.0.3", "10.0.0.0/8", "192.0.2.9"),
    ("2001:db8:1:2:3:4:5:6", None, "", "2001:db8:1:2::/64"),  # one host owns a /64
    ("::ffff:192.0.2.1", None, "", "192.0.2.1"),
    ("not an address", None, "", "unknown"),
])
def test_client_addresses_are_canonical_and_short(peer, forwarded, trusted, expected):
    assert resolve_client_address(peer, forwarded, parse_trusted_proxies(trusted)) == expected


# ---------------------------------------------------------------- 5. /readyz
def test_readyz_is_cheap_for_anyone(make_vendor):
    vendor = make_vendor()
    readiness = vendor.server.config.app.state.readiness
    counted = _Counted(_service(vendor))
    try:
        with vendor.client() as client:
            answers = [client.get("/readyz") for _ in range(100)]
    finally:
        counted.undo()
    assert all(r.status_code == 200 for r in answers)
    assert readiness.probes <= 1 and counted.encoded["text"] <= 1  # 100 calls, at most one forward pass


def test_readyz_stays_ready_while_the_model_is_busy(make_vendor):
    vendor = make_vendor(ready_probe_interval_s=0.1)
    key = vendor.create_key(quota=10)
    service, gate = _service(vendor), Gate()
    undo = gated_tower(service, "image", gate)
    try:
        sock = raw_request(vendor.base_url, "POST", "/v1/embeddings",
                           {"model": vendor.model_id, "input": [image_item(random_image(1))]},
                           {"Authorization": f"Bearer {key}"})
        gate.wait_reached()  # a long forward pass holds the model
        time.sleep(0.3)
        with vendor.client() as client:
            started = time.monotonic()
            r = client.get("/readyz")
            took = time.monotonic() - started
    finally:
        gate.open()
        undo()
    assert r.status_code == 200 and r.json()["model"] == "ok", r.text
    assert took < 1.0
    assert read_response(sock)[0] == 200


def test_readyz_reports_a_broken_model(make_vendor):
    vendor = make_vendor(ready_probe_interval_s=0.1)
    service = _service(vendor)
    original = service.batcher.towers["text"]

    def broken(batch):
        raise RuntimeError("GPU fell over")

    service.batcher.towers["text"] = type(original)("text", broken)
    try:
        with vendor.client() as client:
            r = client.get("/readyz")
    finally:
        service.batcher.towers["text"] = original
    assert r.status_code == 503 and r.json()["model"].startswith("failed")
    time.sleep(0.15)
    with vendor.client() as client:
        assert client.get("/readyz").status_code == 200  # recovers with the next probe


def test_replays_are_free_of_units_but_spend_the_rate_limit(make_vendor):
    """A stored answer can be megabytes; replaying it at full speed must not be free for the vendor."""
    vendor = make_vendor()
    key = vendor.create_key(quota=10, rate=0.2, burst=2)
    body = {"model": vendor.model_id, "input": ["stored answer"]}
    with vendor.client(key) as client:
        first = client.post("/v1/embeddings", json=body, headers={"Idempotency-Key": "r1"})
        replay = client.post("/v1/embeddings", json=body, headers={"Idempotency-Key": "r1"})
        limited = client.post("/v1/embeddings", json=body, headers={"Idempotency-Key": "r1"})
    assert first.status_code == 200 and replay.status_code == 200
    assert replay.headers["idempotent-replayed"] == "true" and replay.headers["x-units-charged"] == "0"
    assert limited.status_code == 429
    assert vendor.account().spent == 1
