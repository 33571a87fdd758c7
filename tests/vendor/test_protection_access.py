"""`probabilities` keys and /v1/classifications (no embedding ever leaves, charged per image,
bad requests free), and who may change a key's mode (only the vendor, only with valid specs)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from client_distiller.buying.teacher_client import ImageBytes, TeacherClient
from tests.support.imaging import image_item, random_image

CLASSES = ["dog", "cat", "car", "tree", "house", "bird", "shoe"]


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    random_image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


def reference_probabilities(teacher, seeds: list[int], classes: list[str]) -> np.ndarray:
    images = teacher.encode_images(torch.stack([teacher.preprocess(random_image(s)) for s in seeds]))
    texts = teacher.encode_texts(teacher.tokenize([f"a photo of a {c}." for c in classes]))
    logits = teacher.logit_scale * images.astype(np.float64) @ texts.astype(np.float64).T
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


def test_a_probabilities_key_gets_top_k_only_and_never_an_embedding(make_vendor, teacher):
    vendor = make_vendor(price_per_image=2, price_per_text=5)
    key = vendor.create_key(name="strict", quota=100, protection="probabilities:3")
    body = {"model": vendor.model_id, "input": [image_item(random_image(s)) for s in range(4)], "classes": CLASSES}
    with vendor.client(key) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert (card["output"], card["top_k"], card["embedding_dim"]) == ("probabilities", 3, 64)
        for items in (["a dog"], [image_item(random_image(0))]):
            refused = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": items})
            assert refused.status_code == 403 and refused.headers["x-units-charged"] == "0"
            assert refused.json()["error"]["code"] == "embeddings_not_permitted"
            assert refused.json()["error"]["type"] == "permission_error" and "embedding" not in refused.json()
        answer = client.post("/v1/classifications", json={**body, "top_k": 10}, headers={"Idempotency-Key": "c-1"})
        replay = client.post("/v1/classifications", json={**body, "top_k": 10}, headers={"Idempotency-Key": "c-1"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-units-charged"] == "8" and answer.json()["usage"]["units_charged"] == 8  # 4 images x 2
    assert replay.headers["idempotent-replayed"] == "true" and replay.content == answer.content
    assert vendor.account("strict").spent == 8
    events = vendor.ledger("strict")  # the refused embeddings left no trace; the replay was free
    assert [(e["event"], e.get("units"), e.get("images"), e.get("texts")) for e in events] == [
        ("create", "100", None, None), ("debit", "8", "4", "0"), ("replay", "0", None, None)]
    expected = reference_probabilities(teacher, list(range(4)), CLASSES)
    for item in answer.json()["data"]:
        assert item["object"] == "classification" and len(item["top_k"]) == 3  # capped at the key's K
        probs = [c["probability"] for c in item["top_k"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 2e-3  # rounded to 3 decimals
        assert [c["class_index"] for c in item["top_k"]] == list(np.argsort(-expected[item["index"]])[:3])
        np.testing.assert_allclose(probs, np.sort(expected[item["index"]])[::-1][:3], atol=1e-3)
    assert "embedding" not in answer.text and len(answer.content) < 2000  # no vector rides along


def test_any_key_may_classify_and_the_client_gets_a_dense_matrix(vendor):
    key = vendor.create_key(name="open", quota=50, protection="rotate")
    with TeacherClient(vendor.base_url, key, max_attempts=2) as client:
        result = client.classify(vendor.model_id, [ImageBytes(png(s)) for s in range(3)], CLASSES[:4],
                                 top_k=99, idempotency_key="dense-1")
        again = client.classify(vendor.model_id, [ImageBytes(png(s)) for s in range(3)], CLASSES[:4],
                                top_k=2, idempotency_key="dense-2")
    assert result.probabilities.shape == (3, 4) and result.probabilities.dtype == np.float32
    # k capped at C = 4; each probability rounded to VENDOR_CLASSIFY_DECIMALS (3)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, atol=4 * 5e-4 + 1e-6)
    assert (result.units_charged, result.units_remaining, result.replayed) == (3, 47, False)
    assert ((again.probabilities > 0).sum(axis=1) == 2).all() and (again.probabilities.sum(axis=1) <= 1 + 2e-3).all()


@pytest.mark.parametrize("change,code", [
    ({"classes": []}, 400),
    ({"classes": ["dog"]}, 400),
    ({"classes": ["dog", "   "]}, 400),
    ({"classes": ["dog", "x" * 5000]}, 400),
    ({"classes": [f"c{i}" for i in range(1001)]}, 400),
    ({"input": ["a photo of a dog"]}, 400),
    ({"input": []}, 400),
    ({"input": [image_item(random_image(s)) for s in range(5)]}, 400),
    ({"input": [{"type": "image", "image": base64.b64encode(b"not an image").decode()}]}, 400),
    ({"top_k": 0}, 400),
    ({"model": "other-model"}, 404),
])
def test_bad_classification_requests_are_refused_and_cost_nothing(make_vendor, change, code):
    vendor = make_vendor(max_items_per_request=4)
    key = vendor.create_key(name="asker", quota=20, protection="probabilities:5")
    body = {"model": vendor.model_id, "input": [image_item(random_image(1))], "classes": CLASSES, **change}
    with vendor.client(key) as client:
        r = client.post("/v1/classifications", json=body)
    assert r.status_code == code, r.text
    assert r.headers["x-units-charged"] == "0" and r.json()["error"]["message"]
    assert vendor.account("asker").spent == 0 and [e["event"] for e in vendor.ledger("asker")] == ["create"]


def test_key_holders_cannot_change_their_mode_and_admins_cannot_set_bad_specs(make_vendor):
    vendor = make_vendor(admin_secret="adm1n")
    key = vendor.create_key(name="holder", protection="noise:0.1")
    with vendor.client(key) as user:
        for method, path in [("POST", "/admin/keys/holder/protection"), ("POST", "/v1/protection"),
                             ("PATCH", "/v1/usage"), ("POST", "/v1/usage"), ("PUT", "/v1/models")]:
            r = user.request(method, path, json={"protection": "none"})
            assert r.status_code in (401, 404, 405), (method, path, r.status_code)
    assert vendor.account("holder").protection == "noise:0.1"
    with vendor.client("adm1n") as admin:
        for spec in ["lasers", "noise", "noise:-1", "noise:abc", "quantize", "quantize:int4", "truncate",
                     "truncate:64", "truncate:0", "rotate:x", "rotate:-2", "probabilities:0", "watermark:2",
                     "b4b:0", "none:1"]:
            r = admin.post("/admin/keys/holder/protection", json={"protection": spec})
            assert r.status_code == 400 and r.json()["error"]["message"], spec
            assert admin.post("/admin/keys", json={"name": "n", "quota": 1, "protection": spec}).status_code == 400
        ok = admin.post("/admin/keys/holder/protection", json={"protection": "truncate:32"})
        assert ok.status_code == 200 and ok.json()["protection"] == "truncate:32"
    with vendor.client(key) as user:
        assert user.get("/v1/models").json()["data"][0]["embedding_dim"] == 32
        r = user.post("/v1/embeddings", json={"model": vendor.model_id, "input": ["a dog"]})
        assert len(r.json()["data"][0]["embedding"]) == 32


def test_vendor_admin_refuses_bad_specs_and_specs_that_do_not_fit_the_recorded_teacher(vendor, tmp_path):
    env = {**os.environ, "REDIS_URL": vendor.redis_url, "VENDOR_DATA_DIR": str(tmp_path)}

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vendor_api.admin_cli", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    for spec, message in [("noise:abc", "must be a number"), ("truncate:64", "D < 64"), ("quantize:int4", "level")]:
        result = admin("create-key", "--name", "x", "--quota", "5", "--protection", spec)
        assert result.returncode == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert admin("create-key", "--name", "x", "--quota", "5", "--protection", "truncate:63").returncode == 0
    bad = admin("set-protection", "x", "rotate:nope")
    assert bad.returncode == 1 and "integer" in bad.stderr
    assert "protection=b4b:0.2" in admin("set-protection", "x", "b4b:0.2").stdout
