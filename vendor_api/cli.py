"""`vendor-api serve`: load the teacher, connect the meter, then bind the port.

Loading happens before uvicorn starts, so a missing or broken teacher is one clear error and a
non-zero exit, never a server that answers /healthz but cannot embed.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from .errors import SetupError
from .settings import VendorSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vendor-api", description="Serve a metered CLIP embedding API.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the HTTP server")
    serve.add_argument("--host", help="bind address (default VENDOR_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default VENDOR_PORT or 8000; 0 picks a free one)")
    serve.add_argument("--teacher", help="open_clip spec (overrides VENDOR_TEACHER)")
    serve.add_argument("--data-dir", type=Path, help="overrides VENDOR_DATA_DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "teacher": args.teacher,
                                   "data_dir": args.data_dir}.items() if v is not None}
    try:
        settings = VendorSettings(**overrides)
    except ValidationError as exc:
        print(f"vendor-api: invalid configuration: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve(settings)
    except (SetupError, ValueError) as exc:  # SetupError: teacher or Redis; ValueError: a bad REDIS_URL
        print(f"vendor-api: {exc}", file=sys.stderr)
        return 1


def serve(settings: VendorSettings) -> int:
    import uvicorn

    from .app import create_app
    from .runtime import load_teacher, redis_url

    teacher = load_teacher(settings)
    # uvicorn re-raises the SIGTERM it caught once it has drained; turning that into SystemExit
    # lets the embedded Redis below shut down cleanly (AOF fsynced) instead of being orphaned.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with redis_url(settings) as url:
        app = create_app(settings, teacher, url)
        server = uvicorn.Server(uvicorn_config(app, settings))
        server.run()
    return 0 if server.started else 1


def uvicorn_config(app: object, settings: VendorSettings, **overrides: object) -> "uvicorn.Config":
    """How every vendor server runs uvicorn (the CLI and the tests alike).

    `proxy_headers=False`: uvicorn would otherwise believe `X-Forwarded-For` from 127.0.0.1, so
    anyone on the host (or behind a local proxy) could pick the address that failed logins are
    counted against; the app resolves forwarded addresses itself, from `VENDOR_TRUSTED_PROXIES`
    only. `access_log=False`: the request observer logs one line per request, with its id.
    `VENDOR_METRICS_PORT` adds a second listener that serves only `/metrics`."""
    import uvicorn

    options: dict = dict(host=settings.host, port=settings.port, log_level=settings.log_level,
                         timeout_graceful_shutdown=10, proxy_headers=False, access_log=False)
    options.update(overrides)
    config = uvicorn.Config(app, **options)  # type: ignore[arg-type]
    if settings.metrics_port is not None:
        _serve_metrics_port(app, settings)
    return config


def _serve_metrics_port(app: object, settings: VendorSettings) -> None:
    """A private listener for `/metrics` only (Prometheus' own HTTP server, in a thread)."""
    from prometheus_client import start_http_server

    start_http_server(settings.metrics_port, addr=settings.host, registry=app.state.metrics.registry)  # type: ignore[attr-defined]


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
