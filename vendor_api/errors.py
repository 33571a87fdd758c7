"""The vendor's one exception family. Each error carries its HTTP status and OpenAI-shaped body.

Every error the vendor raises on purpose derives from `VendorError`. Code anywhere below the
HTTP layer raises one of these; `app.py` maps them to responses in a single place
(`error_response`, reached through one handler table, `app._AS_VENDOR_ERROR`, which also turns
the framework's own exceptions into a `VendorError`), so no route builds an error response by
hand. Anything else that escapes a route is a bug and becomes `InternalError` (500
`internal_error`), logged once with its traceback; each kind of failure keeps its own code:

    VendorError (500 internal_error)
    ├── InvalidRequest 400 · NotFound 404 · MethodNotAllowed 405 · PayloadTooLarge 413
    ├── AuthenticationFailed 401 (+ WWW-Authenticate) · Forbidden 403 · EmbeddingsNotPermitted 403
    ├── InsufficientQuota 402 · RateLimited 429 · IdempotencyStoreFull 429
    ├── IdempotencyInFlight 409 · Conflict 409 · IdempotencyMismatch 422
    ├── ClientDisconnected 499 (never reaches anyone; counted and logged without a traceback)
    ├── InferenceFailed 500 · ProtectionMisconfigured 500 · AccountMisconfigured 500 · InternalError 500
    ├── Overloaded 503 · MeteringUnavailable 503 · DebitLapsed 503
    └── SetupError (also a RuntimeError): the vendor cannot start or build; one line, exit 1
        TeacherLoadError · EmbeddedRedisError (`embedded_redis`) · DemoTeacherError (`demo_teacher.store`)

`SetupError` is what `vendor-api serve` and `vendor-admin` report as one line before any request
exists; it also derives from the `RuntimeError` it replaced, so code that caught that still works.
"""

from __future__ import annotations

from typing import Callable

from shared.protocol import ErrorCode, ErrorDetail, ErrorResponse, ErrorType

#: A `VendorError` as raw ASGI parts (status, headers, body): how the middlewares that answer
#: outside any route (the request observer, the body size limit) get `app.error_response`.
ErrorRenderer = Callable[["VendorError"], tuple[int, list[tuple[bytes, bytes]], bytes]]


class VendorError(Exception):
    """The root: an HTTP status, an error type and code, and the headers to answer with."""

    status_code: int = 500
    error_type: ErrorType = ErrorType.SERVER
    code: ErrorCode = ErrorCode.INTERNAL_ERROR
    #: whether the HTTP layer logs this failure with a traceback (a bug or a broken dependency)
    log_traceback: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict:
        detail = ErrorDetail(message=self.message, type=self.error_type, code=self.code, param=self.param)
        return ErrorResponse(error=detail).model_dump(mode="json")


class InvalidRequest(VendorError):
    status_code = 400
    error_type = ErrorType.INVALID_REQUEST
    code = ErrorCode.INVALID_REQUEST


class NotFound(VendorError):
    status_code = 404
    error_type = ErrorType.INVALID_REQUEST
    code = ErrorCode.NOT_FOUND


class MethodNotAllowed(VendorError):
    """405: the route exists, the method does not (the framework's own 405, in our shape)."""

    status_code = 405
    error_type = ErrorType.INVALID_REQUEST
    code = ErrorCode.INVALID_REQUEST


class PayloadTooLarge(VendorError):
    status_code = 413
    error_type = ErrorType.INVALID_REQUEST
    code = ErrorCode.PAYLOAD_TOO_LARGE


