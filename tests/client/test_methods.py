"""Methods and the one training loop: the VL2V-ADiP loss, stage freezing, Predict, the registry, ERM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from client_distiller.data import DomainBedFolder, eval_transform, leave_one_out, train_transform
from client_distiller.targets import TeacherTargets
from client_distiller.training.loop import TrainConfig, TrainData, fit, train_stage
from client_distiller.training.methods import (METHODS, Batch, HparamError, MissingTeacherOutputError,
                                               UnknownMethodError, adip_loss, get_method)
from client_distiller.training.students import create_student
from tests.support.client import TEST_DOMAIN, one_thread, tiny_student  # noqa: F401  (one_thread: autouse in this module)


def _data(bench: Path, targets: TeacherTargets | None, size: int = 32, mean=(0.5,) * 3, std=(0.5,) * 3) -> TrainData:
    loo = leave_one_out(DomainBedFolder.scan(bench), TEST_DOMAIN)
    train = [x for s in loo.sources for x in s.train]
    return TrainData([s.train for s in loo.sources], [x for s in loo.sources for x in s.val],
                     train_transform(size, mean, std), eval_transform(size, mean, std),
                     targets.restricted_to(p for p, _ in train) if targets else None)


def _adip(targets: TeacherTargets, **hp):
    return get_method("vl2v-adip")(tiny_student(), targets.num_classes, targets, {"align_lr": 1e-2, "lr": 1e-2, **hp})


def test_adip_loss_matches_a_hand_computed_value() -> None:
    z = torch.tensor([[3.0, 4.0], [0.0, 2.0]])          # normalised: [.6, .8], [0, 1]
    t_txt = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    t_img = torch.tensor([[1.0, 0.0], [0.7, 0.7]])
    has = torch.tensor([True, False])
    # sample 0: 0.5 * (1 - .6) + 0.5 * (1 - .8) = 0.3 ; sample 1 (no image target): 1 - 0 = 1.0
    assert adip_loss(z, t_txt, t_img, has, 0.5).item() == pytest.approx(0.65)
    # lam = 0.25: 0.25 * 0.4 + 0.75 * 0.2 = 0.25 ; mean with 1.0 -> 0.625
    assert adip_loss(z, t_txt, t_img, has, 0.25).item() == pytest.approx(0.625)
    assert adip_loss(z, t_txt, None, None, 0.5).item() == pytest.approx((0.2 + 1.0) / 2)


def test_method_loss_is_the_adip_loss_of_the_projected_features(bench_targets: TeacherTargets) -> None:
    m = _adip(bench_targets, lam=0.3).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 3, 3, 9])
    t_img = F.normalize(torch.randn(4, 64, generator=g), dim=-1)
    has = torch.tensor([True, True, False, True])
    with torch.no_grad():
        z = m.head.projection(m.backbone(x))
        zn, txt = F.normalize(z, dim=-1), bench_targets.text_embeddings[y]
        by_hand = torch.stack([
            0.3 * (1 - zn[i] @ t_img[i]) + 0.7 * (1 - zn[i] @ txt[i]) if has[i] else 1 - zn[i] @ txt[i]
            for i in range(4)]).mean()
        assert m.loss(Batch(x, y, t_img, has)).item() == pytest.approx(by_hand.item(), abs=1e-6)


def test_text_only_fallback_for_images_without_a_teacher_embedding(bench_targets: TeacherTargets) -> None:
    m = _adip(bench_targets).eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 3, 32, 32, generator=g), torch.tensor([1, 2, 3])
    none = torch.zeros(3, dtype=torch.bool)
    with torch.no_grad():
        text_only = m.loss(Batch(x, y))
        assert m.loss(Batch(x, y, torch.zeros(3, 64), none)).item() == pytest.approx(text_only.item())
        noise = F.normalize(torch.randn(3, 64, generator=g), dim=-1)
        assert m.loss(Batch(x, y, noise, none)).item() == pytest.approx(text_only.item())  # ignored when absent
        assert m.loss(Batch(x, y, noise, ~none)).item() != pytest.approx(text_only.item())


def test_training_data_marks_unbought_images(tiny_bench: Path, bench_targets: TeacherTargets) -> None:
    from client_distiller.training.loop import TeacherColumns
    from client_distiller.training.methods import Batch

    data = _data(tiny_bench, bench_targets)
    items = data.sources[0]
    half = bench_targets.restricted_to(p for p, _ in items[::2])
    columns = TeacherColumns(items, half, images=True, probabilities=False)
    batch = columns.fill(Batch(None, torch.tensor([0, 0])), torch.tensor([1, 0]))
    assert batch.has_image.tolist() == [False, True] and torch.count_nonzero(batch.image_targets[0]) == 0
    assert torch.equal(batch.image_targets[1], bench_targets.image_target(items[0][0]))
    assert float(columns.has_image.float().mean()) == pytest.approx(0.5, abs=0.05)
    assert columns.probabilities is None


def test_align_trains_only_the_projection_and_keeps_bn_statistics(tiny_bench: Path,
                                                                  bench_targets: TeacherTargets) -> None:
    m = _adip(bench_targets)
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    proj = m.head.projection.weight.detach().clone()
    train_stage(m, "align", _data(tiny_bench, bench_targets),
                TrainConfig(steps=3, batch_size=4, eval_every=3, keep="last", show_progress=False))
    after = m.backbone.state_dict()
    assert any("running_mean" in k for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before), "backbone weights or BN statistics moved"
    assert not torch.equal(proj, m.head.projection.weight)
    assert not any(p.requires_grad for p in m.backbone.parameters())
    m.train()
    assert not m.backbone.training and m.head.projection.training  # frozen BN stays in eval mode


def test_distill_trains_the_backbone_with_the_projection_frozen(tiny_bench: Path,
                                                                bench_targets: TeacherTargets) -> None:
    m = _adip(bench_targets)
    data = _data(tiny_bench, bench_targets)
    cfg = TrainConfig(steps=2, batch_size=4, eval_every=2, keep="last", show_progress=False)
    train_stage(m, "align", data, cfg)
    proj = {k: v.clone() for k, v in m.head.state_dict().items()}
    backbone = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    hist = train_stage(m, "distill", data, cfg)
    assert all(torch.equal(proj[k], v) for k, v in m.head.state_dict().items())
    assert any(not torch.equal(backbone[k], v) for k, v in m.backbone.state_dict().items() if "weight" in k)
    assert hist.evals[0]["step"] == 0  # distill also considers its starting (best Align) checkpoint


def test_stages_end_at_the_best_validation_checkpoint(tiny_bench: Path, bench_targets: TeacherTargets) -> None:
    m = _adip(bench_targets)
    hist = fit(m, _data(tiny_bench, bench_targets), TrainConfig(steps=4, batch_size=4, eval_every=1,
                                                                show_progress=False))
    assert [s.stage for s in hist.stages] == ["align", "distill"]
    best = hist.stages[-1]
    assert best.best_val_acc == max(e["val_acc"] for e in best.evals)


def test_predict_ranks_classes_by_text_embeddings(bench_targets: TeacherTargets) -> None:
    m = _adip(bench_targets).eval()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    logits = m.predict(x)
    expected = bench_targets.logit_scale * m.head.embed(m.backbone(x)) @ bench_targets.text_embeddings.T
    assert torch.allclose(logits, expected, atol=1e-4)
    a, b = logits.argmax(-1)[0].item(), (logits.argmax(-1)[0].item() + 1) % 10
    with torch.no_grad():
        m.head.text_embeddings[[a, b]] = m.head.text_embeddings[[b, a]].clone()
    swapped = m.predict(x)
    assert torch.allclose(swapped[:, [a, b]], logits[:, [b, a]])
    assert swapped.argmax(-1)[0].item() == b


def test_registry_lists_methods_and_their_needs(bench_targets: TeacherTargets) -> None:
    assert {"erm", "vl2v-adip"} <= set(METHODS)
    assert METHODS["erm"].needs == frozenset()
    assert METHODS["vl2v-adip"].needs == frozenset({"class_texts", "images"})
    assert [s.name for s in METHODS["vl2v-adip"].STAGES] == ["align", "distill"]
    hp = METHODS["vl2v-adip"].resolve_hparams()
    assert hp == {"lr": 5e-5, "weight_decay": 0.0, "align_lr": 5e-5, "lam": 0.5}
    drawn = METHODS["vl2v-adip"].resolve_hparams(random_seed=3)
    assert drawn == METHODS["vl2v-adip"].resolve_hparams(random_seed=3) and drawn != hp
    with pytest.raises(UnknownMethodError, match="registered: "):
        get_method("nope")
    with pytest.raises(HparamError):
        METHODS["erm"].resolve_hparams({"lam": 0.1})
    with pytest.raises(MissingTeacherOutputError):
        get_method("vl2v-adip")(tiny_student(), 10, None)
    get_method("erm")(tiny_student(), 10, None)  # ERM buys nothing


def test_the_loop_trains_erm_above_chance(tiny_bench: Path) -> None:
    """The real product student (EfficientNet-Lite0, ImageNet weights) on the tiny benchmark."""
    torch.manual_seed(0)
    student = create_student("efficientnet-lite0")
    data = _data(tiny_bench, None, size=64, mean=student.mean, std=student.std)
    m = get_method("erm")(student, 10, None, {"lr": 3e-4})  # BatchNorm frozen: 1e-3 stalls
    hist = fit(m, data, TrainConfig(steps=30, batch_size=8, eval_every=10, seed=0, show_progress=False))
    assert hist.best_val_acc > 0.25, hist.as_dict()  # chance is 0.10 (10 classes)
