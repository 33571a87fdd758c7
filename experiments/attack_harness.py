"""Every protection mode against the known extraction attacks, on a vendor this script starts.

One real `vendor-api serve` on 127.0.0.1 (its own embedded Redis, `--teacher`, default: the tiny
seeded test teacher, so the whole run takes minutes on a CPU), one key per mode plus a second key
per mode for the sybil attack, and a `none` key for the clean reference. For every mode, each
attack in `ATTACKS` reports what it recovers (cosine to the clean teacher embedding unless said
otherwise) and the units it cost, as the vendor metered them:

- `re-encodings`: one image sent as 16 pixel-identical PNG files; cos(mean answer, clean);
- `near-dups`: 9 near-duplicates (JPEG q=90/75/50, 90% and 80% crops); cos(mean answer, clean
  of the original);
- `text variants`: 16 case/spacing variants of one text (same tokens);
- `sybil`: orthogonal Procrustes fitted on N images asked through two keys of the mode, held-out
  cos between the aligned key-A answers and key-B's *clean* counterparts, and whether
  `vendor-admin suspects` flagged the pair;
- `invert`: classification answers of the key over 100 class names (attacker holds the clean
  prompt embeddings), inverted by least squares (`attacks.invert_probabilities`);
- `watermark`: p-value of a ridge student fitted to the key's answers, before and after
  "stripping" by refitting with 25% clean answers bought through another key (watermark keys);
- `fidelity`: what a legitimate client keeps: cos(answer, clean) and the correlation of the
  key's pairwise cosines with the clean ones (1.0 for rotate: its own geometry is exact).

    HF_HUB_OFFLINE=1 python experiments/attack_harness.py --out results/attack_harness.md

Not here (see README): extraction itself (distilled students' OOD accuracy against units; that is
`client-distill experiment`), WARDEN's CSE removal.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import numpy as np
from PIL import Image, PngImagePlugin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from client_distiller.local_vendor import LocalVendor  # noqa: E402
from vendor_api.protection.attacks import average_attack, invert_probabilities, mean_cosine, procrustes, unit  # noqa: E402

MODES = ["none", "quantize:int8", "noise:0.5", "truncate:32", "rotate", "rotate:16,0.3", "b4b:0.5", "watermark",
         "probabilities:5"]
SECRET = "attack-harness-secret"
SYBIL_CURVE = (5, 10, 25, 50, 100, 200)


def random_image(seed: int, size: int = 32) -> Image.Image:
    """Smooth random images (blurred noise), so crops and JPEG are near-duplicates, not new noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 4, size // 4, 3)).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def png(image: Image.Image, level: int = 6, note: str | None = None) -> dict:
    info = PngImagePlugin.PngInfo()
    if note:
        info.add_text("comment", note)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=level, pnginfo=info)
    return {"type": "image", "image": base64.b64encode(buffer.getvalue()).decode()}


