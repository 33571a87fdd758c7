"""vendor-admin against the embedded Redis default, and the vendor keeping quotas across a
restart of both processes (append-only persistence in VENDOR_DATA_DIR)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port


def _env(data_dir: Path, teacher_dir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "VENDOR_REDIS_URL")}
    env.update({"HF_HUB_OFFLINE": "1", "VENDOR_DATA_DIR": str(data_dir)})
    if teacher_dir is not None:
        env["VENDOR_TEACHER"] = f"local-dir:{teacher_dir}"
    return env


def admin(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vendor_api.admin_cli", *args], env=_env(data_dir),
                          capture_output=True, text=True, timeout=60)


def test_key_lifecycle(tmp_path):
    created = admin(tmp_path, "create-key", "--name", "acme", "--quota", "500", "--rate-per-s", "3")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("vk-") and len(key) > 40
    listing = admin(tmp_path, "list")
    assert "acme: quota=500 spent=0 remaining=500 rate=3/s" in listing.stdout
    assert key not in listing.stdout  # shown once, never again
    assert "quota=600" in admin(tmp_path, "top-up", "acme", "100").stdout
    assert "revoked" in admin(tmp_path, "revoke", "acme").stdout
    assert "revoked" in admin(tmp_path, "usage", "acme").stdout
    events = admin(tmp_path, "ledger", "acme").stdout
    assert [line.split()[1] for line in events.splitlines()] == ["event=create", "event=top_up", "event=revoke"]


@pytest.mark.parametrize("args,message", [
    (["usage", "nobody"], "no key named 'nobody'"),
    (["top-up", "nobody", "5"], "no key named 'nobody'"),
    (["create-key", "--name", "bad name!", "--quota", "5"], "key name must be"),
    (["create-key", "--name", "x", "--quota", "5", "--protection", "lasers"], "unknown protection mode"),
])
def test_bad_admin_commands_fail_with_one_clear_line(tmp_path, args, message):
    result = admin(tmp_path, *args)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("vendor-admin: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["create-key", "--name", "x", "--quota", "-5"], ["top-up", "x", "0"], ["frobnicate"]])
def test_bad_arguments_are_usage_errors(tmp_path, args):
    result = admin(tmp_path, *args)
    assert result.returncode == 2 and "usage:" in result.stderr and "Traceback" not in result.stderr


def test_duplicate_key_name_is_refused(tmp_path):
    assert admin(tmp_path, "create-key", "--name", "dup", "--quota", "1").returncode == 0
    again = admin(tmp_path, "create-key", "--name", "dup", "--quota", "1")
    assert again.returncode == 1 and "already exists" in again.stderr


class Server:
    """`vendor-api serve` as a real subprocess with the embedded Redis default."""

    def __init__(self, data_dir: Path, teacher_dir: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vendor_api.cli", "serve", "--port", str(self.port)],
            env=_env(data_dir, teacher_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, self.process.stdout.read() if self.process.stdout else ""
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "vendor did not become ready"
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def test_embedded_redis_keeps_quotas_across_restarts(tmp_path, tiny_teacher_dir):
    data_dir = tmp_path / "vendor-data"
    server = Server(data_dir, tiny_teacher_dir)
    try:
        created = admin(data_dir, "create-key", "--name", "acme", "--quota", "10")  # reuses the server's Redis
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip().splitlines()[-1]
        headers = {"Authorization": f"Bearer {key}"}
        model = httpx.get(server.url + "/v1/models", headers=headers).json()["data"][0]["id"]
        r = httpx.post(server.url + "/v1/embeddings", headers=headers, json={"model": model, "input": ["a", "b", "c"]})
        assert r.status_code == 200 and r.headers["x-units-remaining"] == "7"
    finally:
        server.stop()
    assert not (data_dir / "redis" / "redis.sock").exists()  # the embedded Redis stopped with the vendor
    server = Server(data_dir, tiny_teacher_dir)
    try:
        usage = httpx.get(server.url + "/v1/usage", headers=headers).json()
        assert (usage["spent"], usage["remaining"]) == (3, 7)
    finally:
        server.stop()
    assert "spent=3" in admin(data_dir, "usage", "acme").stdout
