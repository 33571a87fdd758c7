"""The embedding API answers exactly what open_clip itself computes, in every wire format."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch

from shared.codec import decode_vector
from shared.protocol import EncodingFormat
from tests.support.imaging import image_item, random_image


@pytest.fixture(scope="module")
def reference(tiny_teacher_dir):
    """The same weights loaded independently through open_clip, for ground truth."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_teacher_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_teacher_dir}")
    model.eval()

    def image(img) -> np.ndarray:
        with torch.no_grad():
            f = model.encode_image(preprocess(img).unsqueeze(0))
        return torch.nn.functional.normalize(f, dim=-1)[0].numpy()

    def text(t: str) -> np.ndarray:
        with torch.no_grad():
            f = model.encode_text(tokenizer([t]))
        return torch.nn.functional.normalize(f, dim=-1)[0].numpy()

    return image, text


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("fmt", [f.value for f in EncodingFormat])
def test_embeddings_match_open_clip_in_every_format(vendor, reference, fmt):
    ref_image, ref_text = reference
    images = [random_image(seed) for seed in range(3)]
    texts = ["a photo of a dog", "a pencil sketch of a sneaker"]
    key = vendor.create_key(quota=100)
    with vendor.client(key) as client:
        response = client.post("/v1/embeddings", json={
            "model": vendor.model_id, "encoding_format": fmt,
            "input": [image_item(images[0]), texts[0], image_item(images[1]), texts[1], image_item(images[2])],
        })
    assert response.status_code == 200, response.text
    body = response.json()
    vectors = [decode_vector(item["embedding"], EncodingFormat(fmt)) for item in body["data"]]
    assert [item["index"] for item in body["data"]] == [0, 1, 2, 3, 4]
    expected = [ref_image(images[0]), ref_text(texts[0]), ref_image(images[1]), ref_text(texts[1]), ref_image(images[2])]
    tolerance = 0.999 if fmt != "base64_fp16" else 0.998
    for got, want in zip(vectors, expected):
        assert got.shape == (64,)
        assert cosine(got, want) >= tolerance
        assert abs(np.linalg.norm(got) - 1.0) < 2e-3
    usage = body["usage"]
    assert usage["images"] == 3 and usage["texts"] == 2
    assert usage["units_charged"] == 5 and usage["units_remaining"] == 95
    assert usage["prompt_tokens"] == usage["total_tokens"] > 0


def test_single_string_input_and_response_headers(vendor, reference):
    key = vendor.create_key(quota=10)
    with vendor.client(key) as client:
        response = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": "a photo of a cat"})
    assert response.status_code == 200
    assert cosine(np.array(response.json()["data"][0]["embedding"]), reference[1]("a photo of a cat")) >= 0.999
    h = response.headers
    assert h["x-units-charged"] == "1" and h["x-units-remaining"] == "9"
    for name in ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
                 "x-queue-time-ms", "x-inference-time-ms", "x-total-time-ms", "x-request-id"):
        assert name in h, name
    assert float(h["x-inference-time-ms"]) > 0


def test_openai_sdk_round_trip(vendor, reference):
    openai = pytest.importorskip("openai")
    key = vendor.create_key(quota=10)
    client = openai.OpenAI(base_url=vendor.base_url + "/v1", api_key=key, max_retries=0)
    texts = ["a photo of a bag", "a sketch of a shoe"]
    result = client.embeddings.create(model=vendor.model_id, input=texts)  # SDK asks for base64 by default
    assert len(result.data) == 2
    for item, text in zip(result.data, texts):
        assert cosine(np.array(item.embedding), reference[1](text)) >= 0.999
    assert result.usage.total_tokens > 0
    float_result = client.embeddings.create(model=vendor.model_id, input="a photo of a bag", encoding_format="float")
    assert cosine(np.array(float_result.data[0].embedding), reference[1]("a photo of a bag")) >= 0.999
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=vendor.base_url + "/v1", api_key="vk-wrong", max_retries=0).embeddings.create(
            model=vendor.model_id, input="x")


def test_models_and_usage_describe_what_is_sold(vendor):
    key = vendor.create_key(name="alice", quota=50, rate=5, burst=7)
    with vendor.client(key) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card == {
            "id": vendor.model_id, "object": "model", "created": 0, "owned_by": "vendor", "embedding_dim": 64,
            "image_size": 32, "context_length": 32, "price_per_image": 1, "price_per_text": 1,
            "logit_scale": pytest.approx(1 / 0.07, rel=1e-4), "protection": "none",
            "output": "embeddings", "top_k": 5,  # classifications are capped for embedding keys too (issue 13)
        }
        client.post("/v1/embeddings", json={"model": vendor.model_id, "input": ["a", "b"]})
        usage = client.get("/v1/usage")
    assert usage.json() == {"name": "alice", "quota": 50, "spent": 2, "remaining": 48, "active": True,
                            "rate_limit": {"requests_per_s": 5.0, "burst": 7}, "protection": "none",
                            "protection_state": {}}
    assert usage.headers["x-units-remaining"] == "48" and usage.headers["x-units-charged"] == "0"


def test_prices_come_from_settings(make_vendor):
    vendor = make_vendor(price_per_image=5, price_per_text=2)
    key = vendor.create_key(quota=100)
    with vendor.client(key) as client:
        r = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": [image_item(random_image(0)), "x", "y"]})
    assert r.json()["usage"]["units_charged"] == 9
    assert vendor.account().spent == 9


def test_health_readiness_and_metrics_are_public(vendor):
    with vendor.client() as client:
        assert client.get("/healthz").json() == {"status": "alive"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["model"] == "ok" and ready.json()["redis"] == "ok"
        key = vendor.create_key()
        client.post("/v1/embeddings", json={"model": vendor.model_id, "input": ["hello"]},
                    headers={"Authorization": f"Bearer {key}"})
        text = client.get("/metrics").text
    for metric in ("vendor_requests_total", "vendor_items_total", "vendor_units_charged_total", "vendor_batch_size",
                   "vendor_queue_seconds", "vendor_inference_seconds", "vendor_request_seconds"):
        assert metric in text, metric
    assert 'vendor_requests_total{route="/v1/embeddings",status="200"} 1.0' in text


def test_openapi_schema_documents_the_api(vendor):
    with vendor.client() as client:
        schema = client.get("/openapi.json").json()
    assert {"/v1/embeddings", "/v1/models", "/v1/usage"} <= set(schema["paths"])
    assert "402" in schema["paths"]["/v1/embeddings"]["post"]["responses"]
