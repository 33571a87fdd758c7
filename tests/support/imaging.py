"""Test images as base64 payloads, in the formats and oddities real clients send."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def random_image(seed: int, size: int = 32, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode=mode)


def to_b64(image: Image.Image, fmt: str = "PNG", **save_kw: object) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kw)
    return base64.b64encode(buffer.getvalue()).decode()


def image_item(image: Image.Image, fmt: str = "PNG") -> dict:
    return {"type": "image", "image": to_b64(image, fmt)}
