"""The offline demo teacher: a real vision-language model built from PyPI-packaged parts.

No pretrained CLIP installs offline, so the vendor's default teacher is assembled and aligned
here: an ImageNet EfficientNet-Lite2 image tower and an all-MiniLM-L6-v2 text tower, aligned
LiT-style on the vendor-private split of the ``fashion-domains`` benchmark (with captions that
name style, colour and background) and on ImageNet's 1,000 class names, then saved as an
open_clip ``local-dir:`` that loads like any public CLIP.

- :func:`build_demo_teacher` - build (atomically) into a folder, evaluate, return a report;
- :func:`ensure_demo_teacher` - return the folder if a complete build is there, else build it
  under a lock (what the vendor does when ``VENDOR_TEACHER`` is unset).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .recipe import RECIPES, Recipe, get_recipe, model_config, preprocess_config
from .store import DemoTeacherError, build_lock, check_output, is_complete, publish, relocate, staging_dir

__all__ = ["build_demo_teacher", "ensure_demo_teacher", "DemoTeacherReport", "DemoTeacherError", "RECIPES"]


@dataclass
class DemoTeacherReport:
    """What a build produced and how good it is (also saved as ``report.json``)."""

    out_dir: str
    size: str
    seed: int
    seconds: float
    stage_seconds: dict[str, float]
    zero_shot: dict[str, float]          # client domain -> accuracy, class prompts only
    zero_shot_mean: float
    concepts: dict[str, float]           # held-out concept set -> accuracy
    concept_chance: dict[str, float]
    concepts_skipped: dict[str, str]
    chance: float
    n_vendor_images: int
    n_captions: int
    n_imagenet_captions: int
    final_losses: dict[str, float]
    recipe: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"demo teacher ({self.size}, seed {self.seed}) built in {self.seconds:.0f} s -> {self.out_dir}",
                 "zero-shot accuracy, class prompts only (chance {:.0%}):".format(self.chance)]
        lines += [f"  {d:<10} {a:6.1%}" for d, a in self.zero_shot.items()]
        lines.append(f"  {'mean':<10} {self.zero_shot_mean:6.1%}")
        lines.append("held-out concept sets:")
        lines += [f"  {s:<16} {a:6.1%} (chance {self.concept_chance[s]:.1%})" for s, a in self.concepts.items()]
        lines += [f"  {s:<16} skipped: {why}" for s, why in self.concepts_skipped.items()]
        return "\n".join(lines)


def _timed(stages: dict[str, float], name: str, start: float) -> float:
    now = time.perf_counter()
    stages[name] = round(now - start, 1)
    return now


def _build_into(tmp: Path, out: Path, recipe: Recipe, size: str, seed: int, progress: bool) -> DemoTeacherReport:
    """All the work; ``tmp`` ends up a complete teacher folder whose config names ``out``."""
    import numpy as np
    import torch
    from open_clip.tokenizer import HFTokenizer

    from offline_data import CONCEPT_SETS, DOMAINS, iter_samples

    from .align import AlignData, align
    from .evaluate import evaluate
    from .features import cache_images, encode_texts
    from .imagenet import imagenet_captions
    from .store import save_weights, write_config
    from .towers import assemble, copy_text_files, init_bridge, minilm_dir

    t0 = start = time.perf_counter()
    stages: dict[str, float] = {}
    built = assemble(recipe, seed)
    model = built.model
    tokenizer = HFTokenizer(str(minilm_dir()), context_length=model_config(recipe, tmp)["text_cfg"]["context_length"])
    start = _timed(stages, "load_towers", start)

    samples = list(iter_samples("fashion-domains", split="vendor", seed=seed, per_class=recipe.vendor_per_class,
                                n_captions=3))
    domain_ids = {d: i for i, d in enumerate(DOMAINS)}
    groups = np.array([domain_ids[s.domain] * 100 + s.label for s in samples])
    unique: dict[str, int] = {}
    caption_ids = [[unique.setdefault(c, len(unique)) for c in dict.fromkeys(s.captions)] for s in samples]
    start = _timed(stages, "render_vendor_split", start)

    images = cache_images(model.visual.trunk, built.imagenet_w, built.imagenet_b, [s.image for s in samples],
                          recipe.image_size, recipe.unfreeze_from, progress=progress)
    del samples
    start = _timed(stages, "image_features", start)

    caption_feats = encode_texts(model.text, tokenizer, list(unique), progress=progress,
                                 desc="teacher: caption features")
    inet = imagenet_captions(recipe.imagenet_templates, recipe.imagenet_synonyms)
    inet_flat = [c for caps in inet for c in caps]
    inet_class = np.repeat(np.arange(len(inet)), [len(c) for c in inet])
    inet_feats = encode_texts(model.text, tokenizer, inet_flat, progress=progress, desc="teacher: ImageNet names")
    class_text = torch.stack([inet_feats[torch.from_numpy(np.flatnonzero(inet_class == c))].mean(0)
                              for c in range(len(inet))])
    init_bridge(model, class_text, seed)
    start = _timed(stages, "text_features", start)

    losses = align(model, AlignData(images, groups, caption_ids, caption_feats, inet_feats, inet_class,
                                    built.imagenet_w, built.imagenet_b), recipe, seed, progress=progress)
    start = _timed(stages, "alignment", start)

    cfg = model_config(recipe, tmp)
    save_weights(model, tmp)
    copy_text_files(tmp)
    write_config(tmp, cfg, preprocess_config(recipe), tmp)
    start = _timed(stages, "save", start)

    domains, concepts, skipped = evaluate(tmp, seed=seed, eval_per_class=recipe.eval_per_class,
                                          concept_per_class=recipe.concept_per_class, progress=progress)
    start = _timed(stages, "evaluate", start)

    write_config(tmp, cfg, preprocess_config(recipe), out)
    report = DemoTeacherReport(
        out_dir=str(out), size=size, seed=seed, seconds=round(time.perf_counter() - t0, 1), stage_seconds=stages,
        zero_shot={d: round(a, 4) for d, a in domains.items()},
        zero_shot_mean=round(sum(domains.values()) / max(1, len(domains)), 4),
        concepts={k: round(v, 4) for k, v in concepts.items()},
        concept_chance={k: round(1 / len(CONCEPT_SETS[k].classes), 4) for k in concepts},
        concepts_skipped=skipped, chance=0.1, n_vendor_images=len(groups), n_captions=len(unique),
        n_imagenet_captions=len(inet_flat), final_losses={k: round(v, 4) for k, v in losses.items()},
        recipe=recipe.to_json())
    (tmp / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report


def build_demo_teacher(out_dir: Path, *, seed: int = 0, size: str = "full",
                       show_progress: bool = True) -> DemoTeacherReport:
    """Build the demo teacher into ``out_dir`` (replacing a previous teacher there) and report on it.

    Deterministic for ``seed`` on a given machine. ``size="tiny"`` is a seconds-long build for
    tests; ``"full"`` is the vendor's default. The folder is published atomically: until the build
    succeeds, ``out_dir`` keeps whatever teacher it held before.
    """
    recipe = get_recipe(size)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DemoTeacherError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(out_dir).resolve()
    check_output(out)
    tmp = staging_dir(out)
    try:
        report = _build_into(tmp, out, recipe, size, seed, show_progress)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def ensure_demo_teacher(out_dir: Path, **kw: Any) -> Path:
    """``out_dir`` if a complete teacher is there, else build it there first (under a file lock).

    Keyword arguments go to :func:`build_demo_teacher` (``seed``, ``size``, ``show_progress``). A
    second process asking at the same time waits for the first build and reuses it.
    """
    out = Path(out_dir).resolve()
    if is_complete(out):
        return relocate(out)
    with build_lock(out):
        if not is_complete(out):
            build_demo_teacher(out, **kw)
    return relocate(out)
