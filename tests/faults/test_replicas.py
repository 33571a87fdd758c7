"""Two vendor replicas (two uvicorn servers, each with its own event loop and Redis connection
pool) on one Redis, many concurrent clients on both, against a small quota: the quota is used to
the last unit and never past it, and served items == charged units == the ledger. And the key
layout that lets that one Redis become a Redis Cluster: one slot per account."""

from __future__ import annotations

import re
from importlib import resources

import redis
from redis.crc import key_slot

from tests.support.hardening import net_units
from tests.support.load import drain_quotas

QUOTA = 97  # not a multiple of any request size: the last units are bought one by one
CLIENTS = 10


def test_two_replicas_share_one_quota_exactly(make_vendor):
    replicas = [make_vendor(max_wait_ms=2), make_vendor(max_wait_ms=2)]
    key = replicas[0].create_key(quota=QUOTA, rate=10_000, burst=10_000)
    run = drain_quotas(replicas, lambda i: ("default", key), clients=CLIENTS, max_size=5)

    account = replicas[1].account()
    ledger = replicas[1].ledger()
    net = net_units(ledger)
    assert set(run.statuses) == {200, 402}
    assert run.served["default"] == run.charged["default"] == account.spent == net == QUOTA
    assert run.statuses.count(402) >= CLIENTS  # every client ended on a refusal, none was served past the quota


def test_every_script_touches_one_cluster_slot_per_account(make_vendor):
    """The Redis Cluster-safe layout (docs/scaling.md): after a workload through every script
    path (debit, idempotent replay, refund, lease reaping, a failed authentication), every key of
    an account hashes to that account's slot, and the scripts name no key outside `KEYS` except
    the idempotency record that they themselves created under the account's hash tag."""
    vendor = make_vendor(inflight_lease_s=1)
    keys = {name: vendor.create_key(name=name, quota=100) for name in ("alice", "bob")}
    for name, key in keys.items():
        with vendor.client(key) as client:
            body = {"model": vendor.model_id, "input": [name, "x"]}
            assert client.post("/v1/embeddings", json=body, headers={"Idempotency-Key": "k1"}).status_code == 200
            assert client.post("/v1/embeddings", json=body, headers={"Idempotency-Key": "k1"}).status_code == 200
            assert client.post("/v1/embeddings", json={"model": vendor.model_id, "input": "y"}).status_code == 200
    with vendor.client("vk-nobody") as client:
        assert client.get("/v1/usage").status_code == 401
    store = redis.Redis.from_url(vendor.redis_url)
    names = [k.decode() for k in store.keys("*")]
    digests = {d.decode() for d in store.hvals("vendor:names")}
    store.close()
    assert len(digests) == 2
    for digest in digests:
        account_keys = [n for n in names if f"{{{digest}}}" in n]
        assert len(account_keys) >= 4 and any(":idem:" in n for n in account_keys)
        assert {key_slot(n.encode()) for n in account_keys} == {key_slot(f"vendor:{{{digest}}}:acct".encode())}
    others = set(names) - {n for d in digests for n in names if f"{{{d}}}" in n}
    assert {"vendor:names", "vendor:authfail:{127.0.0.1}"} <= others  # global single-key records
    assert not any(d in n for d in digests for n in others)  # no account data outside its slot
    for script in (s for s in resources.files("vendor_api").joinpath("lua").iterdir() if s.name.endswith(".lua")):
        source = script.read_text()
        calls = re.findall(r"redis\.call\('(\w+)',\s*([^,)]+)", source)
        outside = {(cmd, arg) for cmd, arg in calls if not arg.startswith("KEYS[") and cmd != "TIME"}
        assert outside <= {("DEL", "idem_key")}, outside  # idem_key was KEYS[6] (same tag) when stored