def jpeg_then_png(image: Image.Image, quality: int) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return png(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def crop(image: Image.Image, keep: float, corner: int) -> dict:
    w, h = image.size
    cw, ch = int(w * keep), int(h * keep)
    x, y = [(0, 0), (w - cw, 0), ((w - cw) // 2, (h - ch) // 2)][corner]
    return png(image.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC))


@dataclass
class Key:
    """One API key of the run, with the units it has been charged."""

    name: str
    spec: str
    client: httpx.Client
    model: str
    units: int = 0

    def embed(self, items: list) -> np.ndarray:
        rows: list[list[float]] = []
        for start in range(0, len(items), 64):
            r = self.client.post("/v1/embeddings", json={"model": self.model, "input": items[start:start + 64]})
            r.raise_for_status()
            self.units += int(r.headers.get("x-units-charged", 0))
            rows += [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]
        return np.array(rows, dtype=np.float64)

    def classify(self, items: list, classes: list[str]) -> list[tuple[list[int], list[float]]]:
        r = self.client.post("/v1/classifications", json={"model": self.model, "input": items, "classes": classes,
                                                           "top_k": len(classes)})
        r.raise_for_status()
        self.units += int(r.headers.get("x-units-charged", 0))
        return [([c["class_index"] for c in d["top_k"]], [c["probability"] for c in d["top_k"]])
                for d in sorted(r.json()["data"], key=lambda d: d["index"])]

    @property
    def sells_embeddings(self) -> bool:
        return not self.spec.startswith("probabilities")


@dataclass
class Run:
    vendor: LocalVendor
    clean: Key
    scale: float
    shared_queries: int
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def clean_rows(self, items: list) -> np.ndarray:
        return self.clean.embed(items)


Attack = Callable[[Run, Key, Key], dict[str, Any]]


def _spent(fn: Callable[[], dict[str, Any]], *keys: Key) -> dict[str, Any]:
    before = sum(k.units for k in keys)
    out = fn()
    out["units"] = sum(k.units for k in keys) - before
    return out


def attack_reencodings(run: Run, key: Key, _: Key) -> dict[str, Any]:
    if not key.sells_embeddings:
        return {"value": None}
    image = random_image(10_000)
    answers = key.embed([png(image, level=i % 10, note=f"copy {i}") for i in range(16)])
    clean = run.clean_rows([png(image)])[0]
    if answers.shape[1] != clean.shape[0]:
        return {"value": None, "note": "other frame"}
    return {"value": float(average_attack(answers) @ clean), "one": float(unit(answers[0]) @ clean)}


def attack_near_duplicates(run: Run, key: Key, _: Key) -> dict[str, Any]:
    if not key.sells_embeddings:
        return {"value": None}
    values, ones, curves = [], [], []
    for seed in range(20_000, 20_004):
        image = random_image(seed)
        variants = [jpeg_then_png(image, q) for q in (90, 75, 50)] + [crop(image, k, c) for k in (0.9, 0.8)
                                                                      for c in range(3)]
        answers = key.embed(variants)
        clean = run.clean_rows([png(image)])[0]
        if answers.shape[1] != clean.shape[0]:
            return {"value": None, "note": "other frame"}
        values.append(float(average_attack(answers) @ clean))
        ones.append(float(unit(answers[0]) @ clean))
        curves.append([float(average_attack(answers[:n]) @ clean) for n in range(1, len(answers) + 1)])
    return {"value": float(np.mean(values)), "one": float(np.mean(ones)),
            "curve": {str(n + 1): float(v) for n, v in enumerate(np.mean(curves, axis=0))}}


def attack_text_variants(run: Run, key: Key, _: Key) -> dict[str, Any]:
    if not key.sells_embeddings:
        return {"value": None}
    text = "a photo of a small brown dog"
    variants = sorted({text, text.upper(), text.title(), " " + text, text + " ", "\t" + text, text.replace(" ", "  ")}
                      | {text.replace(w, w.upper()) for w in text.split()}
                      | {text.replace(w, w.capitalize()) for w in text.split()})
    answers = key.embed(variants)
    clean = run.clean_rows([text])[0]
    if answers.shape[1] != clean.shape[0]:
        return {"value": None, "note": "other frame"}
    return {"value": float(average_attack(answers) @ clean), "one": float(unit(answers[0]) @ clean)}


def attack_sybil(run: Run, key: Key, twin: Key) -> dict[str, Any]:
    if not key.sells_embeddings:
        return {"value": None}
    base = 30_000 + 1_000 * int(key.name[1:].split("-")[0])  # per mode: other modes' keys never ask for them
    shared = [png(random_image(s)) for s in range(base, base + run.shared_queries)]
    held = [png(random_image(s)) for s in range(40_000, 40_020)]
    a, b = key.embed(shared + held), twin.embed(shared + held)
    clean = run.clean_rows(shared + held)
    n = len(shared)
    w = procrustes(a[:n], b[:n])
    aligned = unit(a[n:] @ w)
    # B's frame differs from the clean one for rotate keys; what matters is recovering B's clean answer,
    # i.e. whether A's answers become usable in B's frame: compare with B's own answers and, through
    # a second alignment B -> clean fitted on the same shared inputs, with the clean embeddings.
    to_clean = procrustes(b[:n], clean[:n])
    flagged = json.loads(run.vendor.admin("suspects", "--json", "--min-shared", str(max(1, n // 2))))
    pair = {tuple(sorted((p["key_a"], p["key_b"]))) for p in flagged}
    curve = {str(m): mean_cosine(unit(a[n:] @ procrustes(a[:m], b[:m])), b[n:]) for m in SYBIL_CURVE if m <= n}
    return {"value": mean_cosine(aligned, b[n:]), "curve": curve, "before": mean_cosine(a[n:, : b.shape[1]], b[n:])
            if a.shape == b.shape else None,
            "to_clean": mean_cosine(unit(aligned @ to_clean), clean[n:]),
            "flagged": tuple(sorted((key.name, twin.name))) in pair}


def attack_invert(run: Run, key: Key, _: Key) -> dict[str, Any]:
    classes = [f"object number {i}" for i in range(100)]
    prompts = [f"a photo of a {c}." for c in classes]
    images = [png(random_image(s)) for s in range(50_000, 50_016)]  # >= 13 images pay for 100 new prompts
    prompt_rows = run.clean_rows(prompts)
    clean = run.clean_rows(images)
    answers = key.classify(images, classes)
    inverted = np.stack([invert_probabilities([answer], prompt_rows, run.scale) for answer in answers])
    returned = float(np.mean([len(c) for c, _ in answers]))
    return {"value": mean_cosine(inverted, clean), "classes_returned": returned}


def _ridge_student(train: np.ndarray, targets: np.ndarray, probe: np.ndarray, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((train.shape[1], 256))
    features = lambda x: np.tanh(3 * (x - train.mean(axis=0)) @ projection)  # noqa: E731
    f = features(train)
    head = np.linalg.solve(f.T @ f + np.eye(f.shape[1]), f.T @ targets)
    return features(probe) @ head


def attack_watermark(run: Run, key: Key, twin: Key) -> dict[str, Any]:
    if not key.spec.startswith("watermark"):
        return {"value": None}
    train_items = [png(random_image(s)) for s in range(60_000, 60_300)]
    probe_items = [png(random_image(s)) for s in range(70_000, 70_300)]
    marked = key.embed(train_items)
    clean_train, clean_probe = run.clean_rows(train_items), run.clean_rows(probe_items)
    extra = [png(random_image(s)) for s in range(80_000, 80_100)]
    extra_clean = run.clean_rows(extra)  # "a few clean answers", bought through an unprotected key
    probe_file = Path(tempfile.mkdtemp(prefix="harness-probe-")) / "probe.npz"
    np.savez(probe_file, clean=clean_probe.astype(np.float32))

    verdicts: list[dict[str, Any]] = []

    def p_value(student: np.ndarray) -> float:
        suspect = probe_file.with_name("suspect.npy")
        np.save(suspect, student.astype(np.float32))
        verdict = json.loads(run.vendor.admin("verify-watermark", key.name, "--probe", str(probe_file),
                                              "--suspect", str(suspect), "--json", timeout=600))
        verdicts.append(verdict)
        return float(verdict["p_value"])

    before = p_value(_ridge_student(clean_train, marked, clean_probe))
    stripped = _ridge_student(np.concatenate([clean_train, extra_clean]), np.concatenate([marked, extra_clean]),
                              clean_probe)
    honest = p_value(_ridge_student(clean_train, clean_train, clean_probe))
    return {"value": before, "after_strip": p_value(stripped), "clean_student": honest,
            "triggered_probes": verdicts[0]["triggered"], "inconclusive": verdicts[0]["inconclusive"],
            "sold_triggered": int((np.abs(marked - clean_train).max(axis=1) > 1e-6).sum())}


def attack_fidelity(run: Run, key: Key, _: Key) -> dict[str, Any]:
    if not key.sells_embeddings:
        return {"value": None}
    items = [png(random_image(s)) for s in range(90_000, 90_040)] + [f"a photo of a thing number {i}" for i in range(10)]
    rows, clean = key.embed(items), run.clean_rows(items)
    geometry = float(np.corrcoef((rows @ rows.T)[np.triu_indices(len(items), 1)],
                                 (clean @ clean.T)[np.triu_indices(len(items), 1)])[0, 1])
    same_frame = rows.shape == clean.shape
    return {"value": mean_cosine(rows, clean) if same_frame else None, "geometry": geometry}


ATTACKS: dict[str, Attack] = {
    "fidelity": attack_fidelity,
    "re-encodings": attack_reencodings,
    "near-dups": attack_near_duplicates,
    "text variants": attack_text_variants,
    "sybil": attack_sybil,
    "invert": attack_invert,
    "watermark": attack_watermark,
}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "flagged" if value else "not flagged"
    if isinstance(value, float):
        return f"{value:.2g}" if (0 < abs(value) < 1e-3) else f"{value:.{digits}f}"
    return str(value)


def report(run: Run, command: str, seconds: float, out_name: str) -> list[str]:
    lines = ["# Protection modes against the extraction attacks (issue 13)", "",
             f"`{command}`, {seconds:.0f} s. Teacher: {run.clean.model}; {run.shared_queries} shared sybil queries. "
             "Cosines are to the clean teacher embedding (1.0 = the attack recovered it); `-`: the attack does not "
             "apply (no embeddings sold, or another frame). Sybil: key A aligned to key B by Procrustes on the shared "
             "queries, held-out cos to B's answers (in parentheses: then aligned to the clean frame with the same "
             "queries' clean answers, i.e. an attacker who also holds a `none` key). Units: what the vendor charged the "
             f"attacker's key(s). Plot: [{out_name}]({out_name}) (sybil alignment against units; "
             "near-duplicate averaging against the number averaged).", "",
             "| mode | fidelity (cos / geometry) | re-encodings x16: one -> mean | near-dups x9: one -> mean "
             "| text variants: one -> mean | sybil: aligned held-out cos (to clean) | invert classifications "
             "(classes returned) | watermark p: student -> stripped (clean student) |",
             "|---|---|---|---|---|---|---|---|"]
    for spec, r in run.results.items():
        f, re, nd, tv, sy, inv, wm = (r[a] for a in ATTACKS)
        lines.append(
            f"| `{spec}` | {_fmt(f.get('value'))} / {_fmt(f.get('geometry'))} "
            f"| {_fmt(re.get('one'))} -> {_fmt(re.get('value'))} ({re['units']} u) "
            f"| {_fmt(nd.get('one'))} -> {_fmt(nd.get('value'))} ({nd['units']} u) "
            f"| {_fmt(tv.get('one'))} -> {_fmt(tv.get('value'))} ({tv['units']} u) "
            f"| {_fmt(sy.get('value'))} ({_fmt(sy.get('to_clean'))}), {_fmt(sy.get('flagged'))} ({sy['units']} u) "
            f"| {_fmt(inv.get('value'))} ({_fmt(inv.get('classes_returned'), 0)}; {inv['units']} u) "
            f"| {_fmt(wm.get('value'))} -> {_fmt(wm.get('after_strip'))} ({_fmt(wm.get('clean_student'))}) |")
    return lines


def plot(run: Run, out: Path) -> None:
    """Two panels: sybil alignment against the units the two keys paid for shared queries, and
    near-duplicate averaging against the number of variants averaged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for spec, r in run.results.items():
        sybil, near = r["sybil"].get("curve"), r["near-dups"].get("curve")
        if sybil:
            left.plot([2 * int(m) for m in sybil], list(sybil.values()), marker="o", label=spec)
        if near:
            right.plot([int(m) for m in near], list(near.values()), marker="o", label=spec)
    left.set(xscale="log", xlabel="units spent on shared queries (2 keys)", ylabel="held-out cos after Procrustes",
             title="sybil alignment")
    right.set(xlabel="near-duplicates averaged", ylabel="cos to the clean embedding", title="averaging near-duplicates")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/attack_harness.md"))
    parser.add_argument("--teacher", default=None, help="open_clip spec; default: the tiny seeded test teacher")
    parser.add_argument("--shared", type=int, default=200, help="queries the two sybil keys share")
    parser.add_argument("--data-dir", type=Path, default=None, help="the vendor's data dir (default: a temp dir)")
    parser.add_argument("--modes", nargs="+", default=MODES, help="protection specs (default: all)")
    args = parser.parse_args(argv)
    started = time.time()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="attack-harness-"))
    teacher = args.teacher
    if teacher is None:
        from vendor_api.model_files import write_seeded_local_dir

        teacher = f"local-dir:{write_seeded_local_dir(data_dir / 'tiny-teacher', seed=0)}"
    # the watermark's trigger regions are calibrated on images like the traffic (as a vendor must set
    # VENDOR_WATERMARK_CALIBRATION_DIR): with the built-in synthetic set, these smooth images trigger
    # almost nothing and the watermark is neither applied nor detectable (p = 1, inconclusive)
    calibration = data_dir / "watermark-calibration"
    calibration.mkdir(parents=True, exist_ok=True)
    for seed in range(5_000, 5_096):
        random_image(seed).save(calibration / f"{seed}.png")
    env = {"VENDOR_PROTECTION_SECRET": SECRET, "VENDOR_MAX_ITEMS_PER_REQUEST": "512",
           "VENDOR_WATERMARK_CALIBRATION_DIR": str(calibration)}
    with LocalVendor(data_dir, teacher=teacher, extra_env=env) as vendor:
        def key(name: str, spec: str) -> Key:
            api_key = vendor.create_key(name, 10**9, rate_per_s=10_000, burst=10_000, protection=spec)
            client = httpx.Client(base_url=vendor.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120)
            card = client.get("/v1/models").json()["data"][0]
            return Key(name, spec, client, card["id"])

        clean = key("clean-reference", "none")
        scale = float(clean.client.get("/v1/models").json()["data"][0]["logit_scale"])
        run = Run(vendor, clean, scale, args.shared)
        for i, spec in enumerate(args.modes):
            a, b = key(f"m{i}-a", spec), key(f"m{i}-b", spec)
            run.results[spec] = {name: _spent(lambda: fn(run, a, b), a, b) for name, fn in ATTACKS.items()}
            print(f"{spec}: " + json.dumps({n: {k: v for k, v in r.items()} for n, r in run.results[spec].items()},
                                           default=str), flush=True)
    lines = report(run, "python experiments/attack_harness.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   time.time() - started, args.out.with_suffix(".png").name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    (args.out.with_suffix(".json")).write_text(json.dumps(run.results, indent=1, default=str))
    plot(run, args.out.with_suffix(".png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
