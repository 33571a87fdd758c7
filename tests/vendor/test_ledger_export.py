"""`vendor-admin export-ledger` against a real Redis: every debit, refund, replay, top-up (and
create, revoke) event once, as CloudEvents JSON lines or CSV; the cursor in Redis; a SIGKILLed
exporter resumes without loss or duplicate; `--trim` keeps what another consumer still needs."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import multiprocessing
import os
import random
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import redis

from tests.support.cluster import admin_in_process
from tests.conftest import run_sync
from vendor_api.key_admin import KeyAdmin
from vendor_api.ledger_events import CSV_COLUMNS
from vendor_api.ledger_export import ExportOptions, FileSink, LedgerExporter
from vendor_api.metering import AccountKeys, Meter


def _export(monkeypatch, capsys, url: str, *args: str) -> tuple[int, list[str], str]:
    code, out, err = admin_in_process(monkeypatch, capsys, url, "export-ledger", *args)
    return code, out.splitlines(), err


def test_every_event_kind_once_as_cloudevents_and_the_cursor_moves(vendor, monkeypatch, capsys):
    key = vendor.create_key(name="acme", quota=40)
    body = {"model": vendor.model_id, "input": ["a", "b", "c"]}
    with vendor.client(key) as client:
        paid = client.post("/v1/embeddings", json=body, headers={"Idempotency-Key": "k1"})
        replayed = client.post("/v1/embeddings", json=body, headers={"Idempotency-Key": "k1"})
    assert paid.status_code == replayed.status_code == 200 and replayed.headers["x-units-charged"] == "0"

    async def refund_one() -> str:
        meter = Meter.from_url(vendor.redis_url)
        try:
            keys = KeyAdmin(meter.redis)
            account = await keys.get_account("acme")
            debit = await meter.debit(account, units=2, images=1, texts=1, fingerprint="f", idempotency_key=None)
            await meter.settle(account, debit, outcome="failed", idempotency_key=None, reason="inference_failed")
            await keys.top_up("acme", 10)
            return debit.request_id
        finally:
            await meter.close()

    refunded_id = run_sync(refund_one())
    started = time.time()
    code, lines, err = _export(monkeypatch, capsys, vendor.redis_url, "--source", "https://vendor.example/ledger")
    assert code == 0, err
    events = [json.loads(line) for line in lines]
    assert [e["data"]["event"] for e in events] == ["create", "debit", "replay", "debit", "refund", "top_up"]
    digest = vendor.account("acme").digest
    for event in events:
        assert event["specversion"] == "1.0" and event["source"] == "https://vendor.example/ledger"
        assert event["subject"] == "acme" and event["type"] == f"vendor.ledger.{event['data']['event']}"
        assert event["id"].startswith(digest[:32] + "-")
        assert abs(datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp() - started) < 120
    assert len({e["id"] for e in events}) == len(events)
    create, debit, replay, _, refund, top_up = (e["data"] for e in events)
    assert create["units"] == 40 and top_up["units"] == 10 and create["net_units"] == top_up["net_units"] == 0
    assert debit == {"event": "debit", "units": 3, "net_units": 3, "items": 3, "images": 0, "texts": 3,
                     "request_id": debit["request_id"], "idempotency": debit["idempotency"], "reason": None}
    assert len(debit["request_id"]) == 32 and len(debit["idempotency"]) == 32
    assert replay["units"] == replay["net_units"] == 0 and replay["request_id"] == debit["request_id"]
    assert replay["idempotency"] == debit["idempotency"] and replay["items"] is None
    assert refund["request_id"] == refunded_id and refund["net_units"] == -2 and refund["reason"] == "inference_failed"
    assert sum(e["data"]["net_units"] for e in events) == vendor.account("acme").spent == 3
    assert "exported 6 ledger events" in err

    code, lines, _ = _export(monkeypatch, capsys, vendor.redis_url)
    assert code == 0 and lines == []  # the cursor is in Redis: nothing twice
    with vendor.client(key) as client:
        assert client.post("/v1/embeddings", json={"model": vendor.model_id, "input": "d"}).status_code == 200
    code, lines, _ = _export(monkeypatch, capsys, vendor.redis_url)
    assert [json.loads(line)["data"]["event"] for line in lines] == ["debit"]
    code, lines, _ = _export(monkeypatch, capsys, vendor.redis_url, "--since", "0")  # a backfill: all, cursor kept
    assert code == 0 and len(lines) == 7
    assert _export(monkeypatch, capsys, vendor.redis_url)[1] == []


def test_csv_rows_carry_the_same_fields(vendor, monkeypatch, capsys, tmp_path):
    key = vendor.create_key(name="beta", quota=10)
    with vendor.client(key) as client:
        r = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": ["x", "y"]})
    out = tmp_path / "ledger.csv"
    assert _export(monkeypatch, capsys, vendor.redis_url, "--format", "csv", "--out", str(out))[0] == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert [(row["event"], row["units"], row["net_units"], row["items"], row["subject"]) for row in rows] == \
        [("create", "10", "0", "", "beta"), ("debit", "2", "2", "2", "beta")]
    assert len(rows[1]["request_id"]) == 32 and rows[1]["type"] == "vendor.ledger.debit"
    assert r.status_code == 200
    with vendor.client(key) as client:
        assert client.post("/v1/embeddings", json={"model": vendor.model_id, "input": "z"}).status_code == 200
    assert _export(monkeypatch, capsys, vendor.redis_url, "--format", "csv", "--out", str(out))[0] == 0
    text = out.read_text()
    assert text.count("id,source,type") == 1 and len(list(csv.DictReader(io.StringIO(text)))) == 3  # header once


def test_trim_removes_only_what_every_consumer_exported(vendor, monkeypatch, capsys):
    key = vendor.create_key(name="gamma", quota=100)
    ledger_key = AccountKeys(vendor.account("gamma").digest).ledger
    store = redis.Redis.from_url(vendor.redis_url)

    def spend(n: int) -> None:
        with vendor.client(key) as client:
            for i in range(n):
                assert client.post("/v1/embeddings", json={"model": vendor.model_id, "input": f"t{i}"}).status_code == 200

    try:
        spend(2)
        assert len(_export(monkeypatch, capsys, vendor.redis_url, "--consumer", "audit")[1]) == 3
        spend(3)
        code, lines, err = _export(monkeypatch, capsys, vendor.redis_url, "--consumer", "billing", "--trim")
        assert code == 0 and len(lines) == 6 and "trimmed 3 exported entries" in err
        assert store.xlen(ledger_key) == 3  # the three the audit consumer has not exported yet
        assert len(_export(monkeypatch, capsys, vendor.redis_url, "--consumer", "audit")[1]) == 3
        code, lines, err = _export(monkeypatch, capsys, vendor.redis_url, "--consumer", "billing", "--trim")
        assert lines == [] and "trimmed 3" in err and store.xlen(ledger_key) == 0
        spend(1)  # new entries after a full trim get new, larger ids: nothing is exported twice
        assert [json.loads(x)["data"]["event"] for x in _export(monkeypatch, capsys, vendor.redis_url,
                                                                 "--consumer", "audit")[1]] == ["debit"]
    finally:
        store.close()
    assert vendor.account("gamma").spent == 6  # trimming the ledger never touches the balance


@pytest.mark.parametrize("args,message", [
    (["--since", "yesterday"], "--since must be a ledger cursor"),
    (["--since", "0", "--trim"], "--trim needs the stored cursor"),
    (["--consumer", "a b"], "--consumer must be"),
    (["--follow", "--interval", "20"], "--lock-ttl must be at least twice --interval"),
])
def test_bad_export_arguments_are_one_clear_line(redis_url, monkeypatch, capsys, args, message):
    code, lines, err = _export(monkeypatch, capsys, redis_url, *args)
    assert code == 1 and lines == [] and err.strip().startswith("vendor-admin: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_a_second_exporter_for_one_consumer_is_refused(redis_url, monkeypatch, capsys):
    async def hold() -> LedgerExporter:
        meter = Meter.from_url(redis_url)
        exporter = LedgerExporter(meter.redis, FileSink(Path(os.devnull), "cloudevents"), ExportOptions())
        await exporter.acquire()
        await meter.close()
        return exporter

    run_sync(hold())
    code, _, err = _export(monkeypatch, capsys, redis_url)
    assert code == 1 and "another exporter for consumer 'billing' is running" in err
    assert _export(monkeypatch, capsys, redis_url, "--consumer", "other")[0] == 0


def test_a_torn_last_line_is_cut_and_the_export_resumes_after_the_last_whole_event(vendor, monkeypatch, capsys,
                                                                                  tmp_path):
    key = vendor.create_key(name="delta", quota=100)
    with vendor.client(key) as client:
        for i in range(4):
            assert client.post("/v1/embeddings", json={"model": vendor.model_id, "input": f"q{i}"}).status_code == 200
    out = tmp_path / "events.jsonl"
    _, all_lines, _ = _export(monkeypatch, capsys, vendor.redis_url, "--consumer", "probe")
    assert len(all_lines) == 5
    # as if an exporter had written three events and half a fourth, then died before committing
    out.write_text("\n".join(all_lines[:3]) + "\n" + all_lines[3][: len(all_lines[3]) // 2])
    assert _export(monkeypatch, capsys, vendor.redis_url, "--out", str(out))[0] == 0
    assert out.read_text().splitlines() == all_lines


# ---------------------------------------------------------------- SIGKILL, again and again
def _exporter_child(url: str, out: str) -> None:
    """A forked `vendor-admin export-ledger --follow` (forked: a fresh Python would take seconds
    to start on a loaded machine; the kill is the same)."""
    from vendor_api.admin_cli import main

    os.environ["REDIS_URL"] = url
    os._exit(main(["export-ledger", "--follow", "--interval", "0.05", "--lock-ttl", "2", "--batch", "4",
                   "--trim", "--out", out]))


def test_a_sigkilled_exporter_resumes_without_loss_or_duplicate(redis_url, tmp_path):
    out = tmp_path / "billing.jsonl"
    expected: list[tuple[str, str, str]] = []  # (subject, event, request id) of every entry written
    done = threading.Event()

    async def write_events() -> None:
        meter = Meter.from_url(redis_url)
        try:
            keys, accounts = KeyAdmin(meter.redis), []
            for name in ("a1", "a2", "a3"):
                await keys.create_key(name, quota=10**6, rate_per_s=1000, burst=1000)
                expected.append((name, "create", ""))
                accounts.append(await keys.get_account(name))
            rng = random.Random(0)
            for n in range(240):
                account = rng.choice(accounts)
                debit = await meter.debit(account, units=2, images=1, texts=1, fingerprint="f", idempotency_key=None)
                outcome = "failed" if n % 5 == 0 else "delivered"
                await meter.settle(account, debit, outcome=outcome, idempotency_key=None)
                expected.append((account.name, "debit", debit.request_id))
                if outcome == "failed":
                    expected.append((account.name, "refund", debit.request_id))
                await asyncio.sleep(0.04)  # >= 9.6 s of writing: time for three kills and restarts
        finally:
            await meter.close()
            done.set()

    writer = threading.Thread(target=run_sync, args=(write_events(),))
    writer.start()
    fork = multiprocessing.get_context("fork")
    kills = 0
    rng = random.Random(1)
    while not done.is_set():
        child = fork.Process(target=_exporter_child, args=(redis_url, str(out)))
        child.start()
        time.sleep(rng.uniform(0.3, 0.9))
        if done.is_set():
            break
        assert child.is_alive(), f"the exporter stopped by itself (exit {child.exitcode})"
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        kills += 1
        store = redis.Redis.from_url(redis_url)
        try:  # a second exporter is refused until the dead one's lock lapses (2 s after its last renewal)
            while store.exists("vendor:{export}:lock:billing"):
                time.sleep(0.05)
        finally:
            store.close()
    writer.join()
    if not child.is_alive():  # the writer finished right after a kill: one more exporter to finish the job
        child = fork.Process(target=_exporter_child, args=(redis_url, str(out)))
        child.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < len(expected)):
        time.sleep(0.1)
    assert child.is_alive(), f"the exporter stopped by itself (exit {child.exitcode})"
    os.kill(child.pid, signal.SIGTERM)  # a graceful stop after its pass
    child.join(timeout=30)
    assert child.exitcode == 0 and kills >= 3
    events = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), "an event was written twice"
    got = sorted((e["subject"], e["data"]["event"], e["data"]["request_id"] or "") for e in events)
    assert got == sorted(expected), "an event was lost"
    store = redis.Redis.from_url(redis_url)
    try:
        assert sum(store.xlen(k) for k in store.scan_iter("vendor:*:ledger")) == 0  # all exported, all trimmed
    finally:
        store.close()
