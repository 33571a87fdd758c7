"""The budget policy: what to buy, in what order.

1. Class-prompt text embeddings first (classes x templates): without them there is no Predict
   head, so a budget that cannot cover them is refused up front.
2. Then training images, one teacher embedding per *un-augmented* image (augmented views reuse
   it; buying a view per augmentation would multiply the cost by the number of epochs). When the
   budget covers fewer images than the data holds, an ordering policy decides which come first
   and the purchase stops where the budget does; images left unbought still train through the
   text-alignment term.

Comparing methods (:func:`buy_for_methods`) buys exactly the union of what they need
(``Method.needs``), each output once, into the shared cache: class prompts only if some method
needs ``class_texts`` (or ``class_probabilities`` on an embeddings key, where the probabilities are
derived from image and text embeddings), the sentence bank only if some method needs
``sentences``, training images if some method needs ``images`` (or derived probabilities), and on a
probabilities-mode key the teacher's class probabilities per training image instead. Order:
prompts, sentences (both all-or-nothing), then images with whatever budget is left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import AbstractSet, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from shared.protocol import OUTPUT_EMBEDDINGS, OUTPUT_PROBABILITIES

from client_distiller.buying.purchaser import Purchaser
from client_distiller.data import DomainBedFolder, leave_one_out
from client_distiller.errors import UsageError
from client_distiller.prompts import all_prompts, ensemble
from client_distiller.targets import TeacherTargets

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
    sentences: int = 0
    probabilities_known: int = 0
    # What each teacher output costs at the vendor's prices (whether paid now or earlier, cached).
    units_by_output: dict[str, int] = field(default_factory=dict)
    output_mode: str = OUTPUT_EMBEDDINGS

    def units_for(self, needs: AbstractSet[str]) -> int:
        """What the outputs behind ``needs`` cost: a method's share of one shared purchase."""
        return sum(self.units_by_output.get(o, 0) for o in effective_outputs(needs, self.output_mode))


class PlanError(UsageError):
    """What the methods need cannot be bought from this vendor key."""


def effective_outputs(needs: AbstractSet[str], mode: str = OUTPUT_EMBEDDINGS) -> set[str]:
    """What must actually be bought for ``needs`` under a key's output mode.

    On an embeddings key class probabilities are derived (``softmax(scale * t_img . T_txt^T)``), so
    they need the class texts and the images; on a probabilities key they are bought directly and
    nothing else can be.
    """
    out = set(needs)
    if "class_probabilities" in out and mode == OUTPUT_EMBEDDINGS:
        out.discard("class_probabilities")
        out |= {"class_texts", "images"}
    return out


def buy_class_texts(purchaser: Purchaser, class_names: Sequence[str]) -> tuple[torch.Tensor, int]:
    """Every class prompt (all or nothing), ensembled per class: ([C, D], number of prompts)."""
    prompts = all_prompts(class_names)
    flat = [p for per_class in prompts for p in per_class]
    vectors = torch.from_numpy(purchaser.texts(flat))
    per_class, start = [], 0
    for group in prompts:
        per_class.append(vectors[start:start + len(group)])
        start += len(group)
    return ensemble(per_class), len(flat)


def buy_for_methods(purchaser: Purchaser, class_names: Sequence[str], train_items: Sequence[Item],
                    needs: AbstractSet[str], *, sentences: Sequence[str] | None = None, selection: str = "balanced",
                    seed: int = 0) -> tuple[TeacherTargets, PlanReport]:
    """Buy exactly what ``needs`` (the union of the compared methods' ``needs``) requires, once.

    ``sentences`` is the bank bought when ``"sentences"`` is needed (default: the offline bank built
    from the class names, :func:`client_distiller.buying.sentences.default_bank`). Outputs a
    probabilities-mode key cannot sell are left out (``text_embeddings`` stays None): methods that
    need them refuse to build with :class:`~client_distiller.training.methods.MissingTeacherOutputError`.
    """
    if selection not in ORDERINGS:
        raise ValueError(f"unknown selection policy {selection!r}; choose from {', '.join(ORDERINGS)}")
    mode = purchaser.card.output
    wanted = effective_outputs(needs, mode)
    if "sentences" in wanted and sentences is None:
        from client_distiller.buying.sentences import default_bank

        sentences = default_bank(class_names)  # the offline default (deterministic)
    if "sentences" in wanted and not sentences:
        raise PlanError("a method needs a sentence bank but the one given is empty")
    text_price, image_price = purchaser.card.price_per_text, purchaser.card.price_per_image
    units: dict[str, int] = {}
    text = None
    n_prompts = 0
    sentence_embeddings = None
    images: dict[str, torch.Tensor] = {}
    probabilities: dict[str, torch.Tensor] = {}
    ordered = ORDERINGS[selection](train_items, seed) if wanted & {"images", "class_probabilities"} else []
    if mode == OUTPUT_EMBEDDINGS:
        if "class_texts" in wanted:
            text, n_prompts = buy_class_texts(purchaser, class_names)
            units["class_texts"] = n_prompts * text_price
        if "sentences" in wanted:
            assert sentences is not None
            sentence_embeddings = torch.from_numpy(purchaser.texts(list(sentences)))
            units["sentences"] = len(sentences) * text_price
        if "images" in wanted:
            images = buy_images(purchaser, ordered)
            units["images"] = len(images) * image_price
    elif mode == OUTPUT_PROBABILITIES:
        if "class_probabilities" in wanted:
            probabilities = buy_probabilities(purchaser, ordered, class_names)
            units["class_probabilities"] = len(probabilities) * image_price
    else:
        raise PlanError(f"the vendor key's output mode {mode!r} is not one this client can use")
    targets = TeacherTargets(list(class_names), text, images, logit_scale=purchaser.card.logit_scale,
                             teacher_id=purchaser.card.id, image_probabilities=probabilities,
                             sentence_embeddings=sentence_embeddings, image_size=purchaser.card.image_size)
    report = PlanReport(n_prompts, len(ordered), len(images), purchaser.committed,
                        sentences=len(sentences) if sentence_embeddings is not None else 0,
                        probabilities_known=len(probabilities), units_by_output=units, output_mode=mode)
    return targets, report


