"""The adaptive inversion's budget: a key asks at most `VENDOR_CLASSIFY_LISTS_PER_IMAGE` distinct
class lists of one image (the pixels the model sees). The attack it limits: in the attack harness,
25 designed lists of one image invert a key without noise to its clean embedding (centred cos 0.98).
A refused request costs nothing; asking a list again, or another key, or another image, is free of
the limit; a re-encoded file is the same image."""

from __future__ import annotations

from tests.support.imaging import image_item, random_image, to_b64

CLASSES = {"a": ["dog", "cat", "car"], "b": ["tree", "house", "bird"], "c": ["shoe", "bag", "boat"]}


def classify(client, vendor, classes: list[str], images: list[dict]):
    return client.post("/v1/classifications", json={"model": vendor.model_id, "classes": classes, "input": images})


def png(seed: int, level: int = 6) -> dict:
    return {"type": "image", "image": to_b64(random_image(seed), "PNG", compress_level=level)}


def test_a_key_gets_two_class_lists_per_image_and_a_refused_third_costs_nothing(make_vendor):
    vendor = make_vendor(classify_lists_per_image=2)
    key = vendor.create_key("prober", quota=100)
    with vendor.client(key) as client:
        assert classify(client, vendor, CLASSES["a"], [png(1)]).status_code == 200
        assert classify(client, vendor, CLASSES["b"], [png(1)]).status_code == 200
        # the same list again (any order, repeats) is not a new list: answered and charged as usual
        assert classify(client, vendor, ["car", "dog", "cat", "dog"], [png(1)]).status_code == 200
        spent, events = vendor.account("prober").spent, len(vendor.ledger("prober"))
        third = classify(client, vendor, CLASSES["c"], [png(1)])
        assert third.status_code == 403, third.text
        error = third.json()["error"]
        assert error["code"] == "class_lists_exhausted" and error["param"] == "input[0]"
        assert "Nothing was charged" in error["message"]
        # the same pixels in another file are the same image
        assert classify(client, vendor, CLASSES["c"], [png(1, level=1)]).status_code == 403
        assert vendor.account("prober").spent == spent and len(vendor.ledger("prober")) == events
        # all or nothing: a fresh image beside the exhausted one is refused with it and keeps its allowance
        mixed = classify(client, vendor, CLASSES["c"], [png(2), png(1)])
        assert mixed.status_code == 403 and mixed.json()["error"]["param"] == "input[1]"
        for classes in (CLASSES["b"], CLASSES["c"]):
            assert classify(client, vendor, classes, [png(2)]).status_code == 200
        assert classify(client, vendor, CLASSES["a"], [png(2)]).status_code == 403
    # another key has its own allowance (sybils need more keys, which then share the images)
    with vendor.client(vendor.create_key("other", quota=100)) as other:
        assert classify(other, vendor, CLASSES["c"], [png(1)]).status_code == 200


def test_the_limit_can_be_switched_off(make_vendor):
    vendor = make_vendor(classify_lists_per_image=0)
    with vendor.client(vendor.create_key("free", quota=100)) as client:
        for i in range(4):
            r = classify(client, vendor, [f"class-{i}-{j}" for j in range(3)], [image_item(random_image(5))])
            assert r.status_code == 200, r.text


def test_a_failed_classification_gives_its_class_lists_back(make_vendor):
    """No answer, no allowance used: the model failing after the reservation (and the debit) refunds
    the units and releases the lists, so the key can still ask two lists of that image."""
    vendor = make_vendor(classify_lists_per_image=2)
    key = vendor.create_key("unlucky", quota=100)
    service = vendor.server.config.app.state.service
    original = service.batcher.towers["image"]

    def broken(_):
        raise RuntimeError("GPU fell over")

    with vendor.client(key) as client:
        service.batcher.towers["image"] = type(original)("image", broken)
        try:
            failed = classify(client, vendor, CLASSES["a"], [png(7)])
        finally:
            service.batcher.towers["image"] = original
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "inference_failed"
        assert vendor.account("unlucky").spent == 0
        for classes in (CLASSES["b"], CLASSES["c"]):
            assert classify(client, vendor, classes, [png(7)]).status_code == 200
        assert classify(client, vendor, CLASSES["a"], [png(7)]).status_code == 403


def picture(seed: int, size: int = 96):
    """A smooth picture with a shape on it (unlike `random_image`'s noise, it has the low
    frequencies real images have, which is what a re-compression keeps)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8))
    image = coarse.resize((size, size), Image.BICUBIC)
    x, y = rng.integers(10, size // 2, size=2)
    ImageDraw.Draw(image).ellipse([int(x), int(y), int(x) + size // 3, int(y) + size // 4],
                                  fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def test_a_recompressed_copy_is_the_same_image_to_the_limit(make_vendor):
    """Asking new lists of a JPEG copy was the way around a limit keyed on exact pixels."""
    vendor = make_vendor(classify_lists_per_image=2)
    original = {"type": "image", "image": to_b64(picture(3), "PNG")}
    copy = {"type": "image", "image": to_b64(picture(3).convert("RGB"), "JPEG", quality=75)}
    with vendor.client(vendor.create_key("copier", quota=100)) as client:
        for classes in (CLASSES["a"], CLASSES["b"]):
            assert classify(client, vendor, classes, [original]).status_code == 200
        refused = classify(client, vendor, CLASSES["c"], [copy])
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "class_lists_exhausted"
        assert "near copy" in refused.json()["error"]["message"]
        assert classify(client, vendor, CLASSES["a"], [copy]).status_code == 200  # an asked list: answered
        assert classify(client, vendor, CLASSES["c"], [{"type": "image", "image": to_b64(picture(4), "PNG")}]
                        ).status_code == 200  # another picture is another image
        assert vendor.account("copier").spent == 4


def test_perceptual_codes_follow_the_pixels_not_the_file():
    import io

    import torch
    from PIL import Image

    from vendor_api.protection.perceptual import BANDS, perceptual_codes

    def view(image: Image.Image) -> torch.Tensor:
        import numpy as np
        return torch.from_numpy(np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.float32) / 255).permute(2, 0, 1)

    def jpeg(image: Image.Image, quality: int) -> Image.Image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue()))

    codes = [perceptual_codes(view(picture(s))) for s in range(30)]
    assert all(len(c) == BANDS for c in codes)
    assert perceptual_codes(view(picture(0)) * 0.5 + 0.1) == codes[0]  # normalisation does not move a bit
    caught = [any(a == b for a, b in zip(codes[s], perceptual_codes(view(jpeg(picture(s), 75))))) for s in range(30)]
    assert sum(caught) >= 27, caught
    unrelated = sum(any(a == b for a, b in zip(codes[i], codes[j])) for i in range(30) for j in range(i + 1, 30))
    assert unrelated <= 2, unrelated
