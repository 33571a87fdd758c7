"""Embedding protection modes over real HTTP with the tiny teacher: each mode's contract
(determinism per input, unit norm, the dimension /v1/models announces), quantize levels,
truncate, per-key rotation, b4b noise growing with coverage, and a restart keeping transforms."""

from __future__ import annotations

import stat

import numpy as np
import redis

from tests.conftest import start_vendor
from tests.support.imaging import image_item, random_image

SECRET = "test-protection-secret"
WORDS = ["dog", "cat", "car", "tree", "house", "bird", "shoe", "boat", "lamp", "apple", "chair", "river"]


def embed(client, model: str, items: list) -> np.ndarray:
    r = client.post("/v1/embeddings", json={"model": model, "input": items})
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])], dtype=np.float64)


def mixed_items(seeds: range) -> list:
    return [image_item(random_image(s)) for s in seeds] + [f"a photo of a {w}" for w in WORDS[:4]]


def test_every_embedding_mode_is_deterministic_unit_norm_and_announces_its_dims(make_vendor):
    vendor = make_vendor(protection_secret=SECRET)
    specs = ["none", "quantize:fp16", "quantize:int8", "quantize:binary", "noise:0.2", "truncate:16",
             "rotate", "rotate:4", "b4b:0.3", "watermark:0.5"]
    items = mixed_items(range(6))
    clean = None
    for i, spec in enumerate(specs):
        key = vendor.create_key(name=f"k{i}", protection=spec)
        with vendor.client(key) as client:
            card = client.get("/v1/models").json()["data"][0]
            first, second = embed(client, vendor.model_id, items), embed(client, vendor.model_id, items)
        # top_k: embedding-mode keys are capped too (VENDOR_CLASSIFY_MAX_TOP_K), not unlimited
        assert card["protection"] == spec and card["output"] == "embeddings" and card["top_k"] == 5
        assert first.shape == (len(items), card["embedding_dim"]), spec
        np.testing.assert_array_equal(first, second, err_msg=spec)  # same input, same key: same answer
        np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5, err_msg=spec)
        if spec == "none":
            clean = first
        elif spec.startswith(("noise", "b4b", "quantize:int8")):
            assert not np.allclose(first, clean, atol=1e-4), spec  # the mode really changed the answer
    assert clean is not None and clean.shape[1] == 64