class AuthenticationFailed(VendorError):
    """401, with `WWW-Authenticate: Bearer` (RFC 6750) so clients know how to authenticate."""

    status_code = 401
    error_type = ErrorType.AUTHENTICATION
    code = ErrorCode.INVALID_API_KEY

    def __init__(self, message: str, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(message, **kwargs)
        error = "invalid_request" if message.startswith("missing") else "invalid_token"
        self.headers.setdefault("WWW-Authenticate", f'Bearer realm="vendor", error="{error}"')


class Forbidden(VendorError):
    status_code = 403
    error_type = ErrorType.PERMISSION
    code = ErrorCode.FORBIDDEN


class InsufficientQuota(VendorError):
    """402, never retried by a well-behaved client: only a top-up helps."""

    status_code = 402
    error_type = ErrorType.INSUFFICIENT_QUOTA
    code = ErrorCode.INSUFFICIENT_QUOTA


class RateLimited(VendorError):
    status_code = 429
    error_type = ErrorType.RATE_LIMIT
    code = ErrorCode.RATE_LIMITED


class IdempotencyStoreFull(VendorError):
    """429: the key's stored answers reached `VENDOR_IDEMPOTENCY_MAX_BYTES_PER_KEY`. Refused before
    anything is charged: storing no answer for a new Idempotency-Key would let its retry be
    charged twice, so the request is not run at all (without the header it would be)."""

    status_code = 429
    error_type = ErrorType.RATE_LIMIT
    code = ErrorCode.IDEMPOTENCY_STORE_FULL


class IdempotencyInFlight(VendorError):
    status_code = 409
    error_type = ErrorType.INVALID_REQUEST
    code = ErrorCode.IDEMPOTENCY_IN_FLIGHT


class Conflict(VendorError):
    status_code = 409
    error_type = ErrorType.INVALID_REQUEST
    code = ErrorCode.CONFLICT


class IdempotencyMismatch(VendorError):
    status_code = 422
    error_type = ErrorType.INVALID_REQUEST
    code = ErrorCode.IDEMPOTENCY_MISMATCH


class Overloaded(VendorError):
    """503 with Retry-After: the batch queue is full; the client should come back shortly."""

    status_code = 503
    error_type = ErrorType.SERVER
    code = ErrorCode.OVERLOADED


class MeteringUnavailable(VendorError):
    """503: Redis is unreachable. We fail closed: no answer is ever served unmetered."""

    status_code = 503
    error_type = ErrorType.SERVER
    code = ErrorCode.METERING_UNAVAILABLE


class EmbeddingsNotPermitted(VendorError):
    """403: this key is sold probabilities only (`probabilities` mode); no vector ever leaves."""

    status_code = 403
    error_type = ErrorType.PERMISSION
    code = ErrorCode.EMBEDDINGS_NOT_PERMITTED


class ClassListsExhausted(VendorError):
    """403: this key has asked `VENDOR_CLASSIFY_LISTS_PER_IMAGE` other class lists of one of these
    images already (`protection/class_lists.py`); refused before any charge."""

    status_code = 403
    error_type = ErrorType.PERMISSION
    code = ErrorCode.CLASS_LISTS_EXHAUSTED


class ProtectionMisconfigured(VendorError):
    """500: the key's protection mode does not fit the served teacher (e.g. truncate beyond its
    dimension). The vendor's mistake, so it is refused before any charge."""

    status_code = 500
    error_type = ErrorType.SERVER
    code = ErrorCode.PROTECTION_MISCONFIGURED


class InferenceFailed(VendorError):
    """500: the model (or a protection transform) failed after the debit, which was refunded."""

    status_code = 500
    error_type = ErrorType.SERVER
    code = ErrorCode.INFERENCE_FAILED
    log_traceback = True


class AccountMisconfigured(VendorError):
    """500: the key's account record holds numbers the meter cannot use exactly (written before
    admin numbers were validated, or by hand). Refused before anything is written."""

    status_code = 500
    error_type = ErrorType.SERVER
    code = ErrorCode.ACCOUNT_INVALID


class InternalError(VendorError):
    """500: a bug. The generic code, so it is never mistaken for a model failure."""

    status_code = 500
    error_type = ErrorType.SERVER
    code = ErrorCode.INTERNAL_ERROR
    log_traceback = True


class DebitLapsed(VendorError):
    """503: the request outlived its debit's lease (it was refunded) and could not be paid for
    again, so its answer is not delivered: never an answer that was not paid for."""

    status_code = 503
    error_type = ErrorType.SERVER
    code = ErrorCode.DEBIT_LAPSED


class ClientDisconnected(VendorError):
    """499 (nginx's 'client closed request'): the client hung up; its debit, if any, was
    refunded. Nobody reads the response; it exists for the metrics and the one log line."""

    status_code = 499
    error_type = ErrorType.INVALID_REQUEST
    code = ErrorCode.CLIENT_CLOSED


class SetupError(VendorError, RuntimeError):
    """The vendor cannot start or build what it serves: reported as one line and a non-zero exit
    by `vendor-api` and `vendor-admin`, never as an answer to a request."""

    log_traceback = True


class TeacherLoadError(SetupError):
    """The configured teacher cannot be loaded: the server refuses to start."""
