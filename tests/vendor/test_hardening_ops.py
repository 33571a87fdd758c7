"""Issue 12, operations and conventions: stale Redis connections after a restart, unexpected
errors (their own code, counted, one traceback, no flood from disconnects), and what clients and
their SDKs expect (consistent headers, RateLimit fields, WWW-Authenticate, invisible texts, data:
URLs, /metrics off the public port)."""

from __future__ import annotations

import logging
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from tests.conftest import free_port, vendor_on_own_redis
from tests.support.hardening import wait_for
from tests.support.imaging import random_image, to_b64

ADMIN = "admin-" + "q" * 30


def _service(vendor):
    return vendor.server.config.app.state.service


# ---------------------------------------------------------------- 7. stale connections
def test_the_first_requests_after_a_clean_redis_restart_are_served(teacher, tmp_path):
    with vendor_on_own_redis(teacher, tmp_path / "r") as (vendor, own):
        key = vendor.create_key(quota=100)
        with vendor.client(key) as client:
            # several pooled connections, all left open
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda i: client.post("/v1/embeddings", json={"model": vendor.model_id,
                                                                            "input": f"warm {i}"}), range(8)))
            own.stop()
            own.start()
            statuses = [client.post("/v1/embeddings", json={"model": vendor.model_id, "input": f"after {i}"}).status_code
                        for i in range(4)]
            usage = client.get("/v1/usage").status_code
    assert statuses == [200, 200, 200, 200] and usage == 200


# ---------------------------------------------------------------- 8. unexpected errors
def _metric(vendor, route: str, status: str) -> float:
    text = httpx.get(vendor.base_url + "/metrics").text
    match = re.search(r'vendor_requests_total\{route="%s",status="%s"\} ([0-9.e+]+)' % (re.escape(route), status), text)
    return float(match.group(1)) if match else 0.0


def _tracebacks(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info]


def test_a_bug_is_internal_error_counted_and_logged_once(make_vendor, caplog):
    vendor = make_vendor(admin_secret=ADMIN)
    key = vendor.create_key(quota=10)
    service, keys = _service(vendor), vendor.server.config.app.state.keys

    def bug(account):
        raise KeyError("a bug")

    async def admin_bug():
        raise ZeroDivisionError("another bug")

    caplog.set_level(logging.INFO)
    service.model_card, keys.list_accounts = bug, admin_bug
    try:
        with vendor.client(key) as client:
            r = client.get("/v1/models")
        with vendor.client(ADMIN) as admin:
            a = admin.get("/admin/keys")
    finally:
        del service.model_card, keys.list_accounts
    for response in (r, a):
        assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    assert _metric(vendor, "/v1/models", "500") == 1 and _metric(vendor, "/admin/keys", "500") == 1
    assert len(_tracebacks(caplog)) == 2  # one per failure
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "vendor_api.requests"]
    assert any(r.headers["x-request-id"] in line and " 500 " in line for line in lines)


def test_a_model_failure_keeps_its_own_code(vendor, caplog):
    key = vendor.create_key(quota=10)
    service = _service(vendor)
    original = service.batcher.towers["text"]

    def broken(batch):
        raise RuntimeError("GPU fell over")

    caplog.set_level(logging.INFO)
    service.batcher.towers["text"] = type(original)("text", broken)
    try:
        with vendor.client(key) as client:
            r = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": "x"})
    finally:
        service.batcher.towers["text"] = original
    assert r.status_code == 500 and r.json()["error"]["code"] == "inference_failed"
    assert len(_tracebacks(caplog)) == 1 and vendor.account().spent == 0


def test_a_client_that_hangs_up_mid_upload_is_one_line_and_no_traceback(vendor, caplog):
    key = vendor.create_key(quota=10)
    caplog.set_level(logging.DEBUG)
    url = urlsplit(vendor.base_url)
    for _ in range(5):
        sock = socket.create_connection((url.hostname, url.port))
        sock.sendall(f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"input\": [".encode())
        time.sleep(0.1)
        sock.close()
    wait_for(lambda: _metric(vendor, "/v1/embeddings", "499") == 5, what="five 499s")
    assert _tracebacks(caplog) == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert vendor.account().spent == 0


# ---------------------------------------------------------------- conventions
def test_units_remaining_header_agrees_with_the_body_under_concurrency(make_vendor):
    vendor = make_vendor(max_wait_ms=2)
    key = vendor.create_key(quota=1000)

    def one(i):
        with vendor.client(key) as client:
            return client.post("/v1/embeddings", json={"model": vendor.model_id, "input": [f"t{i}", f"u{i}"]})

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(one, range(30)))
    assert all(r.status_code == 200 for r in answers)
    assert all(r.headers["x-units-remaining"] == str(r.json()["usage"]["units_remaining"]) for r in answers)


def test_ietf_ratelimit_fields_on_200_402_and_429(make_vendor):
    vendor = make_vendor()
    key = vendor.create_key(quota=1, rate=1, burst=2)
    with vendor.client(key) as client:
        ok = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": "x"})
        broke = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": "y"})
        limited = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": "z"})
        usage = client.get("/v1/usage")
    assert (ok.status_code, broke.status_code, limited.status_code) == (200, 402, 429)
    for r in (ok, broke, limited, usage):
        assert r.headers["ratelimit-policy"] == '"burst";q=2;w=2', r.headers
        assert re.fullmatch(r'"burst";r=\d+;t=\d+', r.headers["ratelimit"])
        assert "x-ratelimit-limit-requests" in r.headers
    assert limited.headers["ratelimit"].startswith('"burst";r=0;')


def test_401_says_how_to_authenticate(vendor):
    with vendor.client() as client:
        missing = client.get("/v1/models")
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer vk-wrong"})
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]


@pytest.mark.parametrize("text", ["\u200b\u200b", "\u200d\ufeff\u2060", " \u200b \u3164 ", "\ufe0f\u034f", "\u2800"])
def test_invisible_texts_are_refused_free(vendor, text):
    key = vendor.create_key(quota=10)
    with vendor.client(key) as client:
        r = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": ["fine", text]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "empty_input"
    assert r.json()["error"]["param"] == "input[1]" and vendor.account().spent == 0


def test_images_as_data_urls_and_openai_image_url_items(vendor):
    key = vendor.create_key(quota=10)
    b64 = to_b64(random_image(3))
    shapes = [{"type": "image", "image": b64}, {"type": "image", "image": f"data:image/png;base64,{b64}"},
              {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}]
    with vendor.client(key) as client:
        r = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": shapes})
        fetch = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]})
        bad_data = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": [
            {"type": "image", "image": "data:text/plain;base64,aGVsbG8="}]})
    assert r.status_code == 200, r.text
    vectors = np.array([item["embedding"] for item in r.json()["data"]])
    assert np.allclose(vectors, vectors[0], atol=1e-6)  # one image, whatever its spelling
    assert fetch.status_code == 400 and fetch.json()["error"]["code"] == "invalid_image"
    assert "never fetches" in fetch.json()["error"]["message"]
    assert bad_data.status_code == 400
    assert vendor.account().spent == 3


def test_metrics_can_be_kept_off_the_public_port(make_vendor):
    port = free_port()
    vendor = make_vendor(metrics_public=False, metrics_port=port)
    assert httpx.get(vendor.base_url + "/metrics").status_code == 404
    private = httpx.get(f"http://127.0.0.1:{port}/metrics")
    assert private.status_code == 200 and "vendor_requests_total" in private.text
