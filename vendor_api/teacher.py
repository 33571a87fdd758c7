"""Loads any open_clip model from a spec string and encodes images and texts with it.

All three spec forms go through open_clip's own loader, so the vendor serves exactly what
`open_clip.create_model_and_transforms` would give a researcher: same weights, same
preprocessing transform, same tokenizer.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import TeacherLoadError

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_SCHEMES = ("local-dir:", "hf-hub:")
_PRECISIONS = {"fp32", "fp16", "bf16", "pure_fp16", "pure_bf16", "amp", "amp_bf16"}


@dataclass(frozen=True)
class TeacherSpec:
    """A parsed `VENDOR_TEACHER` value: open_clip's `model_name` and `pretrained` arguments."""

    model_name: str
    pretrained: str | None

    @classmethod
    def parse(cls, spec: str) -> "TeacherSpec":
        spec = spec.strip()
        if not spec:
            raise TeacherLoadError("VENDOR_TEACHER is empty")
        if spec.startswith(_SCHEMES):
            return cls(model_name=spec, pretrained=None)
        model, sep, pretrained = spec.partition(":")
        if not sep or not model or not pretrained:
            raise TeacherLoadError(
                f"teacher spec {spec!r} is not MODEL:TAG, MODEL:/path/weights.safetensors or "
                "local-dir:/path"
            )
        return cls(model_name=model, pretrained=pretrained)

    @property
    def weights_path(self) -> Path | None:
        """The local weights file, when `pretrained` names a file rather than a hub tag."""
        if self.pretrained and (os.sep in self.pretrained or self.pretrained.endswith(_WEIGHT_SUFFIXES)):
            return Path(self.pretrained).expanduser()
        return None

    @property
    def model_id(self) -> str:
        """A readable id that never exposes a server-side file path to clients."""
        if self.model_name.startswith("local-dir:"):
            return Path(self.model_name.removeprefix("local-dir:")).name or "local-model"
        if self.weights_path is not None:
            return f"{self.model_name}:{self.weights_path.stem}"
        return f"{self.model_name}:{self.pretrained}" if self.pretrained else self.model_name


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise TeacherLoadError(f"device {device!r} requested but CUDA is not available")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp16 on CUDA by default (the GPU serving norm), fp32 on CPU (fp16 is slow there)."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in _PRECISIONS:
        raise TeacherLoadError(f"unknown precision {precision!r}; choose from {sorted(_PRECISIONS)}")
    return precision


class Teacher:
    """An open_clip model ready to serve: preprocessing, tokenising and normalised encoding.

    `encode_*` are called from one model thread at a time (the batcher's), and are guarded by a
    lock anyway so a direct caller (readiness probe, benchmark) can never interleave with it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        *,
        model_id: str,
        device: torch.device,
        precision: str,
    ) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = device
        self.precision = precision
        self._lock = threading.Lock()
        self.image_size = _image_size_of(model)
        self.context_length = int(tokenizer.context_length or model.context_length)  # the tokenizer's may be None
        probe_image = self.encode_images(torch.stack([self.preprocess(Image.new("RGB", (self.image_size, self.image_size)))]))
        probe_text = self.encode_texts(self.tokenize(["a photo"]))
        if probe_image.shape[1] != probe_text.shape[1]:
            raise TeacherLoadError(
                f"image ({probe_image.shape[1]}) and text ({probe_text.shape[1]}) embeddings differ in size"
            )
        if not (np.isfinite(probe_image).all() and np.isfinite(probe_text).all()):
            raise TeacherLoadError("the teacher produced non-finite embeddings on a probe input")
        self.embed_dim = int(probe_image.shape[1])
        self.logit_scale = float(model.logit_scale.exp().item())

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        spec: str,
        *,
        device: str = "auto",
        precision: str = "auto",
        model_config_dir: Path | None = None,
        model_id: str | None = None,
    ) -> "Teacher":
        """Load through open_clip; any failure becomes one clear `TeacherLoadError`."""
        import open_clip  # heavy import kept out of module import time

        parsed = TeacherSpec.parse(spec)
        torch_device = resolve_device(device)
        open_clip_precision = resolve_precision(precision, torch_device)
        if model_config_dir is not None:
            if not Path(model_config_dir).exists():
                raise TeacherLoadError(f"model config dir {model_config_dir} does not exist")
            open_clip.add_model_config(model_config_dir)
        weights = parsed.weights_path
        if weights is not None and not weights.is_file():
            raise TeacherLoadError(f"teacher weights file not found: {weights}")
        local_dir = parsed.model_name.removeprefix("local-dir:") if parsed.model_name.startswith("local-dir:") else None
        if local_dir is not None and not (Path(local_dir) / "open_clip_config.json").is_file():
            raise TeacherLoadError(f"{local_dir} is not an open_clip local-dir (no open_clip_config.json)")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                parsed.model_name,
                pretrained=str(weights) if weights is not None else parsed.pretrained,
                device=torch_device,
                precision=open_clip_precision,
            )
            tokenizer = open_clip.get_tokenizer(parsed.model_name)
        except Exception as exc:  # open_clip raises RuntimeError/ValueError/KeyError/OSError
            raise TeacherLoadError(f"cannot load teacher {spec!r}: {type(exc).__name__}: {exc}") from exc
        log.info("loaded teacher %s on %s (%s)", parsed.model_id, torch_device, open_clip_precision)
        return cls(
            model,
            preprocess,
            tokenizer,
            model_id=model_id or parsed.model_id,
            device=torch_device,
            precision=open_clip_precision,
        )

    # ------------------------------------------------------------------ encoding
    @property
    def input_dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "pure_fp16": torch.float16, "bf16": torch.bfloat16,
                "pure_bf16": torch.bfloat16}.get(self.precision, torch.float32)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def count_tokens(self, text: str) -> int:
        """Tokens the text needs, including start/end tokens; used to reject overlong texts
        instead of letting the tokenizer silently truncate what the client paid for."""
        hf = getattr(self.tokenizer, "tokenizer", None)
        if hf is not None and callable(hf):
            return len(hf(text)["input_ids"])
        encode = getattr(self.tokenizer, "encode", None)
        if callable(encode):
            return len(encode(text)) + 2
        return int((self.tokenize([text]) != 0).sum())

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        with self._lock:
            features = self.model.encode_image(pixels.to(self.device, dtype=self.input_dtype, non_blocking=True))
            return F.normalize(features.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def encode_texts(self, tokens: torch.Tensor) -> np.ndarray:
        with self._lock:
            features = self.model.encode_text(tokens.to(self.device, non_blocking=True))
            return F.normalize(features.float(), dim=-1).cpu().numpy()


def _image_size_of(model: torch.nn.Module) -> int:
    """The side the image tower expects: every model open_clip creates (>= 3.0, see pyproject)
    carries the preprocessing it was built with on its `visual` tower, size included."""
    size = model.visual.preprocess_cfg["size"]
    return int(max(size) if isinstance(size, (tuple, list)) else size)
