"""Buying teacher outputs: cache first, then a ledger reservation, then the vendor.

Two outputs, one buying path: embeddings (`texts`, `images`; every embedding protection mode) and,
for keys in the vendor's `probabilities` mode, top-k class probabilities over the client's own
class names (`probabilities`). Each output is a *channel*: a cache namespace plus the request that
fills it; the budget, the ledger and resumption below are the same for both.

The order of operations is what makes the budget a hard ceiling and resumption free:
1. look every input up in the content-addressed cache (hits cost nothing);
2. reserve the batch's units in the ledger under an Idempotency-Key derived from the batch's
   content (over budget: stop before sending);
3. send; 4. append the answers to the cache (fsynced); 5. settle the reservation with the units
the vendor reports. A crash between 2 and 5 leaves an open reservation that still counts against
the budget and records the batch's items; the rerun first re-sends exactly that batch under the
same key (whatever its batch size is now), and the vendor replays the stored answer for free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from shared.hashing import api_key_digest, digest_parts
from shared.protocol import OUTPUT_EMBEDDINGS, OUTPUT_PROBABILITIES

from client_distiller.buying.cache import EmbeddingCache, CacheNamespace
from client_distiller.buying.ledger import Ledger, Reservation
from client_distiller.buying.teacher_client import ImageBytes, Item, TeacherClient, VendorError
from client_distiller.errors import RunError


log = logging.getLogger(__name__)
SERVER_PREPROCESSING = "server-open_clip-v1"  # the vendor preprocesses; bump if the client ever does


class BudgetTooSmall(RunError):
    """A purchase that must be complete (the class prompts) does not fit in the budget."""


class InputRejected(RunError):
    """The vendor refused one of our inputs (an unreadable image, an overlong prompt); names it."""


class OutputUnavailable(RunError):
    """This key does not receive the output asked for (embeddings from a `probabilities` key, or
    probabilities from an embedding key): refused before anything is reserved or sent."""


@dataclass(frozen=True)
class Answer:
    """One request's rows (embeddings or probabilities) and its billing, whatever the route."""

    rows: np.ndarray
    units_charged: int
    units_remaining: int
    replayed: bool


Fetch = Callable[[list[Item], str], Answer]  # (inputs, Idempotency-Key) -> answer


@dataclass
class _Channel:
    """One output's cache namespace and the request that fills it."""

    namespace: CacheNamespace
    cache: EmbeddingCache
    fetch: Fetch


@dataclass
class PurchaseStats:
    """What one purchaser did, for progress bars and reports."""

    bought: dict[str, int] = field(default_factory=lambda: {"image": 0, "text": 0})
    cached: dict[str, int] = field(default_factory=lambda: {"image": 0, "text": 0})
    units_charged: int = 0
    requests: int = 0
    replays: int = 0
    stopped_by_budget: bool = False


