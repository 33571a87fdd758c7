"""The embedding service: validate, decode, meter, batch, protect, answer (embeddings and
class probabilities share one metered path).

Independent of HTTP (routes in `app.py` only translate), so the whole metered path can be
driven and benchmarked in-process. Order matters and is deliberate:
1. cheap checks on the parsed request (model, counts, the key's mode);
2. admission (`Meter.admit`): replay a finished answer, spend the rate-limit slot and check that
   the balance covers the price, all *before* any decoding, tokenising or embedding, so a key
   that cannot pay costs the vendor one Redis round trip per request and no real work;
3. validate and decode everything (bad input costs nothing), reserve queue room (a full server
   refuses before charging);
4. debit in one atomic script, then run the model while a heartbeat renews the debit's lease;
5. settle at the last moment, when the HTTP layer is about to write the answer (`deliver`):
   the answer is stored for idempotent replay, or, if the client is gone or anything failed,
   refunded. A settle that cannot be written is retried in the background until it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import unicodedata
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Awaitable, Callable, Sequence

import numpy as np
import torch

from shared import codec
from shared.hashing import fingerprint_json
from shared.protocol import (
    OUTPUT_EMBEDDINGS,
    ClassificationItem,
    ClassificationRequest,
    ClassificationResponse,
    ClassProbability,
    EmbeddingItem,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ErrorCode,
    ImageInput,
    ModelCard,
)

from .accounts import Account
from .batcher import BatchTiming, DynamicBatcher
from .errors import (
    DebitLapsed,
    EmbeddingsNotPermitted,
    InferenceFailed,
    InsufficientQuota,
    InvalidRequest,
    MeteringUnavailable,
    NotFound,
    ProtectionMisconfigured,
    VendorError,
)
from .images import ImageLimits, decode_image
from .metering import Admission, Debit, Meter, Replay, rate_headers
from .metrics import VendorMetrics
from .protection import (
    ProtectionContext,
    ProtectionMode,
    RedisBucketStore,
    WatermarkCalibration,
    compute_calibration,
    parse_protection,
    record_teacher_dim,
    resolve_protection_secret,
    top_k_probabilities,
)
from .protection.class_lists import ClassListLimit, Reservation
from .protection.overlap import OverlapDetector, image_signature, near_signatures, text_signature
from .protection.perceptual import perceptual_codes
from .protection.probabilities import class_prompts
from .settings import VendorSettings
from .teacher import Teacher

log = logging.getLogger(__name__)
_PROMPT_CACHE_SIZE = 8192  # class prompt embeddings kept (one row each), across class lists
Produce = Callable[[Debit], Awaitable[tuple[bytes, BatchTiming]]]


@dataclass
class _Pending:
    """A paid debit whose answer is produced but not yet handed to the client."""

    account: Account
    debit: Debit
    idempotency_key: str | None
    fingerprint: str
    heartbeat: asyncio.Task | None = None

    def stop_heartbeat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.cancel()


@dataclass
class EmbedOutcome:
    """An answer. Fresh answers carry `pending` until `EmbeddingService.deliver` settles them;
    `units_remaining` is the balance right after this request's debit, the same number the body's
    `usage.units_remaining` shows."""

    body: bytes
    units_charged: int
    units_remaining: int
    replayed: bool = False
    timing: BatchTiming = field(default_factory=BatchTiming)
    rate_remaining: int | None = None
    rate_limit: int | None = None
    rate_reset_s: float | None = None
    rate_window_s: float | None = None
    pending: _Pending | None = None
    delivered: _Pending | None = None


@dataclass
class _Prepared:
    """A validated request: tensors ready for the towers, and what it will cost."""

    image_slots: list[int]
    image_tensors: list[torch.Tensor]
    text_slots: list[int]
    text_tokens: torch.Tensor | None
    prompt_tokens: int
    input_hashes: list[str]

    @property
    def modalities(self) -> list[str]:
        kinds = ["image"] * (len(self.image_slots) + len(self.text_slots))
        for slot in self.text_slots:
            kinds[slot] = "text"
        return kinds


class EmbeddingService:
    def __init__(self, settings: VendorSettings, teacher: Teacher, meter: Meter, metrics: VendorMetrics) -> None:
        self.settings = settings
        self.teacher = teacher
        self.meter = meter
        self.metrics = metrics
        self.limits = ImageLimits(settings.max_image_pixels, settings.max_image_side, settings.min_image_side)
        self.batcher = DynamicBatcher(
            {"image": teacher.encode_images, "text": teacher.encode_texts},
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue_items=max(settings.max_queue_items, settings.max_items_per_request),
            metrics=metrics,
        )
        self._cpu_pool = ThreadPoolExecutor(max_workers=settings.preprocess_workers, thread_name_prefix="preprocess")
        self.buckets = RedisBucketStore(meter.redis)
        self._secret: bytes | None = None
        self._calibration: WatermarkCalibration | None = None
        self._calibration_lock = asyncio.Lock()
        self._prompt_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._background: set[asyncio.Task] = set()
        self.class_lists = ClassListLimit(meter.redis, per_image=settings.classify_lists_per_image,
                                          ttl_s=settings.overlap_ttl_s) if settings.classify_lists_per_image else None
        self.overlap = OverlapDetector(
            meter.redis, ttl_s=settings.overlap_ttl_s, max_keys=settings.overlap_max_keys,
            min_shared=settings.overlap_min_shared, registry=metrics.registry,
        ) if settings.overlap_detection else None

    async def start(self) -> None:
        await self.batcher.start()
        try:  # lets vendor-admin check modes against the teacher; serving does not depend on it
            await record_teacher_dim(self.meter.redis, self.teacher.model_id, self.teacher.embed_dim)
        except MeteringUnavailable:
            log.warning("could not record the teacher's dimension in Redis; vendor-admin will not check modes")

    async def stop(self) -> None:
        for task in list(self._background):  # refunds still owed fall to the lease reaper
            task.cancel()
        await self.batcher.stop()
        self._cpu_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ descriptions
    def mode_for(self, account: Account) -> ProtectionMode:
        """The key's mode, checked against the served teacher (a misfit is the vendor's error)."""
        try:
            mode = parse_protection(account.protection)
            mode.output_dim(self.teacher.embed_dim)
        except (InvalidRequest, ValueError) as exc:
            message = exc.message if isinstance(exc, InvalidRequest) else str(exc)
            raise ProtectionMisconfigured(
                f"this key's protection mode {account.protection!r} does not fit the served teacher "
                f"({message}); the vendor must fix it. Nothing was charged."
            ) from exc
        return mode

    def model_card(self, account: Account) -> ModelCard:
        mode = self.mode_for(account)
        return ModelCard(
            id=self.teacher.model_id,
            created=0,
            owned_by="vendor",
            embedding_dim=mode.output_dim(self.teacher.embed_dim),
            image_size=self.teacher.image_size,
            context_length=self.teacher.context_length,
            price_per_image=self.settings.price_per_image,
            price_per_text=self.settings.price_per_text,
            logit_scale=round(self.teacher.logit_scale, 4),
            protection=account.protection,
            output=mode.output,
            top_k=self.classify_top_k(mode),
        )

    def classify_top_k(self, mode: ProtectionMode) -> int:
        """Most classes per image this key may receive: a probabilities key's own K, else the
        vendor's cap (an uncapped embedding-mode key got all 1000 probabilities of a list)."""
        own = mode.top_k()
        return own if own is not None else self.settings.classify_max_top_k

    async def protection_state(self, account: Account) -> dict[str, float]:
        """What the key's mode reports about itself (b4b: coverage and current noise)."""
        mode = self.mode_for(account)
        return await mode.state(await self._context(mode, account, None))

    # ------------------------------------------------------------------ protection inputs
    # The secret and the calibration are derived on first use, and used only for a mode that says it
    # needs them (`needs_secret`, `needs_calibration`) and for the near-duplicate codes of a keyed
    # mode's inputs (`_record_overlap`): a vendor whose keys are all `none` never derives either.
    def secret(self) -> bytes:
        """The protection secret, resolved (read, or generated and kept) on first use."""
        if self._secret is None:
            self._secret = resolve_protection_secret(self.settings)
        return self._secret

    async def calibration(self) -> WatermarkCalibration:
        """The teacher's embeddings of the calibration set, computed once, on first use."""
        async with self._calibration_lock:
            if self._calibration is None:
                loop = asyncio.get_running_loop()
                self._calibration = await loop.run_in_executor(
                    self._cpu_pool, compute_calibration, self.teacher, self.settings.watermark_calibration_dir)
            return self._calibration

    async def _context(self, mode: ProtectionMode, account: Account, prepared: "_Prepared | None") -> ProtectionContext:
        return ProtectionContext(
            account_digest=account.digest,
            input_hashes=prepared.input_hashes if prepared else [],
            secret=self.secret() if mode.needs_secret or mode.needs_input_hashes else b"",
            modalities=prepared.modalities if prepared else [],  # type: ignore[arg-type]
            store=self.buckets,
            calibration=await self.calibration() if mode.needs_calibration and prepared else None,
        )

    # ------------------------------------------------------------------ the metered path
    async def embed(self, account: Account, request: EmbeddingRequest, idempotency_key: str | None) -> EmbedOutcome:
        self._check_request(request)
        mode = self.mode_for(account)
        if mode.output != OUTPUT_EMBEDDINGS:
            raise EmbeddingsNotPermitted(
                f"this API key's protection mode ({account.protection}) sells class probabilities only: "
                "use POST /v1/classifications. Nothing was charged.")
        items = request.items()
        n_images = sum(isinstance(item, ImageInput) for item in items)
        units = n_images * self.settings.price_per_image + (len(items) - n_images) * self.settings.price_per_text
        fingerprint = fingerprint_json(request.model_dump(mode="json"))
        admission = await self.meter.admit(account, units=units, fingerprint=fingerprint,
                                           idempotency_key=idempotency_key)
        if isinstance(admission, Replay):
            return self._replayed(admission)
        with self.batcher.reserve(len(items), retry_after_s=self.settings.retry_after_s):
            prepared = await self._prepare(items, hash_inputs=mode.needs_input_hashes)

            async def produce(debit: Debit) -> tuple[bytes, BatchTiming]:
                clean, timing = await self._infer(prepared)
                rows = await mode.apply(clean, await self._context(mode, account, prepared))
                await self._record_overlap(account, mode, prepared, clean)
                return self._render(request, rows, prepared, debit), timing

            return await self._metered(
                account, produce, units=units, images=len(prepared.image_slots), texts=len(prepared.text_slots),
                fingerprint=fingerprint, idempotency_key=idempotency_key, admission=admission,
            )

    async def classify(
        self, account: Account, request: ClassificationRequest, idempotency_key: str | None
    ) -> EmbedOutcome:
        """Top-k class probabilities for images, over the caller's class names. Any key may ask
        (it reveals less than embeddings); a `probabilities:K` key is capped at K classes."""
        self._check_model(request.model)
        mode = self.mode_for(account)
        self._check_count(len(request.input))
        prompts = class_prompts(request.classes)
        for i, name in enumerate(request.classes):
            if not name.strip():
                raise InvalidRequest(f"classes[{i}]: class name is empty", code=ErrorCode.EMPTY_INPUT,
                                     param=f"classes[{i}]")
        caps = [c for c in (request.top_k, self.classify_top_k(mode), len(request.classes)) if c is not None]
        k = min(caps)
        items: list[str | ImageInput] = list(request.input)
        new_prompts = self._check_new_prompts(prompts, len(items))
        units = len(items) * self.settings.price_per_image
        fingerprint = fingerprint_json({"route": "classifications", **request.model_dump(mode="json")})
        admission = await self.meter.admit(account, units=units, fingerprint=fingerprint,
                                           idempotency_key=idempotency_key)
        if isinstance(admission, Replay):
            return self._replayed(admission)
        # tokenising (up to 1,000 prompts) is real work: only once the key is admitted
        self._check_texts(prompts, list(range(len(prompts))), param_name="classes")
        admitted = min(len(items) + new_prompts, self.batcher.max_queue_items)
        with self.batcher.reserve(admitted, retry_after_s=self.settings.retry_after_s):
            prepared = await self._prepare(items, hash_inputs=False)
            loop = asyncio.get_running_loop()
            # before the debit: a refused list costs nothing (and a replay above used no allowance)
            reservation = None
            if self.class_lists is not None:
                codes = await loop.run_in_executor(self._cpu_pool, _perceptual_codes, prepared)
                reservation = await self.class_lists.reserve(account.digest, codes, request.classes)
            signatures = None if self.overlap is None else await loop.run_in_executor(
                self._cpu_pool, _signatures, prepared)

            async def produce(debit: Debit) -> tuple[bytes, BatchTiming]:
                class_rows = await self._class_embeddings(prompts)  # paid for: only after the debit
                rows, timing = await self._infer(prepared)
                images, classes = await self._scoring_rows(mode, account, prepared, rows, class_rows)
                ranked = top_k_probabilities(images, classes, self.teacher.logit_scale, k,
                                             self.settings.classify_decimals)
                await self._record_overlap(account, mode, prepared, rows, signatures)
                return self._render_classes(ranked, prepared, debit), timing

            try:
                return await self._metered(
                    account, produce, units=units, images=len(prepared.image_slots), texts=0,
                    fingerprint=fingerprint, idempotency_key=idempotency_key, admission=admission,
                )
            except BaseException:  # no answer was produced: the lists it reserved are given back
                if reservation is not None:
                    await asyncio.shield(self._release_lists(reservation))
                raise

    async def _release_lists(self, reservation: Reservation) -> None:
        """Best effort: a Redis error here must not hide why the request failed."""
        try:
            await self.class_lists.release(reservation)  # type: ignore[union-attr]
        except Exception:
            log.warning("could not give back a failed classification's class-list reservations")

    def _check_new_prompts(self, prompts: list[str], images: int) -> int:
        """How many class prompts this request makes the model encode, bounded by what it pays:
        at most `class_prompts_per_image` new prompts per image (a CLIP text encoding costs about
        a seventh of an image's), so no key buys 1,000 text encodings for one unit. Prompts
        already cached (any key's, any list) are free. Refused before admission: costs nothing."""
        new = len({p for p in prompts if p not in self._prompt_cache})
        allowed = images * self.settings.class_prompts_per_image
        if new > allowed:
            needed = -(-new // self.settings.class_prompts_per_image)
            raise InvalidRequest(
                f"{new} of these class names are new to this vendor; one request encodes at most "
                f"{self.settings.class_prompts_per_image} new class prompts per image it pays for, so send at "
                f"least {needed} images with them (later requests with the same classes need no more). "
                "Nothing was charged.", code=ErrorCode.TOO_MANY_NEW_CLASSES, param="classes")
        return new

    async def _scoring_rows(self, mode: ProtectionMode, account: Account, prepared: _Prepared, images: np.ndarray,
                            classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The key's own protected image and class-prompt embeddings, through one `scoring_rows`
        call (one b4b coverage update and noise level for both), so the probabilities equal
        softmax(logit_scale * protected_image . protected_prompt) of what the key could buy."""
        context = replace(await self._context(mode, account, prepared),
                          modalities=["image"] * len(images) + ["text"] * len(classes))
        rows = await mode.scoring_rows(np.concatenate([images, classes]), context)
        return rows[: len(images)], rows[len(images):]

    async def _record_overlap(self, account: Account, mode: ProtectionMode, prepared: _Prepared,
                              clean: np.ndarray, signatures: list[tuple[str, str]] | None = None) -> None:
        """Best effort: which inputs this key asked for (vendor-admin suspects), exactly and, for a
        keyed mode, by the near-duplicate codes of their `clean` embeddings (so crops and
        re-compressions sent through several keys are seen too). Monitoring must not fail a paid
        answer, so a Redis error here is logged, not raised.

        Near codes need the secret and the calibration. Only a keyed mode (`needs_secret`: noise,
        rotate, b4b, watermark, probabilities with noise) answers each key differently, so only
        there do several keys give a holder more than one key does; an unkeyed key (`none`,
        quantize, truncate, plain probabilities) is recorded by its exact inputs alone."""
        if self.overlap is None:
            return
        try:
            loop = asyncio.get_running_loop()
            if signatures is None:
                signatures = await loop.run_in_executor(self._cpu_pool, _signatures, prepared)
            near: list[tuple[str, tuple[int, ...]]] = []
            if mode.needs_secret:
                calibration = await self.calibration()
                near = await loop.run_in_executor(self._cpu_pool, partial(
                    near_signatures, clean, prepared.modalities, calibration.samples, secret=self.secret()))
            await self.overlap.record(account.digest, signatures, near)
        except MeteringUnavailable:
            log.warning("could not record input overlap for a key; vendor-admin suspects will miss it")
        except Exception:  # a script error, a bad calibration: still not a reason to fail a paid answer
            log.exception("input overlap recording failed; vendor-admin suspects will miss this request")

    async def _class_embeddings(self, prompts: list[str]) -> np.ndarray:
        """Class prompt embeddings, cached per prompt (LRU): the question, not the product, so
        they are not charged; only a paid request (after its debit) encodes the missing ones,
        and `_check_new_prompts` bounds how many."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        fresh: dict[str, np.ndarray] = {}
        if missing:
            loop = asyncio.get_running_loop()
            tokens = await loop.run_in_executor(self._cpu_pool, self.teacher.tokenize, missing)
            rows, _ = await self.batcher.submit("text", list(tokens))
            fresh = dict(zip(missing, rows))
        out = []
        for prompt in prompts:
            row = fresh.get(prompt)
            if row is None:
                row = self._prompt_cache[prompt]
                self._prompt_cache.move_to_end(prompt)
            out.append(row)
        for prompt, row in fresh.items():
            self._prompt_cache[prompt] = row
        while len(self._prompt_cache) > _PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return np.stack(out)

    def _replayed(self, replay: Replay) -> EmbedOutcome:
        self.metrics.replays.inc()
        return EmbedOutcome(body=replay.body, units_charged=0, units_remaining=replay.remaining, replayed=True)

    async def _metered(
        self, account: Account, produce: Produce, *, units: int, images: int, texts: int, fingerprint: str,
        idempotency_key: str | None, admission: Admission,
    ) -> EmbedOutcome:
        """Debit and produce: the one path every billable answer takes. A replay returns the
        stored body; any failure or cancellation while producing (model, protection state,
        rendering, the client hanging up) refunds. The answer is settled later, by `deliver`."""
        request_id = uuid.uuid4().hex
        debiting = asyncio.ensure_future(self.meter.debit(
            account, units=units, images=images, texts=texts, fingerprint=fingerprint,
            idempotency_key=idempotency_key, request_id=request_id, rate=admission.rate))
        try:
            debit = await asyncio.shield(debiting)
        except asyncio.CancelledError:  # cancelled mid-debit: let it land, then refund what it took
            await asyncio.shield(self._refund_landed(account, debiting, idempotency_key))
            raise
        except MeteringUnavailable:
            # The debit may have run with its reply lost (Redis, or a cluster primary, died just
            # after it). Refund it by request id as soon as Redis is back instead of after its
            # lease: settle is exactly-once per request id and a no-op if nothing was debited.
            self._refund_later(_Pending(account, Debit(request_id, units, 0), idempotency_key, ""),
                               reason="debit_reply_lost")
            raise
        except InsufficientQuota as exc:  # a concurrent request took the balance since admission
            exc.headers.update({k: v for k, v in rate_headers(admission.rate).items() if k not in exc.headers})
            raise
        if isinstance(debit, Replay):
            return self._replayed(debit)
        self.metrics.units.inc(units)
        heartbeat = asyncio.create_task(self._keep_alive(account, debit), name=f"lease-{request_id}")
        try:
            body, timing = await produce(debit)
        except BaseException as exc:  # includes cancellation (client went away): refund, then re-raise
            heartbeat.cancel()
            await asyncio.shield(self._refund(account, debit, idempotency_key, reason=_reason(exc)))
            if isinstance(exc, Exception) and not isinstance(exc, VendorError):
                raise InferenceFailed("inference failed; the request was not charged") from exc
            raise
        return EmbedOutcome(
            body=body, units_charged=debit.units, units_remaining=debit.remaining, timing=timing,
            rate_remaining=debit.rate_remaining, rate_limit=debit.rate_limit, rate_reset_s=debit.rate_reset_s,
            rate_window_s=debit.rate_window_s,
            pending=_Pending(account, debit, idempotency_key, fingerprint, heartbeat),
        )

    async def deliver(self, outcome: EmbedOutcome) -> EmbedOutcome:
        """Settle a fresh answer as delivered: the last step before its first byte is written.
        Never ignores settle's result: an answer whose debit lapsed (its lease expired and was
        refunded) is paid for again atomically, or not delivered at all (`DebitLapsed`)."""
        pending = outcome.pending
        if pending is None:
            return outcome
        pending.stop_heartbeat()
        try:
            settled = await self.meter.settle(
                pending.account, pending.debit, outcome="delivered", idempotency_key=pending.idempotency_key,
                body=outcome.body, fingerprint=pending.fingerprint)
        except MeteringUnavailable:  # not recorded as delivered, so not delivered: refund it
            outcome.pending = None
            self._refund_later(pending, reason="settle_failed")
            raise
        if settled.status == "lapsed":
            outcome.pending = None  # the reaper already refunded it
            self.metrics.refunds.inc(pending.debit.units)
            raise DebitLapsed(
                "this request outlived its debit's lease and was refunded, and the key cannot pay for it "
                "again; nothing was charged. Retry.", headers={"Retry-After": str(self.settings.retry_after_s)})
        if settled.status == "redebited":
            log.warning("request %s outlived its lease (refunded by the reaper); charged again before delivery",
                        pending.debit.request_id)
        outcome.pending, outcome.delivered = None, pending
        return outcome

    async def abandon(self, outcome: EmbedOutcome, *, reason: str) -> None:
        """Refund a fresh answer that will not be written (the client is gone)."""
        pending, outcome.pending = outcome.pending, None
        if pending is not None:
            pending.stop_heartbeat()
            await self._refund(pending.account, pending.debit, pending.idempotency_key, reason=reason)

    async def void(self, outcome: EmbedOutcome, *, reason: str) -> None:
        """Refund an answer settled as delivered that was then not written (the client hung up
        while it was being settled); its idempotency record goes too, so a retry runs afresh."""
        pending, outcome.delivered = outcome.delivered, None
        if pending is None:
            return
        try:
            settled = await self.meter.settle(pending.account, pending.debit, outcome="void",
                                              idempotency_key=pending.idempotency_key, reason=reason)
            if settled.status == "settled":
                self.metrics.refunds.inc(pending.debit.units)
        except MeteringUnavailable:
            log.error("could not refund request %s (its client hung up while it was settled): Redis is down",
                      pending.debit.request_id)

    async def _keep_alive(self, account: Account, debit: Debit) -> None:
        """Renew the debit's lease every third of it while the request lives, so that only a dead
        replica's debit is ever reaped. Stops when the debit is no longer pending."""
        interval = max(0.1, self.meter.lease_s / 3)
        # A backstop: a request that somehow was never settled must not hold its units forever.
        give_up = time.monotonic() + max(600.0, 10 * self.meter.lease_s)
        while time.monotonic() < give_up:
            await asyncio.sleep(interval)
            try:
                if not await self.meter.renew(account, debit):
                    return  # reaped (or settled): deliver() decides, from settle's answer
            except MeteringUnavailable:
                continue  # Redis is down; renew again next beat

    async def _refund(self, account: Account, debit: Debit, idempotency_key: str | None, *, reason: str) -> None:
        try:
            settled = await self.meter.settle(account, debit, outcome="failed", idempotency_key=idempotency_key,
                                              reason=reason)
            if settled.status == "settled":
                self.metrics.refunds.inc(debit.units)
        except MeteringUnavailable:
            self._refund_later(_Pending(account, debit, idempotency_key, ""), reason=reason)

    async def _refund_landed(self, account: Account, debiting: "asyncio.Future[Debit | Replay]",
                             idempotency_key: str | None) -> None:
        with contextlib.suppress(Exception):
            debit = await debiting
            if isinstance(debit, Debit):
                await self._refund(account, debit, idempotency_key, reason="client_disconnected")

    def _refund_later(self, pending: _Pending, *, reason: str) -> None:
        """Redis is unreachable: keep trying to refund in the background, so the units and the
        idempotency slot come back as soon as Redis does (a retry then runs instead of waiting
        out the lease). Past the lease the reaper owns it, and settle is exactly-once anyway."""

        async def retry() -> None:
            deadline = time.monotonic() + self.meter.lease_s + 5
            delay = 0.05
            while time.monotonic() < deadline:
                await asyncio.sleep(delay)
                try:
                    settled = await self.meter.settle(pending.account, pending.debit, outcome="failed",
                                                      idempotency_key=pending.idempotency_key, reason=reason)
                except MeteringUnavailable:
                    delay = min(1.0, delay * 2)
                    continue
                if settled.status == "settled":
                    self.metrics.refunds.inc(pending.debit.units)
                return

        task = asyncio.get_running_loop().create_task(retry(), name=f"refund-{pending.debit.request_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ validation and decoding
    def _check_model(self, model: str) -> None:
        if model != self.teacher.model_id:
            raise NotFound(
                f"model {model!r} is not served here; this vendor serves {self.teacher.model_id!r}",
                code=ErrorCode.UNKNOWN_MODEL, param="model",
            )

    def _check_count(self, count: int) -> None:
        if count == 0:
            raise InvalidRequest("input is empty", code=ErrorCode.EMPTY_INPUT, param="input")
        if count > self.settings.max_items_per_request:
            raise InvalidRequest(
                f"{count} inputs; at most {self.settings.max_items_per_request} per request",
                code=ErrorCode.TOO_MANY_INPUTS, param="input",
            )

    def _check_request(self, request: EmbeddingRequest) -> None:
        self._check_model(request.model)
        if request.dimensions is not None and request.dimensions != self.teacher.embed_dim:
            raise InvalidRequest(
                f"dimensions must be {self.teacher.embed_dim} for this model", param="dimensions"
            )
        self._check_count(len(request.items()))

    async def _prepare(self, items: Sequence[str | ImageInput], *, hash_inputs: bool) -> _Prepared:
        loop = asyncio.get_running_loop()
        image_slots = [i for i, item in enumerate(items) if isinstance(item, ImageInput)]
        text_slots = [i for i, item in enumerate(items) if isinstance(item, str)]
        texts = [items[i] for i in text_slots]
        prompt_tokens = self._check_texts(texts, text_slots)
        image_jobs = [
            loop.run_in_executor(self._cpu_pool, self._prepare_image, items[i].image, f"input[{i}]")  # type: ignore[union-attr]
            for i in image_slots
        ]
        results = await asyncio.gather(*image_jobs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        tokens = await loop.run_in_executor(self._cpu_pool, self.teacher.tokenize, texts) if texts else None
        hashes = [_content_hash(item) for item in items] if hash_inputs else []
        return _Prepared(image_slots, list(results), text_slots, tokens, prompt_tokens, hashes)  # type: ignore[arg-type]

    def _prepare_image(self, payload: str, param: str) -> torch.Tensor:
        image = decode_image(payload, self.limits, param=param)
        return self.teacher.preprocess(image)

    def _check_texts(self, texts: list[str], slots: list[int], *, param_name: str = "input") -> int:
        total = 0
        for text, slot in zip(texts, slots):
            param = f"{param_name}[{slot}]"
            if not text.strip():
                raise InvalidRequest(f"{param}: text is empty", code=ErrorCode.EMPTY_INPUT, param=param)
            if not any(_visible(c) for c in text):
                raise InvalidRequest(f"{param}: text has only invisible characters (zero-width, format or "
                                     "control characters)", code=ErrorCode.EMPTY_INPUT, param=param)
            if len(text) > self.settings.max_text_chars:
                raise InvalidRequest(
                    f"{param}: {len(text)} characters; at most {self.settings.max_text_chars}",
                    code=ErrorCode.CONTEXT_LENGTH_EXCEEDED, param=param,
                )
            tokens = self.teacher.count_tokens(text)
            if tokens > self.teacher.context_length:
                raise InvalidRequest(
                    f"{param}: {tokens} tokens; this model's context length is {self.teacher.context_length}",
                    code=ErrorCode.CONTEXT_LENGTH_EXCEEDED, param=param,
                )
            total += tokens
        return total

    # ------------------------------------------------------------------ inference and rendering
    async def _infer(self, prepared: _Prepared) -> tuple[np.ndarray, BatchTiming]:
        jobs = []
        if prepared.image_tensors:
            jobs.append(self.batcher.submit("image", prepared.image_tensors))
        if prepared.text_tokens is not None:
            jobs.append(self.batcher.submit("text", list(prepared.text_tokens)))
        results = await asyncio.gather(*jobs)
        total = len(prepared.image_slots) + len(prepared.text_slots)
        rows = np.zeros((total, self.teacher.embed_dim), dtype=np.float32)
        timing = BatchTiming()
        slot_groups = [s for s in (prepared.image_slots, prepared.text_slots) if s]
        for slots, (matrix, part_timing) in zip(slot_groups, results):
            rows[slots] = matrix
            timing.queue_s = max(timing.queue_s, part_timing.queue_s)
            timing.inference_s += part_timing.inference_s
        return rows, timing

    def _render(self, request: EmbeddingRequest, rows: np.ndarray, prepared: _Prepared, debit: Debit) -> bytes:
        encoded = codec.encode_vectors(rows, request.encoding_format)
        response = EmbeddingResponse(
            data=[EmbeddingItem(index=i, embedding=e) for i, e in enumerate(encoded)],
            model=self.teacher.model_id,
            usage=EmbeddingUsage(
                prompt_tokens=prepared.prompt_tokens,
                total_tokens=prepared.prompt_tokens,
                images=len(prepared.image_slots),
                texts=len(prepared.text_slots),
                units_charged=debit.units,
                units_remaining=debit.remaining,
            ),
        )
        return response.model_dump_json().encode()

    def _render_classes(self, ranked: list[list[tuple[int, float]]], prepared: _Prepared, debit: Debit) -> bytes:
        response = ClassificationResponse(
            data=[ClassificationItem(index=i, top_k=[ClassProbability(class_index=c, probability=p) for c, p in row])
                  for i, row in enumerate(ranked)],
            model=self.teacher.model_id,
            usage=EmbeddingUsage(prompt_tokens=0, total_tokens=0, images=len(prepared.image_slots), texts=0,
                                 units_charged=debit.units, units_remaining=debit.remaining),
        )
        return response.model_dump_json().encode()


def _perceptual_codes(prepared: _Prepared) -> list[tuple[str, ...]]:
    """Each image's perceptual codes, for the class-list limit (no model work)."""
    return [perceptual_codes(t) for t in prepared.image_tensors]


def _signatures(prepared: _Prepared) -> list[tuple[str, str]]:
    """(modality, signature of what the tower sees) per input, for the overlap detector."""
    images = [("image", image_signature(t)) for t in prepared.image_tensors]
    texts = [("text", text_signature(t)) for t in prepared.text_tokens] if prepared.text_tokens is not None else []
    return images + texts


# Characters that render as nothing although Unicode files them as letters or symbols.
_INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u2800\u180e\u034f")


def _visible(char: str) -> bool:
    """Whether a character shows: not whitespace, not a format (zero-width, bidi), control,
    combining-only or variation-selector character, nor a known blank letter."""
    return not char.isspace() and unicodedata.category(char) not in ("Cf", "Cc", "Mn", "Me", "Zs", "Zl", "Zp",
                                                                     "Co", "Cn", "Cs") and char not in _INVISIBLE


def _reason(exc: BaseException) -> str:
    """The ledger's refund reason for an exception."""
    if isinstance(exc, asyncio.CancelledError):
        return "client_disconnected"
    return exc.code.value if isinstance(exc, VendorError) else "inference_failed"


def _content_hash(item: str | ImageInput) -> str:
    """What deterministic noise is keyed on: the input's content and kind, not its position."""
    kind, payload = ("text", item) if isinstance(item, str) else ("image", item.image)
    return hashlib.sha256(kind.encode() + b"\x00" + payload.encode()).hexdigest()
