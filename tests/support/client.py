"""Fixtures for the client's training-half tests: a tiny real offline benchmark, a tiny seeded
open_clip teacher and its white-box targets, and a tiny timm student.

Import the fixtures by name into a test module. Tests run single-threaded: on a shared 2-core CPU
OpenMP's second thread makes small convolutions ~20x slower.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from client_distiller.data import DomainBedFolder
from client_distiller.targets import TeacherTargets, local_targets
from client_distiller.training.students import Student, create_student

# Each importing module registers its own copy of a session fixture; this cache makes the
# expensive values (benchmark, teacher, targets) once per session anyway.
_CACHE: dict[str, object] = {}

TINY_STUDENT = "test_efficientnet"  # timm's ~100k-parameter EfficientNet (BatchNorm included), random init
TEST_DOMAIN = "sketch"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fashion-domains, client split, tiny preset: 4 domains x 10 classes x 6 images of 64 px."""
    from offline_data import build_benchmark

    if "bench" not in _CACHE:
        out = tmp_path_factory.mktemp("bench") / "fashion-tiny"
        build_benchmark("fashion-domains", out, seed=0, split="client", size="tiny")
        _CACHE["bench"] = out
    return _CACHE["bench"]  # type: ignore[return-value]


@pytest.fixture(scope="session")
def tiny_clip(tiny_teacher_dir: Path):
    import open_clip

    if "clip" not in _CACHE:
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_teacher_dir}")
        _CACHE["clip"] = (model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{tiny_teacher_dir}"))
    return _CACHE["clip"]


@pytest.fixture(scope="session")
def bench_targets(tiny_bench: Path, tiny_clip) -> TeacherTargets:
    """White-box targets for every image of the benchmark (test domain included, on purpose)."""
    if "targets" not in _CACHE:
        model, preprocess, tokenizer = tiny_clip
        data = DomainBedFolder.scan(tiny_bench)
        paths = [p for items in data.files.values() for p, _ in items]
        _CACHE["targets"] = local_targets(model, preprocess, tokenizer, paths, data.class_names, device="cpu",
                                          teacher_id="tiny-seeded-clip")
    return _CACHE["targets"]  # type: ignore[return-value]


def tiny_student(seed: int = 0) -> Student:
    torch.manual_seed(seed)
    return create_student(TINY_STUDENT, pretrained=False)


# ----------------------------------------------------------------------------- distill command lines
PROMPTS = 10 * 7  # classes x templates
TRAIN_IMAGES = 3 * 10 * 6 - 3 * 12  # three source domains, 80% in-split of 60 images each


def distill_argv(vendor, key: str, bench: Path, out: Path, cache: Path, budget: int, *extra: str) -> list[str]:
    """A small, fast `client-distill distill` command line against ``vendor`` (tiny student, 2 steps)."""
    return ["--vendor-url", vendor.base_url, "--api-key", key, "--budget", str(budget), "--data", str(bench),
            "--test-domain", "sketch", "--out", str(out), "--cache-dir", str(cache), "--student", "test_efficientnet",
            "--random-init", "--steps", "2", "--batch-size", "2", "--image-size", "32", "--eval-every", "2",
            "--hparam", "vl2v-adip.lr=0.01", *extra]
