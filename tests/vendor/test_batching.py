"""Concurrent requests are merged into model batches, and batching never mixes up answers."""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from tests.support.imaging import image_item, random_image
from vendor_api.batcher import DynamicBatcher
from vendor_api.errors import Overloaded


def _batch_sizes(metrics_text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'vendor_batch_size_sum\{tower="(\w+)"\} ([\d.]+)', metrics_text)}


def test_concurrent_requests_share_batches_and_keep_their_own_answers(make_vendor):
    vendor = make_vendor(max_wait_ms=200, max_batch_size=16)
    key = vendor.create_key(quota=1000)
    images = [random_image(i) for i in range(8)]
    with vendor.client(key) as client:
        alone = [np.array(client.post("/v1/embeddings", json={"model": vendor.model_id, "input": [image_item(im)]})
                          .json()["data"][0]["embedding"]) for im in images]
        before = client.get("/metrics").text

    def one(i: int) -> np.ndarray:
        with vendor.client(key) as client:
            r = client.post("/v1/embeddings", json={"model": vendor.model_id, "input": [image_item(images[i])]})
            return np.array(r.json()["data"][0]["embedding"])

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, range(8)))
    with vendor.client() as client:
        after = client.get("/metrics").text
    batches = float(re.search(r'vendor_batch_size_count\{tower="image"\} ([\d.]+)', after).group(1)) - \
        float(re.search(r'vendor_batch_size_count\{tower="image"\} ([\d.]+)', before).group(1))
    assert batches < 8, "eight concurrent single-image requests should share model batches"
    for a, b in zip(alone, together):
        assert np.allclose(a, b, atol=1e-5)


def test_batcher_splits_large_requests_and_preserves_order():
    seen: list[int] = []

    def encode(batch: torch.Tensor) -> np.ndarray:
        seen.append(len(batch))
        return batch.numpy() * 2

    async def run() -> np.ndarray:
        batcher = DynamicBatcher({"t": encode}, max_batch_size=4, max_wait_ms=1, max_queue_items=100)
        await batcher.start()
        try:
            rows, timing = await batcher.submit("t", [torch.tensor([float(i)]) for i in range(10)])
            assert timing.inference_s > 0
            return rows
        finally:
            await batcher.stop()

    rows = asyncio.run(run())
    assert rows[:, 0].tolist() == [2.0 * i for i in range(10)]
    assert seen == [4, 4, 2]


def test_reservations_bound_the_queue():
    async def run() -> None:
        batcher = DynamicBatcher({"t": lambda b: b.numpy()}, max_batch_size=4, max_wait_ms=1, max_queue_items=5)
        with batcher.reserve(3):
            with pytest.raises(Overloaded):
                with batcher.reserve(3):
                    pass
            with batcher.reserve(2):
                pass
        with batcher.reserve(5):
            pass

    asyncio.run(run())


def test_a_failing_batch_fails_only_its_requests():
    calls = {"n": 0}

    def flaky(batch: torch.Tensor) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return batch.numpy()

    async def run() -> None:
        batcher = DynamicBatcher({"t": flaky}, max_batch_size=8, max_wait_ms=1, max_queue_items=100)
        await batcher.start()
        try:
            with pytest.raises(RuntimeError, match="boom"):
                await batcher.submit("t", [torch.zeros(1)])
            rows, _ = await batcher.submit("t", [torch.ones(1)])
            assert rows.tolist() == [[1.0]]
        finally:
            await batcher.stop()

    asyncio.run(run())
