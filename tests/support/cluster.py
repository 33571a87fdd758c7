"""Reusable Redis Cluster fixtures: a real 3-primary cluster of `redis-server` processes on
loopback ports (`vendor_api/local_cluster.py`), started once per test module that imports these
fixtures and emptied before each test.

tests/vendor/conftest.py registers the fixtures for the vendor tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.conftest import LiveVendor, vendor_factory

from vendor_api.local_cluster import LocalRedisCluster
from vendor_api.metering import AccountKeys


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("cluster"), primaries=3)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture()
def cluster_url(redis_cluster: LocalRedisCluster) -> str:
    """The cluster's `redis+cluster://` URL, every node running and every primary empty."""
    for node in redis_cluster.nodes:
        if node.process is None or node.process.poll() is not None:
            redis_cluster.restart(node)  # a test that killed a node and failed before restarting it
    redis_cluster.flushall()
    return redis_cluster.url


def port_of_account(cluster: LocalRedisCluster, digest: str) -> int:
    """The port of the primary that holds an account's keys (its hash tag's slot)."""
    return cluster.node_for_key(AccountKeys(digest).account).port


def admin_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str,
                     *args: str) -> tuple[int, str, str]:
    """`vendor-admin ARGS` in this process (its `main`, so the same parsing and error handling as
    the command, without a Python start-up per call): (exit code, stdout, stderr)."""
    from vendor_api.admin_cli import main

    for name in ("VENDOR_REDIS_URL", "VENDOR_REDIS_CLUSTER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDIS_URL", url)
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def admin_cli(url: str, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`vendor-admin ARGS` as a subprocess against `url` (any Redis URL)."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "VENDOR_REDIS_URL", "VENDOR_REDIS_CLUSTER")}
    env.update({"HF_HUB_OFFLINE": "1", "REDIS_URL": url, **(extra_env or {})})
    return subprocess.run([sys.executable, "-m", "vendor_api.admin_cli", *args], env=env, capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])


@pytest.fixture()
def make_cluster_vendor(teacher, cluster_url: str) -> Iterator[Callable[..., LiveVendor]]:
    """Vendor replicas (uvicorn on 127.0.0.1) metering against the cluster; they stop at the end."""
    yield from vendor_factory(teacher, cluster_url)


def keys_on_distinct_primaries(vendor: LiveVendor, cluster: LocalRedisCluster, count: int, *, quota: int,
                               prefix: str = "k") -> list[tuple[str, str, int]]:
    """Create keys until `count` of them live on `count` different primaries; returns (name, API
    key, port) of those (the others stay, unused). Digests are random, so this takes a few tries."""
    chosen: dict[int, tuple[str, str, int]] = {}
    for attempt in range(200):
        name = f"{prefix}{attempt}"
        api_key = vendor.create_key(name=name, quota=quota, rate=100_000, burst=100_000)
        port = port_of_account(cluster, vendor.account(name).digest)
        chosen.setdefault(port, (name, api_key, port))
        if len(chosen) == count:
            return list(chosen.values())
    raise AssertionError(f"no {count} keys on distinct primaries after 200 tries")
