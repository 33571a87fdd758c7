"""The buying/training contract: prompt ensembling, TeacherTargets, and white-box local targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from client_distiller.data import DomainBedFolder
from client_distiller.prompts import TEMPLATES, PromptError, class_prompts, ensemble
from client_distiller.targets import TargetsError, TeacherTargets, image_key
from tests.support.client import one_thread  # noqa: F401  (one_thread: autouse in this module)


def test_class_prompts_replace_underscores() -> None:
    prompts = class_prompts("ankle_boot")
    assert prompts[0] == "a photo of a ankle boot."
    assert len(prompts) == len(TEMPLATES) and all("ankle boot" in p for p in prompts)
    with pytest.raises(PromptError):
        class_prompts("_")


def test_ensemble_normalises_then_averages_then_renormalises() -> None:
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # unnormalised template vectors of one class
    out = ensemble([a, torch.tensor([[0.0, 3.0]])])
    expected = F.normalize(torch.tensor([0.5, 0.5]), dim=0)
    assert torch.allclose(out[0], expected) and torch.allclose(out[1], torch.tensor([0.0, 1.0]))
    assert out.dtype == torch.float32 and out.shape == (2, 2)


def test_targets_validate_and_round_trip(tmp_path: Path) -> None:
    text = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    img = F.normalize(torch.randn(8), dim=0)
    t = TeacherTargets(["a", "b_c", "d"], text, {str(tmp_path / "x.png"): img}, 42.0, "teacher-x")
    assert t.embed_dim == 8 and t.has_image(tmp_path / "x.png") and not t.has_image(tmp_path / "y.png")
    assert torch.equal(t.image_target(str(tmp_path / "sub" / ".." / "x.png")), img)  # keys are resolved paths
    back = TeacherTargets.load(t.save(tmp_path / "saved"))
    assert back.class_names == t.class_names and back.logit_scale == 42.0 and back.teacher_id == "teacher-x"
    assert torch.equal(back.text_embeddings, text) and torch.equal(back.image_target(tmp_path / "x.png"), img)
    assert t.restricted_to([]).image_embeddings == {}
    with pytest.raises(TargetsError):
        TeacherTargets(["a"], torch.ones(1, 4), {})  # not normalised
    with pytest.raises(TargetsError):
        TeacherTargets(["a", "b"], text[:1], {})  # wrong class count
    with pytest.raises(TargetsError):
        TeacherTargets.load(tmp_path / "nothing")


def test_targets_keep_the_teachers_image_size(tmp_path: Path) -> None:
    """Saved targets carry the teacher's input size, so `tune` defaults the student to it as `distill` does."""
    from client_distiller.commands.tune import TuneError, config_from, add_tune_arguments

    text = F.normalize(torch.randn(2, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    t = TeacherTargets(["a", "b"], text, {}, 20.0, "teacher-x", image_size=96)
    folder = t.save(tmp_path / "saved")
    back = TeacherTargets.load(folder)
    assert back.image_size == 96 and back.restricted_to([]).image_size == 96
    with pytest.raises(TargetsError):
        TeacherTargets(["a", "b"], text, {}, image_size=0)

    import argparse
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    base = ["--data", str(tmp_path), "--targets", str(folder), "--out", str(tmp_path / "tune"), "--method", "erm"]
    assert config_from(parser.parse_args(base)).image_size == 96
    assert config_from(parser.parse_args(base + ["--image-size", "64"])).image_size == 64
    TeacherTargets(["a", "b"], text, {}).save(tmp_path / "old")  # no size recorded: the user must say
    with pytest.raises(TuneError, match="--image-size"):
        config_from(parser.parse_args(base[:2] + ["--targets", str(tmp_path / "old")] + base[4:]))


def test_local_targets_match_the_open_clip_model(tiny_bench: Path, tiny_clip, bench_targets: TeacherTargets) -> None:
    model, preprocess, tokenizer = tiny_clip
    data = DomainBedFolder.scan(tiny_bench)
    assert bench_targets.class_names == data.class_names and bench_targets.embed_dim == 64
    assert len(bench_targets.image_embeddings) == 240
    assert bench_targets.logit_scale == pytest.approx(model.logit_scale.exp().item())
    with torch.no_grad():
        per_template = F.normalize(model.encode_text(tokenizer(class_prompts(data.class_names[3]))), dim=-1)
        from PIL import Image
        path = data.files["photo"][0][0]
        img = F.normalize(model.encode_image(preprocess(Image.open(path).convert("RGB"))[None]), dim=-1)[0]
    assert torch.allclose(bench_targets.text_embeddings[3], F.normalize(per_template.mean(0), dim=0), atol=1e-5)
    assert torch.allclose(bench_targets.image_target(path), img, atol=1e-5)
    assert image_key(path) in bench_targets.image_embeddings
