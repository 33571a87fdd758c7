"""Embeddings <-> wire formats, and image bytes <-> base64.

Both sides use these functions so an fp16 vector encoded by the vendor is decoded by the client
with exactly the same dtype and byte order; there is no second implementation to drift.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Sequence, Union

import numpy as np

from .protocol import EncodingFormat

_WIRE_DTYPES: dict[EncodingFormat, np.dtype] = {
    EncodingFormat.BASE64: np.dtype("<f4"),
    EncodingFormat.BASE64_FP16: np.dtype("<f2"),
}


class CodecError(ValueError):
    """A payload that cannot be decoded: bad base64, wrong length, wrong type."""


def encode_vector(vector: np.ndarray, fmt: EncodingFormat) -> Union[list[float], str]:
    """One embedding in the requested wire format."""
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    if fmt is EncodingFormat.FLOAT:
        return vector.tolist()
    return base64.b64encode(vector.astype(_WIRE_DTYPES[fmt]).tobytes()).decode("ascii")


def encode_vectors(matrix: np.ndarray, fmt: EncodingFormat) -> list[Union[list[float], str]]:
    return [encode_vector(row, fmt) for row in np.asarray(matrix)]


def decode_vector(payload: Union[Sequence[float], str], fmt: EncodingFormat) -> np.ndarray:
    """Inverse of `encode_vector`; always returns float32."""
    if fmt is EncodingFormat.FLOAT:
        if isinstance(payload, str):
            raise CodecError("expected a list of floats, got a string")
        return np.asarray(payload, dtype=np.float32)
    if not isinstance(payload, str):
        raise CodecError(f"expected a base64 string for {fmt.value}")
    raw = b64decode_strict(payload)
    dtype = _WIRE_DTYPES[fmt]
    if len(raw) % dtype.itemsize:
        raise CodecError(f"{len(raw)} bytes is not a whole number of {dtype} values")
    return np.frombuffer(raw, dtype=dtype).astype(np.float32)


def b64decode_strict(text: str) -> bytes:
    """Base64 that rejects stray characters instead of silently skipping them."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CodecError(f"not valid base64: {exc}") from exc


def image_to_base64(image: "object", fmt: str = "PNG") -> str:
    """Encode a PIL image (or raw file bytes) for an `ImageInput`."""
    if isinstance(image, (bytes, bytearray)):
        return base64.b64encode(bytes(image)).decode("ascii")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)  # type: ignore[attr-defined]
    return base64.b64encode(buffer.getvalue()).decode("ascii")
