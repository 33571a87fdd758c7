"""The metering guarantees on a real Redis Cluster: three `redis-server --cluster-enabled yes`
primaries on loopback ports, formed with `redis-cli --cluster create`, vendors built with
redis-py's `RedisCluster` (`redis+cluster://` URL or `VENDOR_REDIS_CLUSTER=true`).

- concurrent clients on two replicas spend quotas that live on three different primaries exactly;
- idempotent replays, and scripts re-sent after `NOSCRIPT` (every primary's script cache flushed);
- SIGKILL of one primary: its keys get 503 while it is down, other keys keep being served, no
  answer is served unmetered, and it recovers once the node is back;
- `vendor-admin` against the cluster, and where the name index lives.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from redis.crc import key_slot

from tests.support.cluster import admin_cli, admin_in_process, keys_on_distinct_primaries
from tests.support.hardening import net_units
from tests.support.load import drain_quotas
from vendor_api.accounts import NAMES_KEY
from vendor_api.redis_client import parse_cluster_url, as_cluster_url

QUOTA = 61  # per key; not a multiple of any request size, so the last units go one by one
CLIENTS = 10


def test_ten_clients_on_two_replicas_spend_quotas_on_three_primaries_exactly(make_cluster_vendor, redis_cluster):
    replicas = [make_cluster_vendor(max_wait_ms=2), make_cluster_vendor(max_wait_ms=2)]
    keys = keys_on_distinct_primaries(replicas[0], redis_cluster, 3, quota=QUOTA)
    assert len({port for _, _, port in keys}) == 3
    run = drain_quotas(replicas, lambda i: keys[i % 3][:2], clients=CLIENTS, max_size=4)
    assert set(run.statuses) == {200, 402}
    for name, _, _ in keys:
        account = replicas[1].account(name)
        assert run.served[name] == run.charged[name] == account.spent == net_units(replicas[1].ledger(name)) == QUOTA


def test_idempotent_replay_and_scripts_resent_after_noscript(make_cluster_vendor, redis_cluster):
    vendor = make_cluster_vendor()
    api_key = vendor.create_key(quota=20)
    body = {"model": vendor.model_id, "input": ["a", "b"]}
    with vendor.client(api_key) as client:
        first = client.post("/v1/embeddings", json=body, headers={"Idempotency-Key": "batch-1"})
        again = client.post("/v1/embeddings", json=body, headers={"Idempotency-Key": "batch-1"})
        other = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": ["c"]},
                            headers={"Idempotency-Key": "batch-1"})
        with redis_cluster.sync_client() as store:
            store.script_flush()  # every primary forgets every script: the next calls get NOSCRIPT
            assert not any(store.script_exists("0" * 40))
        fresh = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": ["d"]},
                            headers={"Idempotency-Key": "batch-2"})
        replay_after_flush = client.post("/v1/embeddings", json=body, headers={"Idempotency-Key": "batch-1"})
    assert first.status_code == again.status_code == fresh.status_code == replay_after_flush.status_code == 200
    assert again.json() == first.json() == replay_after_flush.json()
    assert again.headers["idempotent-replayed"] == "true" and again.headers["x-units-charged"] == "0"
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert vendor.account().spent == 3
    assert [e["event"] for e in vendor.ledger() if e["event"] in ("debit", "refund")] == ["debit", "debit"]


def test_sigkill_of_one_primary_fails_its_keys_closed_and_recovers(make_cluster_vendor, redis_cluster):
    vendor = make_cluster_vendor()
    (victim_name, victim_key, victim_port), (survivor_name, survivor_key, _) = \
        keys_on_distinct_primaries(vendor, redis_cluster, 2, quota=10**6, prefix="f")
    victim_node = next(n for n in redis_cluster.nodes if n.port == victim_port)
    phase = {"now": "before"}
    seen: dict[str, list[tuple[str, int, str]]] = {victim_name: [], survivor_name: []}
    served = {victim_name: 0, survivor_name: 0}
    stop = threading.Event()

    def load(name: str, api_key: str) -> None:
        with vendor.client(api_key) as client:
            n = 0
            while not stop.is_set():
                n += 1
                r = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": [f"{name} {n}", "x"]},
                                headers={"Idempotency-Key": f"{name}-{n}"})
                code = r.json().get("error", {}).get("code", "") if r.status_code != 200 else ""
                seen[name].append((phase["now"], r.status_code, code))
                if r.status_code == 200:
                    served[name] += len(r.json()["data"])
                else:
                    time.sleep(0.05)

    threads = [threading.Thread(target=load, args=(victim_name, victim_key)),
               threading.Thread(target=load, args=(survivor_name, survivor_key))]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        phase["now"] = "down"
        redis_cluster.kill(victim_node)
        time.sleep(2.5)  # past the cluster's node timeout (1 s): the others have marked it failed
        ready_while_down = httpx.get(vendor.base_url + "/readyz", timeout=10)
        phase["now"] = "restarting"
        redis_cluster.restart(victim_node)
        phase["now"] = "back"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(p == "back" and s == 200 for p, s, _ in seen[victim_name]):
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)

    victim, survivor = seen[victim_name], seen[survivor_name]
    down = [(s, c) for p, s, c in victim if p == "down"]
    assert down and all(s == 503 for s, _ in down[1:]), down[:5]  # the first may have been in flight
    assert {c for s, c in down if s == 503} <= {"metering_unavailable", "debit_lapsed"}
    assert any(p == "back" and s == 200 for p, s, _ in victim), "the key did not recover after the restart"
    assert {s for _, s, _ in victim} <= {200, 503}
    assert [s for p, s, _ in survivor if p == "down"] and all(s == 200 for p, s, _ in survivor if p == "down")
    assert ready_while_down.status_code == 200, ready_while_down.text  # a partial outage keeps replicas in
    # nobody paid for an answer not received, no answer unpaid: after the background refunds of
    # settles that failed while the node was down, charged == served, and the ledger agrees
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and vendor.account(victim_name).spent != served[victim_name]:
        time.sleep(0.2)
    for name in (victim_name, survivor_name):
        account = vendor.account(name)
        assert account.spent == served[name] == net_units(vendor.ledger(name)), name


def test_vendor_admin_on_the_cluster_and_the_name_index(make_cluster_vendor, redis_cluster, monkeypatch, capsys):
    """`vendor:names` is one hash in the slot of its own name, on one primary. Only the admin
    commands read it (a request finds its account by the key's digest), so while that primary
    is down every key on the other primaries is still served, and admin commands fail with one
    clear line until it is back."""
    seed = redis_cluster.nodes[0].port
    created = admin_cli(f"redis://127.0.0.1:{seed}", "create-key", "--name", "acme", "--quota", "50",
                        extra_env={"VENDOR_REDIS_CLUSTER": "true"})
    assert created.returncode == 0, created.stderr
    api_key = created.stdout.strip().splitlines()[-1]
    url = redis_cluster.url

    def admin(*args: str) -> tuple[int, str, str]:
        return admin_in_process(monkeypatch, capsys, url, *args)

    assert "quota=80" in admin("top-up", "acme", "30")[1]
    assert "acme: quota=80 spent=0 remaining=80" in admin("list")[1]
    names_node = redis_cluster.node_for_key(NAMES_KEY)
    with redis_cluster.sync_client() as store:
        assert store.hget(NAMES_KEY, "acme") is not None
        assert store.cluster_keyslot(NAMES_KEY) == key_slot(NAMES_KEY.encode())
    vendor = make_cluster_vendor()
    # an account on another primary than the name index, so that it can be served while it is down
    (_, other_key, _), = [k for k in keys_on_distinct_primaries(vendor, redis_cluster, 3, quota=50, prefix="n")
                          if k[2] != names_node.port][:1]
    redis_cluster.kill(names_node)
    try:
        with vendor.client(other_key) as client:
            r = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": ["still served"]})
        code, _, err = admin("list")
    finally:
        redis_cluster.restart(names_node)
    assert r.status_code == 200, r.text
    assert code == 1 and err.strip().startswith("vendor-admin: metering is unavailable")
    assert len(err.strip().splitlines()) == 1
    with vendor.client(api_key) as client:
        assert client.post("/v1/embeddings", json={"model": vendor.model_id, "input": ["a"]}).status_code == 200
    code, usage, err = admin("usage", "acme")
    assert "quota=80 spent=1 remaining=79" in usage, err
    events = admin("ledger", "acme")[1].splitlines()
    assert [line.split()[1] for line in events] == ["event=create", "event=top_up", "event=debit"]


@pytest.mark.parametrize("url,message", [
    ("unix:///tmp/r.sock", "needs a redis:// or rediss://"),
    ("redis://127.0.0.1:6379/2", "only database 0"),
])
def test_cluster_setting_refuses_urls_a_cluster_cannot_have(url, message):
    with pytest.raises(ValueError, match=message):
        as_cluster_url(url)


def test_cluster_urls_name_seed_nodes_and_credentials():
    assert as_cluster_url("redis://10.0.0.1:7000/0") == "redis+cluster://10.0.0.1:7000"
    nodes, options = parse_cluster_url("rediss+cluster://app:s%40cret@a.example:7000,b.example:7001")
    assert [(n.host, n.port) for n in nodes] == [("a.example", 7000), ("b.example", 7001)]
    assert options == {"ssl": True, "username": "app", "password": "s@cret"}
    with pytest.raises(ValueError, match="host:port"):
        parse_cluster_url("redis+cluster://a.example")


def test_cluster_setting_without_redis_url_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VENDOR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("VENDOR_REDIS_CLUSTER", "true")
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("VENDOR_REDIS_URL", raising=False)
    from vendor_api.admin_cli import main

    assert main(["list"]) == 1
    assert "VENDOR_REDIS_CLUSTER=true needs REDIS_URL" in capsys.readouterr().err


def test_export_ledger_and_trim_on_the_cluster(make_cluster_vendor, redis_cluster, monkeypatch, capsys):
    """Cursors, the commit-and-trim script and the exporter's lock each touch one slot, so the
    export runs on a cluster as on one node: accounts on three primaries, each event once."""
    vendor = make_cluster_vendor()
    keys = keys_on_distinct_primaries(vendor, redis_cluster, 3, quota=100, prefix="x")
    for _, api_key, _ in keys:
        with vendor.client(api_key) as client:
            assert client.post("/v1/embeddings", json={"model": vendor.model_id, "input": ["a", "b"]}).status_code == 200
    code, out, err = admin_in_process(monkeypatch, capsys, redis_cluster.url, "export-ledger", "--trim")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    for name, _, _ in keys:
        assert [e["data"]["event"] for e in events if e["subject"] == name] == ["create", "debit"]
    assert len({e["id"] for e in events}) == len(events)
    with redis_cluster.sync_client() as store:
        for name, _, _ in keys:
            assert store.xlen(f"vendor:{{{vendor.account(name).digest}}}:ledger") == 0
    code, out, _ = admin_in_process(monkeypatch, capsys, redis_cluster.url, "export-ledger", "--trim")
    assert code == 0 and out == ""
