"""One ASGI middleware that sees every request: its id, its metrics, its one log line, and the
last resort for exceptions nothing else handled.

Why pure ASGI and outermost (inside only Starlette's ServerErrorMiddleware): a `@app.middleware`
function never sees the 500s, because an unhandled exception skips it on its way out (so no
`status="500"` series existed), and Starlette's error middleware logs and re-raises, so uvicorn
logs the same traceback a second time. Here an unexpected exception becomes `InternalError`
(500 `internal_error`), counted by status and route, logged once with its traceback, and not
re-raised. A client that disconnects is one info line, never a traceback: anybody can trigger
it, so it must not flood the log.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.protocol import HEADER_REQUEST_ID, HEADER_UNITS_CHARGED

from .errors import ClientDisconnected, ErrorRenderer, InternalError, VendorError
from .metrics import VendorMetrics

log = logging.getLogger("vendor_api.requests")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class RequestObserver:
    def __init__(self, app: ASGIApp, *, metrics: VendorMetrics, render_error: ErrorRenderer) -> None:
        self.app = app
        self.metrics = metrics
        self.render_error = render_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        supplied = dict(scope.get("headers") or []).get(HEADER_REQUEST_ID.lower().encode(), b"").decode("latin-1")
        request_id = supplied if _CLIENT_ID.match(supplied) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = [0]
        charged = ["0"]

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((HEADER_REQUEST_ID.lower().encode(), request_id.encode()))
                charged[0] = next((v.decode() for k, v in headers if k.lower() == HEADER_UNITS_CHARGED.lower().encode()),
                                  "0")
                message = {**message, "headers": headers}
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, observed_send)
        except Exception as exc:  # noqa: BLE001 - the last resort: answer, count and log once
            error = exc
            if status[0] == 0:
                failure = exc if isinstance(exc, VendorError) else InternalError("internal server error")
                code, headers, body = self.render_error(failure)
                await observed_send({"type": "http.response.start", "status": code, "headers": headers})
                await observed_send({"type": "http.response.body", "body": body})
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            code = status[0] or 499
            self.metrics.requests.labels(route, str(code)).inc()
            self.metrics.request_seconds.labels(route).observe(elapsed)
            self._log(scope, request_id, code, elapsed, charged[0], error)

    def _log(self, scope: Scope, request_id: str, status: int, elapsed: float, charged: str,
             error: BaseException | None) -> None:
        client = scope.get("client") or ("-", 0)
        line = "%s %s %s %d %.1fms units=%s id=%s"
        args = (client[0], scope.get("method"), scope.get("path"), status, elapsed * 1000, charged, request_id)
        if error is not None and not isinstance(error, (ClientDisconnected, VendorError)):
            log.error(line, *args, exc_info=error)  # the one traceback of an unexpected failure
        elif status >= 500:
            log.warning(line, *args)
        else:
            log.info(line, *args)
