"""Turns an untrusted base64 image into a safe RGB PIL image, or a clear 400.

Everything is checked from the header before a single pixel is decoded (dimensions, pixel
count), so a decompression bomb costs a few hundred bytes of parsing, not gigabytes of RAM.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.codec import CodecError, b64decode_strict
from shared.protocol import ErrorCode

from .errors import InvalidRequest

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
_URL = re.compile(r"^\s*[A-Za-z][A-Za-z0-9+.-]*:")  # http:, https:, file:, ftp:, s3:, ... (base64 has no ':')


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int
    max_side: int
    min_side: int


def decode_image(payload: str, limits: ImageLimits, *, param: str) -> Image.Image:
    """Decode, check and normalise one image. Raises `InvalidRequest` naming `param`."""
    if _URL.match(payload[:64]):
        raise InvalidRequest(
            f"{param}: this vendor never fetches URLs; send the image's bytes as base64, or as a "
            "data:image/...;base64, URL", code=ErrorCode.INVALID_IMAGE, param=param)
    try:
        raw = b64decode_strict(payload)
    except CodecError as exc:
        raise InvalidRequest(f"{param}: {exc}", code=ErrorCode.INVALID_IMAGE, param=param) from exc
    if not raw:
        raise InvalidRequest(f"{param}: empty image", code=ErrorCode.INVALID_IMAGE, param=param)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(raw), formats=ACCEPTED_FORMATS)
            _check_dimensions(image.size, limits, param)
            image.seek(0)  # animated/multi-frame files: the first frame is the image we embed
            image.load()
            image = ImageOps.exif_transpose(image)
        except InvalidRequest:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InvalidRequest(f"{param}: image too large ({exc})", code=ErrorCode.IMAGE_TOO_LARGE, param=param) from exc
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
            raise InvalidRequest(
                f"{param}: not a readable {'/'.join(ACCEPTED_FORMATS)} image ({type(exc).__name__})",
                code=ErrorCode.INVALID_IMAGE,
                param=param,
            ) from exc
    return to_rgb(image)


def _check_dimensions(size: tuple[int, int], limits: ImageLimits, param: str) -> None:
    width, height = size
    if width * height > limits.max_pixels or max(width, height) > limits.max_side:
        raise InvalidRequest(
            f"{param}: image is {width}x{height}; the limit is {limits.max_side} px a side and "
            f"{limits.max_pixels} pixels",
            code=ErrorCode.IMAGE_TOO_LARGE,
            param=param,
        )
    if min(width, height) < limits.min_side:
        raise InvalidRequest(
            f"{param}: image is {width}x{height}; each side must be at least {limits.min_side} px",
            code=ErrorCode.IMAGE_TOO_SMALL,
            param=param,
        )


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Transparent pixels become white (what a viewer shows), not black garbage."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit/32-bit greyscale: rescale to 8 bits instead of clipping everything to white."""
    array = np.asarray(image).astype(np.float64)
    peak = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
    if image.mode == "F":
        peak = max(1.0, float(array.max(initial=1.0)))
    scaled = np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L").convert("RGB")


_MODE_CONVERTERS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "RGBA": _composite_on_white,
    "LA": _composite_on_white,
    "PA": _composite_on_white,
    "RGBa": _composite_on_white,
    "I": _high_bit_depth_to_rgb,
    "I;16": _high_bit_depth_to_rgb,
    "I;16B": _high_bit_depth_to_rgb,
    "I;16L": _high_bit_depth_to_rgb,
    "F": _high_bit_depth_to_rgb,
}


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        return _composite_on_white(image)
    return _MODE_CONVERTERS.get(image.mode, lambda im: im.convert("RGB"))(image)