def test_quantize_levels_truncate_and_noise_scale(make_vendor):
    vendor = make_vendor(protection_secret=SECRET)
    items = mixed_items(range(8))
    out = {}
    for spec in ["none", "quantize:fp16", "quantize:int8", "quantize:binary", "truncate:16", "noise:0.2", "noise:2"]:
        with vendor.client(vendor.create_key(name=spec.replace(":", "-"), protection=spec)) as client:
            out[spec] = embed(client, vendor.model_id, items)
    clean = out["none"]
    assert np.min(np.sum(out["quantize:fp16"] * clean, axis=1)) > 0.9999
    int8 = out["quantize:int8"]
    steps = int8 * 127 / np.abs(int8).max(axis=1, keepdims=True)  # one per-vector step: integers in [-127, 127]
    np.testing.assert_allclose(steps, np.round(steps), atol=2e-3)
    assert np.abs(steps).max() <= 127.0 + 1e-3 and len(np.unique(np.round(steps))) > 20
    assert np.min(np.sum(int8 * clean, axis=1)) > 0.99
    binary = out["quantize:binary"]
    np.testing.assert_allclose(np.abs(binary), 1 / np.sqrt(64), atol=1e-6)
    np.testing.assert_array_equal(np.sign(binary), np.where(clean >= 0, 1.0, -1.0))
    expected = clean[:, :16] / np.linalg.norm(clean[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(out["truncate:16"], expected, atol=1e-6)
    small, large = (np.sum(out[s] * clean, axis=1) for s in ("noise:0.2", "noise:2"))
    assert 0.9 < small.mean() < 0.995 and large.mean() < 0.7  # cos ~ 1/sqrt(1+sigma^2)


def test_noise_differs_per_key_and_survives_a_restart_with_the_persisted_secret(teacher, redis_url, tmp_path):
    items = mixed_items(range(4))
    vendor, thread = start_vendor(teacher, redis_url, data_dir=tmp_path)
    try:
        key_a, key_b = vendor.create_key("a", protection="noise:0.3"), vendor.create_key("b", protection="noise:0.3")
        with vendor.client(key_a) as a, vendor.client(key_b) as b:
            before_a, before_b = embed(a, vendor.model_id, items), embed(b, vendor.model_id, items)
    finally:
        vendor.server.should_exit = True
        thread.join(timeout=15)
    secret_file = tmp_path / "protection-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600 and len(secret_file.read_text().strip()) == 64
    assert np.abs(before_a - before_b).max() > 1e-3  # different key, different noise
    vendor, thread = start_vendor(teacher, redis_url, data_dir=tmp_path)
    try:
        with vendor.client(key_a) as a:
            after = embed(a, vendor.model_id, items)
            reordered = embed(a, vendor.model_id, items[::-1])  # position does not matter, content does
    finally:
        vendor.server.should_exit = True
        thread.join(timeout=15)
    np.testing.assert_array_equal(after, before_a)
    np.testing.assert_allclose(reordered[::-1], before_a, atol=1e-3)  # only batching may differ (fp16 GPUs)


def test_rotate_differs_per_key_yet_keeps_each_keys_image_text_geometry(make_vendor):
    vendor = make_vendor(protection_secret=SECRET)
    images = [image_item(random_image(s)) for s in range(10)]
    texts = [f"a photo of a {w}" for w in WORDS]
    out = {}
    for name, spec in [("clean", "none"), ("r1", "rotate"), ("r2", "rotate")]:
        with vendor.client(vendor.create_key(name=name, protection=spec)) as client:
            out[name] = embed(client, vendor.model_id, images + texts)
    n = len(images)
    clean_cos = out["clean"][:n] @ out["clean"][n:].T
    for name in ("r1", "r2"):
        assert out[name].shape == (n + len(texts), 64 + 16)
        np.testing.assert_allclose(out[name][:n] @ out[name][n:].T, clean_cos, atol=1e-5)
    # the same inputs through two keys do not line up, coordinate for coordinate
    assert np.sum(out["r1"] * out["r2"], axis=1).mean() < 0.5


def test_b4b_noise_grows_with_a_keys_coverage_and_a_narrow_key_stays_clean(make_vendor):
    vendor = make_vendor(protection_secret=SECRET)
    clean_key = vendor.create_key("clean", protection="none")
    broad_key, narrow_key = vendor.create_key("broad", protection="b4b:0.5"), vendor.create_key("narrow", protection="b4b:0.5")
    narrow_items = [image_item(random_image(0)), "a photo of a dog"]
    broad_batches = [[image_item(random_image(100 + 40 * b + i, size=24 + 8 * (i % 3))) for i in range(40)]
                     + [f"{t} {w} {b}" for t in ("a photo of a", "a drawing of the", "my") for w in WORDS]
                     for b in range(4)]
    with vendor.client(clean_key) as client:
        probe_clean = embed(client, vendor.model_id, narrow_items)
    states, drifts = [], []
    with vendor.client(broad_key) as broad, vendor.client(narrow_key) as narrow:
        assert broad.get("/v1/usage").json()["protection_state"] == {"coverage": 0.0, "noise": 0.0}
        for batch in broad_batches:
            embed(broad, vendor.model_id, batch)
            states.append(broad.get("/v1/usage").json()["protection_state"])
            drifts.append(1 - np.sum(embed(broad, vendor.model_id, narrow_items) * probe_clean, axis=1).mean())
        for _ in range(3):
            narrow_out = embed(narrow, vendor.model_id, narrow_items)
        narrow_state = narrow.get("/v1/usage").json()["protection_state"]
    coverages, noises = [s["coverage"] for s in states], [s["noise"] for s in states]
    assert all(b >= a for a, b in zip(coverages, coverages[1:])) and coverages[-1] > coverages[0] > 0
    assert all(b >= a for a, b in zip(noises, noises[1:])) and noises[-1] > noises[0]
    assert drifts[-1] > drifts[0] >= 0  # the same probes come back noisier as coverage grows
    assert narrow_state["coverage"] <= 2 / 4096 and narrow_state["noise"] < noises[-1] / 5
    assert np.sum(narrow_out * probe_clean, axis=1).min() > 0.99
    with vendor.client(clean_key) as client:
        assert client.get("/v1/usage").json()["protection_state"] == {}


def test_a_b4b_state_failure_inside_the_metered_path_is_refunded(make_vendor):
    vendor = make_vendor(protection_secret=SECRET)
    key = vendor.create_key("broken", quota=10, protection="b4b")
    client = redis.Redis.from_url(vendor.redis_url)
    client.set(f"vendor:{{{vendor.account('broken').digest}}}:b4b", "not a set")  # SADD now fails: WRONGTYPE
    client.close()
    with vendor.client(key) as user:
        r = user.post("/v1/embeddings", json={"model": vendor.model_id, "input": ["a dog", "a cat"]})
    assert r.status_code == 500 and r.json()["error"]["code"] == "inference_failed"
    assert r.headers["x-units-charged"] == "0" and vendor.account("broken").spent == 0
    assert [e["event"] for e in vendor.ledger("broken")] == ["create", "debit", "refund"]
