"""Shared fixtures: a real Redis server, a real (tiny, seeded) open_clip teacher, and real
vendor servers on 127.0.0.1 that stop by themselves at the end of each test.

The tests live by subject, each folder with its own conftest.py: ``vendor/`` (API, metering,
keys, hardening, protection), ``client/`` (buying, training, commands), ``faults/`` (kills and
outages across the boundary), ``repo/`` (docs, deployment files, house rules); the helpers they
share are in ``support/``."""

from __future__ import annotations

import asyncio
import contextlib
import atexit
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx
import pytest
import redis
import uvicorn

from vendor_api.app import create_app
from vendor_api.cli import uvicorn_config
from vendor_api.embedded_redis import EmbeddedRedis
from vendor_api.key_admin import KeyAdmin
from vendor_api.model_files import write_seeded_local_dir
from vendor_api.settings import VendorSettings
from vendor_api.teacher import Teacher


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_seeded_local_dir(tmp_path_factory.mktemp("teacher") / "tiny-clip", seed=0)


@pytest.fixture(scope="session")
def teacher(tiny_teacher_dir: Path) -> Teacher:
    return Teacher.load(f"local-dir:{tiny_teacher_dir}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: EmbeddedRedis) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


def run_sync(coro: Any) -> Any:
    return asyncio.run(coro)


async def _create_key(url: str, name: str, quota: int, rate: float, burst: int, protection: str) -> str:
    keys = KeyAdmin.from_url(url)
    try:
        key, _ = await keys.create_key(name, quota=quota, rate_per_s=rate, burst=burst, protection=protection)
        return key
    finally:
        await keys.close()


@dataclass
class LiveVendor:
    base_url: str
    settings: VendorSettings
    redis_url: str
    model_id: str
    server: uvicorn.Server

    def create_key(self, name: str = "client", quota: int = 1000, rate: float = 1000.0, burst: int = 1000,
                   protection: str = "none") -> str:
        return run_sync(_create_key(self.redis_url, name, quota, rate, burst, protection))

    def client(self, api_key: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30, **kw)

    def account(self, name: str = "client") -> Any:
        async def get() -> Any:
            keys = KeyAdmin.from_url(self.redis_url)
            try:
                return await keys.get_account(name)
            finally:
                await keys.close()
        return run_sync(get())

    def ledger(self, name: str = "client") -> list[dict[str, str]]:
        async def get() -> Any:
            keys = KeyAdmin.from_url(self.redis_url)
            try:
                return await keys.ledger(name)
            finally:
                await keys.close()
        return run_sync(get())


def start_vendor(teacher: Teacher, redis_url: str, **overrides: Any) -> tuple[LiveVendor, threading.Thread]:
    if "data_dir" not in overrides:  # never write into the checkout (generated protection secrets)
        overrides["data_dir"] = Path(tempfile.mkdtemp(prefix="vendor-data-"))
        atexit.register(shutil.rmtree, overrides["data_dir"], ignore_errors=True)
    settings = VendorSettings(teacher="unused-in-tests:x", host="127.0.0.1", port=0, **overrides)
    app = create_app(settings, teacher, redis_url)
    config = uvicorn_config(app, settings, port=0, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("vendor failed to start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return LiveVendor(f"http://127.0.0.1:{port}", settings, redis_url, teacher.model_id, server), thread


@contextlib.contextmanager
def vendor_on_own_redis(teacher: Teacher, redis_dir: Path, **overrides: Any
                        ) -> Iterator[tuple[LiveVendor, EmbeddedRedis]]:
    """A vendor on a Redis of its own, for tests that kill and restart Redis (the session's shared
    Redis must stay up for every other test). Both stop when the block ends."""
    own_redis = EmbeddedRedis(redis_dir, port=free_port())
    own_redis.start()
    vendor, thread = start_vendor(teacher, own_redis.url, **overrides)
    try:
        yield vendor, own_redis
    finally:
        vendor.server.should_exit = True
        thread.join(timeout=15)
        own_redis.stop()


def vendor_factory(teacher: Teacher, redis_url: str) -> Iterator[Callable[..., LiveVendor]]:
    """Yields ``make(**settings)``, which starts a vendor replica (uvicorn on 127.0.0.1) metering
    against ``redis_url``; every replica it started stops when the generator resumes. The body of
    the single-Redis and the Redis-Cluster ``make_*vendor`` fixtures."""
    started: list[tuple[LiveVendor, threading.Thread]] = []

    def make(**overrides: Any) -> LiveVendor:
        vendor, thread = start_vendor(teacher, redis_url, **overrides)
        started.append((vendor, thread))
        return vendor

    yield make
    for vendor, thread in started:
        vendor.server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture()
def make_vendor(teacher: Teacher, redis_url: str) -> Iterator[Callable[..., LiveVendor]]:
    yield from vendor_factory(teacher, redis_url)


@pytest.fixture()
def vendor(make_vendor: Callable[..., LiveVendor]) -> LiveVendor:
    return make_vendor()
