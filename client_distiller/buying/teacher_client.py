"""HTTP client of the vendor's embedding API: one pooled connection, careful retries.

Retries (tenacity) cover what is safe to repeat: connection errors and timeouts, 429, 503, 500
(the vendor refunds failed inference) and 409 (the same Idempotency-Key still running). Every
retry resends the same Idempotency-Key, so a request whose answer was lost is replayed by the
vendor for free rather than charged twice. 402 and every other 4xx are final: retrying cannot
help and would only hammer the vendor.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Sequence, Union

import httpx
import numpy as np
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from shared.codec import CodecError, decode_vector
from shared.protocol import (ClassificationResponse, HEADER_IDEMPOTENCY_KEY, HEADER_IDEMPOTENT_REPLAY,
                             EmbeddingResponse, EncodingFormat, ModelList, UsageReport)

from client_distiller.errors import RunError

log = logging.getLogger(__name__)
_RETRYABLE_STATUS = frozenset({409, 429, 500, 502, 503, 504})


class VendorError(RunError):
    """The vendor refused or failed a request; `status` and `code` come from its error body."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None,
                 param: str | None = None) -> None:
        super().__init__(f"vendor answered {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.param = param


class QuotaExhausted(VendorError):
    """402: the key's quota at the vendor is spent. Never retried."""


class AuthenticationError(VendorError):
    """401: the API key is wrong or revoked."""


class VendorUnreachable(RunError):
    """Connection problems outlasted every retry."""


@dataclass(frozen=True)
class ImageBytes:
    """An encoded image file (PNG/JPEG/WebP) exactly as read from disk."""

    data: bytes


Item = Union[str, ImageBytes]


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray
    units_charged: int  # what this batch cost, from the vendor's own usage (replays report the original)
    units_remaining: int
    replayed: bool


@dataclass(frozen=True)
class ClassifyResult:
    """Top-k probabilities from /v1/classifications as a dense [N, C] float32 matrix: zeros
    outside the classes the vendor returned for each image."""

    probabilities: np.ndarray
    units_charged: int
    units_remaining: int
    replayed: bool


def _error_from(response: httpx.Response) -> VendorError:
    try:
        error = response.json()["error"]
        code, message, param = str(error.get("code")), str(error.get("message")), error.get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        code, message, param = "unknown", response.text[:200], None
    retry_after = _retry_after(response)
    cls = {402: QuotaExhausted, 401: AuthenticationError}.get(response.status_code, VendorError)
    return cls(response.status_code, code, message, retry_after, param)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, VendorError):
        return exc.status in _RETRYABLE_STATUS
    return isinstance(exc, httpx.TransportError)


class TeacherClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 120.0,
        max_attempts: int = 8,
        max_retry_after_s: float = 30.0,
        backoff_max_s: float = 20.0,
        encoding: EncodingFormat = EncodingFormat.BASE64,
    ) -> None:
        self.encoding = encoding
        self.max_attempts = max_attempts
        self.max_retry_after_s = max_retry_after_s
        self._backoff = wait_exponential_jitter(multiplier=0.25, max=backoff_max_s)
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=8),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "TeacherClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ retries
    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, VendorError) and exc.retry_after is not None:
            return min(exc.retry_after, self.max_retry_after_s)
        return self._backoff(state)

    def _call(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        def attempt() -> httpx.Response:
            response = self._http.request(method, path, **kwargs)  # type: ignore[arg-type]
            if response.status_code >= 400:
                raise _error_from(response)
            return response

        retrying = Retrying(retry=retry_if_exception(_retryable), wait=self._wait,
                            stop=stop_after_attempt(self.max_attempts), reraise=True,
                            before_sleep=lambda s: log.info("retrying %s %s after %s", method, path,
                                                            s.outcome.exception() if s.outcome else None))
        try:
            return retrying(attempt)
        except httpx.TransportError as exc:
            raise VendorUnreachable(f"vendor at {self._http.base_url} unreachable: {exc}") from exc

    # ------------------------------------------------------------------ API
    def model_card(self):  # type: ignore[no-untyped-def]
        """The teacher's id, embedding size, prices and this key's protection mode."""
        return ModelList.model_validate(self._call("GET", "/v1/models").json()).data[0]

    def usage(self) -> UsageReport:
        return UsageReport.model_validate(self._call("GET", "/v1/usage").json())

    def embed(self, model: str, items: Sequence[Item], *, idempotency_key: str) -> EmbedResult:
        payload = [
            item if isinstance(item, str) else {"type": "image", "image": base64.b64encode(item.data).decode("ascii")}
            for item in items
        ]
        response = self._call("POST", "/v1/embeddings",
                              json={"model": model, "input": payload, "encoding_format": self.encoding.value},
                              headers={HEADER_IDEMPOTENCY_KEY: idempotency_key})
        body = EmbeddingResponse.model_validate_json(response.content)
        if len(body.data) != len(items):
            raise VendorError(response.status_code, "bad_response", f"{len(body.data)} vectors for {len(items)} inputs")
        try:
            vectors = np.stack([decode_vector(d.embedding, self.encoding) for d in sorted(body.data, key=lambda d: d.index)])
        except CodecError as exc:
            raise VendorError(response.status_code, "bad_response", str(exc)) from exc
        return EmbedResult(
            vectors=vectors,
            units_charged=body.usage.units_charged,
            units_remaining=body.usage.units_remaining,
            replayed=response.headers.get(HEADER_IDEMPOTENT_REPLAY) == "true",
        )

    def classify(self, model: str, images: Sequence[ImageBytes], classes: Sequence[str], *,
                 top_k: int | None = None, idempotency_key: str | None = None) -> ClassifyResult:
        """Top-k class probabilities of `images` over `classes` (any key; the only answer a key in
        `probabilities` mode can get). Same retries as `embed`: resend the same Idempotency-Key."""
        payload: dict[str, object] = {
            "model": model, "classes": list(classes),
            "input": [{"type": "image", "image": base64.b64encode(im.data).decode("ascii")} for im in images],
        }
        if top_k is not None:
            payload["top_k"] = top_k
        headers = {HEADER_IDEMPOTENCY_KEY: idempotency_key} if idempotency_key else {}
        response = self._call("POST", "/v1/classifications", json=payload, headers=headers)
        body = ClassificationResponse.model_validate_json(response.content)
        if len(body.data) != len(images):
            raise VendorError(response.status_code, "bad_response", f"{len(body.data)} answers for {len(images)} images")
        probabilities = np.zeros((len(images), len(classes)), dtype=np.float32)
        for item in body.data:
            for entry in item.top_k:
                if not (0 <= item.index < len(images) and 0 <= entry.class_index < len(classes)):
                    raise VendorError(response.status_code, "bad_response", "class or image index out of range")
                probabilities[item.index, entry.class_index] = entry.probability
        return ClassifyResult(
            probabilities=probabilities,
            units_charged=body.usage.units_charged,
            units_remaining=body.usage.units_remaining,
            replayed=response.headers.get(HEADER_IDEMPOTENT_REPLAY) == "true",
        )
