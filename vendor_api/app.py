"""FastAPI routes only: authenticate, parse, call the service, attach headers.

Public routes (health, readiness, metrics) are separate from authenticated ones; every error is a
`VendorError` (`errors.py`) turned into an OpenAI-shaped body by one function (`error_response`),
reached from one handler table (`_AS_VENDOR_ERROR`: the framework's own exceptions become
`VendorError`s there), from the body size limit (`body_limit.py`) and from the request observer
(`observe.py`), the last resort.

A metered route runs in this order: authenticate, read and parse the body, then watch the
connection (`ClientWatch`) while the service admits, validates, debits and produces; the
response settles the debit only when the client is still there to receive it
(`SettlingResponse`), so a client that hangs up at any point is not charged.
"""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from shared import protocol as P
from shared.protocol import EmbeddingRequest, ModelList, RateLimitInfo, UsageReport

from .accounts import Account
from .auth_guard import client_address, guard_for
from .connection import ClientWatch
from .errors import (
    AuthenticationFailed,
    ClientDisconnected,
    Forbidden,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    VendorError,
)
from .key_admin import KeyAdmin
from .body_limit import BodySizeLimit
from .metering import Meter, RateState, rate_headers
from .metrics import VendorMetrics
from .observe import RequestObserver
from .protection import validate_protection
from .readiness import Readiness
from .service import EmbeddingService, EmbedOutcome
from .settings import VendorSettings
from .teacher import Teacher

log = logging.getLogger(__name__)


def create_app(settings: VendorSettings, teacher: Teacher, redis_url: str) -> FastAPI:
    """An app serving `teacher`, metering against the Redis at `redis_url`.

    The teacher is loaded by the caller (CLI, tests, benchmark) so a bad teacher fails before a
    port is ever bound: there is no half-alive server.
    """
    metrics = VendorMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        meter = Meter.from_url(redis_url, timeout_s=settings.redis_timeout_s,
                               idempotency_ttl_s=settings.idempotency_ttl_s,
                               inflight_lease_s=settings.inflight_lease_s,
                               idempotency_max_bytes=settings.idempotency_max_bytes_per_key)
        service = EmbeddingService(settings, teacher, meter, metrics)
        await service.start()
        app.state.service = service
        app.state.meter = meter
        app.state.keys = KeyAdmin(meter.redis)  # the admin routes' (same connection pool)
        app.state.readiness = Readiness(service, probe_interval_s=settings.ready_probe_interval_s)
        metrics.queue_depth.set_function(lambda: service.batcher.depth)  # live on either metrics port
        try:
            yield
        finally:
            await service.stop()
            await meter.close()

    app = FastAPI(title="Metered CLIP embedding API", version="1", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, render_error=render_error)
    app.add_middleware(RequestObserver, metrics=metrics, render_error=render_error)  # outermost: sees all
    _install_error_handlers(app)
    app.include_router(_public_routes(teacher, metrics_public=settings.metrics_public))
    app.include_router(_api_routes())
    app.include_router(_admin_routes())
    return app


# ---------------------------------------------------------------- errors
def error_response(exc: VendorError) -> JSONResponse:
    """The one mapping from the exception root to HTTP: status, OpenAI-shaped body, headers."""
    headers = {P.HEADER_UNITS_CHARGED: "0", **exc.headers}
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)


