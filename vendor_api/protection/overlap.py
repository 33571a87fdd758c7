"""Cross-key overlap: which keys query the same model inputs (the sybil signal).

Per-key transforms (`rotate`) stop outputs of several keys from combining coordinate by
coordinate, but not keys whose holder sends the *same* inputs through each: orthogonal Procrustes
on ~100 shared inputs aligns two rotate keys at held-out cosine 1.0. What the vendor can do is
see the sharing. Every delivered answer records, per input, a signature of what the model saw
(the preprocessed pixels or the token ids: re-encoding a file or re-spelling a text does not
change it) and the key that asked. When a second key asks for a signature, the pair's shared
count for that modality goes up by one.

Redis layout (one slot, hash tag `{overlap}`, so one script per request is atomic):
- `vendor:{overlap}:seen:<modality>:<signature>`: SET of key digests, expiring after
  `VENDOR_OVERLAP_TTL_S` of silence;
- `vendor:{overlap}:pairs:<modality>`: ZSET "digestA:digestB" -> distinct shared inputs;
- `vendor:{overlap}:score:<modality>`: ZSET of the same pairs -> weighted score, each shared input
  worth 1 / (n - 1) when n keys asked for it (TF-IDF's idea: an input many keys ask for says
  little about any pair of them). The score flags a pair; the counts are shown beside it.

Why a weighted score: with plain counts, honest keys that each ask for the same 20 popular images
(a benchmark image, a logo) were all flagged at the threshold of 20: 28 of 45 pairs of 10 honest
keys in the attack harness. Weighted, k keys sharing the same s inputs score s / (k - 1) per pair,
while a sybil pair sharing s inputs of its own scores s. The price, said plainly: a ring of k
sybil keys all sharing the same s inputs also scores s / (k - 1) per pair, so it takes
(k - 1) x the threshold of shared inputs to be flagged (Procrustes aligns two keys from ~25).
An input asked through more than `VENDOR_OVERLAP_MAX_KEYS` keys is common ("a photo of a dog.",
a benchmark image everybody uses) and stops adding to pair counts and scores: sybils share
*their* inputs among a few keys. Texts are counted apart from images because legitimate clients of one task
share class prompts; `vendor-admin suspects` flags pairs by shared images (default) or texts.

Near-duplicates. An exact signature misses a sybil who sends each key another JPEG quality or
crop of its images. Each input therefore also gets NEAR_TABLES locality-sensitive codes of its
*clean* embedding (NEAR_BITS secret hyperplanes each, centred and median-thresholded on the
teacher's calibration set like `lsh`, but with their own planes and many more bits: `lsh`'s
8-cell tables are meant to be shared by neighbours, these must not be shared by strangers). Two
inputs are near-duplicates when at least NEAR_MIN_TABLES of their codes agree; the pair's
near-duplicate count (`vendor:{overlap}:near:<modality>`) goes up once per input a key asks for
that another key has asked a near-duplicate of, and its score (`nearscore`) as for exact inputs
(n = the keys holding a near-duplicate; only pairs holding a score give back, and none below zero,
as near-duplication is not transitive). Exact duplicates agree on every code, so the
near count includes them. Measured on the tiny test teacher (prototype, 100 images x 9 variants,
1,500 unrelated images): JPEG re-compressions match (q=90/75/50: 0.99/0.89/0.63 of inputs),
crops mostly do not (0.01 at 90%: that teacher barely tells a crop from another image, cos 0.98
against 0.99), and unrelated image pairs match at ~1e-5, so two honest keys of n images each
share ~1e-5 n^2 near-duplicates by chance (10 at n = 1,000, against a suspect threshold of 20;
a real encoder separates unrelated images far better, cos ~0.5). The harness measures it again.

Redis layout for near-duplicates, in the same slot: `vendor:{overlap}:band:<modality>:<t>:<code>`,
one SET of key digests per table cell (same TTL and common-input cap as the exact sets).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import redis.asyncio as aioredis
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge

from ..redis_calls import fail_closed
from .lsh import lsh_codes

PREFIX = "vendor:{overlap}"
MODALITIES = ("image", "text")
# Near-duplicate codes (measured choice on the tiny teacher, see the module docstring): 32 tables of
# 20 bits, a match in >= 3 of them (one input against one input: cells are shared by many inputs
# of a large key, so counting a key's cells instead of its inputs flags every large pair).
# 16 x 16 at >= 3 kept fewer JPEG q=50 variants (0.55); 32 x 12 at >= 2 let unrelated pairs match
# at 8e-3.
NEAR_TABLES = 32
NEAR_BITS = 20
NEAR_MIN_TABLES = 3
# A cell holding more inputs than this is common, not evidence (cells hold ~N / 2^NEAR_BITS of N
# recorded inputs: the detector stays sharp up to tens of millions of inputs per TTL).
NEAR_CELL_CAP = 64
NEAR_LABEL = "overlap-near"

# KEYS[1..4] = pair count zsets (image, text, near image, near text), KEYS[5..8] = the pairs'
# weighted scores in the same order; KEYS[9 .. 8 + n_exact] = one seen-set per exact signature;
# then NEAR_TABLES band sets per near input.
# ARGV = digest, ttl, max_keys, min_shared, n_exact, n_near, tables, min_tables, cell_cap, then one
# modality index (1 or 2) per exact signature, then one per near input, then one id per near input.
# Returns {shared image inputs added, shared text inputs added, image pairs scoring >= min_shared,
#          near image inputs added, near text inputs added, near image pairs scoring >= min_shared}.
_RECORD = """
local digest, ttl, max_keys, min_shared = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local n_exact, n_near, tables, min_tables = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local cell_cap = tonumber(ARGV[9])
local added = {0, 0}
local near_added = {0, 0}
local function pair_of(a, b)
  return (a < b) and (a .. ':' .. b) or (b .. ':' .. a)
