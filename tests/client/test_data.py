"""The client's DomainBed reader and student registry, on a real tiny build."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client_distiller.data import (DatasetLayoutError, DomainBedFolder, ImageListDataset, eval_transform, in_out_split,
                                   leave_one_out, train_transform)
from client_distiller.training.students import STUDENTS, StudentLoadError, create_student
from offline_data import build_benchmark
from offline_data.weights import packaged_weights_path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> DomainBedFolder:
    out = tmp_path_factory.mktemp("bench") / "fd"
    build_benchmark("fashion-domains", out, size="tiny", per_class=10)
    return DomainBedFolder.scan(out)


def test_scan_reads_domains_classes_and_names(folder: DomainBedFolder) -> None:
    assert set(folder.domains) == {"photo", "cartoon", "sketch", "negative"}
    assert len(folder.classes) == 10 and all(len(folder.files[d]) == 100 for d in folder.domains)
    assert folder.class_names[folder.classes.index("ankle_boot")] == "ankle boot"


def test_in_out_split_is_seeded_disjoint_80_20(folder: DomainBedFolder) -> None:
    a, b = in_out_split(folder, "photo", seed=1), in_out_split(folder, "photo", seed=1)
    c = in_out_split(folder, "photo", seed=2)
    assert a == b and a != c
    assert len(a.train) == 80 and len(a.val) == 20 and not set(a.train) & set(a.val)


def test_leave_one_out(folder: DomainBedFolder) -> None:
    loo = leave_one_out(folder, "sketch")
    assert [s.domain for s in loo.sources] == [d for d in folder.domains if d != "sketch"]
    assert len(loo.test) == 100
    with pytest.raises(DatasetLayoutError, match="unknown domain"):
        leave_one_out(folder, "clipart")


def test_transforms_and_dataset(folder: DomainBedFolder) -> None:
    items = folder.files["photo"][:4]
    for tf in (train_transform(48, (0.5,) * 3, (0.5,) * 3), eval_transform(48, (0.5,) * 3, (0.5,) * 3)):
        x, y = ImageListDataset(items, tf, preload=True)[0]
        assert x.shape == (3, 48, 48) and -1.01 <= float(x.min()) and float(x.max()) <= 1.01 and y == items[0][1]


def test_scan_rejects_non_domainbed(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError):
        DomainBedFolder.scan(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetLayoutError):
        DomainBedFolder.scan(tmp_path / "flat")


def test_default_student_has_packaged_imagenet_weights() -> None:
    s = create_student("efficientnet-lite0", num_classes=10)
    assert s.mean == s.std == (0.5, 0.5, 0.5) and s.feature_dim == 1280
    packaged = torch.load(packaged_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert torch.equal(s.model.conv_stem.weight, packaged["_conv_stem.weight"])
    assert s.model(torch.zeros(2, 3, 64, 64)).shape == (2, 10)
    assert "efficientnet-lite0" in STUDENTS


def test_unknown_student_offline_is_a_clear_error() -> None:
    with pytest.raises(StudentLoadError):
        create_student("no_such_architecture_xyz")
