"""Every bad input gets a clear 4xx in OpenAI's error shape, costs nothing, and leaves the
server healthy; odd-but-valid images are handled deliberately."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.support.imaging import image_item, random_image, to_b64


def _png_claiming_size(width: int, height: int) -> str:
    """A tiny valid-header PNG that claims huge dimensions: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


def _truncated_png() -> str:
    raw = base64.b64decode(to_b64(random_image(3, size=64)))
    return base64.b64encode(raw[: len(raw) // 2]).decode()


def _zero_png(width: int, height: int) -> str:
    """A complete, valid greyscale PNG of zeros: a few KB that decode to width x height bytes."""
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


def _jpeg_claiming_size(width: int, height: int) -> str:
    """A small real JPEG whose frame header (SOF0) is rewritten to claim huge dimensions."""
    raw = bytearray(base64.b64decode(to_b64(random_image(4, size=16), "JPEG")))
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return base64.b64encode(bytes(raw)).decode()


def _multi_frame(fmt: str) -> str:
    buffer = io.BytesIO()
    frames = [random_image(30), random_image(31)]
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:])
    return base64.b64encode(buffer.getvalue()).decode()


def _img(payload: str) -> dict:
    return {"type": "image", "image": payload}


BAD_BODIES = {
    "not base64": ({"input": [_img("@@@ not base64 !!!")]}, 400, "invalid_image"),
    "truncated png": ({"input": [_img(_truncated_png())]}, 400, "invalid_image"),
    "non-image bytes": ({"input": [_img(base64.b64encode(b"hello, I am a text file").decode())]}, 400, "invalid_image"),
    "empty image bytes": ({"input": [_img("")]}, 400, "invalid_image"),
    "gif is not accepted": ({"input": [image_item(random_image(1), "GIF")]}, 400, "invalid_image"),
    "1x1 image": ({"input": [image_item(random_image(1, size=1))]}, 400, "image_too_small"),
    "decompression bomb": ({"input": [_img(_png_claiming_size(50_000, 50_000))]}, 400, "image_too_large"),
    "too wide": ({"input": [_img(_png_claiming_size(20_000, 10))]}, 400, "image_too_large"),
    "empty list": ({"input": []}, 400, "empty_input"),
    "empty string": ({"input": ""}, 400, "empty_input"),
    "blank string in list": ({"input": ["ok", "   "]}, 400, "empty_input"),
    "too many items": ({"input": ["x"] * 9}, 400, "too_many_inputs"),
    "overlong text (chars)": ({"input": ["word " * 100]}, 400, "context_length_exceeded"),
    "overlong text (tokens)": ({"input": ["zebra giraffe " * 20]}, 400, "context_length_exceeded"),
    "input is a number": ({"input": 123}, 400, "invalid_request"),
    "input has numbers": ({"input": [1, 2]}, 400, "invalid_request"),
    "token ids are not supported": ({"input": [[1, 2, 3]]}, 400, "invalid_request"),
    "unknown item type": ({"input": [{"type": "video", "image": "AAAA"}]}, 400, "invalid_request"),
    "image item missing bytes": ({"input": [{"type": "image"}]}, 400, "invalid_request"),
    "unknown encoding": ({"input": "x", "encoding_format": "xml"}, 400, "invalid_request"),
    "wrong dimensions": ({"input": "x", "dimensions": 32}, 400, "invalid_request"),
    "unknown model": ({"input": "x", "model": "gpt-9"}, 404, "model_not_found"),
    "missing model": ({"input": "x", "model": None}, 400, "invalid_request"),
    "bad image among good ones": ({"input": [image_item(random_image(5)), _img("!!")]}, 400, "invalid_image"),
    "real decompression bomb (valid 12 MP png)": ({"input": [_img(_zero_png(3500, 3500))]}, 400, "image_too_large"),
    "jpeg claiming 60000x60000": ({"input": [_img(_jpeg_claiming_size(60_000, 60_000))]}, 400, "image_too_large"),
    "one pixel past the side limit": ({"input": [_img(_zero_png(4097, 8))]}, 400, "image_too_large"),
    "multi-frame tiff is not accepted": ({"input": [_img(_multi_frame("TIFF"))]}, 400, "invalid_image"),
    "animated gif is not accepted": ({"input": [_img(_multi_frame("GIF"))]}, 400, "invalid_image"),
}