end
-- An input that n + 1 keys asked for is worth 1 / n to each of their pairs (so that the n + 1
-- keys' pairs share one input's worth between them): the newcomer's n pairs get 1 / n, and the
-- pairs among the n earlier keys, which held 1 / (n - 1) each, give back 1 / (n (n - 1)).
-- Only a pair that holds a score gives back (a near-duplicate relation is not transitive: two of
-- the earlier keys may never have matched each other), and a score given back to zero is removed.
local function share(scores, others, n)
  for i = 1, n do
    redis.call('ZINCRBY', scores, 1 / n, pair_of(digest, others[i]))
    for j = i + 1, n do
      local pair = pair_of(others[i], others[j])
      local held = redis.call('ZSCORE', scores, pair)
      if held then
        local left = tonumber(held) - 1 / (n * (n - 1))
        if left > 1e-9 then redis.call('ZADD', scores, left, pair) else redis.call('ZREM', scores, pair) end
      end
    end
  end
end
for i = 9, 8 + n_exact do
  local seen = KEYS[i]
  local m = tonumber(ARGV[i + 1])
  if redis.call('SISMEMBER', seen, digest) == 0 then
    local n = redis.call('SCARD', seen)
    if n > 0 and n < max_keys then
      local others = redis.call('SMEMBERS', seen)
      for _, other in ipairs(others) do redis.call('ZINCRBY', KEYS[m], 1, pair_of(digest, other)) end
      share(KEYS[4 + m], others, n)
      added[m] = added[m] + 1
    end
    if n <= max_keys then redis.call('SADD', seen, digest) end
  end
  redis.call('EXPIRE', seen, ttl)
