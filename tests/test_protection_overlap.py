"""Cross-key overlap detection (the sybil signal rotate alone cannot stop): keys that query the
same model inputs are flagged by `vendor-admin suspects` and the `vendor_overlap_*` metrics;
keys that share nothing, or only common class prompts, are not."""

from __future__ import annotations

import json

import numpy as np

from tests.imaging import image_item, random_image, to_b64
from vendor_api.admin_cli import main as admin_main
from vendor_api.protection.attacks import mean_cosine, procrustes

PROMPTS = [f"a photo of a {c}." for c in ("dog", "cat", "car", "tree", "house", "bird", "shoe")]


def embed(client, model: str, items: list) -> np.ndarray:
    rows = []
    for start in range(0, len(items), 64):
        r = client.post("/v1/embeddings", json={"model": model, "input": items[start:start + 64]})
        assert r.status_code == 200, r.text
        rows += [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]
    return np.array(rows, dtype=np.float64)


def images(seeds: range, *, compress_level: int = 6) -> list[dict]:
    return [{"type": "image", "image": to_b64(random_image(s), "PNG", compress_level=compress_level)} for s in seeds]


def suspects(vendor, monkeypatch, capsys, *args: str) -> list[dict]:
    monkeypatch.setenv("REDIS_URL", vendor.redis_url)
    capsys.readouterr()
    assert admin_main(["suspects", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def metric(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


def test_two_rotate_keys_sharing_50_queries_are_flagged_and_keys_sharing_none_are_not(make_vendor, monkeypatch,
                                                                                       capsys):
    vendor = make_vendor(protection_secret="overlap-secret")
    keys = {name: vendor.create_key(name, protection="rotate") for name in ("sybil-a", "sybil-b", "honest-c", "honest-d")}
    answers = {}
    with vendor.client(keys["sybil-a"]) as a, vendor.client(keys["sybil-b"]) as b:
        answers["a"] = embed(a, vendor.model_id, images(range(0, 80)) + PROMPTS)
        # the same 50 images, as other files (another compress level): the model sees the same pixels
        answers["b"] = embed(b, vendor.model_id, images(range(30, 80), compress_level=1) + images(range(500, 520))
                             + PROMPTS)
        again = embed(b, vendor.model_id, images(range(30, 40)))  # asking again is not more sharing
    with vendor.client(keys["honest-c"]) as c, vendor.client(keys["honest-d"]) as d:
        embed(c, vendor.model_id, images(range(1000, 1080)) + PROMPTS)  # shares only the class prompts
        r = c.post("/v1/classifications", json={"model": vendor.model_id, "classes": ["dog", "cat"],
                                                 "input": [image_item(random_image(s)) for s in range(2000, 2010)]})
        assert r.status_code == 200, r.text
        embed(d, vendor.model_id, images(range(3000, 3080)) + PROMPTS)
        metrics = c.get("/metrics").text
    assert again.shape == (10, 80)

    flagged = suspects(vendor, monkeypatch, capsys)
    assert flagged == [{"key_a": flagged[0]["key_a"], "key_b": flagged[0]["key_b"], "shared_images": 50,
                        "shared_texts": len(PROMPTS)}]
    assert {flagged[0]["key_a"], flagged[0]["key_b"]} == {"sybil-a", "sybil-b"}
    # texts are counted apart: every pair shares the 7 class prompts, none is a suspect for it...
    by_texts = suspects(vendor, monkeypatch, capsys, "--min-shared", "1000", "--min-shared-texts", str(len(PROMPTS)))
    assert len(by_texts) == 6 and all(p["shared_texts"] == len(PROMPTS) for p in by_texts)
    # ...and a lower image threshold still finds no honest pair: they share no image at all
    assert {(p["key_a"], p["key_b"]) for p in suspects(vendor, monkeypatch, capsys, "--min-shared", "1")} == {
        (flagged[0]["key_a"], flagged[0]["key_b"])}
    assert metric(metrics, "vendor_overlap_suspect_pairs") == 1.0
    assert metric(metrics, 'vendor_overlap_shared_inputs_total{modality="image"}') == 50.0

    # why the flag matters: the shared queries align the two rotate keys (held-out cosine ~1)
    shared_a, shared_b = answers["a"][30:70], answers["b"][:40]
    held_a, held_b = answers["a"][70:80], answers["b"][40:50]
    assert mean_cosine(held_a, held_b) < 0.5
    assert mean_cosine(held_a @ procrustes(shared_a, shared_b), held_b) > 0.99


def test_an_input_asked_through_many_keys_is_common_not_evidence(make_vendor, monkeypatch, capsys):
    vendor = make_vendor(overlap_max_keys=3, overlap_min_shared=5)
    popular = images(range(0, 8))
    for i in range(5):
        with vendor.client(vendor.create_key(f"user-{i}")) as client:
            embed(client, vendor.model_id, popular + images(range(100 + 10 * i, 110 + 10 * i)))
    # keys 0..2 each met the 8 images while they were still rare: 3 pairs; keys 3 and 4 found them common
    pairs = suspects(vendor, monkeypatch, capsys, "--min-shared", "5")
    assert sorted(tuple(sorted((p["key_a"], p["key_b"]))) for p in pairs) == [("user-0", "user-1"), ("user-0", "user-2"),
                                                               ("user-1", "user-2")]
    assert all(p["shared_images"] == 8 for p in pairs)
