"""KD, CLIP-KD and DIME-FM losses against hand-computed values on tiny batches, the KL direction
and log-probabilities, ablation weights, the registry, and VL2V-SD's teacher-initialised student."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from client_distiller.deployed import DistilledStudent
from client_distiller.targets import TeacherTargets
from client_distiller.training.methods import METHODS, Batch, HparamError, MissingTeacherOutputError, get_method
from client_distiller.training.methods.clip_kd import crd_loss, fd_loss, icl_loss
from client_distiller.training.methods.dime_fm import pvl_loss, vl_loss
from client_distiller.training.methods.kd import kd_divergence, teacher_log_probs
from client_distiller.training.methods.vl2v_sd import MissingTeacherWeightsError
from tests.support.client import one_thread, tiny_student  # noqa: F401  (one_thread: autouse in this module)

def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _softmax(v: list[float]) -> list[float]:
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


# ---------------------------------------------------------------------- KD
def test_kd_divergence_hand_computed_direction_and_log_probabilities() -> None:
    z = torch.tensor([[2.0, 0.0]])
    p = torch.tensor([[0.75, 0.25]])
    want = _kl([0.75, 0.25], _softmax([2.0, 0.0]))            # KL(teacher || student)
    assert kd_divergence(z, p, 1.0).item() == pytest.approx(want, abs=1e-6)
    assert kd_divergence(z, p, 1.0).item() != pytest.approx(_kl(_softmax([2.0, 0.0]), [0.75, 0.25]), abs=1e-3)
    # the public code's bug: probabilities (not log-probabilities) as kl_div's input gives another number
    buggy = F.kl_div(F.softmax(z, -1), p, reduction="batchmean").item()
    assert buggy != pytest.approx(want, abs=1e-3)
    # T = 2: tempered teacher = softmax(log p / 2) = sqrt(p) renormalised; loss scaled by T^2
    pt = [math.sqrt(0.75), math.sqrt(0.25)]
    pt = [v / sum(pt) for v in pt]
    assert kd_divergence(z, p, 2.0).item() == pytest.approx(4 * _kl(pt, _softmax([1.0, 0.0])), abs=1e-6)


def test_kd_handles_sparse_top_k_probabilities() -> None:
    p = torch.tensor([[0.9, 0.0, 0.0]])                      # a top-1 answer: the rest omitted
    log_p = teacher_log_probs(p, 1.0)
    assert torch.isfinite(log_p).all() and log_p.exp().sum().item() == pytest.approx(1.0)
    assert log_p.exp()[0, 0].item() == pytest.approx(1.0, abs=1e-6)   # renormalised, floor mass negligible
    assert torch.isfinite(kd_divergence(torch.zeros(1, 3), p, 2.0))


def test_kd_method_mixes_ce_and_falls_back_to_ce_without_probabilities() -> None:
    m = get_method("kd")(tiny_student(), 3, TeacherTargets(["a", "b", "c"], None), {"alpha": 0.25,
                                                                                   "temperature": 2.0}).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0, 2])
    probs = torch.tensor([[0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    has = torch.tensor([True, False])
    with torch.no_grad():
        logits = m.head(m.backbone(x))
        ce = F.cross_entropy(logits, y, reduction="none")
        q = F.softmax(logits[0] / 2, -1).tolist()
        pt = _softmax([math.log(v) / 2 for v in probs[0].tolist()])
        by_hand = (0.25 * 4 * _kl(pt, q) + 0.75 * ce[0].item() + ce[1].item()) / 2
        assert m.loss(Batch(x, y, probabilities=probs, has_probabilities=has)).item() == pytest.approx(by_hand, abs=1e-5)
    with pytest.raises(HparamError):
        get_method("kd")(tiny_student(), 3, TeacherTargets(["a", "b", "c"], None), {"alpha": 1.5})


# ---------------------------------------------------------------------- CLIP-KD
def test_clip_kd_terms_hand_computed() -> None:
    assert fd_loss(torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.4)
    eye = torch.eye(2)
    # scale ln 3: teacher image->text logits [0, ln 3] -> p = [.25, .75]; student [1, 1]/sqrt2 -> uniform.
    # KL(teacher || student) = .25 ln .5 + .75 ln 1.5 (the reverse direction would be .1438); the
    # text->image direction over a single image is 0, and CRD is the mean of the two directions
    diag = torch.tensor([[1.0, 1.0]]) / math.sqrt(2)
    got = crd_loss(diag, torch.tensor([[0.0, 1.0]]), eye, math.log(3)).item()
    assert got == pytest.approx(_kl([0.25, 0.75], [0.5, 0.5]) / 2, abs=1e-6)
    assert got != pytest.approx(_kl([0.5, 0.5], [0.25, 0.75]) / 2, abs=1e-3)
    # text->image: two images, teacher [[1,0],[0,1]] vs student both on text 0 at scale ln 3.
    # image->text: row 0 identical (0), row 1 KL([.25,.75] || [.75,.25]); text->image column 0:
    # teacher [.75,.25] vs student uniform, column 1: teacher [.25,.75] vs uniform
    t2, s2 = eye, torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    i2t = (0 + _kl([0.25, 0.75], [0.75, 0.25])) / 2
    t2i = (_kl([0.75, 0.25], [0.5, 0.5]) + _kl([0.25, 0.75], [0.5, 0.5])) / 2
    assert crd_loss(s2, t2, eye, math.log(3)).item() == pytest.approx(0.5 * (i2t + t2i), abs=1e-6)
    # ICL, scale 1, two images of class 0 with student embeddings e0, e1 and class texts e0, e1:
    # image->text: CE([1,0], 0) = ln(1 + e^-1), CE([0,1], 0) = ln(1 + e); text->image: text 0 over
    # the images, target spread over both (same class): .5 ln(1 + e^-1) + .5 ln(1 + e)
    both = 0.5 * (math.log(1 + 1 / math.e) + math.log(1 + math.e))
    got = icl_loss(eye, torch.tensor([0, 0]), eye, torch.tensor(1.0))
    assert got.item() == pytest.approx(both, abs=1e-6)
    # one image per class: each direction is ln(1 + e^-1), and a learnt scale sharpens it
    assert icl_loss(eye, torch.tensor([0, 1]), eye, torch.tensor(1.0)).item() == \
        pytest.approx(math.log(1 + 1 / math.e), abs=1e-6)
    assert icl_loss(eye, torch.tensor([0, 1]), eye, torch.tensor(5.0)).item() < math.log(1 + 1 / math.e)


def test_clip_kd_weights_and_ablation(bench_targets: TeacherTargets) -> None:
    kw = {"align_lr": 1e-2}
    full = get_method("clip-kd")(tiny_student(), 10, bench_targets, kw).eval()
    assert (full.hparams["fd_weight"], full.hparams["crd_weight"], full.hparams["icl_weight"]) == (2000.0, 1.0, 1.0)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])
    t_img = F.normalize(torch.randn(4, 64, generator=g), dim=-1)
    batch = Batch(x, y, t_img, torch.tensor([True, True, False, True]))
    with torch.no_grad():
        t = full.terms(batch)
        assert full.loss(batch).item() == pytest.approx(
            (t["task"] + 2000 * t["fd"] + t["crd"] + t["icl"]).item(), rel=1e-5)
        fd_only = get_method("clip-kd")(tiny_student(), 10, bench_targets,
                                        {**kw, "crd_weight": 0, "icl_weight": 0, "task_weight": 0}).eval()
        fd_only.load_state_dict(full.state_dict())
        assert fd_only.loss(batch).item() == pytest.approx(2000 * t["fd"].item(), rel=1e-5)
        z = F.normalize(full.head.projection(full.backbone(x))[[0, 1, 3]], dim=-1)
        assert t["fd"].item() == pytest.approx(F.mse_loss(z, t_img[[0, 1, 3]]).item(), rel=1e-5)


# ---------------------------------------------------------------------- DIME-FM
def test_dime_fm_terms_hand_computed() -> None:
    eye = torch.eye(2)
    diag = torch.tensor([[1.0, 1.0]]) / math.sqrt(2)
    forward, reverse = _kl([0.25, 0.75], [0.5, 0.5]), _kl([0.5, 0.5], [0.25, 0.75])
    # one image, scale ln 3: image->sentence teacher [.25, .75] vs student uniform; sentence->image
    # over a single image is 0; VL is the mean of the two directions
    got = vl_loss(diag, torch.tensor([[0.0, 1.0]]), eye, scale=math.log(3)).item()
    assert got == pytest.approx(forward / 2, abs=1e-6) and got != pytest.approx(reverse / 2, abs=1e-3)
    assert vl_loss(diag, torch.tensor([[0.0, 1.0]]), eye, scale=3 * math.log(3), temperature=3.0).item() == \
        pytest.approx(forward / 2, abs=1e-6)
    # P-VL, scale 3 ln 3 at T = 3: row 0 teacher image->image [ln 3, 0] -> [.75, .25] vs student uniform;
    # row 1 student = teacher -> 0
    z = torch.cat([diag, eye[1:]])
    got = pvl_loss(z, eye, scale=3 * math.log(3), temperature=3.0).item()
    assert got == pytest.approx(forward / 2, abs=1e-6) and got != pytest.approx(reverse / 2, abs=1e-3)
    assert pvl_loss(eye, eye).item() == pytest.approx(0.0, abs=1e-6)   # the student equals the teacher


def test_dime_fm_loss_weights_and_unbought_images(bench_targets: TeacherTargets) -> None:
    bank = F.normalize(torch.randn(12, 64, generator=torch.Generator().manual_seed(5)), dim=-1)
    with_bank = TeacherTargets(bench_targets.class_names, bench_targets.text_embeddings, {},
                               bench_targets.logit_scale, "t", sentence_embeddings=bank)
    m = get_method("dime-fm")(tiny_student(), 10, with_bank).eval()
    assert (m.hparams["vl_weight"], m.hparams["pvl_weight"], m.hparams["pvl_temperature"]) == (0.7, 0.3, 3.0)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 1, 2])
    t_img = F.normalize(torch.randn(3, 64, generator=g), dim=-1)
    has = torch.tensor([True, False, True])
    with torch.no_grad():
        terms = m.terms(Batch(x, y, t_img, has), sentences=bank)
        z = m.head.projection(m.backbone(x))[[0, 2]]
        scale = bench_targets.logit_scale  # DIME-FM's similarity scale is the teacher's, not CLIP's 100
        assert m.similarity_scale == pytest.approx(scale) and scale != pytest.approx(100.0)
        assert terms["vl"].item() == pytest.approx(vl_loss(z, t_img[[0, 2]], bank, scale=scale).item(), rel=1e-5)
        assert terms["pvl"].item() == pytest.approx(pvl_loss(z, t_img[[0, 2]], scale=scale).item(), rel=1e-5)
        assert terms["vl"].item() != pytest.approx(vl_loss(z, t_img[[0, 2]], bank, scale=100.0).item(), rel=1e-3)
    fixed = get_method("dime-fm")(tiny_student(), 10, with_bank, {"similarity_scale": 100.0})
    assert fixed.similarity_scale == 100.0
    none = m.terms(Batch(x, y, t_img, torch.zeros(3, dtype=torch.bool)))
    assert none["vl"].item() == 0.0 and none["vl"].requires_grad  # still backpropagates (zero gradient)
    with pytest.raises(MissingTeacherOutputError, match="sentence"):
        get_method("dime-fm")(tiny_student(), 10, bench_targets)


# ---------------------------------------------------------------------- registry and outputs
def test_registry_lists_every_method_with_its_needs() -> None:
    assert set(METHODS) == {"erm", "kd", "vl2v-adip", "clip-kd", "dime-fm", "vl2v-sd"}
    needs = {name: cls.needs for name, cls in METHODS.items()}
    assert needs["kd"] == {"class_probabilities"} and needs["erm"] == frozenset()
    assert needs["dime-fm"] == {"class_texts", "images", "sentences"}
    assert needs["clip-kd"] == needs["vl2v-adip"] == needs["vl2v-sd"] == {"class_texts", "images"}
    assert [n for n, c in METHODS.items() if c.white_box] == ["vl2v-sd"]


def test_probabilities_only_targets_feed_kd_and_refuse_text_methods() -> None:
    t = TeacherTargets(["a", "b"], None, image_probabilities={"/x.png": torch.tensor([0.7, 0.3])})
    get_method("kd")(tiny_student(), 2, t)
    with pytest.raises(MissingTeacherOutputError, match="class text embeddings"):
        get_method("vl2v-adip")(tiny_student(), 2, t)


# ---------------------------------------------------------------------- VL2V-SD
def test_vl2v_sd_starts_as_the_teachers_zero_shot_classifier(tiny_teacher_dir: Path, bench_targets: TeacherTargets,
                                                             tiny_clip, tmp_path: Path) -> None:
    cls = get_method("vl2v-sd")
    with pytest.raises(MissingTeacherWeightsError):
        cls.build_student("ignored")
    student = cls.build_student("ignored", teacher_weights=f"local-dir:{tiny_teacher_dir}")
    m = cls(student, 10, bench_targets).eval()
    model = tiny_clip[0]
    x = torch.randn(3, 3, student.input_size, student.input_size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = bench_targets.logit_scale * F.normalize(model.encode_image(x), dim=-1) @ bench_targets.text_embeddings.T
        assert torch.allclose(m.predict(x), want, atol=1e-4)
    folder = DistilledStudent.from_method(m, image_size=student.input_size,
                                          class_names=bench_targets.class_names).save(tmp_path / "sd")
    with torch.no_grad():
        assert torch.allclose(DistilledStudent.load(folder)(x), want, atol=1e-4)
