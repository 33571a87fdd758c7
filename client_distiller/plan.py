"""The budget policy: what to buy, in what order.

1. Class-prompt text embeddings first (classes x templates): without them there is no Predict
   head, so a budget that cannot cover them is refused up front.
2. Then training images, one teacher embedding per *un-augmented* image (augmented views reuse
   it; buying a view per augmentation would multiply the cost by the number of epochs). When the
   budget covers fewer images than the data holds, an ordering policy decides which come first
   and the purchase stops where the budget does; images left unbought still train through the
   text-alignment term.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .prompts import all_prompts, ensemble
from .purchase import Purchaser
from .targets import TeacherTargets

Item = tuple[Path, int]  # (image path, class label)
Ordering = Callable[[Sequence[Item], int], list[Item]]


def _by_class(items: Sequence[Item]) -> list[list[Item]]:
    groups: dict[int, list[Item]] = {}
    for item in items:
        groups.setdefault(item[1], []).append(item)
    return [group for _, group in sorted(groups.items())]


def _round_robin(queues: Sequence[Sequence[Item]]) -> list[Item]:
    """One item of each class in turn, so any prefix of the result is class-balanced."""
    ordered: list[Item] = []
    for rank in range(max((len(q) for q in queues), default=0)):
        ordered.extend(q[rank] for q in queues if rank < len(q))
    return ordered


def class_balanced(items: Sequence[Item], seed: int) -> list[Item]:
    """Round-robin over classes, each class in a seeded random order."""
    rng = np.random.default_rng(seed)
    return _round_robin([[group[i] for i in rng.permutation(len(group))] for group in _by_class(items)])


def _thumbnail(path: Path, size: int = 16) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L").resize((size, size)), dtype=np.float32).ravel() / 255.0


def _k_center_order(features: np.ndarray, first: int) -> list[int]:
    """Farthest point first: each next item is the one least like everything chosen so far."""
    order = [first]
    distance = np.linalg.norm(features - features[first], axis=1)
    distance[first] = -1.0
    while len(order) < len(features):
        nxt = int(np.argmax(distance))
        order.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(features - features[nxt], axis=1))
        distance[order] = -1.0
    return order


def diverse(items: Sequence[Item], seed: int) -> list[Item]:
    """Per class, k-center greedy on small thumbnails, then round-robin over classes: the first
    images bought cover each class's visual variety (styles, domains) instead of repeating
    near-duplicates."""
    rng = np.random.default_rng(seed)
    queues = []
    for group in _by_class(items):
        features = np.stack([_thumbnail(p) for p, _ in group])
        queues.append([group[i] for i in _k_center_order(features, int(rng.integers(len(group))))])
    return _round_robin(queues)


ORDERINGS: dict[str, Ordering] = {"balanced": class_balanced, "diverse": diverse}


@dataclass
class PlanReport:
    prompts: int
    images_wanted: int
    images_known: int
    units_committed: int


def buy_targets(purchaser: Purchaser, class_names: Sequence[str], train_items: Sequence[Item], *,
                selection: str = "balanced", seed: int = 0) -> tuple[TeacherTargets, PlanReport]:
    """Class prompts (all or nothing), then as many training images as the budget allows."""
    if selection not in ORDERINGS:
        raise ValueError(f"unknown selection policy {selection!r}; choose from {', '.join(ORDERINGS)}")
    prompts = all_prompts(class_names)
    flat = [p for per_class in prompts for p in per_class]
    vectors = torch.from_numpy(purchaser.texts(flat))
    per_class, start = [], 0
    for group in prompts:
        per_class.append(vectors[start:start + len(group)])
        start += len(group)
    ordered = ORDERINGS[selection](train_items, seed)
    images = buy_images(purchaser, ordered)
    targets = TeacherTargets(list(class_names), ensemble(per_class), images,
                             logit_scale=purchaser.card.logit_scale, teacher_id=purchaser.card.id)
    return targets, PlanReport(len(flat), len(ordered), len(images), purchaser.committed)


def buy_images(purchaser: Purchaser, ordered: Sequence[Item]) -> dict[str, torch.Tensor]:
    """Image path -> teacher embedding, for every image the budget covered (bought in order)."""
    vectors, found = purchaser.images([p for p, _ in ordered])
    return {str(p): torch.from_numpy(vectors[i]) for i, (p, _) in enumerate(ordered) if found[i]}
