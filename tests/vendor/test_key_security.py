"""Keys under attack: guessing is rate-limited per client address, keys never leak (logs, lists,
usage), one key cannot touch another's account, and admin operations need the admin secret."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import httpx

from client_distiller.buying.local_vendor import LocalVendor
from tests.conftest import vendor_on_own_redis
from vendor_api import app as app_module

ADMIN = "admin-" + "s" * 40


def _embed(client: httpx.Client, vendor, text: str = "x") -> httpx.Response:
    return client.post("/v1/embeddings", json={"model": vendor.model_id, "input": text})


def _from(vendor, address: str, key: str | None) -> httpx.Client:
    """A client whose requests come from `address` (any 127.x address reaches the loopback server)."""
    return vendor.client(key, transport=httpx.HTTPTransport(local_address=address))


def test_guessing_keys_locks_out_the_address_failures_not_its_valid_keys(make_vendor):
    vendor = make_vendor(auth_max_failures=3)
    key = vendor.create_key(quota=10)
    with _from(vendor, "127.0.0.1", None) as guesser:
        guesses = []
        for i in range(3):
            r = guesser.post("/v1/embeddings", json={"model": vendor.model_id, "input": "x"},
                             headers={"Authorization": f"Bearer vk-guess-{i}"})
            guesses.append(r.status_code)
        assert guesses == [401, 401, 401]
        locked = guesser.get("/v1/usage", headers={"Authorization": "Bearer vk-guess-3"})
        assert locked.status_code == 429 and locked.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(locked.headers["retry-after"]) <= 60
        # a valid key from the same (shared, NAT) address still gets through (issue 12)...
        valid = guesser.post("/v1/embeddings", json={"model": vendor.model_id, "input": "x"},
                             headers={"Authorization": f"Bearer {key}"})
        assert valid.status_code == 200 and valid.headers["x-units-charged"] == "1"
        # ...while the address's failed authentications stay refused
        assert guesser.get("/v1/models", headers={"Authorization": "Bearer vk-guess-4"}).status_code == 429
    with _from(vendor, "127.0.0.2", key) as honest:  # another address is not affected
        assert _embed(honest, vendor).status_code == 200
    assert vendor.account().spent == 2
    assert [e["event"] for e in vendor.ledger()] == ["create", "debit", "debit"]


def test_lockout_ends_with_its_window(make_vendor):
    vendor = make_vendor(auth_max_failures=2, auth_failure_window_s=1)
    key = vendor.create_key(quota=10)
    with vendor.client("vk-wrong") as guesser:
        assert [guesser.get("/v1/models").status_code for _ in range(3)] == [401, 401, 429]
    time.sleep(1.1)
    with vendor.client(key) as client:
        assert client.get("/v1/models").status_code == 200


def test_guessing_the_admin_secret_is_limited_too(make_vendor):
    vendor = make_vendor(auth_max_failures=2, admin_secret=ADMIN)
    with vendor.client("not-the-secret") as guesser:
        assert [guesser.get("/admin/keys").status_code for _ in range(3)] == [401, 401, 429]
    with _from(vendor, "127.0.0.3", ADMIN) as admin:
        assert admin.get("/admin/keys").status_code == 200


def test_the_guard_fails_closed_when_redis_is_down(teacher, tmp_path):
    with vendor_on_own_redis(teacher, tmp_path / "r", redis_timeout_s=0.5) as (vendor, own_redis):
        key = vendor.create_key(quota=10)
        own_redis.kill()
        for api_key in (key, "vk-wrong"):
            with vendor.client(api_key) as client:
                r = _embed(client, vendor)
            assert r.status_code == 503 and r.json()["error"]["code"] == "metering_unavailable"


def test_one_key_cannot_read_or_change_another_account(make_vendor):
    vendor = make_vendor(admin_secret=ADMIN)
    alice = vendor.create_key(name="alice", quota=10)
    vendor.create_key(name="bob", quota=10, protection="none")
    with vendor.client(alice) as client:
        usage = client.get("/v1/usage", params={"name": "bob"}).json()  # a name parameter is ignored
        assert usage["name"] == "alice" and "api_key" not in usage
        assert client.post("/admin/keys/bob/protection", json={"protection": "noise:0.1"}).status_code == 401
        assert client.post("/admin/keys/bob/top-up", json={"units": 5}).status_code == 401
        assert client.delete("/admin/keys/bob").status_code == 401
        assert client.get("/admin/keys/bob").status_code == 401
    bob = vendor.account("bob")
    assert (bob.quota, bob.spent, bob.protection, bob.active) == (10, 0, "none", True)


def test_admin_secret_is_compared_in_constant_time():
    """Timing cannot be measured reliably on a shared CPU; the comparison's implementation can be
    checked: `hmac.compare_digest`, never `==`, on the secret."""
    source = inspect.getsource(app_module.require_admin)
    assert "hmac.compare_digest(" in source and "== secret" not in source and "secret ==" not in source


def test_keys_are_never_logged_nor_returned_after_creation(tiny_teacher_dir: Path, tmp_path: Path):
    """A real `vendor-api serve` at debug log level sees valid, invalid and admin keys: none is in its log."""
    env = {"VENDOR_LOG_LEVEL": "debug", "VENDOR_ADMIN_SECRET": ADMIN, "VENDOR_TORCH_THREADS": "1"}
    with LocalVendor(tmp_path / "v", teacher=f"local-dir:{tiny_teacher_dir}", extra_env=env) as vendor:
        with httpx.Client(base_url=vendor.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as admin:
            created = admin.post("/admin/keys", json={"name": "acme", "quota": 50})
            assert created.status_code == 201
            key = created.json()["api_key"]
            listed, one = admin.get("/admin/keys"), admin.get("/admin/keys/acme")
            assert listed.status_code == one.status_code == 200
            assert key not in listed.text and key not in one.text
        wrong = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
        with httpx.Client(base_url=vendor.url, timeout=30) as client:
            auth = {"Authorization": f"Bearer {key}"}
            assert client.post("/v1/embeddings", json={"model": "nope", "input": "x"}, headers=auth).status_code == 404
            models = client.get("/v1/models", headers=auth)
            model_id = models.json()["data"][0]["id"]
            ok = client.post("/v1/embeddings", json={"model": model_id, "input": "x"}, headers=auth)
            usage = client.get("/v1/usage", headers=auth)
            bad = client.get("/v1/usage", headers={"Authorization": f"Bearer {wrong}"})
            bad_admin = client.get("/admin/keys", headers={"Authorization": f"Bearer {wrong}"})
        assert ok.status_code == usage.status_code == 200 and bad.status_code == bad_admin.status_code == 401
        for response in (models, ok, usage, bad):
            assert key not in response.text and key not in str(response.headers)
        cli_listing = vendor.admin("list") + vendor.admin("usage", "acme") + vendor.admin("ledger", "acme")
    log = vendor.log_path.read_text(errors="replace")
    assert "GET /v1/usage" in log  # the access log was on: the test looked at a real request log
    secrets = [key, key[3:], wrong, ADMIN]
    for secret in secrets:
        assert secret not in log and secret not in cli_listing
    aof = b"".join(p.read_bytes() for p in (tmp_path / "v" / "redis").rglob("*") if p.is_file())
    assert key.encode() not in aof  # only its hash is stored, even in the append-only file


def test_an_imported_key_works_and_cannot_take_over_another_account(make_vendor):
    """`KeyAdmin.create_key(api_key=...)` (a billing system's keys, a reproducible study's): the key
    authenticates like a drawn one; a malformed key is refused; a key already in use is a Conflict
    that leaves the first account as it was and the new name free."""
    import asyncio

    import pytest

    from vendor_api.errors import Conflict, InvalidRequest
    from vendor_api.key_admin import KeyAdmin

    vendor = make_vendor()
    imported = "vk-" + "a1B2_-" * 7

    async def admin_steps() -> tuple[object, object]:
        keys = KeyAdmin.from_url(vendor.redis_url)
        try:
            key, account = await keys.create_key("imported", quota=5, rate_per_s=100, burst=100, api_key=imported)
            assert key == imported and account.quota == 5
            with pytest.raises(Conflict, match="another account"):
                await keys.create_key("thief", quota=10**6, rate_per_s=100, burst=100, api_key=imported)
            for bad in ("vk-short", "sk-" + "a" * 40, "vk-" + "a" * 40 + "!", "vk-" + "a" * 300):
                with pytest.raises(InvalidRequest):
                    await keys.create_key(f"bad-{len(bad)}", quota=1, rate_per_s=1, burst=1, api_key=bad)
            # the refused name is free again, and the first account kept its quota and name
            again, _ = await keys.create_key("thief", quota=1, rate_per_s=1, burst=1)
            assert again != imported
            return await keys.get_account("imported"), [a.name for a in await keys.list_accounts()]
        finally:
            await keys.close()

    account, names = asyncio.run(admin_steps())
    assert account.quota == 5 and account.spent == 0 and sorted(names) == ["imported", "thief"]
    with vendor.client(imported) as client:
        assert _embed(client, vendor).status_code == 200
    assert vendor.account("imported").spent > 0
