"""The budget policy: prompts first and whole, then images in a balanced (or diverse) order."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from client_distiller.buying.ledger import Ledger
from client_distiller.buying.policy import buy_for_methods, class_balanced, diverse
from client_distiller.buying.purchaser import BudgetTooSmall, Purchaser
from client_distiller.buying.teacher_client import TeacherClient
from client_distiller.prompts import all_prompts
from tests.support.imaging import random_image


def _items(tmp_path: Path, per_class: dict[int, int]) -> list[tuple[Path, int]]:
    items = []
    for label, count in per_class.items():
        for i in range(count):
            path = tmp_path / f"c{label}_{i}.png"
            random_image(label * 100 + i).save(path)
            items.append((path, label))
    return items


def test_balanced_order_keeps_every_prefix_balanced(tmp_path):
    items = _items(tmp_path, {0: 6, 1: 3, 2: 5})
    ordered = class_balanced(items, seed=1)
    assert sorted(map(str, ordered)) == sorted(map(str, items))
    assert Counter(label for _, label in ordered[:9]) == {0: 3, 1: 3, 2: 3}
    assert ordered == class_balanced(items, seed=1) and ordered != class_balanced(items, seed=2)


def test_diverse_order_puts_near_duplicates_last(tmp_path):
    items = _items(tmp_path, {0: 4})
    twin = tmp_path / "twin.png"
    random_image(0).save(twin)  # identical to c0_0
    ordered = diverse(items + [(twin, 0)], seed=0)
    first_four = {p.name for p, _ in ordered[:4]}
    assert not {"c0_0.png", "twin.png"} <= first_four


def test_buy_prompts_then_images_within_budget(vendor, tmp_path):
    key = vendor.create_key(quota=1000)
    classes = ["t-shirt", "ankle boot"]
    prompts = sum(len(p) for p in all_prompts(classes))
    items = _items(tmp_path, {0: 5, 1: 5})
    buyer = Purchaser(TeacherClient(vendor.base_url, key), cache_dir=tmp_path / "cache",
                      ledger=Ledger(tmp_path / "l.sqlite"), budget=prompts + 4, scope="run", api_key=key,
                      show_progress=False)
    targets, report = buy_for_methods(buyer, classes, items, {"class_texts", "images"}, seed=0)
    assert report.prompts == prompts and report.images_known == 4 and report.units_committed == prompts + 4
    assert vendor.account().spent == prompts + 4
    assert targets.text_embeddings.shape == (2, 64)
    assert torch.allclose(targets.text_embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert Counter(label for p, label in items if targets.has_image(p)) == {0: 2, 1: 2}
    assert targets.logit_scale == pytest.approx(1 / 0.07, rel=1e-3)


def test_budget_smaller_than_the_prompts_is_refused_and_costs_nothing(vendor, tmp_path):
    key = vendor.create_key(quota=1000)
    buyer = Purchaser(TeacherClient(vendor.base_url, key), cache_dir=tmp_path / "cache",
                      ledger=Ledger(tmp_path / "l.sqlite"), budget=3, scope="run", api_key=key, show_progress=False)
    with pytest.raises(BudgetTooSmall):
        buy_for_methods(buyer, ["a", "b"], [], {"class_texts", "images"}, seed=0)
    assert vendor.account().spent == 0
