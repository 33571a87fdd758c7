"""How many class lists one key may ask of one image: the adaptive inversion's budget.

`/v1/classifications` answers top-k probabilities over the caller's class names. One answer says
little about an image's embedding, but many answers over small lists designed one after another do:
in the attack harness 25 lists of 6 classes per image invert a key without noise to its clean
embedding at centred cos 0.98 (`studies/attack_harness.py`, `attacks.AdaptiveInversion`), and the
same list asked again says nothing new. So the vendor counts, per key and image, the *distinct*
class lists asked, and refuses one more than `VENDOR_CLASSIFY_LISTS_PER_IMAGE` (default 2) before
any charge. A list is the set of class names (order and repeats do not make a new one).

What "one image" means: its perceptual codes (`perceptual.py`, a banded DCT hash of the pixels the
model sees, computed without running the model, so a refusal costs no inference). A copy that
keeps any band of the original draws on the original's allowance: on the offline benchmark every
re-encoded file, and 98-100% of JPEG re-compressions down to quality 50
(`benchmarks/results/class_list_codes.md`). Unrelated images rarely share a band (0.01% of pairs
within a domain), and sharing one only matters to a key that asks several lists of both; an
honest client asks one list, its label set, of everything.

What it does not stop, said plainly: crops (a 90% crop keeps a band 1.5% of the time; no width of
band tried catches crops without merging unrelated images), and sybils, who ask the lists through
several keys; those keys then share the images, which `vendor-admin suspects` sees. With the
default of 2 a key's own answers invert to centred cos ~0.79 in the harness (its curve), not 0.98;
noise (`probabilities:K,SIGMA`) is what keeps the inversion away from the clean embedding.

Redis: `vendor:{digest}:lists:<code>`, a SET of list hashes in the account's slot, expiring after
`VENDOR_OVERLAP_TTL_S` of silence. A list counts once it is reserved; a request that then fails
before its answer is produced gives its reservations back (`release`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import redis.asyncio as aioredis

from ..accounts import AccountKeys
from ..errors import ClassListsExhausted
from ..lua_scripts import lua_source
from ..redis_calls import fail_closed


def class_list_hash(classes: Sequence[str]) -> str:
    """The set of class names (stripped; order and repeats do not matter), hashed."""
    names = sorted({c.strip() for c in classes})
    return hashlib.sha256("\x00".join(names).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Reservation:
    """What `ClassListLimit.reserve` wrote: the sets where the list was new (to give back)."""

    digest: str
    list_hash: str
    added: tuple[str, ...]


class ClassListLimit:
    """`VENDOR_CLASSIFY_LISTS_PER_IMAGE` distinct class lists per key and image."""

    def __init__(self, client: aioredis.Redis, *, per_image: int, ttl_s: int) -> None:
        self.redis = client
        self.per_image, self.ttl_s = per_image, ttl_s
        self._script = client.register_script(lua_source("class_lists.lua"))

    @fail_closed
    async def reserve(self, digest: str, image_codes: Sequence[Sequence[str]], classes: Sequence[str]) -> Reservation:
        """Count this request's class list against every code of each image (`perceptual_codes`),
        or raise `ClassListsExhausted` (nothing written) when a code of one image already holds the
        limit. `image_codes[i]` are input i's codes."""
        list_hash = class_list_hash(classes)
        owner: dict[str, int] = {}  # one code twice in a request (the same image twice) is one set
        for index, codes in enumerate(image_codes):
            for code in codes:
                owner.setdefault(AccountKeys(digest).class_lists(code), index)
        if not owner:
            return Reservation(digest, list_hash, ())
        keys = list(owner)
        reply = [int(v) for v in await self._script(
            keys=keys, args=[list_hash, self.per_image, self.ttl_s, *(owner[k] + 1 for k in keys)])]
        if reply[0]:
            first = reply[0] - 1
            raise ClassListsExhausted(
                f"this key has already asked {self.per_image} other class lists of input[{first}] (the same "
                "image, however encoded, or a near copy of it); asking one of those lists again is allowed. "
                "Nothing was charged.", param=f"input[{first}]")
        return Reservation(digest, list_hash, tuple(k for k, added in zip(keys, reply[1:]) if added))

    @fail_closed
    async def release(self, reservation: Reservation) -> None:
        """Give back what a failed request reserved (its answer was never produced)."""
        if reservation.added:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in reservation.added:
                    pipe.srem(key, reservation.list_hash)
                await pipe.execute()