@pytest.fixture()
def strict_vendor(make_vendor):
    return make_vendor(max_items_per_request=8, max_text_chars=300, max_image_pixels=10_000_000,
                       max_image_side=4096, max_body_bytes=200_000)


@pytest.mark.parametrize("case", list(BAD_BODIES), ids=list(BAD_BODIES))
def test_bad_input_is_a_clear_4xx_that_costs_nothing(strict_vendor, case):
    patch, status, code = BAD_BODIES[case]
    vendor = strict_vendor
    key = vendor.create_key(quota=100)
    body = {"model": vendor.model_id, **patch}
    if body["model"] is None:
        del body["model"]
    with vendor.client(key) as client:
        r = client.post("/v1/embeddings", json=body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["code"] == code and error["message"] and error["type"]
        assert r.headers["x-units-charged"] == "0"
        assert client.post("/v1/embeddings", json={"model": vendor.model_id, "input": [image_item(random_image(9))]}).status_code == 200
        assert client.get("/readyz").status_code == 200
    assert vendor.account().spent == 1  # only the good request after it
    assert [e["event"] for e in vendor.ledger()] == ["create", "debit"]


def test_bad_image_error_names_the_offending_input(strict_vendor):
    key = strict_vendor.create_key()
    with strict_vendor.client(key) as client:
        r = client.post("/v1/embeddings", json={"model": strict_vendor.model_id, "input": ["ok", _img("%%%")]})
    assert r.json()["error"]["param"] == "input[1]"


@pytest.mark.parametrize("raw,content_type", [(b"{not json", "application/json"), (b"[1,2]", "application/json"),
                                              (b"", "application/json"), (b"\xff\xfe", "text/plain")])
def test_malformed_bodies_are_400(strict_vendor, raw, content_type):
    key = strict_vendor.create_key()
    with strict_vendor.client(key) as client:
        r = client.post("/v1/embeddings", content=raw, headers={"content-type": content_type})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert strict_vendor.account().spent == 0


def test_oversized_body_is_413_before_it_is_read(strict_vendor):
    key = strict_vendor.create_key()
    big = {"model": strict_vendor.model_id, "input": [_img("A" * 300_000)]}
    with strict_vendor.client(key) as client:
        r = client.post("/v1/embeddings", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

        def chunks():  # no Content-Length: the limit is enforced while streaming
            yield b'{"model": "x", "input": ["'
            for _ in range(40):
                yield b"a" * 10_000
            yield b'"]}'

        streamed = client.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
    with strict_vendor.client(key) as client:
        assert client.get("/healthz").status_code == 200
    assert strict_vendor.account().spent == 0


def test_unknown_route_and_method_use_the_error_shape(strict_vendor):
    with strict_vendor.client() as client:
        missing = client.get("/v1/nothing")
        wrong_method = client.get("/v1/embeddings")
    assert missing.status_code == 404 and "error" in missing.json()
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


# ---------------------------------------------------------------- odd but valid images
def _embed(vendor, key, item) -> np.ndarray:
    with vendor.client(key) as client:
        r = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": [item]})
    assert r.status_code == 200, r.text
    return np.array(r.json()["data"][0]["embedding"])


def test_exif_rotation_is_applied(vendor):
    from vendor_api.images import ImageLimits, decode_image

    upright = random_image(11, size=48).crop((0, 0, 48, 32))  # not square, so rotation shows in the size
    stored = upright.rotate(90, expand=True)  # the camera stored it turned 90 degrees anticlockwise...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...and tagged it "rotate 90 clockwise to display"
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=100, subsampling=0, exif=exif)
    payload = base64.b64encode(buffer.getvalue()).decode()
    decoded = decode_image(payload, ImageLimits(10**7, 4096, 8), param="input[0]")
    assert decoded.size == upright.size == (48, 32)
    error = np.abs(np.asarray(decoded, dtype=float) - np.asarray(upright, dtype=float)).mean()
    assert error < 12, error  # JPEG noise only; a wrong rotation would not even match in shape
    assert _embed(vendor, vendor.create_key(), {"type": "image", "image": payload}).shape == (64,)


@pytest.mark.parametrize("make", [
    lambda: image_item(random_image(1).convert("CMYK"), "JPEG"),
    lambda: image_item(random_image(2, mode="RGBA")),
    lambda: image_item(random_image(3, mode="L")),
    lambda: image_item(Image.fromarray((np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60))),
    lambda: image_item(random_image(4), "WEBP"),
    lambda: image_item(random_image(5).convert("P")),
], ids=["cmyk-jpeg", "rgba-png", "grey-png", "16bit-png", "webp", "palette-png"])
def test_unusual_but_valid_images_are_embedded(vendor, make):
    key = vendor.create_key()
    vector = _embed(vendor, key, make())
    assert np.isfinite(vector).all() and abs(np.linalg.norm(vector) - 1) < 1e-3


def test_sixteen_bit_png_is_rescaled_not_clipped(vendor):
    key = vendor.create_key()
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    deep = _embed(vendor, key, image_item(Image.fromarray(ramp)))
    shallow = _embed(vendor, key, image_item(Image.fromarray((ramp // 257).astype(np.uint8)).convert("RGB")))
    assert np.dot(deep, shallow) > 0.999


def test_animated_image_uses_its_first_frame(vendor):
    key = vendor.create_key()
    frames = [random_image(20), random_image(21)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    animated = _embed(vendor, key, {"type": "image", "image": base64.b64encode(buffer.getvalue()).decode()})
    first = _embed(vendor, key, image_item(frames[0], "PNG"))
    assert np.dot(animated, first) > 0.999


def test_animated_png_uses_its_first_frame(vendor):
    key = vendor.create_key()
    frames = [random_image(22), random_image(23)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(buffer.getvalue())).n_frames == 2  # really an APNG
    animated = _embed(vendor, key, {"type": "image", "image": base64.b64encode(buffer.getvalue()).decode()})
    first = _embed(vendor, key, image_item(frames[0], "PNG"))
    assert np.dot(animated, first) > 0.999


def _clear_palette_png() -> str:
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 0, 0] * 256)
    return to_b64(image, "PNG", transparency=0)  # palette entry 0 (black) is fully transparent


@pytest.mark.parametrize("make", [
    lambda: to_b64(Image.new("RGBA", (32, 32), (0, 0, 0, 0))),
    lambda: to_b64(Image.new("LA", (32, 32), (0, 0))),
    _clear_palette_png,
], ids=["rgba", "grey-alpha", "palette-trns"])
def test_transparent_pixels_are_white_in_every_alpha_mode(vendor, make):
    key = vendor.create_key()
    clear = _embed(vendor, key, _img(make()))
    white = _embed(vendor, key, image_item(Image.new("RGB", (32, 32), (255, 255, 255)), "PNG"))
    black = _embed(vendor, key, image_item(Image.new("RGB", (32, 32), (0, 0, 0)), "PNG"))
    assert np.dot(clear, white) > 0.999 and np.dot(clear, black) < np.dot(clear, white)  # what a viewer shows


def test_image_exactly_at_the_side_limit_is_accepted(strict_vendor):
    key = strict_vendor.create_key()
    with strict_vendor.client(key) as client:
        r = client.post("/v1/embeddings", json={"model": strict_vendor.model_id, "input": [_img(_zero_png(4096, 8))]})
    assert r.status_code == 200, r.text
    assert strict_vendor.account().spent == 1