def render_error(exc: VendorError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """`error_response` as raw ASGI parts (an `ErrorRenderer`), for the middlewares that answer
    outside any route: the request observer's last resort and the body size limit."""
    response = error_response(exc)
    return response.status_code, list(response.raw_headers), bytes(response.body)


def _http_error(exc: StarletteHTTPException) -> VendorError:
    if exc.status_code == 405:
        return MethodNotAllowed(f"method not allowed: {exc.detail}")
    return NotFound(str(exc.detail))


#: Every exception the app answers itself, and the `VendorError` it is answered as. Anything else
#: that escapes a route is a bug: the request observer answers it as `InternalError`.
_AS_VENDOR_ERROR: dict[type[Exception], Callable[[Any], VendorError]] = {
    VendorError: lambda exc: exc,
    ClientDisconnect: lambda exc: ClientDisconnected("the client closed the connection while sending its request"),
    RequestValidationError: lambda exc: InvalidRequest(_describe_validation(exc.errors())),
    StarletteHTTPException: _http_error,
}


def _install_error_handlers(app: FastAPI) -> None:
    for kind, as_vendor_error in _AS_VENDOR_ERROR.items():
        app.add_exception_handler(kind, _error_handler(as_vendor_error))


def _error_handler(
    as_vendor_error: Callable[[Any], VendorError],
) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """The one shape of every handler: the exception as a `VendorError`, its traceback logged once
    if it is a real failure (the request line follows), answered by `error_response`."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        error = as_vendor_error(exc)
        if error.log_traceback:
            log.error("%s (request %s)", error.message, request.scope.get("state", {}).get("request_id"),
                      exc_info=error.__cause__ or error)
        return error_response(error)

    return handle


def _describe_validation(errors: list) -> str:
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


# ---------------------------------------------------------------- auth
def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("missing API key: send 'Authorization: Bearer <key>'")
    return token.strip()


async def current_account(request: Request) -> Account:
    """The caller's account. A valid key always gets through, even from an address that is
    locked out (one guesser behind a shared NAT must not lock out every honest key there); a
    *failed* authentication from a locked address is refused with 429, and otherwise counted
    against the address (auth_guard)."""
    guard, address = guard_for(request), client_address(request)
    try:
        return await request.app.state.meter.authenticate(_bearer(request))
    except AuthenticationFailed:
        await guard.check(address)
        await guard.record_failure(address)
        raise


async def require_admin(request: Request) -> None:
    """The admin secret, compared in constant time; failures are limited like key guesses."""
    secret = request.app.state.settings.admin_secret
    if secret is None:
        raise Forbidden("admin routes are disabled: set VENDOR_ADMIN_SECRET")
    guard, address = guard_for(request), client_address(request)
    try:
        token = _bearer(request)
        if not hmac.compare_digest(token.encode(), secret.get_secret_value().encode()):
            raise AuthenticationFailed("invalid admin secret")
    except AuthenticationFailed:
        await guard.check(address)
        await guard.record_failure(address)
        raise


def _rate_headers(remaining: int | None, limit: int | None, reset_s: float | None,
                  window_s: float | None = None) -> dict[str, str]:
    if remaining is None or limit is None or reset_s is None:
        return {}
    return rate_headers(RateState(remaining, limit, reset_s, window_s or 0.0))


async def _account_headers(request: Request, account: Account) -> dict[str, str]:
    remaining, reset_s = await request.app.state.meter.rate_state(account)
    return {P.HEADER_UNITS_CHARGED: "0", P.HEADER_UNITS_REMAINING: str(account.remaining),
            **_rate_headers(remaining, account.burst, reset_s, account.burst / account.rate_per_s)}


# ---------------------------------------------------------------- public routes
def _public_routes(teacher: Teacher, *, metrics_public: bool = True) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {"status": "alive"}

    @router.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        """Ready if Redis answers a ping and the model has recently served a batch (or, when
        idle, a probe that runs at most every few seconds succeeds): cheap for anyone to ask,
        and never 'not ready' merely because the queue is busy (readiness.py)."""
        checks = await request.app.state.readiness.check()
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "not_ready", "teacher": teacher.model_id, **checks},
                            status_code=200 if ready else 503)

    if metrics_public:
        @router.get("/metrics", include_in_schema=False)
        async def metrics_route(request: Request) -> Response:
            return Response(render_metrics(request.app), media_type=CONTENT_TYPE_LATEST)

    return router


def render_metrics(app: FastAPI) -> bytes:
    """The Prometheus exposition of one app (public route or the private metrics port)."""
    metrics: VendorMetrics = app.state.metrics
    return generate_latest(metrics.registry)


# ---------------------------------------------------------------- authenticated API
def _api_routes() -> APIRouter:
    router = APIRouter(prefix="/v1")
    error_responses = {code: {"model": P.ErrorResponse} for code in (400, 401, 402, 404, 409, 413, 422, 429, 500, 503)}

    @router.post("/embeddings", response_model=P.EmbeddingResponse, responses=error_responses,
                 openapi_extra=_json_body_openapi(EmbeddingRequest, idempotent=True))
    async def embeddings(
        request: Request, account: Account = Depends(current_account)
    ) -> Response:
        payload = await _parse(request, EmbeddingRequest)
        idempotency_key = _idempotency_key(request)
        started = time.perf_counter()
        service: EmbeddingService = request.app.state.service
        watch = ClientWatch(request.receive)
        try:
            outcome = await watch.run(service.embed(account, payload, idempotency_key))
        except BaseException:
            watch.close()
            raise
        return SettlingResponse(service, outcome, watch, started)

    @router.post("/classifications", response_model=P.ClassificationResponse,
                 responses={**error_responses, 403: {"model": P.ErrorResponse}},
                 openapi_extra=_json_body_openapi(P.ClassificationRequest, idempotent=True))
    async def classifications(
        request: Request, account: Account = Depends(current_account)
    ) -> Response:
        """Top-k class probabilities over the caller's class names; metered like embeddings."""
        payload = await _parse(request, P.ClassificationRequest)
        idempotency_key = _idempotency_key(request)
        started = time.perf_counter()
        service: EmbeddingService = request.app.state.service
        watch = ClientWatch(request.receive)
        try:
            outcome = await watch.run(service.classify(account, payload, idempotency_key))
        except BaseException:
            watch.close()
            raise
        return SettlingResponse(service, outcome, watch, started)

    @router.get("/models", response_model=ModelList, responses=error_responses)
    async def models(request: Request, account: Account = Depends(current_account)) -> JSONResponse:
        card = request.app.state.service.model_card(account)
        return JSONResponse(ModelList(data=[card]).model_dump(mode="json"),
                            headers=await _account_headers(request, account))

    @router.get("/usage", response_model=UsageReport, responses=error_responses)
    async def usage(request: Request, account: Account = Depends(current_account)) -> JSONResponse:
        report = _usage_report(account, await request.app.state.service.protection_state(account))
        return JSONResponse(report.model_dump(mode="json"), headers=await _account_headers(request, account))

    return router


def _inline_refs(node: object, defs: dict) -> object:
    """Replace `$ref`s to a model's own `$defs` by their content, so the schema stands alone."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            return {**_inline_refs(target, defs), **{k: _inline_refs(v, defs) for k, v in node.items() if k != "$ref"}}
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def _json_body_openapi(model: type[BaseModel], *, idempotent: bool = False) -> dict:
    """OpenAPI for a JSON body that the route parses itself (off the event loop, with our own
    error shape), so FastAPI cannot see it: without this the published schema says the route
    takes no body, and clients generated from it (and schemathesis) could not call it."""
    schema = model.model_json_schema()
    extra: dict = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": _inline_refs(schema, schema.get("$defs", {}))}}}}
    if idempotent:
        extra["parameters"] = [{"name": P.HEADER_IDEMPOTENCY_KEY, "in": "header", "required": False,
                                "description": "retry under the same key: a finished answer is replayed, free",
                                "schema": {"type": "string", "minLength": 1, "maxLength": 255}}]
    return extra


def _usage_report(account: Account, protection_state: dict[str, float] | None = None) -> UsageReport:
    return UsageReport(
        name=account.name, quota=account.quota, spent=account.spent, remaining=account.remaining,
        active=account.active, rate_limit=RateLimitInfo(requests_per_s=account.rate_per_s, burst=account.burst),
        protection=account.protection, protection_state=protection_state or {},
    )


def _idempotency_key(request: Request) -> str | None:
    idempotency_key = request.headers.get(P.HEADER_IDEMPOTENCY_KEY)
    if idempotency_key is not None and not (1 <= len(idempotency_key) <= 255):
        raise InvalidRequest("Idempotency-Key must be 1-255 characters", param=P.HEADER_IDEMPOTENCY_KEY)
    return idempotency_key


async def _parse(request: Request, model: type[BaseModel]) -> BaseModel:
    """Read and validate a JSON body off the event loop. A client that hangs up mid-upload is
    `ClientDisconnect` (499, one log line), not an error."""
    raw = await request.body()
    try:
        return await run_in_threadpool(model.model_validate_json, raw)
    except ValidationError as exc:
        raise InvalidRequest(_describe_validation(exc.errors())) from exc


class SettlingResponse(Response):
    """An answer whose debit is settled at the last moment before its first byte is written:
    only if the client is still connected, and, if it hung up while the settle was being
    written, refunded again (`void`). Exceptions raised here, before the response starts, go
    through the same error handlers as a route's."""

    media_type = "application/json"

    def __init__(self, service: EmbeddingService, outcome: EmbedOutcome, watch: ClientWatch, started: float) -> None:
        super().__init__(b"", media_type=self.media_type)
        self.service, self.outcome, self.watch, self.started = service, outcome, watch, started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if self.watch.gone:
                await self.service.abandon(self.outcome, reason="client_disconnected")
                self.watch.raise_if_gone()
            outcome = await self.service.deliver(self.outcome)
            if self.watch.gone:
                await self.service.void(outcome, reason="client_disconnected")
                self.watch.raise_if_gone()
        except BaseException:
            self.watch.close()
            await self.service.abandon(self.outcome, reason="not_delivered")  # no-op once settled
            raise
        self.watch.close()
        self.body = outcome.body
        self.init_headers(_answer_headers(outcome, time.perf_counter() - self.started))
        await super().__call__(scope, receive, send)


def _answer_headers(outcome: EmbedOutcome, total_s: float) -> dict[str, str]:
    headers = {
        P.HEADER_UNITS_CHARGED: str(outcome.units_charged),
        P.HEADER_UNITS_REMAINING: str(outcome.units_remaining),
        P.HEADER_QUEUE_TIME: f"{outcome.timing.queue_s * 1000:.2f}",
        P.HEADER_INFERENCE_TIME: f"{outcome.timing.inference_s * 1000:.2f}",
        P.HEADER_TOTAL_TIME: f"{total_s * 1000:.2f}",
        **_rate_headers(outcome.rate_remaining, outcome.rate_limit, outcome.rate_reset_s, outcome.rate_window_s),
    }
    if outcome.replayed:
        headers[P.HEADER_IDEMPOTENT_REPLAY] = "true"
    return headers


# ---------------------------------------------------------------- admin API
class CreateKeyRequest(BaseModel):
    """Ranges are key administration's (`key_admin.validate_account_fields`), checked there with
    one clear error."""

    model_config = ConfigDict(allow_inf_nan=False, strict=True)
    name: str = Field(min_length=1, max_length=64)
    quota: int
    rate_per_s: float | None = None
    burst: int | None = None
    protection: str = "none"


class TopUpRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    units: int


class ProtectionRequest(BaseModel):
    protection: str


def _admin_routes() -> APIRouter:
    router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)], include_in_schema=False)

    @router.post("/keys", status_code=201)
    async def create_key(body: CreateKeyRequest, request: Request) -> dict:
        settings: VendorSettings = request.app.state.settings
        validate_protection(body.protection, request.app.state.service.teacher.embed_dim)
        api_key, account = await request.app.state.keys.create_key(
            body.name, quota=body.quota,
            rate_per_s=settings.default_rate_per_s if body.rate_per_s is None else body.rate_per_s,
            burst=settings.default_burst if body.burst is None else body.burst, protection=body.protection,
        )
        return {"api_key": api_key, **_usage_report(account).model_dump(mode="json")}

    @router.get("/keys")
    async def list_keys(request: Request) -> list[dict]:
        return [_usage_report(a).model_dump(mode="json") for a in await request.app.state.keys.list_accounts()]

    @router.get("/keys/{name}")
    async def get_key(name: str, request: Request) -> dict:
        return _usage_report(await request.app.state.keys.get_account(name)).model_dump(mode="json")

    @router.post("/keys/{name}/top-up")
    async def top_up(name: str, body: TopUpRequest, request: Request) -> dict:
        return _usage_report(await request.app.state.keys.top_up(name, body.units)).model_dump(mode="json")

    @router.post("/keys/{name}/protection")
    async def set_protection(name: str, body: ProtectionRequest, request: Request) -> dict:
        validate_protection(body.protection, request.app.state.service.teacher.embed_dim)
        account = await request.app.state.keys.set_protection(name, body.protection)
        return _usage_report(account).model_dump(mode="json")

    @router.delete("/keys/{name}")
    async def revoke(name: str, request: Request) -> dict:
        return _usage_report(await request.app.state.keys.revoke(name)).model_dump(mode="json")

    return router
