"""Request/response models, error codes and header names of the embedding API.

The shapes follow OpenAI's `/v1/embeddings` so the official SDK works unchanged for texts;
image items and the extra usage fields are additions a plain OpenAI client simply ignores.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

# ---------------------------------------------------------------- header names
HEADER_UNITS_CHARGED = "X-Units-Charged"
HEADER_UNITS_REMAINING = "X-Units-Remaining"
HEADER_QUEUE_TIME = "X-Queue-Time-Ms"
HEADER_INFERENCE_TIME = "X-Inference-Time-Ms"
HEADER_TOTAL_TIME = "X-Total-Time-Ms"
HEADER_REQUEST_ID = "X-Request-Id"
HEADER_IDEMPOTENCY_KEY = "Idempotency-Key"
HEADER_IDEMPOTENT_REPLAY = "Idempotent-Replayed"
HEADER_RETRY_AFTER = "Retry-After"
HEADER_RATELIMIT_LIMIT = "X-RateLimit-Limit-Requests"
HEADER_RATELIMIT_REMAINING = "X-RateLimit-Remaining-Requests"
HEADER_RATELIMIT_RESET = "X-RateLimit-Reset-Requests"


class ErrorCode(str, Enum):
    """Machine-readable error codes (the `error.code` field). Clients branch on these."""

    INVALID_REQUEST = "invalid_request"
    INVALID_IMAGE = "invalid_image"
    IMAGE_TOO_SMALL = "image_too_small"
    IMAGE_TOO_LARGE = "image_too_large"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    TOO_MANY_INPUTS = "too_many_inputs"
    EMPTY_INPUT = "empty_input"
    UNKNOWN_MODEL = "model_not_found"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    INVALID_API_KEY = "invalid_api_key"
    KEY_REVOKED = "key_revoked"
    INSUFFICIENT_QUOTA = "insufficient_quota"
    RATE_LIMITED = "rate_limit_exceeded"
    IDEMPOTENCY_MISMATCH = "idempotency_key_reused"
    IDEMPOTENCY_IN_FLIGHT = "idempotency_request_in_flight"
    IDEMPOTENCY_STORE_FULL = "idempotency_store_full"
    OVERLOADED = "server_overloaded"
    METERING_UNAVAILABLE = "metering_unavailable"
    INFERENCE_FAILED = "inference_failed"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    CONFLICT = "conflict"
    EMBEDDINGS_NOT_PERMITTED = "embeddings_not_permitted"
    PROTECTION_MISCONFIGURED = "protection_misconfigured"
    ACCOUNT_INVALID = "account_invalid"
    DEBIT_LAPSED = "debit_lapsed"
    TOO_MANY_NEW_CLASSES = "too_many_new_classes"
    CLASS_LISTS_EXHAUSTED = "class_lists_exhausted"
    CLIENT_CLOSED = "client_closed_request"
    INTERNAL_ERROR = "internal_error"


class ErrorType(str, Enum):
    """OpenAI's coarse error categories (the `error.type` field)."""

    INVALID_REQUEST = "invalid_request_error"
    AUTHENTICATION = "authentication_error"
    PERMISSION = "permission_error"
    INSUFFICIENT_QUOTA = "insufficient_quota"
    RATE_LIMIT = "rate_limit_error"
    SERVER = "server_error"


class ErrorDetail(BaseModel):
    message: str
    type: ErrorType
    code: ErrorCode
    param: str | None = None


class ErrorResponse(BaseModel):
    """Every non-2xx answer has this body, so one client-side parser handles them all."""

    error: ErrorDetail


# ---------------------------------------------------------------- encodings
class EncodingFormat(str, Enum):
    """How embedding vectors travel.

    `base64` is little-endian float32, byte-compatible with OpenAI (its SDK asks for it by
    default and decodes with numpy); `base64_fp16` halves the bytes for clients that want it.
    """

    FLOAT = "float"
    BASE64 = "base64"
    BASE64_FP16 = "base64_fp16"


