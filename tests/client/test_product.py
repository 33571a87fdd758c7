"""The deployable student: save/load/predict round trip, ONNX parity, and `client-distill predict`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from client_distiller.cli import main
from client_distiller.data import DomainBedFolder
from client_distiller.deployed import DistilledStudent, StudentFormatError, export_onnx, onnx_max_abs_diff
from client_distiller.targets import TeacherTargets
from client_distiller.training.methods import get_method
from tests.support.client import one_thread, tiny_student  # noqa: F401  (one_thread: autouse in this module)


@pytest.fixture(scope="module")
def saved_student(tiny_bench: Path, bench_targets: TeacherTargets, tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    method = get_method("vl2v-adip")(tiny_student(), 10, bench_targets).eval()
    with torch.no_grad():  # a non-trivial projection / BN state, as after training
        method.head.projection.weight.normal_(generator=torch.Generator().manual_seed(0))
    data = DomainBedFolder.scan(tiny_bench)
    folder = DistilledStudent.from_method(method, image_size=32, class_names=data.class_names).save(
        tmp_path_factory.mktemp("student") / "vl2v")
    return method, folder, data


def test_round_trip_predicts_like_the_trained_method(saved_student) -> None:
    method, folder, data = saved_student
    student = DistilledStudent.load(folder)
    assert student.class_names == data.class_names and student.image_size == 32
    assert student.config["timm_name"] == "test_efficientnet" and student.config["head"] == "text"
    assert torch.equal(student.head.text_embeddings, method.head.text_embeddings)
    paths = [items[0][0] for items in data.files.values()]
    pixels = student.pixels(paths)
    assert torch.allclose(student(pixels), method.predict(pixels), atol=1e-5)
    by_path = student.predict(paths)
    by_pil = student.predict([Image.open(p) for p in paths])
    assert [p.label for p in by_path] == [p.label for p in by_pil]
    top = method.predict(pixels).argmax(-1).tolist()
    assert [p.label for p in by_path] == [data.class_names[k] for k in top]
    assert all(abs(sum(p.probabilities) - 1.0) < 1e-4 and p.probability == max(p.probabilities) for p in by_path)


def test_load_rejects_a_non_student_folder(tmp_path: Path) -> None:
    with pytest.raises(StudentFormatError):
        DistilledStudent.load(tmp_path)


def test_onnx_export_matches_pytorch(saved_student, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, folder, _ = saved_student
    out = export_onnx(folder, tmp_path / "student.onnx")  # checks parity itself (atol 1e-4)
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    assert onnx_max_abs_diff(DistilledStudent.load(folder), out, pixels) < 1e-4


def test_cli_predict_prints_a_class_per_image(saved_student, capsys: pytest.CaptureFixture[str]) -> None:
    method, folder, data = saved_student
    paths = [data.files["photo"][0][0], data.files["sketch"][5][0]]
    assert main(["predict", "--student", str(folder), *map(str, paths), "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = [p.label for p in DistilledStudent.load(folder).predict(paths)]
    assert [ln.split("\t")[1] for ln in lines] == expected and all(len(ln.split("\t")) == 5 for ln in lines)
    assert main(["predict", "--student", str(folder.parent / "missing"), str(paths[0])]) == 2
    assert "not a saved student" in capsys.readouterr().err
