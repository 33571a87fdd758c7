"""Helpers for the hardening tests (issue 12): clients that hang up at a chosen moment, gates
that hold a real server at a chosen point of the metered path, and ledger arithmetic."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any, Callable
from urllib.parse import urlsplit


def raw_request(base_url: str, method: str, path: str, body: dict | None = None,
                headers: dict[str, str] | None = None) -> socket.socket:
    """Send one complete HTTP/1.1 request on a fresh socket and return the socket unread: the
    caller decides when the client 'dies' (close) or reads the answer (`read_response`)."""
    url = urlsplit(base_url)
    payload = json.dumps(body).encode() if body is not None else b""
    head = [f"{method} {path} HTTP/1.1", f"Host: {url.hostname}:{url.port}", "Connection: close",
            f"Content-Length: {len(payload)}", "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    raw = b"".join(chunks)
    return (int(raw.split(b" ", 2)[1]) if raw else 0), raw


def hang_up(sock: socket.socket) -> None:
    """Close like a killed client: RST, not a polite FIN after reading."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


class Gate:
    """A point in the server that waits until the test opens it; `reached` tells the test the
    server got there. Usable from the model thread (`wait_blocking`) and the event loop (`wait`)."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.opened = threading.Event()

    def wait_blocking(self, timeout: float = 20.0) -> None:
        self.reached.set()
        self.opened.wait(timeout)

    async def wait(self, timeout: float = 20.0) -> None:
        self.reached.set()
        deadline = time.monotonic() + timeout
        while not self.opened.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def wait_reached(self, timeout: float = 20.0) -> None:
        assert self.reached.wait(timeout), "the server never reached the gate"

    def open(self) -> None:
        self.opened.set()


def gated_tower(service: Any, tower: str, gate: Gate) -> Callable[[], None]:
    """Make `tower`'s forward pass wait at `gate`; returns the undo function."""
    original = service.batcher.towers[tower]

    def encode(batch: Any) -> Any:
        gate.wait_blocking()
        return original.encode(batch)

    service.batcher.towers[tower] = type(original)(tower, encode)
    return lambda: service.batcher.towers.__setitem__(tower, original)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def net_units(ledger: list[dict[str, str]]) -> int:
    """Debits minus refunds: what `spent` must equal."""
    return sum(int(e["units"]) for e in ledger if e["event"] == "debit") - \
        sum(int(e["units"]) for e in ledger if e["event"] == "refund")


def events(ledger: list[dict[str, str]]) -> list[tuple[str, ...]]:
    return [(e["event"], e["units"], e.get("reason", "")) for e in ledger]
