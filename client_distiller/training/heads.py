"""Prediction heads that sit on a student's pooled features, shared by training and deployment.

A head is the only method-specific part of a deployed student, so the exact modules used while
training are the ones :mod:`client_distiller.deployed` saves and reloads (no re-implementation that
could drift). ``HEADS`` maps the head kind stored in a deployed student's config to its class.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class TextHead(nn.Module):
    """VL2V-ADiP's head: project to the teacher space, score by cosine to class text embeddings.

    ``projection`` is the trained part; the text embeddings and logit scale are the teacher's and
    are stored as buffers so a saved student predicts without the vendor.
    """

    kind = "text"

    def __init__(self, feature_dim: int, text_embeddings: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        text = torch.as_tensor(text_embeddings, dtype=torch.float32)
        self.projection = nn.Linear(feature_dim, text.shape[1])
        self.register_buffer("text_embeddings", F.normalize(text, dim=-1).clone())
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """L2-normalised student embedding in the teacher's space, ``normalize(P f(x))``."""
        return F.normalize(self.projection(features), dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.embed(features) @ self.text_embeddings.T

    def config(self) -> dict[str, Any]:
        return {"feature_dim": self.projection.in_features, "embed_dim": self.projection.out_features,
                "num_classes": int(self.text_embeddings.shape[0])}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "TextHead":
        return cls(cfg["feature_dim"], torch.zeros(cfg["num_classes"], cfg["embed_dim"]) + 1.0, 1.0)


class LinearHead(nn.Module):
    """ERM's head: a linear classifier on pooled features."""

    kind = "linear"

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def config(self) -> dict[str, Any]:
        return {"feature_dim": self.classifier.in_features, "num_classes": self.classifier.out_features}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "LinearHead":
        return cls(cfg["feature_dim"], cfg["num_classes"])


HEADS: dict[str, type[nn.Module]] = {TextHead.kind: TextHead, LinearHead.kind: LinearHead}
