"""Start a real vendor as a separate process on 127.0.0.1, as a real client would meet one.

The demo and the experiment runner need a vendor; they start `vendor-api serve` (with its own
embedded Redis in a data directory) and create keys with `vendor-admin`, then talk HTTP. The
client package never imports the vendor's code: the process boundary is the product's boundary.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import httpx

from client_distiller.errors import RunError


class LocalVendorError(RunError):
    """The local vendor did not start, or an admin command failed."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalVendor:
    """`with LocalVendor(data_dir) as vendor: key = vendor.create_key("me", 1000)`."""

    def __init__(self, data_dir: Path, *, teacher: str | None = None, port: int | None = None,
                 extra_env: dict[str, str] | None = None, startup_timeout_s: float = 900.0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout_s = startup_timeout_s
        self.env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "VENDOR_REDIS_URL", "VENDOR_TEACHER")}
        self.env.update({"VENDOR_DATA_DIR": str(self.data_dir), "VENDOR_HOST": "127.0.0.1",
                         "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
        if teacher:
            self.env["VENDOR_TEACHER"] = teacher
        self.env.update(extra_env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "vendor.log"

    def _run(self, module: str, *args: str, timeout: float = 120.0) -> str:
        result = subprocess.run([sys.executable, "-m", module, *args], env=self.env, capture_output=True,
                                text=True, timeout=timeout)
        if result.returncode != 0:
            raise LocalVendorError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else
                                   f"{module} {' '.join(args)} failed with exit code {result.returncode}")
        return result.stdout

    def build_demo_teacher(self, *, size: str = "full") -> None:
        """Build (or reuse) the offline demo teacher where the vendor will look for it, with the
        build's own progress output on the terminal."""
        target = self.data_dir / "demo-teacher"
        if (target / "open_clip_config.json").is_file():
            return
        result = subprocess.run([sys.executable, "-m", "vendor_api.admin_cli", "build-demo-teacher",
                                 "--out", str(target), "--size", size], env=self.env)
        if result.returncode != 0:
            raise LocalVendorError("building the demo teacher failed")

    def start(self) -> "LocalVendor":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vendor_api.cli", "serve", "--port", str(self.port)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise LocalVendorError("the vendor exited during start-up: " + " | ".join(tail))
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise LocalVendorError(f"the vendor was not ready within {self.startup_timeout_s:.0f}s")
            time.sleep(0.25)

    def create_key(self, name: str, quota: int, *, rate_per_s: float | None = None, burst: int | None = None,
                   protection: str | None = None) -> str:
        args = ["create-key", "--name", name, "--quota", str(quota)]
        if rate_per_s is not None:
            args += ["--rate-per-s", str(rate_per_s)]
        if burst is not None:
            args += ["--burst", str(burst)]
        if protection is not None:
            args += ["--protection", protection]
        return self._run("vendor_api.admin_cli", *args).strip().splitlines()[-1]

    def admin(self, *args: str, timeout: float = 120.0) -> str:
        return self._run("vendor_api.admin_cli", *args, timeout=timeout)

    def check_protection(self, specs: Sequence[str]) -> list[str]:
        """The vendor's own parse of protection specs (normalised, e.g. `rotate` -> `rotate:16`),
        or `LocalVendorError` naming the bad one; needs no running vendor, Redis or model."""
        return self.admin("check-protection", *specs).split()

    def set_protection(self, name: str, protection: str) -> None:
        """Change a key's protection mode, as the vendor's operator does (never the key holder)."""
        self.admin("set-protection", name, protection)

    def verify_watermark(self, name: str, probe: Path, suspect: Path) -> dict[str, Any]:
        """The vendor's watermark test of key ``name`` on a suspect model: ``suspect`` (.npy) holds
        the suspect's teacher-space embeddings of the probe images, ``probe`` is their folder
        (sorted by path) or an .npz of their clean teacher embeddings in the same order.
        Returns ``{"p_value", "triggered", "untriggered", "detected"}``."""
        text = self.admin("verify-watermark", name, "--probe", str(probe), "--suspect", str(suspect), "--json",
                          timeout=600.0)
        try:
            return dict(json.loads(text.strip().splitlines()[-1]))
        except (ValueError, IndexError) as exc:
            raise LocalVendorError(f"verify-watermark printed no JSON result: {text.strip()[-200:]!r}") from exc

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "LocalVendor":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
