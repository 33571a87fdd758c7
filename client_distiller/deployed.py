"""The deployable student: one folder that predicts class names with no vendor access.

``DistilledStudent.save(dir)`` writes

- ``config.json`` - format version, method, student name, timm architecture, image size, mean/std,
  head kind and its shape, class names, teacher id;
- ``model.safetensors`` - ``backbone.*`` (timm weights) and ``head.*``; for VL2V-ADiP-style
  students the head holds the projection, the teacher's class text embeddings and logit scale
  (the Predict head), for ERM a linear classifier.

The head modules are the ones training used (:mod:`client_distiller.training.heads`), so a reloaded
student computes exactly what the trained method's ``predict`` computed. :func:`export_onnx`
writes the same computation (normalised pixels -> class logits) as an ONNX graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file, save_file

from client_distiller.data import eval_transform
from client_distiller.errors import RunError, UsageError
from client_distiller.training.heads import HEADS
from client_distiller.training.students import BACKBONES, STUDENTS

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class StudentFormatError(UsageError):
    """A folder is not a saved student, or its files disagree with each other."""


class ExportError(RunError):
    """ONNX export is unavailable (package missing) or the exported graph disagrees with PyTorch."""


@dataclass(frozen=True)
class Prediction:
    """One image's prediction: the top class and the full probability vector (class order)."""

    label: str
    probability: float
    probabilities: tuple[float, ...]


def timm_architecture(student_name: str, backbone: nn.Module) -> str:
    """The timm architecture name needed to rebuild ``backbone`` offline (weights come from the file)."""
    if student_name in STUDENTS:
        return STUDENTS[student_name].timm_name
    arch = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture")
    return arch or student_name


