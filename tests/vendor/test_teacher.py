"""Teacher specs in all three forms load through open_clip; a bad teacher is a clear start-up
error and the server never starts half-alive."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vendor_api.errors import TeacherLoadError
from vendor_api.model_files import TINY_CLIP_CONFIG, save_local_dir, seeded_model
from vendor_api.teacher import Teacher, TeacherSpec


@pytest.mark.parametrize("spec,model,pretrained", [
    ("ViT-L-14:openai", "ViT-L-14", "openai"),
    ("ViT-B-32:/models/b32.safetensors", "ViT-B-32", "/models/b32.safetensors"),
    ("local-dir:/srv/teacher", "local-dir:/srv/teacher", None),
    ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None),
])
def test_spec_forms_map_to_open_clip_arguments(spec, model, pretrained):
    parsed = TeacherSpec.parse(spec)
    assert (parsed.model_name, parsed.pretrained) == (model, pretrained)


def test_model_id_never_exposes_server_paths():
    assert TeacherSpec.parse("ViT-B-32:/secret/dir/b32.safetensors").model_id == "ViT-B-32:b32"
    assert TeacherSpec.parse("local-dir:/secret/dir/my-clip").model_id == "my-clip"
    assert TeacherSpec.parse("ViT-L-14:openai").model_id == "ViT-L-14:openai"


def test_weights_file_form_with_custom_config(tmp_path):
    """MODEL:/path/weights.safetensors, with the architecture registered from a config dir."""
    from safetensors.torch import save_file

    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "tiny-test-clip.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    model = seeded_model(TINY_CLIP_CONFIG, seed=3)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    teacher = Teacher.load(f"tiny-test-clip:{weights}", model_config_dir=config_dir)
    assert teacher.embed_dim == 64 and teacher.model_id == "tiny-test-clip:tiny"
    tokens = teacher.tokenize(["a photo of a cat"])
    expected = model.encode_text(tokens).detach()
    got = teacher.encode_texts(tokens)
    assert np.allclose(got[0], (expected / expected.norm(dim=-1, keepdim=True))[0].numpy(), atol=1e-5)


def test_local_dir_round_trips_weights(tmp_path, teacher):
    copy = save_local_dir(teacher.model, TINY_CLIP_CONFIG, tmp_path / "copy")
    again = Teacher.load(f"local-dir:{copy}")
    tokens = teacher.tokenize(["hello"])
    assert np.allclose(again.encode_texts(tokens), teacher.encode_texts(tokens), atol=1e-6)


@pytest.mark.parametrize("spec,needle", [
    ("", "empty"),
    ("ViT-B-32", "is not MODEL:TAG"),
    ("ViT-B-32:/does/not/exist.safetensors", "weights file not found"),
    ("local-dir:/does/not/exist", "not an open_clip local-dir"),
    ("No-Such-Model:openai", "cannot load teacher"),
    ("ViT-B-32:openai", "cannot load teacher"),  # a real tag, but no hub on this machine
])
def test_unloadable_teacher_is_a_clear_error(spec, needle):
    with pytest.raises(TeacherLoadError, match=needle):
        Teacher.load(spec)


def test_corrupt_weights_are_a_clear_error(tmp_path):
    directory = tmp_path / "broken"
    save_local_dir(seeded_model(TINY_CLIP_CONFIG, 0), TINY_CLIP_CONFIG, directory)
    (directory / "open_clip_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(TeacherLoadError, match="cannot load teacher"):
        Teacher.load(f"local-dir:{directory}")


def test_server_refuses_to_start_with_a_bad_teacher(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VENDOR_TEACHER": "local-dir:/nowhere",
           "VENDOR_DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "vendor_api.cli", "serve", "--port", "0"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "vendor-api: /nowhere is not an open_clip local-dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_cuda_device_without_cuda_is_a_clear_error(tiny_teacher_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(TeacherLoadError, match="CUDA is not available"):
        Teacher.load(f"local-dir:{tiny_teacher_dir}", device="cuda")


def test_cuda_teacher_runs_fp16_and_matches_fp32(tiny_teacher_dir):
    """On a GPU machine: the default precision there is fp16, and it must stay faithful."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA on this machine")
    gpu = Teacher.load(f"local-dir:{tiny_teacher_dir}", device="cuda")
    cpu = Teacher.load(f"local-dir:{tiny_teacher_dir}", device="cpu")
    assert gpu.precision == "fp16"
    from PIL import Image

    pixels = torch.stack([cpu.preprocess(Image.new("RGB", (40, 40), (200, 30, 90)))])
    a, b = gpu.encode_images(pixels)[0], cpu.encode_images(pixels)[0]
    assert float(np.dot(a, b)) >= 0.999
