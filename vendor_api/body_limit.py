"""Request body size limit as pure ASGI middleware.

It refuses on the declared Content-Length before reading anything, and counts streamed
(chunked) bodies as they arrive, so an oversized upload is cut off with 413 instead of being
buffered whole in memory. The early refusal is rendered by the app's one error mapping
(`render_error`), like every other error.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ErrorRenderer, PayloadTooLarge


class BodySizeLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int, render_error: ErrorRenderer) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.render_error = render_error

    def _error(self, headers: dict[str, str] | None = None) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body is larger than the limit of {self.max_bytes} bytes", headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False
            if too_big:
                await self._reject(send)
                return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, counting_receive, send)

    async def _reject(self, send: Send) -> None:
        """Before reading the body: the connection is closed after the answer, not drained."""
        status, headers, body = self.render_error(self._error(headers={"Connection": "close"}))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
