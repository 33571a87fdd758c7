"""Cross-key overlap detection (the sybil signal rotate alone cannot stop): keys that query the
same model inputs, or near-duplicates of them (JPEG re-compressions: other pixels, so no exact
signature matches), are flagged by `vendor-admin suspects` and the `vendor_overlap_*` metrics;
keys that share nothing, or only common class prompts, are not."""

from __future__ import annotations

import json

import numpy as np

import io

from PIL import Image

from tests.support.imaging import image_item, random_image, to_b64
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
    assert len(flagged) == 1 and {k: flagged[0][k] for k in ("shared_images", "shared_texts", "score_images")} == {
        "shared_images": 50, "shared_texts": len(PROMPTS), "score_images": 50.0}  # only these two asked: 1 each
    # every key asked the 7 prompts: each prompt is worth 1 / 3 to each of the 6 pairs
    assert abs(flagged[0]["score_texts"] - len(PROMPTS) / 3) < 1e-3
    # exact duplicates are near-duplicates too (a few fewer: an input near one the key itself asked
    # before is not counted again, and on the tiny teacher some of a key's own inputs are)
    assert 45 <= flagged[0]["near_images"] <= 50 and flagged[0]["near_texts"] <= len(PROMPTS)
    assert {flagged[0]["key_a"], flagged[0]["key_b"]} == {"sybil-a", "sybil-b"}
    # texts are counted apart: every pair shares the 7 class prompts, none is a suspect for it...
    by_texts = suspects(vendor, monkeypatch, capsys, "--min-shared", "1000", "--min-shared-texts", "2")
    assert len(by_texts) == 6 and all(p["shared_texts"] == len(PROMPTS) for p in by_texts)
    assert suspects(vendor, monkeypatch, capsys, "--min-shared", "1000", "--min-shared-texts", "3") == []
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
    vendor = make_vendor(overlap_max_keys=3, overlap_min_shared=4)
    popular = images(range(0, 8))
    for i in range(5):
        with vendor.client(vendor.create_key(f"user-{i}")) as client:
            embed(client, vendor.model_id, popular + images(range(100 + 10 * i, 110 + 10 * i)))
    # keys 0..2 each met the 8 images while they were still rare: 3 pairs, each image worth 1 / 2 to
    # each (asked by 3 keys); keys 3 and 4 found them common and add nothing
    pairs = suspects(vendor, monkeypatch, capsys, "--min-shared", "1")
    assert sorted(tuple(sorted((p["key_a"], p["key_b"]))) for p in pairs) == [("user-0", "user-1"), ("user-0", "user-2"),
                                                               ("user-1", "user-2")]
    assert all(p["shared_images"] == 8 and p["score_images"] == 4.0 for p in pairs)
    assert len(suspects(vendor, monkeypatch, capsys, "--min-shared", "4")) == 3  # a threshold of 4 is reached...
    assert suspects(vendor, monkeypatch, capsys, "--min-shared", "5") == []  # ...a higher one is not


def test_honest_keys_sharing_popular_inputs_score_low_and_a_sybil_pair_scores_its_shared_inputs(
        make_vendor, monkeypatch, capsys):
    """The false flag the weighted score removes: with plain counts, 5 honest keys that each asked
    for the same 20 popular images (and their own 10) were 10 suspect pairs at the threshold of 20.
    Each popular image asked by 5 keys is worth 1 / 4 to each pair; two sybils sharing 20 images
    of their own score 20."""
    vendor = make_vendor(overlap_min_shared=20)
    popular = images(range(0, 20))
    for i in range(5):
        with vendor.client(vendor.create_key(f"honest-{i}")) as client:
            embed(client, vendor.model_id, popular + images(range(100 + 10 * i, 110 + 10 * i)))
    common = images(range(1000, 1020))
    for side in "ab":
        with vendor.client(vendor.create_key(f"sybil-{side}")) as client:
            embed(client, vendor.model_id, common + images(range(2000 + (side == "b") * 50, 2010 + (side == "b") * 50)))
    every = suspects(vendor, monkeypatch, capsys, "--min-shared", "1")
    honest = [p for p in every if p["key_a"].startswith("honest")]
    assert len(honest) == 10 and all(p["shared_images"] == 20 and abs(p["score_images"] - 5.0) < 1e-3 for p in honest)
    flagged = suspects(vendor, monkeypatch, capsys)
    assert [({p["key_a"], p["key_b"]}, p["shared_images"], p["score_images"]) for p in flagged] == [
        ({"sybil-a", "sybil-b"}, 20, 20.0)]


