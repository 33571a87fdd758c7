"""Which perceptual codes should the class-list limit count per image? For each band layout of the
63-bit DCT hash (`vendor_api.protection.perceptual`): how often a near-duplicate keeps at least one
band whole (it then counts as the same image: the attack the limit exists for, asking new class
lists of a copy, is stopped), and how often two unrelated images of the offline benchmark share a
band (they then share an allowance; harmless to a client that asks one class list of everything).

    .venv/bin/python benchmarks/class_list_codes.py --data var/demo/data-small --out benchmarks/results/class_list_codes.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _report import cpu_summary, publish  # noqa: E402
from protection_lsh import VARIANTS  # noqa: E402  (the same JPEG and crop near-duplicates)

from vendor_api.protection import perceptual  # noqa: E402

LAYOUTS = [1, 3, 4, 7, 9]  # bands of 63, 21, 16, 9 and 7 bits
SIZE = 128  # the demo teacher's input


def model_view(image: Image.Image) -> torch.Tensor:
    """What the tower sees, up to normalisation (which does not change the codes' bits)."""
    array = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def shares_a_band(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    return any(x == y for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("var/demo/data-small"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/class_list_codes.md"))
    parser.add_argument("--items", type=int, default=200, help="images per domain with near-duplicates")
    args = parser.parse_args()
    started = time.time()
    domains = sorted(p.name for p in args.data.iterdir() if p.is_dir())
    rng = np.random.default_rng(0)
    per_domain = {}
    for domain in domains:
        paths = sorted((args.data / domain).rglob("*.png"))
        per_domain[domain] = [paths[i] for i in rng.permutation(len(paths))[: args.items]]
    images = {d: [Image.open(p).convert("RGB") for p in ps] for d, ps in per_domain.items()}
    views = {d: [model_view(im) for im in ims] for d, ims in images.items()}
    variant_views = {name: {d: [model_view(fn(im, i)) for i, im in enumerate(ims)] for d, ims in images.items()}
                     for name, fn in VARIANTS.items()}

    lines = ["# Class-list limit: perceptual codes per image (issue 13)", "",
             f"`{' '.join(sys.argv)}` on {cpu_summary()}. {args.items} images per domain of the offline benchmark "
             f"({', '.join(domains)}), seen at {SIZE} px as the demo teacher sees them; the 63-bit DCT hash dealt "
             "into interleaved bands. A near-duplicate is *caught* when it keeps at least one band of its original "
             "(it then draws on the original's class-list allowance). Unrelated pairs: every pair of distinct images "
             "within a domain (the most alike images there are here).", "",
             "Near-duplicates caught (%), and unrelated pairs sharing a band (%):", "",
             "| bands x bits | " + " | ".join(VARIANTS) + " | unrelated pairs, same domain | images sharing a band with another |",
             "|---" * (len(VARIANTS) + 3) + "|"]
    for bands in LAYOUTS:
        codes = {d: [perceptual.perceptual_codes(v, bands) for v in vs] for d, vs in views.items()}
        cells = []
        for name in VARIANTS:
            caught = [shares_a_band(a, perceptual.perceptual_codes(b, bands))
                      for d in domains for a, b in zip(codes[d], variant_views[name][d])]
            cells.append(f"{100 * np.mean(caught):.1f}")
        pairs = shared = 0
        crowded = 0
        for d in domains:
            n = len(codes[d])
            hit = np.zeros(n, dtype=bool)
            for i in range(n):
                for j in range(i + 1, n):
                    pairs += 1
                    if shares_a_band(codes[d][i], codes[d][j]):
                        shared += 1
                        hit[i] = hit[j] = True
            crowded += int(hit.sum())
        cells += [f"{100 * shared / pairs:.2f}", f"{100 * crowded / sum(len(c) for c in codes.values()):.1f}"]
        width = -(-63 // bands)
        lines.append(f"| {bands} x {width}{' (default)' if bands == perceptual.BANDS else ''} | " + " | ".join(cells) + " |")
    lines += ["", "The limit's first version counted an exact hash of the model's input, which catches pixel-identical "
              "copies only (no JPEG copy). More, narrower bands catch more near-duplicates and merge more unrelated "
              "images. Crops shift the picture under the hash, so a DCT hash catches few of them at any width that "
              "keeps unrelated images apart: they are left to noise and to `vendor-admin suspects` (sybils).", "",
              f"Run time {time.time() - started:.0f} s."]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
