"""What the client knows from the teacher for one dataset: the contract between buying and training.

The buying half (``buying/purchaser.py``) fills a :class:`TeacherTargets` over HTTP; :func:`local_targets`
fills the same object in-process from an open_clip model the client holds (tests, VL2V-SD, the
teacher zero-shot row). Training code only ever reads this object, so it never knows or cares how
the embeddings were obtained. ``save``/``load`` keep a run's bought targets inspectable and
reusable without paying twice.

On disk (``path`` is a folder): ``targets.safetensors`` holds ``text_embeddings`` [C, D] (absent for
a probabilities-only key), ``image_embeddings`` [N, D], ``image_probabilities`` [M, C] and
``sentence_embeddings`` [S, D] (absent when none were bought); ``targets.json`` holds class names,
the N image keys and M probability keys (same row order), logit scale, teacher id and a format
version. Version 1 folders (embeddings only) are still read.

Teacher class probabilities come in two ways: bought from a probabilities-mode vendor key
(:attr:`TeacherTargets.image_probabilities`), or derived from bought embeddings as the teacher's
zero-shot softmax ``softmax(logit_scale * t_img . T_txt^T)``; :meth:`TeacherTargets.class_probabilities`
hides which, so KD trains identically on both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from client_distiller.errors import UsageError
from client_distiller.prompts import TEMPLATES, all_prompts, ensemble

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
TENSORS_FILE = "targets.safetensors"
META_FILE = "targets.json"


class TargetsError(UsageError):
    """Inconsistent or unreadable teacher targets (shape mismatch, not normalised, bad file)."""


def image_key(path: Path | str) -> str:
    """The key of an image in :attr:`TeacherTargets.image_embeddings`: its absolute resolved path."""
    return str(Path(path).expanduser().resolve())


# Loose enough for half-precision vendors, tight enough to catch raw (unnormalised) features.
UNIT_TOLERANCE = 1e-2


def _check_unit(name: str, t: torch.Tensor, tol: float = UNIT_TOLERANCE) -> None:
    norms = t.norm(dim=-1)
    if t.numel() and not torch.allclose(norms, torch.ones_like(norms), atol=tol):
        raise TargetsError(f"{name} must be L2-normalised (norms range {norms.min():.4f}..{norms.max():.4f})")


@dataclass
class TeacherTargets:
    """What the client knows from the teacher for one dataset."""

    class_names: list[str]                       # dataset class order
    text_embeddings: torch.Tensor | None         # [C, D] float32, L2-normalised prompt ensembles; None: not bought
    image_embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # image_key -> [D] (un-augmented)
    logit_scale: float = 100.0                   # the teacher's
    teacher_id: str = "unknown"
    image_probabilities: dict[str, torch.Tensor] = field(default_factory=dict)  # image_key -> [C] (bought)
    sentence_embeddings: torch.Tensor | None = None  # [S, D] unpaired sentence bank (DIME-FM, CLIP-KD's CRD)
    # The teacher's input size (px) from its model card, so commands that train from saved targets
    # (``tune``) default the student to it as ``distill`` does; None: not known (older targets).
    image_size: int | None = None

    def __post_init__(self) -> None:
        self.class_names = list(self.class_names)
        if self.text_embeddings is not None:
            self.text_embeddings = _as_matrix(self.text_embeddings)
            if self.text_embeddings.ndim != 2 or self.text_embeddings.shape[0] != len(self.class_names):
                raise TargetsError(f"text_embeddings must be [C={len(self.class_names)}, D], "
                                   f"got {tuple(self.text_embeddings.shape)}")
            _check_unit("text_embeddings", self.text_embeddings)
        if self.sentence_embeddings is not None:
            self.sentence_embeddings = _as_matrix(self.sentence_embeddings)
            if self.sentence_embeddings.ndim != 2:
                raise TargetsError(f"sentence_embeddings must be [S, D], got {tuple(self.sentence_embeddings.shape)}")
            _check_unit("sentence_embeddings", self.sentence_embeddings)
        dim = self.embed_dim
        images: dict[str, torch.Tensor] = {}
        for key, vec in self.image_embeddings.items():
            vec = torch.as_tensor(vec, dtype=torch.float32).detach().cpu().reshape(-1)
            if dim is None:
                dim = int(vec.shape[0])
            if vec.shape[0] != dim:
                raise TargetsError(f"image embedding of {key} has size {vec.shape[0]}, expected {dim}")
            if abs(float(vec.norm()) - 1.0) > UNIT_TOLERANCE:
                raise TargetsError(f"image embedding of {key} is not L2-normalised (norm {float(vec.norm()):.4f})")
            images[image_key(key)] = vec
        self.image_embeddings = images
        if self.sentence_embeddings is not None and dim is not None and self.sentence_embeddings.shape[1] != dim:
            raise TargetsError(f"sentence embeddings have size {self.sentence_embeddings.shape[1]}, expected {dim}")
        probs: dict[str, torch.Tensor] = {}
        for key, vec in self.image_probabilities.items():
            vec = torch.as_tensor(vec, dtype=torch.float32).detach().cpu().reshape(-1)
            _check_probabilities(key, vec, self.num_classes)
            probs[image_key(key)] = vec
        self.image_probabilities = probs
        self.logit_scale = float(self.logit_scale)
        if self.image_size is not None and (isinstance(self.image_size, bool) or int(self.image_size) <= 0):
            raise TargetsError(f"image_size must be a positive number of pixels, got {self.image_size!r}")
        self.image_size = None if self.image_size is None else int(self.image_size)

    @property
    def embed_dim(self) -> int | None:
        """The teacher's embedding size, or None when only probabilities were bought."""
        if self.text_embeddings is not None:
            return int(self.text_embeddings.shape[1])
        if self.sentence_embeddings is not None:
            return int(self.sentence_embeddings.shape[1])
        first = next(iter(self.image_embeddings.values()), None)
        return None if first is None else int(first.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def has_image(self, path: Path | str) -> bool:
        return image_key(path) in self.image_embeddings

    def image_target(self, path: Path | str) -> torch.Tensor | None:
        """The teacher embedding of an un-augmented image, or None when it was not bought."""
        return self.image_embeddings.get(image_key(path))

    def class_probabilities(self, path: Path | str) -> torch.Tensor | None:
        """The teacher's class probabilities [C] for an image: bought ones if present, else the
        zero-shot softmax derived from its bought embedding and the class text embeddings, else None."""
        key = image_key(path)
        bought = self.image_probabilities.get(key)
        if bought is not None:
            return bought
        emb = self.image_embeddings.get(key)
        if emb is None or self.text_embeddings is None:
            return None
        return torch.softmax(self.logit_scale * (emb @ self.text_embeddings.T), dim=-1)

    def restricted_to(self, paths: Iterable[Path | str]) -> "TeacherTargets":
        """A copy that keeps only the image targets of ``paths``: how training code guarantees it
        never sees the teacher outputs of held-out images, whatever was bought."""
        keep = {image_key(p) for p in paths}
        return TeacherTargets(self.class_names, self.text_embeddings,
                              {k: v for k, v in self.image_embeddings.items() if k in keep},
                              self.logit_scale, self.teacher_id,
                              {k: v for k, v in self.image_probabilities.items() if k in keep},
                              self.sentence_embeddings, self.image_size)

    def difference(self, other: "TeacherTargets") -> float:
        """The largest absolute difference between the two teachers' answers to the same inputs
        (class texts, sentences, the images both hold), or ``inf`` when they are not comparable
        (other classes or sizes). How a run folder tells that its earlier records came from another
        teacher: the offline demo teacher built on another CPU answers a little differently, and
        mixing its records with this one's in one table would average two teachers."""
        if self.class_names != other.class_names or self.embed_dim != other.embed_dim:
            return float("inf")
        worst = 0.0
        pairs = [(self.text_embeddings, other.text_embeddings), (self.sentence_embeddings, other.sentence_embeddings)]
        shared = sorted(set(self.image_embeddings) & set(other.image_embeddings))
        if shared:
            pairs.append((torch.stack([self.image_embeddings[k] for k in shared]),
                          torch.stack([other.image_embeddings[k] for k in shared])))
        shared = sorted(set(self.image_probabilities) & set(other.image_probabilities))
        if shared:
            pairs.append((torch.stack([self.image_probabilities[k] for k in shared]),
                          torch.stack([other.image_probabilities[k] for k in shared])))
        for a, b in pairs:
            if a is None or b is None:
                continue
            if a.shape != b.shape:
                return float("inf")
            worst = max(worst, float((a - b).abs().max())) if a.numel() else worst
        return worst

    # ------------------------------------------------------------------ persistence
    def save(self, path: Path | str) -> Path:
        """Write ``path/targets.safetensors`` + ``path/targets.json``; returns the folder."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.image_embeddings)
        dim = self.embed_dim or 0
        images = (torch.stack([self.image_embeddings[k] for k in keys]) if keys
                  else torch.zeros(0, dim, dtype=torch.float32))
        prob_keys = sorted(self.image_probabilities)
        probs = (torch.stack([self.image_probabilities[k] for k in prob_keys]) if prob_keys
                 else torch.zeros(0, self.num_classes, dtype=torch.float32))
        tensors = {"image_embeddings": images.contiguous(), "image_probabilities": probs.contiguous()}
        if self.text_embeddings is not None:
            tensors["text_embeddings"] = self.text_embeddings
        if self.sentence_embeddings is not None:
            tensors["sentence_embeddings"] = self.sentence_embeddings
        save_file(tensors, str(out / TENSORS_FILE))
        meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "class_names": self.class_names,
                                "image_keys": keys, "probability_keys": prob_keys, "logit_scale": self.logit_scale,
                                "teacher_id": self.teacher_id, "embed_dim": self.embed_dim,
                                "image_size": self.image_size}
        (out / META_FILE).write_text(json.dumps(meta, indent=1))
        return out

    @classmethod
    def load(cls, path: Path | str) -> "TeacherTargets":
        folder = Path(path)
        meta_file, tensor_file = folder / META_FILE, folder / TENSORS_FILE
        if not meta_file.is_file() or not tensor_file.is_file():
            raise TargetsError(f"{folder} is not a saved TeacherTargets folder (needs {META_FILE} and {TENSORS_FILE})")
        try:
            meta = json.loads(meta_file.read_text())
            tensors = load_file(str(tensor_file))
        except Exception as exc:  # corrupt json / safetensors
            raise TargetsError(f"cannot read teacher targets in {folder}: {exc}") from exc
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise TargetsError(f"{folder}: unsupported targets format {meta.get('format_version')!r}")
        keys, images = meta["image_keys"], tensors["image_embeddings"]
        if len(keys) != images.shape[0]:
            raise TargetsError(f"{folder}: {len(keys)} image keys but {images.shape[0]} image embeddings")
        prob_keys = meta.get("probability_keys", [])
        probs = tensors.get("image_probabilities", torch.zeros(0, len(meta["class_names"])))
        if len(prob_keys) != probs.shape[0]:
            raise TargetsError(f"{folder}: {len(prob_keys)} probability keys but {probs.shape[0]} rows")
        obj = cls(meta["class_names"], tensors.get("text_embeddings"), {}, meta["logit_scale"], meta["teacher_id"],
                  {}, tensors.get("sentence_embeddings"), meta.get("image_size"))
        # Keys are stored resolved; do not re-resolve on load (a moved dataset keeps its old keys).
        obj.image_embeddings = {k: images[i].clone() for i, k in enumerate(keys)}
        for i, k in enumerate(prob_keys):
            _check_probabilities(k, probs[i], obj.num_classes)
        obj.image_probabilities = {k: probs[i].clone() for i, k in enumerate(prob_keys)}
        return obj


def _as_matrix(t: Any) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float32).detach().cpu().contiguous()


def _check_probabilities(key: str, vec: torch.Tensor, num_classes: int) -> None:
    """A probability vector over the classes: non-negative, summing to at most 1 (a sparse top-k
    answer may omit mass, which KD renormalises), and not all zero."""
    if vec.shape[0] != num_classes:
        raise TargetsError(f"class probabilities of {key} have {vec.shape[0]} entries, expected {num_classes}")
    total = float(vec.sum())
    if not torch.isfinite(vec).all() or float(vec.min()) < 0 or total > 1.0 + UNIT_TOLERANCE or total <= 0:
        raise TargetsError(f"class probabilities of {key} are not a distribution (sum {total:.4f})")


# ---------------------------------------------------------------------- white-box helper
@torch.no_grad()
def local_targets(model: torch.nn.Module, preprocess: Any, tokenizer: Any, image_paths: Sequence[Path | str],
                  class_names: Sequence[str], *, device: str | torch.device = "cpu", batch_size: int = 64,
                  templates: Sequence[str] = TEMPLATES, teacher_id: str | None = None) -> TeacherTargets:
    """The same targets the vendor would sell, computed in-process from an open_clip model.

    ``preprocess`` is the model's *eval* transform (un-augmented images, CLIP's own normalisation).
    """
    from PIL import Image

    device = torch.device(device)
    was_training = model.training
    model = model.to(device).eval()
    per_class = []
    for prompts in all_prompts(class_names, templates):
        tokens = tokenizer(prompts).to(device)
        per_class.append(model.encode_text(tokens).float().cpu())
    text = ensemble(per_class)
    paths = [Path(p) for p in image_paths]
    images: dict[str, torch.Tensor] = {}
    for i in range(0, len(paths), batch_size):
        chunk = paths[i:i + batch_size]
        pixels = []
        for p in chunk:
            with Image.open(p) as im:
                pixels.append(preprocess(im.convert("RGB")))
        feats = F.normalize(model.encode_image(torch.stack(pixels).to(device)).float(), dim=-1).cpu()
        images.update({image_key(p): f for p, f in zip(chunk, feats)})
    scale = getattr(model, "logit_scale", None)
    logit_scale = float(scale.exp().item()) if isinstance(scale, torch.Tensor) else 100.0
    model.train(was_training)
    return TeacherTargets(list(class_names), text, images, logit_scale,
                          teacher_id or f"local:{type(model).__name__}")
