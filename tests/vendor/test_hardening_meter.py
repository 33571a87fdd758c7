"""Issue 12, item 3: no script or transaction leaves a partial write. Every admin number is
checked against ranges the Lua arithmetic handles exactly; a record that slipped in anyway is
refused before anything is written; and a property test throws random admin values and request
sequences at a real Redis and checks `spent == sum of the ledger` for every key."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.hardening import events, net_units
from vendor_api.errors import InsufficientQuota, InvalidRequest, RateLimited, VendorError
from vendor_api.key_admin import MAX_UNITS, KeyAdmin
from vendor_api.metering import AccountKeys, Debit, Meter

ADMIN = "admin-" + "z" * 30


@pytest.mark.parametrize("body", [
    {"name": "tiny-rate", "quota": 10, "rate_per_s": 1e-300},
    {"name": "huge-rate", "quota": 10, "rate_per_s": 1e300},
    {"name": "huge-quota", "quota": 10**30},
    {"name": "quota-past-2-53", "quota": 2**53 + 1},
    {"name": "huge-burst", "quota": 10, "burst": 10**12},
    {"name": "zero-burst", "quota": 10, "burst": 0},
    {"name": "text-quota", "quota": "10"},
    {"name": "bool-quota", "quota": True},
    {"name": "float-quota", "quota": 10.5},
])
def test_admin_numbers_out_of_range_are_one_clear_400_and_write_nothing(make_vendor, body):
    vendor = make_vendor(admin_secret=ADMIN)
    with vendor.client(ADMIN) as admin:
        r = admin.post("/admin/keys", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"]
        assert admin.get("/admin/keys").json() == []
    store = redis.Redis.from_url(vendor.redis_url)
    assert store.hlen("vendor:names") == 0  # the name is not left taken
    store.close()


def test_top_ups_that_would_overflow_are_refused_and_change_nothing(make_vendor):
    vendor = make_vendor(admin_secret=ADMIN)
    with vendor.client(ADMIN) as admin:
        assert admin.post("/admin/keys", json={"name": "acme", "quota": MAX_UNITS - 5}).status_code == 201
        for units in (10**20, 6, 0, -1):
            r = admin.post("/admin/keys/acme/top-up", json={"units": units})
            assert r.status_code == 400, (units, r.text)
        assert admin.post("/admin/keys/acme/top-up", json={"units": 5}).json()["quota"] == MAX_UNITS
    assert vendor.account("acme").quota == MAX_UNITS
    assert events(vendor.ledger("acme")) == [("create", str(MAX_UNITS - 5), ""), ("top_up", "5", "")]


def test_a_corrupt_account_record_is_refused_before_anything_is_written(vendor):
    """A record written before validation existed (rate 1e-300 made every request 500 after
    `HINCRBY spent` had run): now refused first, spent untouched, nothing in the ledger."""
    key = vendor.create_key(quota=10)
    store = redis.Redis.from_url(vendor.redis_url)
    digest = store.hget("vendor:names", "client").decode()
    store.hset(AccountKeys(digest).account, "rate_per_s", "1e-300")
    with vendor.client(key) as client:
        for _ in range(3):
            r = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": "x"})
            assert r.status_code == 500 and r.json()["error"]["code"] == "account_invalid"
    assert vendor.account().spent == 0
    assert [e["event"] for e in vendor.ledger()] == ["create"]
    assert store.get(AccountKeys(digest).tat) is None
    store.close()


# ---------------------------------------------------------------- the property test
_numbers = st.one_of(st.integers(-5, 50), st.integers(10**14, 10**16), st.integers(10**18, 10**31),
                     st.floats(allow_nan=True, allow_infinity=True), st.just(True))
_op = st.one_of(
    st.tuples(st.just("top_up"), _numbers),
    st.tuples(st.just("request"), st.integers(0, 40), st.sampled_from(["delivered", "failed", "void", "crash"]),
              st.booleans()),
    st.tuples(st.just("revoke")),
)


async def _scenario(url: str, quota: object, rate: object, burst: object, ops: list) -> None:
    meter = Meter.from_url(url, inflight_lease_s=1)
    keys = KeyAdmin(meter.redis)
    name = "p-" + uuid.uuid4().hex[:12]
    try:
        try:
            await keys.create_key(name, quota=quota, rate_per_s=rate, burst=burst)  # type: ignore[arg-type]
        except InvalidRequest:
            assert await meter.redis.hget("vendor:names", name) is None
            return
        for n, op in enumerate(ops):
            account = await keys.get_account(name)
            if op[0] == "top_up":
                try:
                    await keys.top_up(name, op[1])  # type: ignore[arg-type]
                except InvalidRequest:
                    pass
            elif op[0] == "revoke":
                await keys.revoke(name)
            else:
                _, units, outcome, idem = op
                key = f"k{n % 3}" if idem else None
                try:
                    await meter.admit(account, units=units, fingerprint=str(units), idempotency_key=key)
                    debit = await meter.debit(account, units=units, images=units, texts=0, fingerprint=str(units),
                                              idempotency_key=key)
                except (InsufficientQuota, RateLimited, VendorError):
                    continue
                if not isinstance(debit, Debit):
                    continue  # a replay
                if outcome == "crash":
                    await meter.redis.zadd(AccountKeys(account.digest).inflight, {debit.request_id: 0})
                    continue  # never settled: the next request of the key reaps it
                first = "delivered" if outcome == "void" else outcome
                await meter.settle(account, debit, outcome=first, idempotency_key=key, body=b"{}")
                if outcome == "void":
                    await meter.settle(account, debit, outcome="void", idempotency_key=key)
                # settle is exactly-once: a retried settle (lost reply) changes nothing
                await meter.settle(account, debit, outcome=first, idempotency_key=key, body=b"{}")
        account = await keys.get_account(name)
        ledger = await keys.ledger(name)
        assert account.spent == net_units(ledger), events(ledger)
        assert account.quota == sum(int(e["units"]) for e in ledger if e["event"] in ("create", "top_up"))
        assert 0 <= account.spent <= account.quota <= MAX_UNITS
    finally:
        await meter.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(quota=_numbers, rate=st.one_of(_numbers, st.floats(1e-3, 1e6)), burst=_numbers,
       ops=st.lists(_op, max_size=12))
def test_random_admin_values_and_requests_keep_spent_equal_to_the_ledger(redis_url, quota, rate, burst, ops):
    asyncio.run(_scenario(redis_url, quota, rate, burst, ops))