def buy_probabilities(purchaser: Purchaser, ordered: Sequence[Item], class_names: Sequence[str]
                      ) -> dict[str, torch.Tensor]:
    """Image path -> the teacher's class probabilities, for every image the budget covered."""
    vectors, found = purchaser.probabilities([p for p, _ in ordered], list(class_names))
    return {str(p): torch.as_tensor(vectors[i], dtype=torch.float32) for i, (p, _) in enumerate(ordered) if found[i]}


def buy_images(purchaser: Purchaser, ordered: Sequence[Item]) -> dict[str, torch.Tensor]:
    """Image path -> teacher embedding, for every image the budget covered (bought in order)."""
    vectors, found = purchaser.images([p for p, _ in ordered])
    return {str(p): torch.from_numpy(vectors[i]) for i, (p, _) in enumerate(ordered) if found[i]}


# ---------------------------------------------------------------------- what a leave-one-domain-out run buys
def _grouped(items: Sequence[Item], domain: int, classes: int) -> list[Item]:
    """Label each item by (domain, class) so the buying order balances domains as well as classes."""
    return [(path, domain * classes + label) for path, label in items]


def training_items(data: DomainBedFolder, test_domains: Sequence[str], *, seed: int,
                   holdout: float = 0.2) -> list[Item]:
    """The union of the source domains' training splits over every held-out domain's job: what
    the training budget may buy (never a held-out or validation image)."""
    chosen: dict[Path, Item] = {}
    for test_domain in test_domains:
        loo = leave_one_out(data, test_domain, seed=seed, holdout=holdout)
        for split in loo.sources:
            for item in _grouped(split.train, data.domain_index(split.domain), len(data.classes)):
                chosen.setdefault(item[0], item)
    return list(chosen.values())


def evaluation_items(data: DomainBedFolder, test_domains: Sequence[str], *, seed: int,
                     holdout: float = 0.2) -> list[Item]:
    """Held-out images: every test domain, then the source out-splits (for the ID column)."""
    chosen: dict[Path, Item] = {}
    for test_domain in test_domains:
        loo = leave_one_out(data, test_domain, seed=seed, holdout=holdout)
        for item in _grouped(loo.test, data.domain_index(test_domain), len(data.classes)):
            chosen.setdefault(item[0], item)
        for split in loo.sources:
            for item in _grouped(split.val, data.domain_index(split.domain), len(data.classes)):
                chosen.setdefault(item[0], item)
    return list(chosen.values())


def buy_evaluation_targets(purchaser: Purchaser, items: Sequence[Item], train_targets: TeacherTargets, *,
                           seed: int) -> TeacherTargets:
    """The teacher's answers for the zero-shot row, bought through an ``eval``-scope purchaser
    (its own budget; they never feed training): embeddings, or on a probabilities key its class
    probabilities, with the class texts of ``train_targets``."""
    ordered = ORDERINGS["balanced"](items, seed)
    if train_targets.text_embeddings is None:  # a probabilities key: the teacher's row from its probabilities
        probabilities = buy_probabilities(purchaser, ordered, train_targets.class_names)
        return TeacherTargets(train_targets.class_names, None, {}, train_targets.logit_scale,
                              train_targets.teacher_id, image_probabilities=probabilities,
                              image_size=train_targets.image_size)
    return TeacherTargets(train_targets.class_names, train_targets.text_embeddings, buy_images(purchaser, ordered),
                          train_targets.logit_scale, train_targets.teacher_id, image_size=train_targets.image_size)
