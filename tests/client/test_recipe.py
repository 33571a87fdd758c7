"""The training recipe's guarantees: frozen BatchNorm, exact cached-feature Align, seeded
initialisation independent of the method list and of resuming, the teacher's image size, the
tensor augmentation, and recipe defaults equal to what the committed sweep selected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client_distiller.data import DomainBedFolder, eval_transform, leave_one_out, train_transform
from client_distiller.lodo import run_job
from client_distiller.targets import TeacherTargets
from client_distiller.training.augment import EvalTransform, TrainTransform, decode_images
from client_distiller.training.loop import TrainConfig, TrainData, feature_bank, DistInfo, train_stage
from client_distiller.training.methods import Batch, get_method
from client_distiller.training.recipe import Schedule
from client_distiller.training.recipe import ALIGN_LR, CPU_RECIPE, SELECTED_LR
from tests.support.client import TEST_DOMAIN, TINY_STUDENT, one_thread, tiny_student  # noqa: F401  (one_thread: autouse in this module)

REPO = Path(__file__).resolve().parents[2]


def _data(bench: Path, targets: TeacherTargets | None, size: int = 32) -> TrainData:
    loo = leave_one_out(DomainBedFolder.scan(bench), TEST_DOMAIN)
    train = [x for s in loo.sources for x in s.train]
    mean = std = (0.5,) * 3
    return TrainData([s.train for s in loo.sources], [x for s in loo.sources for x in s.val],
                     train_transform(size, mean, std), eval_transform(size, mean, std),
                     targets.restricted_to(p for p, _ in train) if targets else None)


def _bn_stats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k or "num_batches" in k}


@pytest.mark.parametrize("method", ["erm", "kd", "vl2v-adip"])
def test_batchnorm_statistics_never_move_while_the_backbone_trains(method: str, tiny_bench: Path,
                                                                   bench_targets: TeacherTargets) -> None:
    cls = get_method(method)
    m = cls(tiny_student(), 10, bench_targets if cls.needs else None, {"lr": 1e-2, **({"align_lr": 1e-2}
                                                                                      if "align_lr" in cls.HPARAMS else {})})
    stage = [s for s in cls.STAGES if "backbone" in s.trainable][0]
    before = _bn_stats(m.backbone)
    weights = {k: v.clone() for k, v in m.backbone.state_dict().items() if k.endswith("weight")}
    assert before, "the tiny student has BatchNorm layers"
    train_stage(m, stage, _data(tiny_bench, bench_targets),
                TrainConfig(steps=3, batch_size=4, eval_every=3, keep="last", show_progress=False))
    after = _bn_stats(m.backbone)
    assert all(torch.equal(before[k], after[k]) for k in before), "BatchNorm running statistics moved"
    assert any(not torch.equal(weights[k], m.backbone.state_dict()[k]) for k in weights), "the backbone did not train"


def test_batchnorm_can_be_left_training_when_asked(tiny_bench: Path) -> None:
    m = get_method("erm")(tiny_student(), 10, None, {"lr": 1e-2})
    before = _bn_stats(m.backbone)
    train_stage(m, "erm", _data(tiny_bench, None), TrainConfig(steps=2, batch_size=4, eval_every=2, keep="last",
                                                              show_progress=False, freeze_batchnorm=False))
    assert any(not torch.equal(before[k], v) for k, v in _bn_stats(m.backbone).items())


@pytest.mark.parametrize("method", ["vl2v-adip", "clip-kd"])
def test_cached_feature_align_has_the_same_loss_and_gradients(method: str, tiny_bench: Path,
                                                              bench_targets: TeacherTargets) -> None:
    cls = get_method(method)
    m = cls(tiny_student(), 10, bench_targets, {"align_lr": 1e-2})
    m.begin_stage(cls.stage("align"))
    m.train()
    assert m.backbone_frozen and not m.backbone.training
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3, 4, 5])
    t_img = torch.nn.functional.normalize(torch.randn(6, 64, generator=g), dim=-1)
    has = torch.tensor([True, True, False, True, True, True])
    grads = []
    for batch in (Batch(x, y, t_img, has), Batch(None, y, t_img, has, features=m.backbone(x).detach())):
        m.zero_grad(set_to_none=True)
        loss = m.loss(batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters() if p.requires_grad]))
    (l1, g1), (l2, g2) = grads
    assert torch.allclose(l1, l2, atol=1e-6) and len(g1) == len(g2) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))


def test_feature_bank_holds_the_frozen_backbones_clean_and_augmented_views(tiny_bench: Path,
                                                                          bench_targets: TeacherTargets) -> None:
    m = get_method("vl2v-adip")(tiny_student(), 10, bench_targets)
    m.begin_stage(m.stage("align"))
    data = _data(tiny_bench, bench_targets)
    cfg = TrainConfig(steps=1, batch_size=4, feature_views=2, show_progress=False)
    bank = feature_bank(m, data, cfg, torch.device("cpu"), 0, DistInfo())
    assert len(bank) == len(data.sources) and bank[0].shape[:2] == (3, len(data.sources[0]))
    clean = data.eval_transform.batch(decode_images([p for p, _ in data.sources[0]]))
    with torch.no_grad():
        assert torch.allclose(bank[0][0], m.backbone(clean), atol=1e-5)   # view 0: the clean images
    assert not torch.allclose(bank[0][1], bank[0][0])                      # views 1..: augmented
    assert feature_bank(m, data, cfg, torch.device("cpu"), 0, DistInfo()) is bank  # shared, not recomputed


def test_tensor_augmentation_is_seeded_and_shaped(tiny_bench: Path) -> None:
    items = DomainBedFolder.scan(tiny_bench).files["photo"][:5]
    pixels = decode_images([p for p, _ in items])
    tf = TrainTransform(48, (0.5,) * 3, (0.5,) * 3)
    a = tf.batch(pixels, torch.Generator().manual_seed(1))
    b = tf.batch(pixels, torch.Generator().manual_seed(1))
    c = tf.batch(pixels, torch.Generator().manual_seed(2))
    assert a.shape == (5, 3, 48, 48) and torch.equal(a, b) and not torch.equal(a, c)
    assert -1.0 - 1e-6 <= float(a.min()) and float(a.max()) <= 1.0 + 1e-6
    ev = EvalTransform(48, (0.5,) * 3, (0.5,) * 3)
    from PIL import Image
    with Image.open(items[0][0]) as im:
        assert torch.equal(ev(im), ev.batch(pixels[:1])[0])  # one implementation for PIL and tensors


def _records(result) -> dict[str, tuple[float, float, float]]:
    return {r["method"]: (r["id_acc"], r["ood_acc"], r.get("best_val_acc")) for r in result.records}


JOB = dict(schedule=Schedule(TINY_STUDENT, pretrained=False, steps=3, align_steps=4, batch_size=4, eval_every=2,
                             image_size=32), show_progress=False, seed=5,
           hparams={"erm": {"lr": 1e-2}, "vl2v-adip": {"align_lr": 1e-2, "lr": 1e-2}})


def test_a_trial_does_not_depend_on_the_method_list_or_on_resuming(tiny_bench: Path, bench_targets: TeacherTargets,
                                                                   tmp_path: Path) -> None:
    both = _records(run_job(tiny_bench, TEST_DOMAIN, bench_targets, methods=["erm", "vl2v-adip"],
                            out_dir=tmp_path / "both", **JOB))
    again = _records(run_job(tiny_bench, TEST_DOMAIN, bench_targets, methods=["erm", "vl2v-adip"],
                             out_dir=tmp_path / "again", **JOB))
    alone = _records(run_job(tiny_bench, TEST_DOMAIN, bench_targets, methods=["vl2v-adip"],
                             out_dir=tmp_path / "alone", **JOB))
    reversed_ = _records(run_job(tiny_bench, TEST_DOMAIN, bench_targets, methods=["vl2v-adip", "erm"],
                                 out_dir=tmp_path / "reversed", **JOB))
    assert both == again                                  # the same command twice: the same table, to the digit
    assert alone["vl2v-adip"] == both["vl2v-adip"]        # a resumed run that trains only the missing method
    assert reversed_ == both                              # the order of --method does not matter


def test_recipe_defaults_are_what_the_committed_sweep_selected() -> None:
    selected = json.loads((REPO / "results" / "recipe" / "selected.json").read_text())
    assert {m: v["lr"] for m, v in selected["selected"].items()} == SELECTED_LR
    assert selected["align_lr"] == ALIGN_LR
    lrs = CPU_RECIPE.learning_rates()
    assert all(lrs[f"{m}.lr"] == lr for m, lr in SELECTED_LR.items())
    grid = selected["grid"]
    assert all(lr in grid for lr in SELECTED_LR.values())  # every method chose from the same grid
    assert (REPO / "results" / "recipe" / "tune.md").is_file()
