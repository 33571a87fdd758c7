"""Zero-shot accuracy of a saved teacher, loaded the way the vendor loads any CLIP.

Scores use class prompts only ("a photo of a {class}", folder name with ``_`` as spaces): no
style words, no training on client data. Held-out concept sets use the same prompt with the
concept's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

PROMPT = "a photo of a {}"


def load_local_dir(path: Path):
    """(model, preprocess, tokenizer) through open_clip's ``local-dir:`` code path."""
    import open_clip

    spec = f"local-dir:{Path(path)}"
    model, _, preprocess = open_clip.create_model_and_transforms(spec)
    return model.eval(), preprocess, open_clip.get_tokenizer(spec)


@torch.inference_mode()
def zero_shot(model, preprocess, tokenizer, images: Sequence[Image.Image], labels: Sequence[int],
              class_names: Sequence[str], *, batch: int = 128) -> float:
    """Top-1 accuracy of cosine(image, prompt(class)) over ``class_names``."""
    text = F.normalize(model.encode_text(tokenizer([PROMPT.format(c) for c in class_names])), dim=-1)
    correct = 0
    for i in range(0, len(images), batch):
        x = torch.stack([preprocess(im) for im in images[i:i + batch]])
        pred = (F.normalize(model.encode_image(x), dim=-1) @ text.T).argmax(1)
        correct += int((pred == torch.as_tensor(labels[i:i + batch])).sum())
    return correct / max(1, len(images))


def evaluate(path: Path, *, seed: int, eval_per_class: int, concept_per_class: int,
             progress: bool = False) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """Per-domain accuracy on the client benchmark and per-set accuracy on held-out concepts.

    Returns (domains, concepts, skipped) where ``skipped`` names concept sets whose source is not
    installed (the emoji font is a Debian package) and why.
    """
    from offline_data import CONCEPT_SETS, MissingSourceError, concept_samples, get_benchmark, iter_samples

    model, preprocess, tokenizer = load_local_dir(path)
    spec = get_benchmark("fashion-domains")
    names = [c.key.replace("_", " ") for c in spec.classes]
    domains: dict[str, float] = {}
    for d in tqdm(spec.domains_for("client"), desc="teacher: zero-shot", disable=not progress, unit="domain"):
        samples = list(iter_samples(spec.name, split="client", seed=seed, per_class=eval_per_class, domains=(d,)))
        domains[d] = zero_shot(model, preprocess, tokenizer, [s.image for s in samples], [s.label for s in samples], names)
    concepts: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name in CONCEPT_SETS:
        try:
            images, labels, classes = concept_samples(name, seed=seed, per_class=concept_per_class)
        except MissingSourceError as exc:
            skipped[name] = str(exc)
            continue
        concepts[name] = zero_shot(model, preprocess, tokenizer, images, labels, classes)
    return domains, concepts, skipped
