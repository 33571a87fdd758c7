"""Buying for methods: only what their needs require, once into the shared cache; the extended
TeacherTargets (probabilities, sentences, no text) round-trips and still reads version 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from client_distiller.buying.ledger import Ledger
from client_distiller.buying.policy import buy_for_methods, effective_outputs
from client_distiller.buying.purchaser import Purchaser
from client_distiller.buying.sentences import SentenceBankError, default_bank, read_bank
from client_distiller.buying.teacher_client import TeacherClient
from client_distiller.prompts import all_prompts
from client_distiller.targets import TargetsError, TeacherTargets
from client_distiller.training.methods import METHODS
from tests.support.imaging import random_image

CLASSES = ["t-shirt", "ankle boot"]


def _items(tmp_path: Path, n: int = 4) -> list[tuple[Path, int]]:
    items = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        random_image(i).save(path)
        items.append((path, i % 2))
    return items


def _buyer(vendor, key: str, tmp_path: Path, budget: int = 1000) -> Purchaser:
    return Purchaser(TeacherClient(vendor.base_url, key), cache_dir=tmp_path / "cache",
                     ledger=Ledger(tmp_path / "ledger.sqlite"), budget=budget, scope="train", api_key=key,
                     show_progress=False)


def test_effective_outputs_derive_probabilities_from_embeddings() -> None:
    assert effective_outputs(METHODS["kd"].needs) == {"class_texts", "images"}
    assert effective_outputs(METHODS["kd"].needs, "probabilities") == {"class_probabilities"}
    assert effective_outputs(METHODS["erm"].needs) == set()


def test_planner_buys_only_what_the_methods_need_and_once(vendor, tmp_path: Path) -> None:
    key = vendor.create_key(quota=1000)
    items = _items(tmp_path)
    prompts = sum(len(p) for p in all_prompts(CLASSES))
    bank = default_bank(CLASSES, size=10)

    buyer = _buyer(vendor, key, tmp_path)
    t, report = buy_for_methods(buyer, CLASSES, items, METHODS["erm"].needs)
    assert vendor.account().spent == 0 and t.text_embeddings is None and not t.image_embeddings

    t, report = buy_for_methods(buyer, CLASSES, items, METHODS["kd"].needs)
    assert vendor.account().spent == prompts + len(items)           # prompts + images, no sentences
    assert t.sentence_embeddings is None and report.sentences == 0
    p = t.class_probabilities(items[0][0])                            # derived: softmax(scale * cos)
    want = torch.softmax(t.logit_scale * t.image_target(items[0][0]) @ t.text_embeddings.T, -1)
    assert torch.allclose(p, want) and p.sum().item() == pytest.approx(1.0)
    buyer.close()

    # another method set over the same data: only the sentence bank is new
    buyer = _buyer(vendor, key, tmp_path)
    needs = METHODS["dime-fm"].needs | METHODS["vl2v-adip"].needs | METHODS["clip-kd"].needs
    t, report = buy_for_methods(buyer, CLASSES, items, needs, sentences=bank)
    assert vendor.account().spent == prompts + len(items) + len(bank)
    assert t.sentence_embeddings.shape == (len(bank), 64) and report.sentences == len(bank)
    assert report.units_for(METHODS["dime-fm"].needs) == prompts + len(items) + len(bank)
    assert report.units_for(METHODS["vl2v-adip"].needs) == report.units_for(METHODS["kd"].needs) == prompts + len(items)
    assert report.units_for(METHODS["erm"].needs) == 0
    buyer.close()

    # comparing them all again costs nothing: every output is in the shared cache
    buyer = _buyer(vendor, key, tmp_path)
    buy_for_methods(buyer, CLASSES, items, needs | METHODS["kd"].needs, sentences=bank)
    assert vendor.account().spent == prompts + len(items) + len(bank)
    buyer.close()


def test_targets_round_trip_probabilities_sentences_and_no_text(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    full = TeacherTargets(["a", "b"], F.normalize(torch.randn(2, 8, generator=g), dim=-1),
                          {tmp_path / "x.png": F.normalize(torch.randn(8, generator=g), dim=0)}, 50.0, "t",
                          {tmp_path / "y.png": torch.tensor([0.9, 0.0])},
                          F.normalize(torch.randn(3, 8, generator=g), dim=-1))
    back = TeacherTargets.load(full.save(tmp_path / "full"))
    assert torch.equal(back.text_embeddings, full.text_embeddings)
    assert torch.equal(back.sentence_embeddings, full.sentence_embeddings)
    assert back.image_probabilities.keys() == full.image_probabilities.keys()
    assert torch.equal(back.class_probabilities(tmp_path / "y.png"), torch.tensor([0.9, 0.0]))  # bought wins
    probs_only = TeacherTargets(["a", "b"], None, image_probabilities={tmp_path / "y.png": torch.tensor([0.2, 0.8])})
    back = TeacherTargets.load(probs_only.save(tmp_path / "probs"))
    assert back.text_embeddings is None and back.embed_dim is None
    assert back.class_probabilities(tmp_path / "x.png") is None
    with pytest.raises(TargetsError, match="not a distribution"):
        TeacherTargets(["a", "b"], None, image_probabilities={"z": torch.tensor([0.9, 0.9])})


def test_version_1_targets_are_still_read(tmp_path: Path) -> None:
    folder = tmp_path / "v1"
    folder.mkdir()
    save_file({"text_embeddings": torch.eye(2), "image_embeddings": torch.tensor([[0.0, 1.0]])},
              str(folder / "targets.safetensors"))
    (folder / "targets.json").write_text(json.dumps({"format_version": 1, "class_names": ["a", "b"],
                                                     "image_keys": ["/d/x.png"], "logit_scale": 10.0,
                                                     "teacher_id": "old", "embed_dim": 2}))
    t = TeacherTargets.load(folder)
    assert t.image_probabilities == {} and t.sentence_embeddings is None
    assert torch.allclose(t.class_probabilities("/d/x.png"), torch.softmax(torch.tensor([0.0, 10.0]), -1))


def test_sentence_bank_default_and_file(tmp_path: Path) -> None:
    bank = default_bank(["t_shirt", "bag"], size=50)
    assert len(bank) == 50 == len(set(bank)) and bank == default_bank(["t_shirt", "bag"], size=50)
    assert any("t shirt" in s for s in bank) and not any("_" in s for s in bank)
    f = tmp_path / "bank.txt"
    f.write_text("a red bag.\n\n a red bag. \nshoes on a shelf.\n")
    assert read_bank(f) == ["a red bag.", "shoes on a shelf."]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(SentenceBankError):
        read_bank(tmp_path / "empty.txt")


def test_training_batches_carry_teacher_probabilities(tmp_path: Path) -> None:
    from client_distiller.training.loop import TeacherColumns
    from client_distiller.training.methods import Batch

    items = _items(tmp_path, 2)
    t = TeacherTargets(CLASSES, None, image_probabilities={items[0][0]: torch.tensor([0.2, 0.8])})
    columns = TeacherColumns(items, t, images=False, probabilities=True)
    batch = columns.fill(Batch(None, torch.tensor([0, 1])), torch.tensor([0, 1]))
    assert columns.image_targets is None and batch.image_targets is None  # not asked for
    assert batch.has_probabilities.tolist() == [True, False]
    assert torch.equal(batch.probabilities[0], torch.tensor([0.2, 0.8]))
    assert torch.equal(batch.probabilities[1], torch.tensor([0.5, 0.5]))   # unknown: CE only (KD masks it out)