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
- `invert`: classification answers of the key over 100 class names inverted to the image
  embedding (attacker holds the prompt embeddings: clean ones, or the key's own where it sells
  them in the teacher's dimension, since the key's answers are scored on those), from one query
  per image and from 25 lists of top_k + 1 classes per image, random or designed from the answers
  so far (`attacks.AdaptiveInversion`); solved by plain least squares (`invert_probabilities`,
  the first harness's solver, which recovered ~nothing), and by `invert_classifications`
  (rounding-weighted, regularised) without and with a prior fitted to 64 of the attacker's own
  clean image embeddings; cosines raw and centred (see `attack_invert`);
- `watermark`: p-value of a ridge student (random tanh features, intercept) fitted to the key's
  answers, then after the two strippings of issue 13: fine-tuning the student on 25/100/300 clean
  answers bought through a `none` key (closed-form fine-tuning: ridge toward the marked head), and
  WARDEN's CSE removal (ACL 2024: k-means clusters of the bought answers, the pairs whose
  similarity differs most from the attacker's own reference encoder, here a second seeded tiny
  model, their differences' top principal directions projected out before fitting), with 4 and 16
  directions; and the p of a student fitted to clean answers (with and without CSE); all of it for
  `--watermark-keys` keys (8; each its own secret directions), and every key's test on every other
  key's student (cross-key: must not fire);
- `fidelity`: what a legitimate client keeps: cos(answer, clean) and the correlation of the
  key's pairwise cosines with the clean ones (1.0 for rotate: its own geometry is exact).

    HF_HUB_OFFLINE=1 python studies/attack_harness.py --out results/attack_harness.md

- `extraction`: not run here (training students takes hours): read from the committed sweep,
  `results/protection_sweep.md` (`client-distill experiment --publish`), per mode its students'
  OOD accuracy and fidelity against units spent; a mode the sweep did not run shows "not run".

Once, after the modes: the false-flag rate of `vendor-admin suspects` for honest keys that share
popular images (`overlap_false_flags`: 10 honest keys, k = 0/5/10/20/40 popular images each, per
`--flag-modes`), beside sybil pairs sharing 50 and 200 queries. The JSON holds
{"modes": {spec: {attack: result}}, "overlap_false_flags": ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import numpy as np
from PIL import Image, PngImagePlugin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from client_distiller.buying.local_vendor import LocalVendor  # noqa: E402
from vendor_api.admin_cli import suspect_rows  # noqa: E402
from vendor_api.accounts import API_KEY_PREFIX, Account  # noqa: E402
from vendor_api.key_admin import KeyAdmin  # noqa: E402
from vendor_api.protection import read_teacher_dim, validate_protection  # noqa: E402
from vendor_api.protection.watermark import WatermarkReport  # noqa: E402
from vendor_api.runtime import redis_url  # noqa: E402
from vendor_api.settings import VendorSettings  # noqa: E402
from vendor_api.watermark_check import WatermarkVerifier  # noqa: E402
from vendor_api.protection.attacks import (  # noqa: E402
    AdaptiveInversion, EmbeddingPrior, average_attack, cse_directions, invert_classifications, invert_probabilities,
    mean_cosine, procrustes, project_out, unit)

MODES = ["none", "quantize:int8", "noise:0.5", "truncate:32", "rotate", "rotate:16,0.3", "b4b:0.5", "watermark",
         "probabilities:5", "probabilities:5,0.5"]
SWEEP = Path(__file__).resolve().parents[1] / "results" / "protection_sweep.md"
FINETUNE_CLEAN = (25, 100, 300)
CSE_DIRECTIONS = (4, 16)
SECRET = "attack-harness-secret"
SYBIL_CURVE = (5, 10, 25, 50, 100, 200)
INVERT_QUERIES = 25  # class lists per image, adaptive inversion
LIST_LIMIT = VendorSettings.model_fields["classify_lists_per_image"].default  # the vendor's per-key default
INVERT_IMAGES = 4
PRIOR_IMAGES = 64  # clean embeddings of the attacker's own images, for its prior
REFERENCE_SEEDS = range(70_000, 70_300)  # the watermark probes: their mean centres the inversion cosines
WATERMARK_KEYS = 8
POPULAR = (0, 5, 10, 20, 40)  # popular images every honest key also asks for (false-flag table)
HONEST_KEYS = 10
HONEST_OWN = 50  # each honest key's own distinct images
SYBIL_SHARED = (50, 200)
RING_KEYS = 4  # a sybil ring: this many keys all asking the same shared images (the weighted score's price)
FLAG_MODES = ("none", "watermark")


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


T = TypeVar("T")


class VendorAdmin:
    """The vendor operator's side of the run (create keys, `suspects`, `verify-watermark`), in
    this process: the admin CLI's own code (`KeyAdmin`, `admin_cli.suspect_rows`,
    `watermark_check.WatermarkVerifier`) against the running vendor's Redis, with the vendor's
    settings. A `vendor-admin` subprocess per call costs an interpreter start (about 5 s on a
    loaded 2-core machine) and, for verify-watermark, a teacher load and a calibration; about ten
    checks per watermark key made the tiny-scale test run past 25 minutes. The verifier (teacher
    and calibration) is loaded once, on the first check."""

    def __init__(self, vendor: LocalVendor) -> None:
        self.settings = vendor_settings(vendor)
        self._verifier: WatermarkVerifier | None = None

    def _with_keys(self, fn: Callable[[KeyAdmin], Awaitable[T]]) -> T:
        async def call() -> T:
            with redis_url(self.settings) as url:  # the vendor's live embedded Redis: reused, left running
                keys = KeyAdmin.from_url(url, timeout_s=self.settings.redis_timeout_s)
                try:
                    return await fn(keys)
                finally:
                    await keys.close()

        return asyncio.run(call())

    def create_key(self, name: str, spec: str, *, quota: int, rate_per_s: float, burst: int) -> str:
        """`vendor-admin create-key`: the spec checked against the teacher the vendor recorded. The
        key is derived from its name (imported, not drawn): per-key secrets (noise, rotations,
        watermark directions) come from the key's digest, so drawn keys made every run's numbers
        differ; derived ones make the harness reproduce its table to the digit."""
        async def create(keys: KeyAdmin) -> str:
            validate_protection(spec, await read_teacher_dim(keys.redis))
            derived = API_KEY_PREFIX + hashlib.sha256(f"{SECRET}/{name}".encode()).hexdigest()
            api_key, _ = await keys.create_key(name, quota=quota, rate_per_s=rate_per_s, burst=burst, protection=spec,
                                               api_key=derived)
            return api_key

        return self._with_keys(create)

    def suspects(self, min_shared: float) -> list[dict[str, Any]]:
        """`vendor-admin suspects --json --min-shared N` (here also below 1: every pair sharing anything)."""
        return self._with_keys(lambda keys: suspect_rows(keys, self.settings, min_images=min_shared, min_texts=None))

    def account(self, name: str) -> Account:
        return self._with_keys(lambda keys: keys.get_account(name))

    def verify_watermark(self, name: str, clean: np.ndarray, suspect: np.ndarray) -> WatermarkReport:
        """`vendor-admin verify-watermark NAME` on in-memory probe and suspect embeddings."""
        if self._verifier is None:
            self._verifier = WatermarkVerifier.load(self.settings)
        return self._verifier.verify(self.account(name), clean.astype(np.float32), suspect.astype(np.float32))


def vendor_settings(vendor: LocalVendor) -> VendorSettings:
    """The settings the vendor process runs with: its `VENDOR_*` environment (data dir, teacher,
    secret, calibration dir), and no `REDIS_URL` (LocalVendor drops it: the vendor meters against
    its embedded Redis, which this process must find too, not one named in our own environment)."""
    fields = {name.removeprefix("VENDOR_").lower(): value for name, value in vendor.env.items()
              if name.startswith("VENDOR_") and name != "VENDOR_REDIS_URL"}
    return VendorSettings(**fields).model_copy(update={"redis_url": None, "redis_cluster": False})


_UNITS_LOCK = threading.Lock()


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
            self._charge(r)
            rows += [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]
        return np.array(rows, dtype=np.float64)

    def classify(self, items: list, classes: list[str]) -> list[tuple[list[int], list[float]]]:
        r = self.client.post("/v1/classifications", json={"model": self.model, "input": items, "classes": classes,
                                                           "top_k": len(classes)})
        r.raise_for_status()
        self._charge(r)
        return [([c["class_index"] for c in d["top_k"]], [c["probability"] for c in d["top_k"]])
                for d in sorted(r.json()["data"], key=lambda d: d["index"])]

    def _charge(self, response: httpx.Response) -> None:
        with _UNITS_LOCK:  # the designed inversion asks from several threads
            self.units += int(response.headers.get("x-units-charged", 0))

    @property
    def sells_embeddings(self) -> bool:
        return not self.spec.startswith("probabilities")


@dataclass
class Run:
    vendor: LocalVendor
    admin: VendorAdmin
    clean: Key
    scale: float
    shared_queries: int
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    reference: Any = None  # the CSE attacker's own encoder, loaded on first use
    new_key: Callable[[str, str], "Key"] | None = None  # `vendor-admin create-key` + a client
    watermark_keys: int = WATERMARK_KEYS
    false_flags: dict[str, Any] | None = None  # overlap_false_flags, run once after the modes
    _clean_cache: dict[str, np.ndarray] = field(default_factory=dict)

    def image_prior(self) -> EmbeddingPrior:
        """The inversion attacker's prior: fitted to clean embeddings of PRIOR_IMAGES images it owns."""
        return EmbeddingPrior.fit(self.clean_rows([png(random_image(s)) for s in range(85_000, 85_000 + PRIOR_IMAGES)]))

    def reference_mean(self) -> np.ndarray:
        """The measurement's centre (not the attacker's): mean clean embedding of 300 images."""
        return self.clean_rows([png(random_image(s)) for s in REFERENCE_SEEDS]).mean(axis=0)

    def clean_rows(self, items: list) -> np.ndarray:
        """Clean teacher embeddings through the `none` key, each distinct input asked once per run:
        every mode's attacks compare with the same prompts and held-out images, and a `none`
        answer is the teacher's, deterministic, so asking again only costs time."""
        keys = [json.dumps(item, sort_keys=True) for item in items]
        missing = list({k: item for k, item in zip(keys, items) if k not in self._clean_cache}.items())
        if missing:
            for (k, _), row in zip(missing, self.clean.embed([item for _, item in missing])):
                self._clean_cache[k] = row
        return np.stack([self._clean_cache[k] for k in keys])


Attack = Callable[[Run, Key, Key], dict[str, Any]]


def _spent(fn: Callable[[], dict[str, Any]], *keys: Key) -> dict[str, Any]:
    before, started = sum(k.units for k in keys), time.time()
    out = fn()
    out["units"] = sum(k.units for k in keys) - before + out.pop("extra_units", 0)  # + keys the attack made
    out["seconds"] = round(time.time() - started, 1)
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
    flagged = run.admin.suspects(max(1, n // 2))
    pair = {tuple(sorted((p["key_a"], p["key_b"]))) for p in flagged}
    curve = {str(m): mean_cosine(unit(a[n:] @ procrustes(a[:m], b[:m])), b[n:]) for m in SYBIL_CURVE if m <= n}
    return {"value": mean_cosine(aligned, b[n:]), "curve": curve, "before": mean_cosine(a[n:, : b.shape[1]], b[n:])
            if a.shape == b.shape else None,
            "to_clean": mean_cosine(unit(aligned @ to_clean), clean[n:]),
            "flagged": tuple(sorted((key.name, twin.name))) in pair}


def _decimals_of(answers: list[tuple[list[int], list[float]]]) -> int | None:
    """The rounding the vendor applies, read off its answers (the attacker's view): the fewest
    decimals every probability is written with; None when they look unrounded."""
    probs = [p for _, row in answers for p in row]
    for decimals in range(10):
        if all(abs(p * 10 ** decimals - round(p * 10 ** decimals)) < 1e-6 for p in probs):
            return decimals
    return None


def attack_invert(run: Run, key: Key, _: Key) -> dict[str, Any]:
    """Classification answers inverted to the image embedding (`attacks.invert_classifications`).

    The attacker holds the clean prompt embeddings of its 100 class names and, for its prior,
    clean embeddings of PRIOR_IMAGES images of its own (both bought once through a `none` key:
    `prior_units`). One query of 100 classes per image, then per image INVERT_QUERIES lists of
    top_k + 1 classes (the class not returned is 1 - the others): random lists (the same for
    every image, as the first harness asked) and lists designed one at a time from the answers so
    far (`attacks.AdaptiveInversion`). Each is inverted by plain least squares (the first
    harness's solver), by the strong solver without any clean image (ridge toward 0, strength by
    GCV) and with the prior (MAP). Cosines to the clean embedding, and *centred* cosines, of e - m
    with m the mean clean embedding of 300 reference images: the tiny teacher's image embeddings
    all lie within cos ~0.99 of their mean, so guessing the mean scores 0.99 raw and ~0 centred;
    the centred cosine is what the answers revealed about *this* image."""
    classes = [f"object number {i}" for i in range(100)]
    prompts = [f"a photo of a {c}." for c in classes]
    images = [png(random_image(s)) for s in range(50_000, 50_016)]  # >= 13 images pay for 100 new prompts
    prompt_rows, prompt_source = run.clean_rows(prompts), "clean"
    if key.sells_embeddings and key.spec != "none":
        # the key's classifications are scored on its own protected prompt embeddings: where it
        # sells them in the teacher's dimension, those are the exact rows to invert with
        own_rows = key.embed(prompts)
        if own_rows.shape == prompt_rows.shape:
            prompt_rows, prompt_source = own_rows, "own key"
    clean = run.clean_rows(images)
    prior, centre = run.image_prior(), run.reference_mean()

    def scores(estimates: list[np.ndarray]) -> dict[str, float]:
        rows = np.stack(estimates)
        truth = clean[: len(rows)]
        return {"cos": mean_cosine(rows, truth), "centred": mean_cosine(rows - centre, truth - centre)}

    answers = key.classify(images, classes)
    top_k, decimals = len(answers[0][0]), _decimals_of(answers)
    one = {"plain": scores([invert_probabilities([a], prompt_rows, run.scale) for a in answers]),
           "no_prior": scores([invert_classifications([a], prompt_rows, run.scale, decimals=decimals)
                               for a in answers]),
           "prior": scores([invert_classifications([a], prompt_rows, run.scale, decimals=decimals, prior=prior)
                            for a in answers])}
    returned = float(np.mean([len(c) for c, _ in answers]))
    n = INVERT_IMAGES
    # random lists of top_k + 1 classes, the same for the n images (one request per list)
    rng = np.random.default_rng(1)
    lists = [sorted(rng.choice(100, top_k + 1, replace=False).tolist()) for _ in range(INVERT_QUERIES)]
    per_image: list[list[tuple[list[int], list[float], list[int]]]] = [[] for _ in range(n)]
    for chosen in lists:
        for i, (indices, probs) in enumerate(key.classify(images[:n], [classes[c] for c in chosen])):
            per_image[i].append(([chosen[c] for c in indices], probs, chosen))
    random_lists = {
        "plain": scores([invert_probabilities(a, prompt_rows, run.scale) for a in per_image]),
        "no_prior": scores([invert_classifications(a, prompt_rows, run.scale, decimals=decimals) for a in per_image]),
        "prior": scores([invert_classifications(a, prompt_rows, run.scale, decimals=decimals, prior=prior)
                         for a in per_image])}
    # designed lists: each image's next list chosen from its answers so far (one request per list)
    def design(i: int) -> tuple[np.ndarray, list[float]]:
        attacker = AdaptiveInversion(prompt_rows, run.scale, top_k=top_k, decimals=decimals, prior=prior, seed=i)
        curve = []
        for _ in range(INVERT_QUERIES):
            chosen = attacker.next_list()
            ((indices, probs),) = key.classify(images[i:i + 1], [classes[c] for c in chosen])
            attacker.add([chosen[c] for c in indices], probs, chosen)
            curve.append(float(unit(attacker.estimate() - centre) @ unit(clean[i] - centre)))
        return attacker.estimate(), curve

    with ThreadPoolExecutor(n) as pool:  # the images' query sequences are independent
        designed, curves = zip(*pool.map(design, range(n)))
    adaptive = scores(list(designed))
    own = None  # what the key sells anyway, for comparison: its own answers for the n images
    if key.sells_embeddings:
        rows = key.embed(images[:n])
        if rows.shape[1] == clean.shape[1]:
            own = {"cos": mean_cosine(rows, clean[:n]), "centred": mean_cosine(rows - centre, clean[:n] - centre)}
    return {"value": one["prior"]["cos"], "centred": one["prior"]["centred"], "one": one,
            "adaptive": adaptive["cos"], "adaptive_centred": adaptive["centred"], "designed": adaptive,
            "random_lists": random_lists, "adaptive_queries": len(lists), "adaptive_images": n,
            "list_size": top_k + 1, "classes_returned": returned, "decimals": decimals, "prompt_rows": prompt_source,
            "curve": {str(q + 1): float(v) for q, v in enumerate(np.mean(curves, axis=0))},
            "prior_only": {"cos": mean_cosine(np.repeat(unit(prior.mean)[None], n, 0), clean[:n]),
                           "centred": mean_cosine(np.repeat((prior.mean - centre)[None], n, 0), clean[:n] - centre)},
            "own_answer": own, "prior_images": PRIOR_IMAGES, "prior_units": PRIOR_IMAGES + len(prompts)}


@dataclass
class RidgeStudent:
    """A stand-in for a distilled student that learnt the teacher: fixed random tanh features of
    the input (here of its clean embedding: the student sees the image) and a ridge head with an
    intercept, fitted to whatever the attacker bought (fidelity to the clean teacher ~0.99 on
    the tiny teacher; without the intercept it was ~0.2 and any refit moved it far)."""

    center: np.ndarray
    projection: np.ndarray
    mean: np.ndarray | None = None
    head: np.ndarray | None = None

    @classmethod
    def fit(cls, inputs: np.ndarray, targets: np.ndarray, seed: int = 7) -> "RidgeStudent":
        projection = np.random.default_rng(seed).standard_normal((inputs.shape[1], 256))
        student = cls(inputs.mean(axis=0), projection)
        student.mean = targets.mean(axis=0)
        f = student.features(inputs)
        student.head = np.linalg.solve(f.T @ f + np.eye(f.shape[1]), f.T @ (targets - student.mean))
        return student

    def features(self, inputs: np.ndarray) -> np.ndarray:
        return np.tanh(3 * (inputs - self.center) @ self.projection)

    def fine_tuned(self, inputs: np.ndarray, targets: np.ndarray, strength: float = 0.1) -> "RidgeStudent":
        """Fine-tuning on a few (input, clean answer) pairs to convergence with weight decay toward
        the current head (closed form): min ||f h + mean - y||^2 + strength ||h - head||^2. A small
        strength fits the clean answers closely; the rest of the head stays as it was."""
        assert self.head is not None and self.mean is not None
        f = self.features(inputs)
        head = np.linalg.solve(f.T @ f + strength * np.eye(f.shape[1]), f.T @ (targets - self.mean) + strength * self.head)
        return RidgeStudent(self.center, self.projection, self.mean, head)

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        assert self.head is not None and self.mean is not None
        return self.mean + self.features(inputs) @ self.head


def _reference_encoder(run: Run) -> Any:
    """The CSE attacker's own encoder (WARDEN's "standard model"): a second seeded tiny open_clip
    model, unrelated to the vendor's weights (its pairwise similarities correlate 0.45 with the
    tiny teacher's on these images)."""
    if run.reference is None:
        from vendor_api.model_files import write_seeded_local_dir
        from vendor_api.teacher import Teacher

        folder = run.vendor.data_dir / "cse-reference"  # with the run's other files, not a stray temp dir
        run.reference = Teacher.load(f"local-dir:{write_seeded_local_dir(folder, seed=1)}")
    return run.reference


def _reference_rows(run: Run, seeds: range) -> np.ndarray:
    import torch

    encoder = _reference_encoder(run)
    return encoder.encode_images(torch.stack([encoder.preprocess(random_image(s)) for s in seeds])).astype(np.float64)


def attack_watermark(run: Run, key: Key, twin: Key) -> dict[str, Any]:
    """The student, stripping and clean-student checks for `run.watermark_keys` keys of the mode
    (the mode's two keys and new ones, each with its own secret-derived directions), each key's
    detector on every other key's student (cross-key: must not fire), and, for the first key, the
    fine-tuning on the twin's marked answers. The first key's figures stay the top-level ones."""
    if not key.spec.startswith("watermark"):
        return {"value": None}
    train_seeds, probe_seeds, extra_seeds = range(60_000, 60_300), range(70_000, 70_300), range(80_000, 80_300)
    train_items = [png(random_image(s)) for s in train_seeds]
    probe_items = [png(random_image(s)) for s in probe_seeds]
    clean_train, clean_probe = run.clean_rows(train_items), run.clean_rows(probe_items)
    # "a few clean answers", bought through an unprotected key (the attacker's cost: these units too)
    extra_clean = run.clean_rows([png(random_image(s)) for s in extra_seeds])
    reference = _reference_rows(run, train_seeds)
    assert run.new_key is not None
    extra = [run.new_key(f"{key.name}-wm{i}", key.spec) for i in range(2, run.watermark_keys)]
    keys = [key, twin, *extra][: max(1, run.watermark_keys)]
    fidelity = lambda rows: mean_cosine(rows, clean_probe)  # noqa: E731

    def verify(student: np.ndarray, name: str) -> WatermarkReport:
        """The vendor's test of key `name` on the student's embeddings of the probes (in-process,
        one loaded teacher for every check: see `VendorAdmin`)."""
        return run.admin.verify_watermark(name, clean_probe, student)

    honest = RidgeStudent.fit(clean_train, clean_train)
    honest_cse = RidgeStudent.fit(clean_train, project_out(clean_train, cse_directions(clean_train, reference,
                                                                                      directions=4)))
    per_key: dict[str, dict[str, Any]] = {}
    students: dict[str, np.ndarray] = {}
    for k in keys:
        marked = k.embed(train_items)
        student = RidgeStudent.fit(clean_train, marked)
        students[k.name] = student(clean_probe)
        first = verify(students[k.name], k.name)
        out: dict[str, Any] = {"value": first.p_value, "student_fidelity": fidelity(students[k.name]),
                               "triggered_probes": first.triggered, "inconclusive": first.inconclusive,
                               "sold_triggered": int((np.abs(marked - clean_train).max(axis=1) > 1e-6).sum()),
                               "finetune": {}, "cse": {}}
        for n in FINETUNE_CLEAN:
            tuned = student.fine_tuned(_inputs_of(extra_clean[:n]), extra_clean[:n])(clean_probe)
            out["finetune"][str(n)] = {"p": verify(tuned, k.name).p_value, "fidelity": fidelity(tuned),
                                       "clean_answers": n}
        for directions in CSE_DIRECTIONS:
            removed = project_out(marked, cse_directions(marked, reference, directions=directions))
            stripped = RidgeStudent.fit(clean_train, removed)(clean_probe)
            out["cse"][str(directions)] = {"p": verify(stripped, k.name).p_value, "fidelity": fidelity(stripped)}
        out["clean_student"] = verify(honest(clean_probe), k.name).p_value
        out["clean_student_cse"] = verify(honest_cse(clean_probe), k.name).p_value
        # "stripped": the attacks that leave the marked answers worth buying, i.e. fine-tuning on fewer
        # clean answers than the student learnt marked ones, and CSE. With as many clean answers as
        # marked ones the attacker could have trained on the clean ones alone: reported apart ("refit")
        few = [v["p"] for n, v in out["finetune"].items() if int(n) < len(train_items)]
        out["after_strip"] = max(few + [v["p"] for v in out["cse"].values()])
        out["after_refit"] = max([v["p"] for n, v in out["finetune"].items() if int(n) >= len(train_items)],
                                 default=None)
        per_key[k.name] = out
        if k is key:
            # the same fine-tuning with answers from a second watermarked key: if every key is
            # marked, the "clean" answers carry their own key's mark
            twin_answers = twin.embed([png(random_image(s)) for s in extra_seeds[:100]])
            tuned = student.fine_tuned(_inputs_of(extra_clean[:100]), twin_answers)(clean_probe)
            out["finetune_twin"] = {"p": verify(tuned, key.name).p_value, "p_twin": verify(tuned, twin.name).p_value,
                                    "fidelity": fidelity(tuned)}
    cross = {f"{a.name} on {b.name}": verify(students[b.name], a.name).p_value
             for a in keys for b in keys if a is not b}
    result = dict(per_key[key.name])
    result.update({
        "keys": per_key, "cross": cross, "watermark_keys": len(keys),
        "max_student_p": max(v["value"] for v in per_key.values()),
        "max_after_strip": max(v["after_strip"] for v in per_key.values()),
        "refit_undetected": sum(1 for v in per_key.values() if v["after_refit"] is not None and v["after_refit"] >= 0.01),
        "min_clean_student_p": min(min(v["clean_student"], v["clean_student_cse"]) for v in per_key.values()),
        "min_cross_p": min(cross.values()) if cross else None,
        "extra_units": sum(k.units for k in extra)})
    return result


def _inputs_of(clean: np.ndarray) -> np.ndarray:
    """The student's input for an image is (a function of) the image; here its clean embedding."""
    return clean


def attack_fidelity(run: Run, key: Key, _: Key) -> dict[str, Any]:
    if not key.sells_embeddings:
        return {"value": None}
    items = [png(random_image(s)) for s in range(90_000, 90_040)] + [f"a photo of a thing number {i}" for i in range(10)]
    rows, clean = key.embed(items), run.clean_rows(items)
    geometry = float(np.corrcoef((rows @ rows.T)[np.triu_indices(len(items), 1)],
                                 (clean @ clean.T)[np.triu_indices(len(items), 1)])[0, 1])
    same_frame = rows.shape == clean.shape
    return {"value": mean_cosine(rows, clean) if same_frame else None, "geometry": geometry}


def overlap_false_flags(run: Run, modes: tuple[str, ...] = FLAG_MODES, popular: tuple[int, ...] = POPULAR,
                        honest_keys: int = HONEST_KEYS, own: int = HONEST_OWN,
                        sybil_shared: tuple[int, ...] = SYBIL_SHARED, ring_keys: int = RING_KEYS) -> dict[str, Any]:
    """How often `vendor-admin suspects` flags honest keys that share popular images.

    Per protection mode (the exact signature counts for every key; a keyed mode also counts near
    duplicates): `honest_keys` new keys, one after the other, each asking for `own` images nobody
    else asks for; then, for each k in `popular` (ascending), each key in turn asks for the
    popular images that bring its total to k (the same for every key: a benchmark image, a logo),
    and the flagged pairs among them at the vendor's threshold (`VENDOR_OVERLAP_MIN_SHARED`) are
    counted, with the largest shared counts. Counts are cumulative, exactly as if each key had
    asked for its own images and k popular ones, at a fraction of the requests. Beside them, a
    sybil pair per count in `sybil_shared`: two new keys asking `own` images each of their own
    plus that many images in common, and a ring of `ring_keys` keys all asking the same ones (the
    price of the weighted score: each pair of the ring scores shared / (ring_keys - 1)). Each mode
    has its own keys and images."""
    threshold = run.admin.settings.overlap_min_shared
    out: dict[str, Any] = {"threshold": threshold, "max_keys": run.admin.settings.overlap_max_keys,
                           "honest_keys": honest_keys, "own_images": own, "ring_keys": ring_keys, "modes": {}}
    seed = iter(range(100_000, 10**7))
    fresh = lambda count: [png(random_image(next(seed))) for _ in range(count)]  # noqa: E731
    assert run.new_key is not None

    def pairs_among(names: set[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        every = [r for r in run.admin.suspects(1e-3) if {r["key_a"], r["key_b"]} <= names]  # every pair that shares
        return [r for r in every if score(r) >= threshold - 1e-6], every

    def score(row: dict[str, Any]) -> float:
        return max(row["score_images"], row["near_score_images"])

    def sybils(n: int, count: int, label: str) -> dict[str, Any]:
        common = fresh(n)
        group = [run.new_key(f"{label}-{mi}-{n}-{side}", spec) for side in range(count)]
        for key in group:
            key.embed(fresh(own) + common)
        flagged, every = pairs_among({key.name for key in group})
        return {"flagged": len(flagged), "pairs": count * (count - 1) // 2,
                "score": min([score(r) for r in every], default=0.0),
                "shared": max([r["shared_images"] for r in every], default=0),
                "near": max([r["near_images"] for r in every], default=0),
                "units": sum(key.units for key in group)}

    for mi, spec in enumerate(modes):
        rows: dict[str, Any] = {"honest": {}, "sybil": {}, "ring": {}}
        keys = [run.new_key(f"honest-{mi}-{i}", spec) for i in range(honest_keys)]
        names = {key.name for key in keys}
        for key in keys:
            key.embed(fresh(own))
        asked = 0
        for k in sorted(popular):
            shared = fresh(k - asked)
            asked = k
            for key in keys:
                if shared:
                    key.embed(shared)
            flagged, every = pairs_among(names)
            rows["honest"][str(k)] = {
                "pairs": honest_keys * (honest_keys - 1) // 2, "flagged": len(flagged),
                "max_shared": max([r["shared_images"] for r in every], default=0),
                "max_near": max([r["near_images"] for r in every], default=0),
                "max_score": max([score(r) for r in every], default=0.0),
                "pairs_sharing": len(every), "units": sum(key.units for key in keys)}
        for n in sybil_shared:
            rows["sybil"][str(n)] = sybils(n, 2, "sybil")
            rows["sybil"][str(n)]["flagged"] = bool(rows["sybil"][str(n)]["flagged"])
            if ring_keys > 2:
                rows["ring"][str(n)] = sybils(n, ring_keys, "ring")
        out["modes"][spec] = rows
    return out


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


def read_sweep(path: Path = SWEEP) -> dict[str, list[dict[str, Any]]]:
    """The extraction measurements of the committed protection sweep (`client-distill experiment
    --publish`, the markdown of `client_distiller.reporting.sweep_report.summary_markdown`): per mode
    spec, one row per budget with units spent, OOD accuracy (%) and fidelity (None where n/a).
    Read, never rerun: distilling students is the sweep's job (hours), not the harness's."""
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("| Mode | Method | Budget | Units spent"))
    except StopIteration:
        return {}
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows: dict[str, list[dict[str, Any]]] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(head, (c.strip() for c in line.strip("|").split("|"))))
        number = lambda text: None if text in ("", "n/a") else float(text.split("±")[0])  # noqa: E731
        rows.setdefault(cells["Mode"].strip("`"), []).append({
            "method": cells["Method"], "budget": int(cells["Budget"]), "units": number(cells["Units spent"]),
            "ood_acc": number(cells["OOD acc"]), "fidelity": number(cells["Fidelity"])})
    return rows


def extraction_for(spec: str, sweep: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The sweep's rows for this mode: the same spec, else the same mode with another parameter
    (named, e.g. `noise:0.1` for `noise:0.5`), else not run."""
    if spec in sweep:
        return {"spec": spec, "rows": sweep[spec]}
    family = spec.partition(":")[0]
    for other, rows in sweep.items():
        if other.partition(":")[0] == family:
            return {"spec": other, "rows": rows}
    return {"spec": None, "rows": []}


def _extraction_cell(found: dict[str, Any]) -> str:
    if not found["rows"]:
        return "not run"
    parts = [f"{r['ood_acc']:.1f}%" + (f" / {r['fidelity']:.2f}" if r["fidelity"] is not None else "")
             + f" @ {r['units']:.0f} u" for r in found["rows"]]
    return (f"(`{found['spec']}`) " if found["spec"] else "") + ", ".join(parts)


def _watermark_cell(wm: dict[str, Any]) -> str:
    if wm.get("value") is None:
        return "- "
    ft = "/".join(_fmt(v["p"]) for v in wm["finetune"].values())
    cse = "/".join(_fmt(v["p"]) for v in wm["cse"].values())
    cell = (f"{_fmt(wm['value'])} (fid {_fmt(wm['student_fidelity'])}); fine-tune {'/'.join(wm['finetune'])} clean: "
            f"{ft}; CSE {'/'.join(wm['cse'])} dirs: {cse} (fid {_fmt(wm['cse'][str(CSE_DIRECTIONS[-1])]['fidelity'])}); "
            f"clean student {_fmt(wm['clean_student'])}")
    if wm.get("keys") and len(wm["keys"]) > 1:
        cell += (f"; {len(wm['keys'])} keys: student p <= {_fmt(wm['max_student_p'])}, stripped <= "
                 f"{_fmt(wm['max_after_strip'])}, refit on clean answers undetected for {wm['refit_undetected']}, "
                 f"clean students >= {_fmt(wm['min_clean_student_p'])}, "
                 f"another key's detector >= {_fmt(wm['min_cross_p'])}")
    return cell


def _cos_centred(scores: dict[str, float] | None) -> str:
    return "-" if scores is None else f"{_fmt(scores['cos'])} ({_fmt(scores['centred'])})"


def _invert_cell(inv: dict[str, Any]) -> str:
    return (f"{_fmt(inv.get('value'))} ({_fmt(inv.get('centred'))}) -> {_fmt(inv.get('adaptive'))} "
            f"({_fmt(inv.get('adaptive_centred'))}) ({_fmt(inv.get('classes_returned'), 0)}; {inv['units']} u)")


def invert_section(run: Run) -> list[str]:
    first = next(iter(run.results.values()))["invert"]
    queries, images, size = first["adaptive_queries"], first["adaptive_images"], first["list_size"]
    lines = ["", "## Inverting classification answers", "",
             f"Per image, the answers of one query over 100 class names (16 images), then of {queries} class lists "
             f"of {size} = top_k + 1 classes ({images} images; the class not returned is 1 - the others): random "
             "lists, the same for every image, or lists designed one after the other from the answers so far "
             "(`attacks.AdaptiveInversion`: greedy A-optimal design under the current estimate). Solvers: plain least "
             "squares (`attacks.invert_probabilities`, the first harness's); `attacks.invert_classifications` "
             "(weighted by each probability's rounding error, normaliser profiled out), without any clean image "
             "(ridge toward 0, strength by generalised cross-validation) and with a Gaussian prior fitted to clean "
             f"embeddings of {first['prior_images']} images the attacker owns (MAP). The attacker holds the clean "
             "embeddings of its class prompts and of its own images, bought once through a `none` key "
             f"({first['prior_units']} u, not in the units column). Each cell: cos to the clean embedding (centred "
             "cos: of e - m, m = the mean clean embedding of 300 other images; guessing m scores "
             f"{_fmt(first['prior_only']['cos'])} raw and {_fmt(first['prior_only']['centred'])} centred here, the "
             "tiny teacher's image embeddings all lie near their mean; the centred cos is what the answers revealed "
             "about the image). Last column: the key's own answer for the same images, where it sells one in the "
             "clean frame: what the key holder has without inverting anything. The vendor refuses a key's "
             f"list beyond the {LIST_LIMIT} distinct ones of an image (`VENDOR_CLASSIFY_LISTS_PER_IMAGE`, default; "
             "off in this harness's vendor): the column at that limit is the designed inversion's centred cos "
             f"after {LIST_LIMIT} lists, what one key gets; {queries} lists take "
             f"{-(-queries // LIST_LIMIT)} keys, which then share the images (`vendor-admin suspects`).", "",
             "| mode | decimals | one query, plain | one query, no prior | one query, prior "
             f"| {queries} random lists, plain | random, no prior | random, prior | {queries} designed lists, prior "
             f"| {LIST_LIMIT} designed lists (one key at the limit), centred | own answer | units |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for spec, r in run.results.items():
        inv = r["invert"]
        one, rnd = inv["one"], inv["random_lists"]
        lines.append(
            f"| `{spec}` | {_fmt(inv['decimals'])} | {_cos_centred(one['plain'])} | {_cos_centred(one['no_prior'])} "
            f"| {_cos_centred(one['prior'])} | {_cos_centred(rnd['plain'])} | {_cos_centred(rnd['no_prior'])} "
            f"| {_cos_centred(rnd['prior'])} | {_cos_centred(inv['designed'])} "
            f"| {_fmt(inv['curve'].get(str(LIST_LIMIT)))} | {_cos_centred(inv['own_answer'])} "
            f"| {inv['units']} u |")
    return lines


def watermark_section(run: Run) -> list[str]:
    lines: list[str] = []
    for spec, r in run.results.items():
        wm = r["watermark"]
        if wm.get("value") is None or not wm.get("keys"):
            continue
        names = list(wm["keys"])
        lines += ["", f"## Watermark, per key (`{spec}`, {len(names)} keys)", "",
                  "Each key has its own secret-derived target and trigger directions. Per key: the p-value of "
                  "the vendor's test on a ridge student of that key's answers (300 images; 300 probes), after "
                  f"fine-tuning it on {'/'.join(str(n) for n in FINETUNE_CLEAN)} clean answers and after WARDEN's CSE "
                  f"with {'/'.join(str(d) for d in CSE_DIRECTIONS)} directions; stripped: the largest p after "
                  "fine-tuning on fewer clean answers than the student learnt marked ones, and after CSE; refit: "
                  "after fine-tuning on as many clean answers as marked ones (300: enough clean data to train a clean "
                  "student without the marked answers); and the key's test on a student of clean answers "
                  "(without / with CSE). Issue 13 asks for p < 0.01 on every key's student; the vendor detects at "
                  "p < 0.001.", "",
                  "| key | triggered probes | student p (fid) | fine-tune clean: p | CSE: p (fid) | stripped: max p "
                  "| refit: p | clean student p (CSE) | detected < 0.01 / < 0.001 after stripping |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, k in wm["keys"].items():
            ft = "/".join(_fmt(v["p"]) for v in k["finetune"].values())
            cse = "/".join(f"{_fmt(v['p'])} ({_fmt(v['fidelity'])})" for v in k["cse"].values())
            lines.append(f"| `{name}` | {k['triggered_probes']} | {_fmt(k['value'])} ({_fmt(k['student_fidelity'])}) "
                         f"| {ft} | {cse} | {_fmt(k['after_strip'])} | {_fmt(k['after_refit'])} | {_fmt(k['clean_student'])} "
                         f"({_fmt(k['clean_student_cse'])}) | {'yes' if k['after_strip'] < 0.01 else 'no'} / "
                         f"{'yes' if k['after_strip'] < 0.001 else 'no'} |")
        lines += ["", "Cross-key: the p-value of each key's test (row) on each key's student (column); the diagonal is "
                  "the key's own student, off the diagonal the test must not fire.", "",
                  "| test of \\ student of | " + " | ".join(f"`{n}`" for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        for a in names:
            cells = [_fmt(wm["keys"][a]["value"]) if a == b else _fmt(wm["cross"][f"{a} on {b}"]) for b in names]
            lines.append(f"| `{a}` | " + " | ".join(cells) + " |")
    return lines


def false_flag_section(run: Run) -> list[str]:
    flags = run.false_flags
    if not flags:
        return []
    popular = list(next(iter(flags["modes"].values()))["honest"])
    sybil = list(next(iter(flags["modes"].values()))["sybil"])
    n = flags["honest_keys"]
    ring = list(next(iter(flags["modes"].values())).get("ring", {}))
    lines = ["", "## False flags of `vendor-admin suspects` (honest keys sharing popular images)", "",
             f"{n} honest keys, one after the other, each asking for {flags['own_images']} images of its own plus the "
             "same k popular images (a benchmark image, a logo); k grows by asking more popular images through the "
             "same keys, so the counts are those of keys that asked own + k. A pair's score weighs each shared image "
             "by 1 / (keys that asked it - 1), exact or near-duplicate (the larger); flagged: pairs whose score "
             f"reaches the vendor's threshold (`VENDOR_OVERLAP_MIN_SHARED` = {flags['threshold']}; an input asked "
             f"through more than `VENDOR_OVERLAP_MAX_KEYS` = {flags['max_keys']} keys stops adding), of the "
             f"{n * (n - 1) // 2} pairs; in parentheses the largest score and exact / near-duplicate count of an "
             f"honest pair. Sybil pair: two keys with {flags['own_images']} images of their own each plus N in "
             f"common; ring: {flags.get('ring_keys', RING_KEYS)} keys all asking the same N (each pair scores "
             "N / (keys - 1): the weighted score's price); in parentheses the lowest pair score. A keyed mode also "
             "counts near-duplicates; `none` counts exact inputs only.", "",
             "| keys' mode | " + " | ".join(f"honest, k = {k}" for k in popular) + " | "
             + " | ".join(f"sybil pair, {m} shared" for m in sybil) + " | "
             + " | ".join(f"ring, {m} shared" for m in ring) + " |",
             "|---|" + "---|" * (len(popular) + len(sybil) + len(ring))]
    for spec, rows in flags["modes"].items():
        honest = [f"{h['flagged']} of {h['pairs']} ({h['max_score']:.1f}; {h['max_shared']} / {h['max_near']})"
                  for h in rows["honest"].values()]
        pairs = [f"{_fmt(sy['flagged'])} ({sy['score']:.1f}; {sy['shared']} / {sy['near']})" for sy in rows["sybil"].values()]
        rings = [f"{r['flagged']} of {r['pairs']} ({r['score']:.1f})" for r in rows.get("ring", {}).values()]
        lines.append(f"| `{spec}` | " + " | ".join(honest + pairs + rings) + " |")
    return lines


def report(run: Run, command: str, seconds: float, out_name: str,
           sweep: dict[str, list[dict[str, Any]]] | None = None) -> list[str]:
    sweep = read_sweep() if sweep is None else sweep
    lines = ["# Protection modes against the extraction attacks (issue 13)", "",
             f"`{command}`, {seconds:.0f} s. Teacher: {run.clean.model}; {run.shared_queries} shared sybil queries. "
             "Cosines are to the clean teacher embedding (1.0 = the attack recovered it); `-`: the attack does not "
             "apply (no embeddings sold, or another frame). Sybil: key A aligned to key B by Procrustes on the shared "
             "queries, held-out cos to B's answers (in parentheses: then aligned to the clean frame with the same "
             "queries' clean answers, i.e. an attacker who also holds a `none` key). Invert: one query of 100 classes "
             f"per image -> {INVERT_QUERIES} designed lists of top_k + 1 classes per image, strong solver with the "
             "attacker's prior, cos (centred cos, see [Inverting classification answers]"
             "(#inverting-classification-answers)). Watermark: p-value of the vendor's test "
             "(`vendor-admin verify-watermark`, detection at p < 0.001) on a ridge student of the key's answers "
             "(fid = its cosine to the clean teacher), after fine-tuning it on 25/100/300 clean answers, after "
             "WARDEN's CSE removal with 4/16 directions, and for a student of clean answers; then the same over "
             "every watermark key measured, and each key's test on the other keys' students (per key: "
             "below). Units: what the vendor "
             f"charged the attacker's key(s). Plot: [{out_name}]({out_name}) (sybil alignment against units; "
             "near-duplicate averaging against the number averaged; designed inversion against queries).", "",
             "Extraction: **from results/protection_sweep.md** (the committed `client-distill experiment` sweep, not "
             "rerun by this harness): the distilled student's OOD accuracy / fidelity at each budget's units; where "
             "the sweep ran the mode with another parameter, that spec is named; `not run`: the sweep has no such "
             "mode. The last row is a legitimate client's side: what it receives (the `none` fidelity) and the OOD "
             "accuracy an honest `none` client reaches at the same units.", "",
             "| mode | fidelity (cos / geometry) | re-encodings x16: one -> mean | near-dups x9: one -> mean "
             "| text variants: one -> mean | sybil: aligned held-out cos (to clean) | invert classifications: one "
             "-> adaptive, cos (centred) (classes returned) | watermark p: student; stripped; clean student "
             "| extraction (from results/protection_sweep.md): OOD / fidelity @ units |",
             "|---|---|---|---|---|---|---|---|---|"]
    for spec, r in run.results.items():
        f, re, nd, tv, sy, inv, wm = (r[a] for a in ATTACKS)
        lines.append(
            f"| `{spec}` | {_fmt(f.get('value'))} / {_fmt(f.get('geometry'))} "
            f"| {_fmt(re.get('one'))} -> {_fmt(re.get('value'))} ({re['units']} u) "
            f"| {_fmt(nd.get('one'))} -> {_fmt(nd.get('value'))} ({nd['units']} u) "
            f"| {_fmt(tv.get('one'))} -> {_fmt(tv.get('value'))} ({tv['units']} u) "
            f"| {_fmt(sy.get('value'))} ({_fmt(sy.get('to_clean'))}), {_fmt(sy.get('flagged'))} ({sy['units']} u) "
            f"| {_invert_cell(inv)} "
            f"| {_watermark_cell(wm)} ({wm['units']} u) "
            f"| {_extraction_cell(extraction_for(spec, sweep))} |")
    honest = extraction_for("none", sweep)
    lines.append("| legitimate client (`none` key, no attack) | 1.000 / 1.000 | - | - | - | - | - | - "
                 f"| {_extraction_cell(honest) if honest['spec'] == 'none' else 'not run'} |")
    return lines + invert_section(run) + watermark_section(run) + false_flag_section(run)


def plot(run: Run, out: Path) -> None:
    """Three panels: sybil alignment against the units the two keys paid for shared queries,
    near-duplicate averaging against the number of variants averaged, and the designed
    inversion's centred cosine against the class lists asked per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right, third) = plt.subplots(1, 3, figsize=(16, 4))
    for spec, r in run.results.items():
        sybil, near, invert = r["sybil"].get("curve"), r["near-dups"].get("curve"), r["invert"].get("curve")
        if sybil:
            left.plot([2 * int(m) for m in sybil], list(sybil.values()), marker="o", label=spec)
        if near:
            right.plot([int(m) for m in near], list(near.values()), marker="o", label=spec)
        if invert:
            third.plot([int(q) for q in invert], list(invert.values()), marker=".", label=spec)
    left.set(xscale="log", xlabel="units spent on shared queries (2 keys)", ylabel="held-out cos after Procrustes",
             title="sybil alignment")
    right.set(xlabel="near-duplicates averaged", ylabel="cos to the clean embedding", title="averaging near-duplicates")
    third.set(xlabel="designed class lists per image (1 unit each)", ylabel="centred cos to the clean embedding",
              title="inverting classifications (prior + MAP)")
    for axis in (left, right, third):
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
    parser.add_argument("--sweep", type=Path, default=SWEEP, help="the protection sweep's published results")
    parser.add_argument("--watermark-keys", type=int, default=WATERMARK_KEYS,
                        help="watermark keys measured (each its own directions; cross-key checks between them)")
    parser.add_argument("--popular", type=int, nargs="*", default=list(POPULAR),
                        help="popular images shared by all honest keys, one false-flag row each (none: skip)")
    parser.add_argument("--honest-keys", type=int, default=HONEST_KEYS, help="honest keys per false-flag row")
    parser.add_argument("--flag-modes", nargs="+", default=list(FLAG_MODES),
                        help="protection modes of the false-flag rows' keys")
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
    # the per-key limit on class lists per image is off: the harness measures the inversion itself,
    # and the table reads off what one key gets at the vendor's default limit (the curve at it)
    env = {"VENDOR_PROTECTION_SECRET": SECRET, "VENDOR_MAX_ITEMS_PER_REQUEST": "512", "VENDOR_CLASSIFY_LISTS_PER_IMAGE": "0",
           "VENDOR_WATERMARK_CALIBRATION_DIR": str(calibration)}
    with LocalVendor(data_dir, teacher=teacher, extra_env=env) as vendor:
        admin = VendorAdmin(vendor)

        def key(name: str, spec: str) -> Key:
            api_key = admin.create_key(name, spec, quota=10**9, rate_per_s=10_000, burst=10_000)
            client = httpx.Client(base_url=vendor.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120)
            card = client.get("/v1/models").json()["data"][0]
            return Key(name, spec, client, card["id"])

        clean = key("clean-reference", "none")
        scale = float(clean.client.get("/v1/models").json()["data"][0]["logit_scale"])
        run = Run(vendor, admin, clean, scale, args.shared, new_key=key, watermark_keys=args.watermark_keys)
        for i, spec in enumerate(args.modes):
            a, b = key(f"m{i}-a", spec), key(f"m{i}-b", spec)
            mode_started = time.time()
            run.results[spec] = {name: _spent(lambda: fn(run, a, b), a, b) for name, fn in ATTACKS.items()}
            print(f"{spec} ({time.time() - mode_started:.0f} s): " + json.dumps({n: {k: v for k, v in r.items()} for n, r in run.results[spec].items()},
                                           default=str), flush=True)
        if args.popular:
            flags_started = time.time()
            run.false_flags = overlap_false_flags(run, tuple(args.flag_modes), tuple(args.popular), args.honest_keys)
            print(f"false flags ({time.time() - flags_started:.0f} s): {json.dumps(run.false_flags)}", flush=True)
    sweep = read_sweep(args.sweep)
    for spec in run.results:
        run.results[spec]["extraction"] = {**extraction_for(spec, sweep), "units": 0, "source": str(args.sweep)}
    lines = report(run, "python studies/attack_harness.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   time.time() - started, args.out.with_suffix(".png").name, sweep)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    (args.out.with_suffix(".json")).write_text(json.dumps({"modes": run.results, "overlap_false_flags": run.false_flags},
                                                          indent=1, default=str))
    plot(run, args.out.with_suffix(".png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
