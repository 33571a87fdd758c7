"""The offline benchmark builders, at tiny scale, on the real packaged sources."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client_distiller.cli import main as cli_main
from offline_data import (BENCHMARKS, CONCEPT_SETS, DOMAINS, MissingSourceError, OutputNotWritableError,
                          UnknownNameError, build_benchmark, concept_samples, get_benchmark, iter_samples,
                          picture_grid)
from offline_data.concepts import EMOJI_FONT

NAME = "fashion-domains"


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_registry_declares_a_real_multi_domain_benchmark() -> None:
    spec = get_benchmark(NAME)
    assert NAME in BENCHMARKS
    assert len(spec.domains_for("client")) >= 4
    assert len(spec.classes) >= 10
    assert all(c.name and " " not in c.key for c in spec.classes)
    assert set(spec.domains_for("client")) <= set(spec.domains_for("vendor")) <= set(DOMAINS)


def test_tiny_build_writes_domainbed_layout(tmp_path: Path) -> None:
    report = build_benchmark(NAME, tmp_path / "b", size="tiny", seed=0)
    spec = get_benchmark(NAME)
    root = Path(report.out)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(spec.domains_for("client"))
    for d in spec.domains_for("client"):
        for c in spec.classes:
            files = sorted((root / d / c.key).glob("*.png"))
            assert len(files) == report.per_class == spec.sizes["tiny"]["client"]
    with Image.open(files[0]) as im:
        assert im.mode == "RGB" and im.size == (spec.image_size, spec.image_size)
    manifest = json.loads((root / "benchmark.json").read_text())
    assert manifest["n_images"] == report.n_images == 4 * 10 * report.per_class
    assert manifest["class_names"][-1] == "ankle boot"
    assert not (root / "captions.jsonl").exists()  # the client gets class names only


def test_build_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = build_benchmark(NAME, tmp_path / "a", size="tiny", seed=3)
    b = build_benchmark(NAME, tmp_path / "b", size="tiny", seed=3)
    c = build_benchmark(NAME, tmp_path / "c", size="tiny", seed=4)
    assert _digest(Path(a.out)) == _digest(Path(b.out)) != _digest(Path(c.out))


def test_domains_really_differ() -> None:
    """Mean colour statistics differ clearly between domains (not just relabelled copies)."""
    stats = {}
    for d in get_benchmark(NAME).domains_for("client"):
        imgs = np.stack([np.asarray(s.image, np.float32) / 255 for s in
                         iter_samples(NAME, split="client", per_class=3, domains=(d,))])
        stats[d] = np.array([imgs.mean(), imgs.std(), (imgs.max(-1) - imgs.min(-1)).mean()])
    names = list(stats)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            assert np.abs(stats[x] - stats[y]).max() > 0.04, (x, y, stats[x], stats[y])


def test_vendor_split_is_disjoint_and_captioned(tmp_path: Path) -> None:
    client = {s.source for s in iter_samples(NAME, split="client", per_class=6)}
    vendor = {s.source for s in iter_samples(NAME, split="vendor", per_class=6)}
    assert client and vendor and not client & vendor
    report = build_benchmark(NAME, tmp_path / "v", split="vendor", size="tiny")
    lines = [json.loads(x) for x in (Path(report.out) / "captions.jsonl").read_text().splitlines()]
    assert len(lines) == report.n_images
    sketch = [c for x in lines if x["path"].startswith("sketch/") for c in x["captions"]]
    assert any("sketch" in c or "drawing" in c for c in sketch)


def test_picture_grid(tmp_path: Path) -> None:
    png = picture_grid(NAME, tmp_path / "grid.png", per_cell=1)
    with Image.open(png) as im:
        assert im.width > 10 * 64 and im.height > 4 * 64


@pytest.mark.parametrize("name", list(CONCEPT_SETS))
def test_concept_sets_render(name: str) -> None:
    if CONCEPT_SETS[name].requires.startswith("Debian") and not EMOJI_FONT.is_file():
        pytest.skip("fonts-noto-color-emoji is not installed")
    images, labels, classes = concept_samples(name, per_class=1, size=48)
    assert len(images) == len(classes) == len(set(classes)) and labels == list(range(len(classes)))
    assert images[0].size == (48, 48)


def test_rejects_unknown_name_unwritable_output_and_missing_source(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(UnknownNameError, match="fashion-domains"):
        build_benchmark("pacs", tmp_path / "x")
    with pytest.raises(UnknownNameError):
        build_benchmark(NAME, tmp_path / "x", split="test")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputNotWritableError):
        build_benchmark(NAME, blocker / "sub", size="tiny")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(OutputNotWritableError):
        build_benchmark(NAME, tmp_path / "full", size="tiny", overwrite=True)  # not ours: never cleared
    assert (tmp_path / "full" / "keep.txt").exists()
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "empty"))
    from offline_data.sources import load_fashion_mnist
    load_fashion_mnist.cache_clear()
    try:
        with pytest.raises(MissingSourceError, match="apt-get install dataset-fashion-mnist"):
            build_benchmark(NAME, tmp_path / "y", size="tiny")
    finally:
        load_fashion_mnist.cache_clear()
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("argv", [
    ["data", "build", "nope", "--out", "{tmp}/o"],
    ["data", "build", "fashion-domains", "--out", "{tmp}/file/o", "--size", "tiny"],
    ["data", "build", "fashion-domains", "--out", "{tmp}/o", "--split", "test"],
    ["data", "build", "fashion-domains", "--out", "{tmp}/o", "--seed", "x"],
    ["data", "build", "fashion-domains"],
    ["data", "frobnicate"],
])
def test_cli_bad_arguments_are_one_line_exit_2(argv: list[str], tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("")
    code = _run_cli([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "error" in err and "Traceback" not in err


def test_cli_builds_and_lists(tmp_path: Path, capsys) -> None:
    assert _run_cli(["data", "build", NAME, "--out", str(tmp_path / "o"), "--size", "tiny", "--seed", "1"]) == 0
    assert "240 images" in capsys.readouterr().out
    assert _run_cli(["data", "list"]) == 0
    assert "fashion-domains" in capsys.readouterr().out


def _run_cli(argv: list[str]) -> int:
    try:
        return cli_main(argv)
    except SystemExit as exc:  # argparse exits for its own errors
        return int(exc.code)


def test_light_commands_do_not_import_the_training_stack() -> None:
    """`data list` answers instantly: building its parser must not import torch (the training
    commands' arguments are attached only when one of them runs)."""
    import subprocess
    import sys

    code = ("import sys; from client_distiller.cli import main; rc = main(['data', 'list']); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'data list imported torch'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert NAME in result.stdout
