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
- `vendor:{overlap}:pairs:<modality>`: ZSET "digestA:digestB" -> distinct shared inputs.

An input asked through more than `VENDOR_OVERLAP_MAX_KEYS` keys is common ("a photo of a dog.",
a benchmark image everybody uses) and stops adding to pair counts: sybils share *their* inputs
among a few keys. Texts are counted apart from images because legitimate clients of one task
share class prompts; `vendor-admin suspects` flags pairs by shared images (default) or texts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import redis.asyncio as aioredis
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge

from ..metering import fail_closed

PREFIX = "vendor:{overlap}"
MODALITIES = ("image", "text")

# KEYS[1..2] = pair zsets (image, text); KEYS[3..] = one seen-set per signature.
# ARGV = digest, ttl, max_keys, min_shared, then one modality index (1 or 2) per signature.
# Returns {shared image inputs added, shared text inputs added, image pairs >= min_shared}.
_RECORD = """
local digest, ttl, max_keys, min_shared = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local added = {0, 0}
for i = 3, #KEYS do
  local seen = KEYS[i]
  local m = tonumber(ARGV[i + 2])
  if redis.call('SISMEMBER', seen, digest) == 0 then
    local n = redis.call('SCARD', seen)
    if n > 0 and n < max_keys then
      for _, other in ipairs(redis.call('SMEMBERS', seen)) do
        local pair = (other < digest) and (other .. ':' .. digest) or (digest .. ':' .. other)
        redis.call('ZINCRBY', KEYS[m], 1, pair)
      end
      added[m] = added[m] + 1
    end
    if n <= max_keys then redis.call('SADD', seen, digest) end
  end
  redis.call('EXPIRE', seen, ttl)
end
return {added[1], added[2], redis.call('ZCOUNT', KEYS[1], min_shared, '+inf')}
"""


def pairs_key(modality: str) -> str:
    return f"{PREFIX}:pairs:{modality}"


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
    """Two keys and how many distinct inputs of each modality both asked for."""

    digest_a: str
    digest_b: str
    shared_images: int
    shared_texts: int


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
            "vendor_overlap_suspect_pairs", "Key pairs sharing at least VENDOR_OVERLAP_MIN_SHARED images",
            registry=registry)

    @fail_closed
    async def record(self, digest: str, signatures: Sequence[tuple[str, str]]) -> int:
        """`signatures`: (modality, signature) per input of one delivered answer. Returns how many
        of them another key had asked for before."""
        unique = sorted(set(signatures))
        if not unique:
            return 0
        keys = [pairs_key(m) for m in MODALITIES] + [f"{PREFIX}:seen:{m}:{s}" for m, s in unique]
        args = [digest, self.ttl_s, self.max_keys, self.min_shared] + [MODALITIES.index(m) + 1 for m, _ in unique]
        images, texts, flagged = (int(v) for v in await self._script(keys=keys, args=args))
        self.shared_inputs.labels("image").inc(images)
        self.shared_inputs.labels("text").inc(texts)
        self.suspect_pairs.set(flagged)
        return images + texts

    @fail_closed
    async def suspects(self, *, min_images: int | None = None, min_texts: int | None = None) -> list[SuspectPair]:
        """Pairs sharing at least `min_images` images (default: the detector's threshold) or at
        least `min_texts` texts (default: never on texts alone), most images first."""
        min_images = self.min_shared if min_images is None else min_images
        counts: dict[str, list[int]] = {}
        for index, modality in enumerate(MODALITIES):
            for member, score in await self.redis.zrange(pairs_key(modality), 0, -1, withscores=True):
                counts.setdefault(member.decode(), [0, 0])[index] = int(score)
        pairs = [SuspectPair(*member.split(":"), images, texts) for member, (images, texts) in counts.items()
                 if images >= min_images or (min_texts is not None and texts >= min_texts)]
        return sorted(pairs, key=lambda p: (-p.shared_images, -p.shared_texts, p.digest_a, p.digest_b))