def smooth_image(seed: int, size: int = 32) -> Image.Image:
    """Blurred noise (photo-like: a JPEG of it is a near-duplicate, not new noise)."""
    small = np.random.default_rng(seed).integers(0, 256, (size // 4, size // 4, 3)).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def jpeg_items(seeds: range, quality: int) -> list[dict]:
    """The image as JPEG at `quality`, decoded and sent as PNG: other pixels than the original."""
    items = []
    for s in seeds:
        buffer = io.BytesIO()
        smooth_image(s).save(buffer, format="JPEG", quality=quality)
        items.append(image_item(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    return items


def test_keys_sharing_50_near_duplicates_are_flagged_and_keys_sharing_none_are_not(make_vendor, monkeypatch, capsys,
                                                                                    tmp_path):
    """The first detector matched exact model inputs only: a sybil sending each key another JPEG
    quality of its images shared 0 inputs as far as it could tell. The near codes are centred on
    the calibration set, which must look like the traffic (as for the watermark): with the
    built-in synthetic set, these smooth images fall into few cells and honest pairs collide."""
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for s in range(5000, 5096):
        smooth_image(s).save(calibration / f"{s}.png")
    vendor = make_vendor(protection_secret="overlap-secret", watermark_calibration_dir=calibration)
    keys = {name: vendor.create_key(name, protection="rotate") for name in ("sybil-a", "sybil-b", "honest-c", "honest-d")}
    with vendor.client(keys["sybil-a"]) as a, vendor.client(keys["sybil-b"]) as b:
        embed(a, vendor.model_id, [image_item(smooth_image(s)) for s in range(0, 50)] + jpeg_items(range(100, 130), 90))
        embed(b, vendor.model_id, jpeg_items(range(0, 50), 90) + jpeg_items(range(200, 230), 75))
        metrics = a.get("/metrics").text
    with vendor.client(keys["honest-c"]) as c, vendor.client(keys["honest-d"]) as d:
        embed(c, vendor.model_id, [image_item(smooth_image(s)) for s in range(1000, 1080)])
        embed(d, vendor.model_id, jpeg_items(range(3000, 3080), 90))

    pairs = suspects(vendor, monkeypatch, capsys, "--min-shared", "1")
    assert len(pairs) == 1, pairs
    (pair,) = pairs
    assert {pair["key_a"], pair["key_b"]} == {"sybil-a", "sybil-b"}
    assert pair["shared_images"] == 0  # no exact input in common: the exact detector alone saw nothing
    assert pair["near_images"] >= 45, pair  # JPEG q=90 re-compressions match (measured 0.99)
    assert suspects(vendor, monkeypatch, capsys) == pairs  # above the default threshold (20)
    assert metric(metrics, 'vendor_overlap_near_duplicate_inputs_total{modality="image"}') == pair["near_images"]
    assert metric(metrics, "vendor_overlap_near_suspect_pairs") == 1.0


def test_a_failing_overlap_record_does_not_fail_or_double_charge_a_paid_answer(make_vendor, caplog):
    """Monitoring is best effort: a Redis script error while recording overlap (here WRONGTYPE, from
    a pair index that is not a sorted set) is logged, and the key still gets the answer it paid for,
    charged once."""
    import logging

    import redis

    from vendor_api.protection.overlap import pairs_key

    vendor = make_vendor()
    first, second = vendor.create_key("first"), vendor.create_key("second")
    shared = images(range(0, 3))
    with vendor.client(first) as a:
        embed(a, vendor.model_id, shared)
    r = redis.Redis.from_url(vendor.redis_url)
    r.delete(pairs_key("image"))
    r.set(pairs_key("image"), "not a sorted set")  # the second key's shared inputs now make the script fail
    with caplog.at_level(logging.ERROR), vendor.client(second) as b:
        rows = embed(b, vendor.model_id, shared)
    assert rows.shape[0] == 3
    assert vendor.account("second").spent == vendor.account("first").spent > 0  # charged once, like the first
    assert "overlap recording failed" in caplog.text