class Purchaser:
    """Buys one key's teacher outputs for one budget scope."""

    def __init__(self, client: TeacherClient, *, cache_dir: Path, ledger: Ledger, budget: int, scope: str,
                 api_key: str, batch_size: int = 64, show_progress: bool = True) -> None:
        if budget < 0:
            raise ValueError("budget must be >= 0")
        self.client = client
        self.card = client.model_card()
        self.ledger = ledger
        self.budget = budget
        self.scope = scope
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.cache_dir = Path(cache_dir)
        self.output = self.card.output
        # Outputs that depend on the key (per-key transforms) must never be shared across keys.
        self.key_scope = "shared" if self.card.protection == "none" else api_key_digest(api_key)[:16]
        self.prices = {"image": self.card.price_per_image, "text": self.card.price_per_text}
        self.stats = PurchaseStats()
        self._channels: dict[str, _Channel] = {}

    # ------------------------------------------------------------------ channels
    @property
    def namespace(self) -> CacheNamespace:
        """The embedding namespace (teacher, protection spec, key scope, preprocessing)."""
        return self._embedding_channel().namespace

    @property
    def cache(self) -> EmbeddingCache:
        return self._embedding_channel().cache

    def _embedding_channel(self) -> _Channel:
        if self.output != OUTPUT_EMBEDDINGS:
            raise OutputUnavailable(f"this key receives {self.output} ({self.card.protection}), not embeddings")
        if "embeddings" not in self._channels:
            namespace = CacheNamespace(self.card.id, self.card.protection, self.key_scope, SERVER_PREPROCESSING)
            self._channels["embeddings"] = _Channel(
                namespace, EmbeddingCache(self.cache_dir, namespace, self.card.embedding_dim), self._fetch_embeddings)
        return self._channels["embeddings"]

    def _probability_channel(self, class_names: Sequence[str], top_k: int | None) -> _Channel:
        """One namespace per (mode spec, class list, top_k): the same image scored over another
        class list (or order) is another answer, so it must never be read back for this one."""
        if self.output != OUTPUT_PROBABILITIES:
            raise OutputUnavailable(f"this key receives {self.output} ({self.card.protection}), not probabilities")
        names = [str(c) for c in class_names]
        if not names or len(set(names)) != len(names):
            raise ValueError("class names must be a non-empty list without duplicates")
        classes = digest_parts(["classes", *names])[:16]
        channel_id = f"probabilities|{classes}|top_k={top_k}"
        if channel_id not in self._channels:
            namespace = CacheNamespace(self.card.id, f"{self.card.protection}|{channel_id}", self.key_scope,
                                  SERVER_PREPROCESSING)

            def fetch(items: list[Item], idempotency_key: str) -> Answer:
                result = self.client.classify(self.card.id, items, names, top_k=top_k,
                                              idempotency_key=idempotency_key)
                return Answer(np.asarray(result.probabilities, dtype=np.float32), result.units_charged,
                              result.units_remaining, result.replayed)

            self._channels[channel_id] = _Channel(namespace, EmbeddingCache(self.cache_dir, namespace, len(names)),
                                                  fetch)
        return self._channels[channel_id]

    def _fetch_embeddings(self, items: list[Item], idempotency_key: str) -> Answer:
        result = self.client.embed(self.card.id, items, idempotency_key=idempotency_key)
        return Answer(result.vectors, result.units_charged, result.units_remaining, result.replayed)

    @property
    def committed(self) -> int:
        return self.ledger.committed(self.scope)

    @property
    def remaining_budget(self) -> int:
        return max(0, self.budget - self.committed)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.cache.close()

    def __enter__(self) -> "Purchaser":
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Closes the caches whatever happened: what was bought is already on disk and in the ledger."""
        self.close()

    # ------------------------------------------------------------------ buying
    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """All of them or `BudgetTooSmall`: partial class prompts would make a wrong classifier."""
        vectors, found = self._buy(self._embedding_channel(), "text", list(texts),
                                   [t.encode("utf-8") for t in texts], list(texts), required=True)
        assert found.all()
        return vectors

    def images(self, paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
        """Buy images in the order given until the budget ends: (vectors, found mask)."""
        channel = self._embedding_channel()
        blobs = [Path(p).read_bytes() for p in paths]
        return self._buy(channel, "image", [ImageBytes(b) for b in blobs], blobs, [str(p) for p in paths],
                         required=False)

    def probabilities(self, paths: Sequence[Path], class_names: Sequence[str], *,
                      top_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`probabilities` keys: the teacher's class probabilities over ``class_names`` (dense
        [N, C], zeros outside the vendor's top-k), bought in the order given until the budget
        ends, exactly like :meth:`images`: (rows, found mask)."""
        channel = self._probability_channel(class_names, top_k)
        blobs = [Path(p).read_bytes() for p in paths]
        return self._buy(channel, "image", [ImageBytes(b) for b in blobs], blobs, [str(p) for p in paths],
                         required=False)

    def _buy(self, channel: _Channel, kind: str, items: list[Item], payloads: list[bytes], names: list[str], *,
             required: bool) -> tuple[np.ndarray, np.ndarray]:
        """Cached answers, then purchases; a refused input is reported by its name (file path)."""
        try:
            return self._buy_missing(channel, kind, items, payloads, required=required)
        except _Rejected as rejected:
            index = next(i for i, p in enumerate(payloads) if channel.namespace.item_key(kind, p) == rejected.key)
            raise InputRejected(f"the vendor refused {names[index]}: {rejected.message}") from rejected.__cause__

    def _buy_missing(self, channel: _Channel, kind: str, items: list[Item], payloads: list[bytes], *,
                     required: bool) -> tuple[np.ndarray, np.ndarray]:
        keys = [channel.namespace.item_key(kind, p) for p in payloads]
        vectors, found = channel.cache.get_many(keys)
        self.stats.cached[kind] += int(found.sum())
        missing: dict[bytes, list[int]] = {}
        for i in np.flatnonzero(~found):
            missing.setdefault(keys[i], []).append(int(i))  # identical inputs are bought once
        todo = list(missing)
        price = self.prices[kind]
        recovered = self._recoverable(set(todo))
        already_counted = sum(r.units for r in recovered)
        if required and len(todo) * price - already_counted > self.remaining_budget:
            raise BudgetTooSmall(
                f"buying {len(todo)} {kind}s costs {len(todo) * price} units but the budget has "
                f"{self.remaining_budget} left (budget {self.budget})")
        for reservation in recovered:  # batches paid for by a run that died before caching them
            batch = _split_keys(reservation.item_keys)
            self._fill(vectors, found, missing, batch,
                       self._send(channel, kind, batch, [items[missing[k][0]] for k in batch],
                                  reservation.idempotency_key))
        done = {k for r in recovered for k in _split_keys(r.item_keys)}
        todo = [k for k in todo if k not in done]
        bar = tqdm(total=len(todo), desc=f"buying {kind}s", unit=kind, disable=not self.show_progress or not todo)
        try:
            while todo:
                batch = self._next_batch(kind, todo, price)
                if not batch:
                    self.stats.stopped_by_budget = True
                    if required:
                        raise BudgetTooSmall(f"the budget ran out while buying {kind}s")
                    break
                rows = self._send(channel, kind, batch, [items[missing[k][0]] for k in batch],
                                  self._batch_key(kind, batch, channel))
                self._fill(vectors, found, missing, batch, rows)
                todo = todo[len(batch):]
                bar.update(len(batch))
                bar.set_postfix(spent=self.committed, left=self.remaining_budget)
        finally:
            bar.close()
        return vectors, found

    def _batch_key(self, kind: str, keys: Sequence[bytes], channel: _Channel | None = None) -> str:
        """The Idempotency-Key of a batch: its content in its namespace, so a resumed run re-sends
        the same batch under the same key (default channel: embeddings)."""
        namespace = (channel or self._embedding_channel()).namespace
        return "cd-" + digest_parts([namespace.digest, kind, *keys])[:48]

    def _recoverable(self, wanted: set[bytes]) -> list[Reservation]:
        """Open reservations whose items are all still wanted: re-send them before anything new."""
        return [r for r in self.ledger.open_reservations(self.scope)
                if r.item_keys and set(_split_keys(r.item_keys)) <= wanted]

    def _next_batch(self, kind: str, todo: list[bytes], price: int) -> list[bytes]:
        """As many of the next items as fit in a request and in the remaining budget."""
        full = todo[: self.batch_size]
        affordable = len(full) if price == 0 else min(len(full), self.remaining_budget // price)
        return full[:affordable]

    @staticmethod
    def _fill(vectors: np.ndarray, found: np.ndarray, missing: dict[bytes, list[int]], batch: list[bytes],
              rows: np.ndarray) -> None:
        for key, row in zip(batch, rows):
            for i in missing[key]:
                vectors[i], found[i] = row, True

    def _send(self, channel: _Channel, kind: str, batch: list[bytes], items: list[Item],
              idempotency_key: str) -> np.ndarray:
        units = len(batch) * self.prices[kind]
        self.ledger.reserve(self.scope, idempotency_key, units, len(batch), self.budget, b"".join(batch))
        try:
            result = channel.fetch(items, idempotency_key)
        except VendorError as exc:
            if exc.status < 500 and exc.status not in (409, 429):
                self.ledger.release(self.scope, idempotency_key)  # a refusal: certainly not charged
            position = _input_position(exc.param)
            if exc.status == 400 and position is not None and position < len(items):
                raise _Rejected(batch[position], exc.message) from exc
            raise
        channel.cache.put_many(batch, result.rows)
        self.ledger.settle(self.scope, idempotency_key, result.units_charged, result.units_remaining)
        self.stats.bought[kind] += len(batch)
        self.stats.units_charged += 0 if result.replayed else result.units_charged
        self.stats.requests += 1
        self.stats.replays += int(result.replayed)
        return result.rows


def _split_keys(blob: bytes) -> list[bytes]:
    return [blob[i:i + 32] for i in range(0, len(blob), 32)]


def _input_position(param: str | None) -> int | None:
    """`input[3]` -> 3: which item of a request the vendor refused."""
    if param and param.startswith("input[") and param.endswith("]") and param[6:-1].isdigit():
        return int(param[6:-1])
    return None


class _Rejected(Exception):
    """Internal: the vendor refused the input with this cache key; `_buy` names it."""

    def __init__(self, key: bytes, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message
