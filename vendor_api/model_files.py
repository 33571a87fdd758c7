"""Writes open_clip models to disk in the forms `VENDOR_TEACHER` accepts.

Used to make small seeded teachers for tests and benchmarks (no pretrained CLIP can be
downloaded on an offline machine) and by anyone who wants to serve their own trained CLIP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# A CLIP small enough for tests (~3.5M parameters, 32 px images), real open_clip code paths.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def save_local_dir(model: torch.nn.Module, model_cfg: dict[str, Any], out_dir: Path,
                   preprocess_cfg: dict[str, Any] | None = None) -> Path:
    """`out_dir/open_clip_config.json` + `open_clip_model.safetensors`: a `local-dir:` spec."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file(_state_dict(model), str(out_dir / "open_clip_model.safetensors"))
    return out_dir


def seeded_model(model_cfg: dict[str, Any] | str, seed: int) -> torch.nn.Module:
    """An open_clip model with deterministic random weights (a config dict or a model name)."""
    import open_clip

    torch.manual_seed(seed)
    if isinstance(model_cfg, str):
        return open_clip.create_model(model_cfg, pretrained=None)
    return open_clip.CLIP(**model_cfg)


def write_seeded_local_dir(out_dir: Path, model_cfg: dict[str, Any] = TINY_CLIP_CONFIG, *, seed: int = 0) -> Path:
    return save_local_dir(seeded_model(model_cfg, seed), model_cfg, out_dir)


def write_seeded_weights(path: Path, model_name: str, *, seed: int = 0) -> Path:
    """A `MODEL:/path/weights.safetensors` file for a model name open_clip knows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_state_dict(seeded_model(model_name, seed)), str(path))
    return path