# ---------------------------------------------------------------- requests
class ImageInput(BaseModel):
    """One image to embed: the file's bytes (PNG, JPEG or WebP), base64-encoded.

    Also accepted, and normalised to this shape as they are parsed (so the idempotency
    fingerprint and the keyed noise do not depend on the spelling): `image` as a
    `data:image/...;base64,` URL, and OpenAI's `{"type": "image_url", "image_url": {"url":
    "data:..."}}`. Any other URL is refused when the image is decoded: the vendor never fetches.
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal["image"]
    image: str = Field(description="base64 of the encoded image file (PNG, JPEG or WebP), or a data: URL of it")

    @model_validator(mode="before")
    @classmethod
    def _openai_shapes(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("type") == "image_url":
            inner = data.get("image_url")
            url = inner.get("url") if isinstance(inner, dict) else inner
            if set(data) - {"type", "image_url"} or (isinstance(inner, dict) and set(inner) - {"url", "detail"}):
                raise ValueError("an image_url item has only 'type' and 'image_url': {'url': ..., 'detail'?: ...}")
            data = {"type": "image", "image": url}
        if isinstance(data, dict) and isinstance(data.get("image"), str):
            data = {**data, "image": _data_url_payload(data["image"])}
        return data


def _data_url_payload(value: str) -> str:
    """The base64 payload of a `data:` URL (RFC 2397), or `value` unchanged if it is not one."""
    if not value[:5].lower() == "data:":
        return value
    header, comma, payload = value.partition(",")
    params = [p.strip().lower() for p in header[5:].split(";")]
    if not comma or "base64" not in params[1:] or not (params[0].startswith("image/") or params[0] == ""):
        raise ValueError("a data: URL must hold a base64-encoded image: data:image/png;base64,...")
    return payload


InputItem = Annotated[Union[str, ImageInput], Field(union_mode="left_to_right")]


class EmbeddingRequest(BaseModel):
    """OpenAI's request body, with `input` widened to accept image items."""

    model_config = ConfigDict(extra="ignore")

    input: Union[str, list[InputItem]]
    model: str
    encoding_format: EncodingFormat = EncodingFormat.FLOAT
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = Field(default=None, max_length=256)

    def items(self) -> list[str | ImageInput]:
        """The inputs as a list, whatever form the caller used."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


# ---------------------------------------------------------------- responses
class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingUsage(BaseModel):
    """OpenAI's usage fields plus what the meter did, so the client can reconcile its ledger."""

    prompt_tokens: int
    total_tokens: int
    images: int
    texts: int
    units_charged: int
    units_remaining: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage


# ---------------------------------------------------------------- what a key is sold
#: What a key's protection mode sells: embeddings (`/v1/embeddings`, and class probabilities scored
#: on them), or top-k class probabilities only (`/v1/classifications`). The one definition the
#: vendor's modes, the model card and the client all use.
OutputKind = Literal["embeddings", "probabilities"]
OUTPUT_EMBEDDINGS: OutputKind = "embeddings"
OUTPUT_PROBABILITIES: OutputKind = "probabilities"


class ModelCard(BaseModel):
    """What a client needs to know before it buys: the teacher's shape and prices."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    embedding_dim: int
    image_size: int
    context_length: int
    price_per_image: int
    price_per_text: int
    logit_scale: float = 100.0
    protection: str = "none"
    output: OutputKind = Field(
        default=OUTPUT_EMBEDDINGS,
        description="what this key receives: embeddings, or only top-k class probabilities (/v1/classifications)",
    )
    top_k: int | None = Field(default=None, description="most classes per image this key may receive; None: all")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class RateLimitInfo(BaseModel):
    requests_per_s: float
    burst: int


class UsageReport(BaseModel):
    """The calling key's own account, never anybody else's."""

    name: str
    quota: int
    spent: int
    remaining: int
    active: bool
    rate_limit: RateLimitInfo
    protection: str
    protection_state: dict[str, float] = Field(
        default_factory=dict,
        description="b4b: {'coverage': fraction of LSH buckets this key has reached, 'noise': the sigma "
        "its next request gets at least}; empty for other modes",
    )


# ---------------------------------------------------------------- classifications (probabilities mode)
MAX_CLASSES = 1000


class ClassificationRequest(BaseModel):
    """Images plus the caller's own class names; the answer is top-k probabilities, never vectors."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: list[ImageInput] = Field(min_length=1, description="images only")
    classes: list[str] = Field(min_length=2, max_length=MAX_CLASSES, description="class names (2..1000)")
    top_k: int | None = Field(default=None, ge=1, description="classes per image; capped by the key's K")


class ClassProbability(BaseModel):
    class_index: int
    probability: float


class ClassificationItem(BaseModel):
    object: Literal["classification"] = "classification"
    index: int
    top_k: list[ClassProbability]


class ClassificationResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ClassificationItem]
    model: str
    usage: EmbeddingUsage
