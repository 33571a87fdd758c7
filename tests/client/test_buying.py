"""The client's buying half against a real vendor on 127.0.0.1: the budget is a hard ceiling,
nothing is paid twice, corrupt cache entries are bought again, retries are safe."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from client_distiller.buying.cache import CacheError, EmbeddingCache, CacheNamespace
from client_distiller.buying.ledger import Ledger
from client_distiller.buying.purchaser import BudgetTooSmall, InputRejected, Purchaser
from client_distiller.buying.teacher_client import (AuthenticationError, ImageBytes, QuotaExhausted, TeacherClient,
                                                    VendorUnreachable)
from tests.conftest import free_port
from tests.support.imaging import random_image


def write_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img{i:03d}.png"
        random_image(i).save(path)
        paths.append(path)
    return paths


def purchaser(vendor, key: str, tmp_path: Path, budget: int, **kw) -> Purchaser:
    client = TeacherClient(vendor.base_url, key, backoff_max_s=0.2, **{k: kw.pop(k) for k in list(kw) if k in ("timeout_s", "max_attempts")})
    return Purchaser(client, cache_dir=tmp_path / "cache", ledger=Ledger(tmp_path / "ledger.sqlite"), budget=budget,
                     scope="run", api_key=key, show_progress=False, **kw)


def test_second_run_spends_nothing(vendor, tmp_path):
    key = vendor.create_key(quota=1000)
    paths = write_images(tmp_path / "imgs", 6)
    first = purchaser(vendor, key, tmp_path, budget=100, batch_size=4)
    texts = first.texts(["a photo of a cat", "a photo of a dog"])
    vectors, found = first.images(paths)
    assert found.all() and first.stats.units_charged == 8 and vendor.account().spent == 8
    second = purchaser(vendor, key, tmp_path, budget=100, batch_size=4)
    again_texts = second.texts(["a photo of a cat", "a photo of a dog"])
    again, found2 = second.images(paths)
    assert found2.all() and np.array_equal(again, vectors) and np.array_equal(again_texts, texts)
    assert second.stats.units_charged == 0 and second.stats.requests == 0
    assert vendor.account().spent == 8


def test_budget_is_a_hard_ceiling_and_the_rest_is_left_unbought(vendor, tmp_path):
    key = vendor.create_key(quota=1000)
    paths = write_images(tmp_path / "imgs", 25)
    buyer = purchaser(vendor, key, tmp_path, budget=10, batch_size=4)
    vectors, found = buyer.images(paths)
    assert found.sum() == 10 and found[:10].all()  # bought in the order given
    assert buyer.stats.stopped_by_budget
    assert buyer.committed == 10 and vendor.account().spent == 10
    more = purchaser(vendor, key, tmp_path, budget=10, batch_size=4)  # a rerun cannot buy past it either
    _, found_again = more.images(paths)
    assert found_again.sum() == 10 and vendor.account().spent == 10


def test_duplicate_inputs_are_bought_once(vendor, tmp_path):
    key = vendor.create_key(quota=100)
    paths = write_images(tmp_path / "imgs", 2)
    buyer = purchaser(vendor, key, tmp_path, budget=100)
    vectors, found = buyer.images([paths[0], paths[1], paths[0]])
    assert found.all() and np.array_equal(vectors[0], vectors[2]) and vendor.account().spent == 2


def test_prompts_that_do_not_fit_the_budget_are_refused_before_any_purchase(vendor, tmp_path):
    key = vendor.create_key(quota=100)
    buyer = purchaser(vendor, key, tmp_path, budget=3)
    with pytest.raises(BudgetTooSmall, match="costs 5 units but the budget has 3 left"):
        buyer.texts([f"prompt {i}" for i in range(5)])
    assert vendor.account().spent == 0 and buyer.committed == 0


def test_answer_lost_after_the_vendor_charged_is_replayed_not_repaid(vendor, tmp_path):
    """The client died after sending and before caching: the rerun gets the answer for free."""
    key = vendor.create_key(quota=100)
    paths = write_images(tmp_path / "imgs", 3)
    dead = purchaser(vendor, key, tmp_path, budget=3, batch_size=8)
    batch = [dead.namespace.item_key("image", p.read_bytes()) for p in paths]
    idem = dead._batch_key("image", batch)
    dead.ledger.reserve("run", idem, 3, 3, budget=3, item_keys=b"".join(batch))
    dead.client.embed(dead.card.id, [ImageBytes(p.read_bytes()) for p in paths], idempotency_key=idem)
    assert vendor.account().spent == 3  # paid, then the process "died"
    rerun = purchaser(vendor, key, tmp_path, budget=3, batch_size=2)  # even with another batch size
    _, found = rerun.images(paths)
    assert found.all() and rerun.stats.replays == 1
    assert vendor.account().spent == 3 and rerun.committed == 3


def test_corrupt_cache_entries_are_bought_again(vendor, tmp_path):
    key = vendor.create_key(quota=100)
    paths = write_images(tmp_path / "imgs", 4)
    first = purchaser(vendor, key, tmp_path, budget=100)
    good, _ = first.images(paths)
    first.close()
    data = next((tmp_path / "cache").glob("*/vectors.bin"))
    raw = bytearray(data.read_bytes())
    record = len(raw) // 4
    raw[record + 40] ^= 0xFF  # flip a byte inside the second vector
    data.write_bytes(bytes(raw) + b"\x01\x02\x03")  # and leave a torn tail
    second = purchaser(vendor, key, tmp_path, budget=100)
    vectors, found = second.images(paths)
    assert found.all() and np.allclose(vectors, good, atol=1e-6)
    assert second.stats.bought["image"] == 1 and vendor.account().spent == 5


def test_retries_honour_429_and_are_charged_once(vendor, tmp_path):
    key = vendor.create_key(quota=100, rate=2, burst=1)
    paths = write_images(tmp_path / "imgs", 6)
    buyer = purchaser(vendor, key, tmp_path, budget=100, batch_size=2)
    started = time.monotonic()
    _, found = buyer.images(paths)
    assert found.all() and vendor.account().spent == 6
    assert time.monotonic() - started >= 0.9  # three requests at 2/s with burst 1 had to wait


def test_retries_through_503_overload(make_vendor, tmp_path):
    vendor = make_vendor(max_queue_items=4, max_items_per_request=4)
    key = vendor.create_key(quota=100)
    paths = write_images(tmp_path / "imgs", 4)
    batcher = vendor.server.config.app.state.service.batcher
    hold = batcher.reserve(4)
    hold.__enter__()
    threading.Timer(1.5, lambda: hold.__exit__(None, None, None)).start()
    buyer = purchaser(vendor, key, tmp_path, budget=100, batch_size=4)
    _, found = buyer.images(paths)
    assert found.all() and vendor.account().spent == 4


def test_timeout_then_retry_with_the_same_key_is_charged_once(vendor, tmp_path):
    key = vendor.create_key(quota=100)
    paths = write_images(tmp_path / "imgs", 2)
    service = vendor.server.config.app.state.service
    original = service.batcher.towers["image"]

    calls = []

    def slow_once(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            time.sleep(1.5)  # the first attempt outlives the client's timeout
        return original.encode(batch)

    service.batcher.towers["image"] = type(original)("image", slow_once)
    try:
        buyer = purchaser(vendor, key, tmp_path, budget=100, timeout_s=0.5, max_attempts=20)
        _, found = buyer.images(paths)
    finally:
        service.batcher.towers["image"] = original
    assert found.all()
    # timed out: the vendor saw the client hang up, cancelled and refunded each attempt that the
    # client gave up on (the model thread finishes the slow batch first, so a retry or two may time
    # out too); the retry under the same Idempotency-Key that was answered was the one charge
    assert vendor.account().spent == 2 and buyer.committed == 2
    ledger = [(e["event"], e.get("reason", "")) for e in vendor.ledger()][1:]
    assert ledger.count(("debit", "")) == ledger.count(("refund", "client_disconnected")) + 1 >= 2
    assert ledger[-1] == ("debit", "")


def test_quota_exhausted_at_the_vendor_is_final_and_costs_nothing(vendor, tmp_path):
    key = vendor.create_key(quota=3)
    paths = write_images(tmp_path / "imgs", 4)
    buyer = purchaser(vendor, key, tmp_path, budget=100, batch_size=2)
    with pytest.raises(QuotaExhausted):
        buyer.images(paths)
    assert vendor.account().spent == 2 and buyer.committed == 2  # the refused batch was released


def test_wrong_key_and_unreachable_vendor_are_clear_errors(vendor, tmp_path):
    with pytest.raises(AuthenticationError):
        TeacherClient(vendor.base_url, "vk-wrong", backoff_max_s=0.1).model_card()
    with pytest.raises(VendorUnreachable):
        TeacherClient(f"http://127.0.0.1:{free_port()}", "vk-x", max_attempts=2, backoff_max_s=0.1).model_card()


def test_cache_namespaces_never_mix(tmp_path):
    a = EmbeddingCache(tmp_path, CacheNamespace("teacher", "none"), dim=4)
    b = EmbeddingCache(tmp_path, CacheNamespace("teacher", "noise:0.05", key_scope="k1"), dim=4)
    key_a = a.namespace.item_key("image", b"same bytes")
    a.put_many([key_a], np.ones((1, 4)))
    assert b.namespace.item_key("image", b"same bytes") != key_a
    assert not b.get_many([key_a])[1].any()
    with pytest.raises(CacheError, match="holds dim 4"):
        EmbeddingCache(tmp_path, CacheNamespace("teacher", "none"), dim=8)
    with pytest.raises(CacheError, match="non-finite"):
        a.put_many([a.namespace.item_key("text", b"x")], np.full((1, 4), np.nan))


def test_an_unreadable_image_is_named_and_what_was_bought_is_kept(vendor, tmp_path):
    key = vendor.create_key(quota=100)
    paths = write_images(tmp_path / "imgs", 5)
    broken = tmp_path / "imgs" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    buyer = purchaser(vendor, key, tmp_path, budget=100, batch_size=3)
    with pytest.raises(InputRejected, match=r"broken\.png: input\[1\]: not a readable"):
        buyer.images(paths[:4] + [broken] + paths[4:])
    assert vendor.account().spent == 3 and buyer.committed == 3  # the first batch, kept; the refused one free
    _, found = purchaser(vendor, key, tmp_path, budget=100, batch_size=3).images(paths)
    assert found.all() and vendor.account().spent == 5  # the rerun without it pays only for the rest


def test_purchaser_is_a_context_manager_that_closes_its_caches_whatever_happens(vendor, tmp_path):
    key = vendor.create_key(quota=1000)
    paths = write_images(tmp_path / "imgs", 3)
    with pytest.raises(RuntimeError, match="after buying"):
        with purchaser(vendor, key, tmp_path, budget=100) as buyer:
            vectors, found = buyer.images(paths)
            caches = [channel.cache for channel in buyer._channels.values()]
            raise RuntimeError("after buying")
    assert caches and all(cache._mmap is None for cache in caches)  # closed on the way out
    with purchaser(vendor, key, tmp_path, budget=100) as again:  # what was bought is kept, not paid twice
        again_vectors, again_found = again.images(paths)
    assert again_found.all() and np.array_equal(again_vectors, vectors) and again.stats.units_charged == 0