class DistilledStudent(nn.Module):
    """Backbone + head + how to feed it; ``forward`` maps normalised pixels to class logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module, config: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.config = dict(config)
        self.eval()

    @property
    def class_names(self) -> list[str]:
        return list(self.config["class_names"])

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(pixels))

    # ------------------------------------------------------------------ building
    @classmethod
    def from_method(cls, method: nn.Module, *, image_size: int, class_names: Sequence[str]) -> "DistilledStudent":
        """Snapshot a trained :class:`~client_distiller.training.methods.Method` (copies its weights)."""
        import copy

        info = method.student_info  # type: ignore[attr-defined]
        head = method.head  # type: ignore[attr-defined]
        targets = getattr(method, "targets", None)
        config = {
            "format_version": FORMAT_VERSION,
            "method": method.name,  # type: ignore[attr-defined]
            "student": info.name,
            "timm_name": timm_architecture(info.name, method.backbone),  # type: ignore[attr-defined]
            "image_size": int(image_size),
            "mean": list(info.mean), "std": list(info.std),
            "head": head.kind, "head_config": head.config(),
            "class_names": list(class_names),
            "teacher_id": targets.teacher_id if targets is not None else None,
        }
        if info.rebuild is not None:  # a non-timm backbone (VL2V-SD: the teacher's image tower)
            config["backbone"] = dict(info.rebuild)
        return cls(copy.deepcopy(method.backbone).cpu(), copy.deepcopy(head).cpu(), config)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ persistence
    def save(self, folder: Path | str) -> Path:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "client_distiller.DistilledStudent"})
        (out / CONFIG_FILE).write_text(json.dumps(self.config, indent=1))
        return out

    @classmethod
    def load(cls, folder: Path | str, *, device: str | torch.device = "cpu") -> "DistilledStudent":
        folder = Path(folder)
        cfg_file, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not cfg_file.is_file() or not weights.is_file():
            raise StudentFormatError(f"{folder} is not a saved student (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        config = json.loads(cfg_file.read_text())
        if config.get("format_version") != FORMAT_VERSION:
            raise StudentFormatError(f"{folder}: unsupported student format {config.get('format_version')!r}")
        head_cls = HEADS.get(config["head"])
        if head_cls is None:
            raise StudentFormatError(f"{folder}: unknown head kind {config['head']!r}; known: {', '.join(HEADS)}")
        build = config.get("backbone") or {"kind": "timm", "timm_name": config["timm_name"]}
        if build.get("kind") not in BACKBONES:
            raise StudentFormatError(f"{folder}: unknown backbone kind {build.get('kind')!r}; known: {', '.join(BACKBONES)}")
        try:
            backbone = BACKBONES[build["kind"]](build)
        except Exception as exc:
            raise StudentFormatError(f"{folder}: cannot build the {build['kind']} backbone: {exc}") from exc
        model = cls(backbone, head_cls.from_config(config["head_config"]), config)  # type: ignore[attr-defined]
        try:
            model.load_state_dict(load_file(str(weights)), strict=True)
        except RuntimeError as exc:
            raise StudentFormatError(f"{folder}: weights do not match the config: {exc}") from exc
        if len(config["class_names"]) != model.head.config()["num_classes"]:  # type: ignore[operator]
            raise StudentFormatError(f"{folder}: {len(config['class_names'])} class names for a "
                                     f"{model.head.config()['num_classes']}-class head")  # type: ignore[operator]
        return model.to(device).eval()

    # ------------------------------------------------------------------ inference
    def transform(self):
        return eval_transform(self.image_size, self.config["mean"], self.config["std"])

    def pixels(self, images: Sequence[Image.Image | Path | str]) -> torch.Tensor:
        """Normalised [B, 3, S, S] pixels (the evaluation transform training used)."""
        tf = self.transform()
        out = []
        for im in images:
            if isinstance(im, (str, Path)):
                with Image.open(im) as f:
                    im = f.convert("RGB")
            out.append(tf(im.convert("RGB")))
        return torch.stack(out)

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image | Path | str], *, batch_size: int = 64) -> list[Prediction]:
        """Class names and softmax probabilities for PIL images or image paths."""
        device = next(self.parameters()).device
        names = self.class_names
        preds: list[Prediction] = []
        for i in range(0, len(images), batch_size):
            probs = self(self.pixels(images[i:i + batch_size]).to(device)).float().softmax(-1).cpu()
            for p in probs:
                k = int(p.argmax())
                preds.append(Prediction(names[k], float(p[k]), tuple(float(v) for v in p)))
        return preds


def _export_dynamo(model: nn.Module, example: torch.Tensor, out: Path, opset: int) -> None:
    torch.onnx.export(model, (example,), str(out), input_names=["pixels"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset, dynamo=True,
                      verbose=False)


def _export_torchscript(model: nn.Module, example: torch.Tensor, out: Path, opset: int) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), str(out), input_names=["pixels"], output_names=["logits"],
                          dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                          dynamo=False)


# "dynamo" is PyTorch's supported exporter (needs onnxscript); "torchscript" is the legacy one,
# deprecated but fast and dependency-free beyond onnx.
EXPORTERS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def export_onnx(folder: Path | str, out: Path | str, *, exporter: str = "dynamo", opset: int = 18,
                check: bool = True, atol: float = 1e-4) -> Path:
    """Export a saved student as ONNX (input ``pixels`` [B, 3, S, S] -> output ``logits`` [B, C]).

    The batch dimension is dynamic. With ``check`` the graph is run in onnxruntime on a batch of a
    different size than the export example and compared with PyTorch (max abs logit difference).
    Needs ``onnx`` (+ ``onnxscript`` for the dynamo exporter, ``onnxruntime`` for the check).
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose from {', '.join(EXPORTERS)}")
    try:
        import onnx  # noqa: F401
        if exporter == "dynamo":
            import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the {exc.name!r} package (pip install onnx onnxscript onnxruntime)"
                          ) from exc
    model = DistilledStudent.load(folder)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = model.image_size
    gen = torch.Generator().manual_seed(0)
    EXPORTERS[exporter](model, torch.randn(2, 3, size, size, generator=gen), out, opset)
    if check:
        diff = onnx_max_abs_diff(model, out, torch.randn(3, 3, size, size, generator=gen))
        if diff > atol:
            raise ExportError(f"ONNX output differs from PyTorch by {diff:.2e} (> {atol:.0e})")
    return out


def onnx_max_abs_diff(model: DistilledStudent, onnx_path: Path | str, pixels: torch.Tensor) -> float:
    """Largest absolute logit difference between onnxruntime and PyTorch on ``pixels``."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("checking an ONNX export needs the 'onnxruntime' package") from exc
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"pixels": pixels.numpy()})[0]
    with torch.no_grad():
        want = model(pixels).numpy()
    return float(abs(got - want).max())