end
-- near-duplicates: members are "digest:input"; another key's input matching this one in
-- >= min_tables cells shares it, unless one of this key's own earlier inputs does (asking for a
-- near-duplicate again is not more sharing). A cell holding more than cell_cap inputs is common.
for g = 1, n_near do
  local m = tonumber(ARGV[9 + n_exact + g])
  local me = digest .. ':' .. ARGV[9 + n_exact + n_near + g]
  local base = 8 + n_exact + (g - 1) * tables
  local counts = {}
  for t = 1, tables do
    local band = KEYS[base + t]
    if redis.call('SCARD', band) <= cell_cap then
      for _, member in ipairs(redis.call('SMEMBERS', band)) do counts[member] = (counts[member] or 0) + 1 end
    end
  end
  local mine, seen_owner, others = false, {}, {}
  for member, c in pairs(counts) do
    if c >= min_tables then
      local owner = string.match(member, '^([^:]+)')
      if owner == digest then
        mine = true
      elseif not seen_owner[owner] then
        seen_owner[owner] = true
        others[#others + 1] = owner
      end
    end
  end
  table.sort(others)  -- a fixed order: the scores must not depend on Lua's table iteration
  -- as for exact inputs: one near-duplicated by max_keys keys or more is common, not evidence
  if not mine and #others > 0 and #others < max_keys then
    for _, other in ipairs(others) do redis.call('ZINCRBY', KEYS[2 + m], 1, pair_of(digest, other)) end
    share(KEYS[6 + m], others, #others)
    near_added[m] = near_added[m] + 1
  end
  for t = 1, tables do
    local band = KEYS[base + t]
    if redis.call('SCARD', band) <= cell_cap then redis.call('SADD', band, me) end
    redis.call('EXPIRE', band, ttl)
  end
end
local floor = min_shared - 1e-6  -- sums of 1 / n need not land on the integer exactly
return {added[1], added[2], redis.call('ZCOUNT', KEYS[5], floor, '+inf'),
        near_added[1], near_added[2], redis.call('ZCOUNT', KEYS[7], floor, '+inf')}
"""


def pairs_key(modality: str) -> str:
    return f"{PREFIX}:pairs:{modality}"


def near_pairs_key(modality: str) -> str:
    return f"{PREFIX}:near:{modality}"


def score_key(modality: str, *, near: bool = False) -> str:
    """The pairs' weighted scores (each shared input worth 1 / (keys that asked it - 1))."""
    return f"{PREFIX}:{'nearscore' if near else 'score'}:{modality}"


def _zsets() -> list[str]:
    """The script's KEYS[1..8], in its order."""
    return ([pairs_key(m) for m in MODALITIES] + [near_pairs_key(m) for m in MODALITIES]
            + [score_key(m) for m in MODALITIES] + [score_key(m, near=True) for m in MODALITIES])


def near_codes(clean: np.ndarray, modalities: Sequence[str], calibration_samples: dict[str, np.ndarray], *,
               secret: bytes) -> np.ndarray:
    """(n, NEAR_TABLES) cell ids of the clean embeddings: the vendor's secret near-duplicate codes
    (one set of planes per vendor, not per key: sybils are found *across* keys)."""
    clean = np.asarray(clean, dtype=np.float64)
    out = np.zeros((len(clean), NEAR_TABLES), dtype=np.int64)
    kinds = np.asarray(list(modalities))
    for modality in sorted(set(modalities)):
        rows = np.flatnonzero(kinds == modality)
        out[rows] = lsh_codes(clean[rows], modality, calibration_samples[modality], secret=secret, label=NEAR_LABEL,
                              digest="", tables=NEAR_TABLES, bits=NEAR_BITS)
    return out


def near_signatures(clean: np.ndarray, modalities: Sequence[str], calibration_samples: dict[str, np.ndarray], *,
                    secret: bytes) -> list[tuple[str, tuple[int, ...]]]:
    """(modality, its NEAR_TABLES codes) per input, for `OverlapDetector.record`."""
    codes = near_codes(clean, modalities, calibration_samples, secret=secret)
    return [(m, tuple(int(c) for c in row)) for m, row in zip(modalities, codes)]


def image_signature(pixels: torch.Tensor) -> str:
    """The preprocessed tensor the image tower sees (size, dtype and bytes)."""
    array = pixels.detach().cpu().contiguous().numpy()
    return _digest(b"image", str(array.shape).encode(), str(array.dtype).encode(), array.tobytes())


def text_signature(tokens: torch.Tensor) -> str:
    """The token ids the text tower sees (case or spacing that tokenises alike is one signature)."""
    return _digest(b"text", np.asarray(tokens.detach().cpu(), dtype=np.int64).tobytes())


def _digest(*parts: bytes) -> str:
    return hashlib.sha256(b"\x00".join(parts)).hexdigest()[:32]


@dataclass(frozen=True)
class SuspectPair:
    """Two keys and how many distinct inputs of each modality both asked for: exactly (the same
    pixels or tokens) and as near-duplicates (matching near codes; exact duplicates included).
    The scores weigh each shared input by 1 / (keys that asked it - 1): an input only these two
    keys asked for counts 1, one that ten honest keys asked for (a benchmark image) 1/9."""

    digest_a: str
    digest_b: str
    shared_images: int
    shared_texts: int
    near_images: int = 0
    near_texts: int = 0
    score_images: float = 0.0
    score_texts: float = 0.0
    near_score_images: float = 0.0
    near_score_texts: float = 0.0

    @property
    def image_score(self) -> float:
        return max(self.score_images, self.near_score_images)

    @property
    def text_score(self) -> float:
        return max(self.score_texts, self.near_score_texts)


class OverlapDetector:
    """Records who asked for what (`record`, one script per delivered request) and lists the
    key pairs that share inputs (`suspects`)."""

    def __init__(self, client: aioredis.Redis, *, ttl_s: int, max_keys: int, min_shared: int,
                 registry: CollectorRegistry | None = None) -> None:
        self.redis = client
        self.ttl_s, self.max_keys, self.min_shared = ttl_s, max_keys, min_shared
        self._script = client.register_script(_RECORD)
        registry = registry if registry is not None else CollectorRegistry()  # admin use: never the global one
        self.shared_inputs = Counter(
            "vendor_overlap_shared_inputs", "Inputs a key asked for that another key had already asked for",
            ["modality"], registry=registry)
        self.suspect_pairs = Gauge(
            "vendor_overlap_suspect_pairs",
            "Key pairs whose shared-image score (1 / (keys - 1) per input) reaches VENDOR_OVERLAP_MIN_SHARED",
            registry=registry)
        self.near_inputs = Counter(
            "vendor_overlap_near_duplicate_inputs",
            "Inputs a key asked for that another key had asked a near-duplicate of (exact ones included)",
            ["modality"], registry=registry)
        self.near_suspect_pairs = Gauge(
            "vendor_overlap_near_suspect_pairs",
            "Key pairs whose near-duplicate image score reaches VENDOR_OVERLAP_MIN_SHARED", registry=registry)

    @fail_closed
    async def record(self, digest: str, signatures: Sequence[tuple[str, str]],
                     near: Sequence[tuple[str, tuple[int, ...]]] = ()) -> int:
        """`signatures`: (modality, signature) per input of one delivered answer; `near`: (modality,
        near codes) per input (`near_signatures`; empty: exact matching only). Returns how many
        inputs another key had asked for before, exactly or as a near-duplicate."""
        unique = sorted(set(signatures))
        near_unique = sorted(set((m, tuple(int(v) for v in c)) for m, c in near))
        if not unique and not near_unique:
            return 0
        keys = _zsets() + [f"{PREFIX}:seen:{m}:{s}" for m, s in unique]
        for m, codes in near_unique:
            if len(codes) != NEAR_TABLES:
                raise ValueError(f"near codes must have {NEAR_TABLES} tables, got {len(codes)}")
            keys += [f"{PREFIX}:band:{m}:{t}:{c}" for t, c in enumerate(codes)]
        args = ([digest, self.ttl_s, self.max_keys, self.min_shared, len(unique), len(near_unique), NEAR_TABLES,
                 NEAR_MIN_TABLES, NEAR_CELL_CAP] + [MODALITIES.index(m) + 1 for m, _ in unique]
                + [MODALITIES.index(m) + 1 for m, _ in near_unique]
                + [_digest(m.encode(), repr(c).encode())[:12] for m, c in near_unique])
        images, texts, flagged, near_images, near_texts, near_flagged = (
            int(v) for v in await self._script(keys=keys, args=args))
        self.shared_inputs.labels("image").inc(images)
        self.shared_inputs.labels("text").inc(texts)
        self.suspect_pairs.set(flagged)
        self.near_inputs.labels("image").inc(near_images)
        self.near_inputs.labels("text").inc(near_texts)
        self.near_suspect_pairs.set(near_flagged)
        return max(images + texts, near_images + near_texts)

    @fail_closed
    async def suspects(self, *, min_images: float | None = None, min_texts: float | None = None) -> list[SuspectPair]:
        """Pairs whose image score reaches `min_images` (exact or near-duplicate, the larger;
        default: the detector's threshold), or whose text score reaches `min_texts` (default: never
        on texts alone), highest score first."""
        min_images = self.min_shared if min_images is None else min_images
        counts: dict[str, list[float]] = {}
        zsets = _zsets()
        for index, zset in enumerate(zsets):
            for member, score in await self.redis.zrange(zset, 0, -1, withscores=True):
                counts.setdefault(member.decode(), [0.0] * len(zsets))[index] = float(score)
        pairs = [SuspectPair(*member.split(":"), *(int(v) for v in values[:4]), *(round(v, 3) for v in values[4:]))
                 for member, values in counts.items()]
        pairs = [p for p in pairs if p.image_score >= min_images - 1e-6
                 or (min_texts is not None and p.text_score >= min_texts - 1e-6)]
        return sorted(pairs, key=lambda p: (-p.image_score, -p.text_score, p.digest_a, p.digest_b))
