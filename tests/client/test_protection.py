"""The client against the vendor's protection modes (issue 5), over real HTTP with real Redis:
the cache never mixes answers of two modes or two keys, probabilities are bought, cached and
budgeted like embeddings, and `client-distill` against a probabilities key trains KD by itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client_distiller.buying.ledger import Ledger
from client_distiller.buying.purchaser import OutputUnavailable, Purchaser
from client_distiller.buying.teacher_client import TeacherClient
from client_distiller.cli import main
from tests.support.client import one_thread  # noqa: F401  (one_thread: autouse in this module)
from tests.conftest import run_sync
from vendor_api.key_admin import KeyAdmin
from tests.support.imaging import random_image

CLASSES = ["cat", "dog", "ship", "tree"]


def write_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        random_image(i).save(path)
        paths.append(path)
    return paths


def buyer(vendor, key: str, tmp: Path, *, budget: int = 1000, run: str = "run") -> Purchaser:
    client = TeacherClient(vendor.base_url, key, max_attempts=2)
    return Purchaser(client, cache_dir=tmp / "cache", ledger=Ledger(tmp / f"{run}.sqlite"), budget=budget,
                     scope="train", api_key=key, show_progress=False)


def set_protection(vendor, name: str, spec: str) -> None:
    async def change() -> None:
        keys = KeyAdmin.from_url(vendor.redis_url)
        try:
            await keys.set_protection(name, spec)
        finally:
            await keys.close()
    run_sync(change())


def test_cache_never_mixes_two_modes_or_two_keys(vendor, tmp_path):
    paths = write_images(tmp_path / "imgs", 3)
    clean_a = vendor.create_key("clean-a", quota=100)
    clean_b = vendor.create_key("clean-b", quota=100)
    noisy_a = vendor.create_key("noisy-a", quota=100, protection="noise:0.1")
    noisy_b = vendor.create_key("noisy-b", quota=100, protection="noise:0.1")

    exact, found = buyer(vendor, clean_a, tmp_path, run="a").images(paths)
    assert found.all() and vendor.account("clean-a").spent == 3
    # Exact answers do not depend on the key: a second clean key reads them from the cache for free.
    again, _ = buyer(vendor, clean_b, tmp_path, run="b").images(paths)
    assert np.array_equal(again, exact) and vendor.account("clean-b").spent == 0

    # A noisy key never reads the clean answers, nor another noisy key's: each pays and gets its own.
    first = buyer(vendor, noisy_a, tmp_path, run="na")
    noisy, _ = first.images(paths)
    second = buyer(vendor, noisy_b, tmp_path, run="nb")
    other, _ = second.images(paths)
    assert vendor.account("noisy-a").spent == 3 and vendor.account("noisy-b").spent == 3
    assert not np.allclose(noisy, exact, atol=1e-3) and not np.allclose(noisy, other, atol=1e-3)
    clean_namespace = buyer(vendor, clean_a, tmp_path).namespace.digest
    assert len({first.namespace.digest, second.namespace.digest, clean_namespace}) == 3
    # ... and a noisy key's rerun is free and identical (its own namespace).
    rerun, _ = buyer(vendor, noisy_a, tmp_path, run="na2").images(paths)
    assert np.array_equal(rerun, noisy) and vendor.account("noisy-a").spent == 3

    # The vendor changes the key's mode: the client sees it on its card and buys into a new namespace.
    set_protection(vendor, "noisy-a", "quantize:binary")
    changed = buyer(vendor, noisy_a, tmp_path, run="na3")
    binary, _ = changed.images(paths)
    assert changed.namespace.digest != first.namespace.digest and vendor.account("noisy-a").spent == 6
    assert not np.allclose(binary, noisy, atol=1e-3)


def test_probabilities_are_budgeted_cached_and_scoped_by_class_list(vendor, tmp_path):
    paths = write_images(tmp_path / "imgs", 5)
    key = vendor.create_key("probs", quota=100, protection="probabilities:2")
    b = buyer(vendor, key, tmp_path, budget=4)
    assert b.card.output == "probabilities"
    with pytest.raises(OutputUnavailable, match="not embeddings"):
        b.images(paths)
    with pytest.raises(OutputUnavailable):
        b.texts(["a photo of a cat"])
    assert vendor.account("probs").spent == 0 and b.committed == 0  # refused before anything was reserved

    rows, found = b.probabilities(paths, CLASSES)
    assert found.tolist() == [True] * 4 + [False]  # the budget (4 units) ends the purchase, as for images
    assert rows.shape == (5, len(CLASSES)) and rows.dtype == np.float32
    assert ((rows[:4] > 0).sum(1) <= 2).all() and (rows[:4].sum(1) <= 1.0 + 1e-5).all() and (rows[4] == 0).all()
    assert vendor.account("probs").spent == 4 and b.committed == 4

    again, found2 = buyer(vendor, key, tmp_path, budget=100, run="r2").probabilities(paths[:4], CLASSES)
    assert found2.all() and np.array_equal(again, rows[:4]) and vendor.account("probs").spent == 4
    # Another class list (even a reordering) is another question: never answered from this cache.
    reordered, _ = buyer(vendor, key, tmp_path, budget=100, run="r3").probabilities(paths[:1], CLASSES[::-1])
    assert vendor.account("probs").spent == 5 and reordered.shape == (1, len(CLASSES))

    embed_key = vendor.create_key("embeds", quota=100)
    with pytest.raises(OutputUnavailable, match="not probabilities"):
        buyer(vendor, embed_key, tmp_path).probabilities(paths, CLASSES)


def _distill_args(vendor, key: str, bench: Path, out: Path, cache: Path, budget: int, *extra: str) -> list[str]:
    return ["--vendor-url", vendor.base_url, "--api-key", key, "--budget", str(budget), "--data", str(bench),
            "--test-domain", "sketch", "--out", str(out), "--cache-dir", str(cache), "--student", "test_efficientnet",
            "--random-init", "--steps", "2", "--batch-size", "2", "--image-size", "32", "--eval-every", "2", *extra]


def test_distill_against_a_probabilities_key_trains_kd_with_a_notice(vendor, tiny_bench, tmp_path, capsys):
    key = vendor.create_key("probs", quota=1000, protection="probabilities:3")
    assert main(_distill_args(vendor, key, tiny_bench, tmp_path / "run", tmp_path / "cache", 50,
                              "--eval-budget", "20")) == 0
    out = capsys.readouterr().out
    notice = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notice) == 1 and "'probabilities:3'" in notice[0] and "erm, kd" in notice[0]
    assert "KD student OOD" in out and "ERM student OOD" in out and "Teacher zero-shot OOD" in out
    assert "units spent: training 50 of 50, evaluation 20 of 20; images bought 50 of 144" in out
    assert vendor.account("probs").spent == 70  # no prompts: the vendor scores our class names itself
    records = (tmp_path / "run" / "results.jsonl").read_text()
    assert '"method": "kd"' in records

    # Methods the user names explicitly that the key cannot feed: one line, exit 2, nothing spent.
    assert main(_distill_args(vendor, key, tiny_bench, tmp_path / "run2", tmp_path / "cache", 50,
                              "--method", "vl2v-adip")) == 2
    err = capsys.readouterr().err.strip()
    assert "vl2v-adip cannot train from that" in err and "\n" not in err
    assert vendor.account("probs").spent == 70

