"""The embedding service: validate, decode, meter, batch, protect, answer (embeddings and
class probabilities share one metered path).

Independent of HTTP (routes in `app.py` only translate), so the whole metered path can be
driven and benchmarked in-process. Order matters and is deliberate:
validate and decode everything first (bad input costs nothing), reserve queue room (a full
server refuses before charging), debit in one atomic script, run the model, then settle:
deliver (and store the answer for idempotent replay) or refund.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

import numpy as np
import torch

from shared import codec
from shared.hashing import fingerprint_json
from shared.protocol import (
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

from .batcher import BatchTiming, DynamicBatcher
from .errors import (
    EmbeddingsNotPermitted,
    InferenceFailed,
    InvalidRequest,
    MeteringUnavailable,
    NotFound,
    ProtectionMisconfigured,
)
from .images import ImageLimits, decode_image
from .metering import Account, Debit, Meter, Replay
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
from .protection.probabilities import class_prompts
from .settings import VendorSettings
from .teacher import Teacher

log = logging.getLogger(__name__)
_CLASS_CACHE_SIZE = 32
Produce = Callable[[Debit], Awaitable[tuple[bytes, BatchTiming]]]


@dataclass
class EmbedOutcome:
    body: bytes
    units_charged: int
    units_remaining: int
    replayed: bool = False
    timing: BatchTiming = field(default_factory=BatchTiming)
    rate_remaining: int | None = None
    rate_limit: int | None = None
    rate_reset_s: float | None = None


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
        self._class_cache: OrderedDict[tuple[str, ...], np.ndarray] = OrderedDict()

    async def start(self) -> None:
        await self.batcher.start()
        try:  # lets vendor-admin check modes against the teacher; serving does not depend on it
            await record_teacher_dim(self.meter.redis, self.teacher.model_id, self.teacher.embed_dim)
        except MeteringUnavailable:
            log.warning("could not record the teacher's dimension in Redis; vendor-admin will not check modes")

    async def stop(self) -> None:
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
            top_k=mode.top_k(),
        )

    async def protection_state(self, account: Account) -> dict[str, float]:
        """What the key's mode reports about itself (b4b: coverage and current noise)."""
        mode = self.mode_for(account)
        return await mode.state(await self._context(mode, account, None))

    # ------------------------------------------------------------------ protection inputs
    def secret(self) -> bytes:
        """Resolved on first use, so a vendor whose keys are all `none` never touches the file."""
        if self._secret is None:
            self._secret = resolve_protection_secret(self.settings)
        return self._secret

    async def calibration(self) -> WatermarkCalibration:
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
        if mode.output != "embeddings":
            raise EmbeddingsNotPermitted(
                f"this API key's protection mode ({account.protection}) sells class probabilities only: "
                "use POST /v1/classifications. Nothing was charged.")
        items = request.items()
        with self.batcher.reserve(len(items), retry_after_s=self.settings.retry_after_s):
            prepared = await self._prepare(items, hash_inputs=mode.needs_input_hashes)
            units = (len(prepared.image_slots) * self.settings.price_per_image
                     + len(prepared.text_slots) * self.settings.price_per_text)

            async def produce(debit: Debit) -> tuple[bytes, BatchTiming]:
                rows, timing = await self._infer(prepared)
                rows = await mode.apply(rows, await self._context(mode, account, prepared))
                return self._render(request, rows, prepared, debit), timing

            return await self._metered(
                account, produce, units=units, images=len(prepared.image_slots), texts=len(prepared.text_slots),
                fingerprint=fingerprint_json(request.model_dump(mode="json")), idempotency_key=idempotency_key,
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
        self._check_texts(prompts, list(range(len(prompts))), param_name="classes")
        caps = [c for c in (request.top_k, mode.top_k(), len(request.classes)) if c is not None]
        k = min(caps)
        items: list[str | ImageInput] = list(request.input)
        cached = tuple(prompts) in self._class_cache
        admitted = min(len(items) + (0 if cached else len(prompts)), self.batcher.max_queue_items)
        with self.batcher.reserve(admitted, retry_after_s=self.settings.retry_after_s):
            prepared = await self._prepare(items, hash_inputs=False)
            class_rows = await self._class_embeddings(prompts)

            async def produce(debit: Debit) -> tuple[bytes, BatchTiming]:
                rows, timing = await self._infer(prepared)
                ranked = top_k_probabilities(rows, class_rows, self.teacher.logit_scale, k)
                return self._render_classes(ranked, prepared, debit), timing

            fingerprint = fingerprint_json({"route": "classifications", **request.model_dump(mode="json")})
            return await self._metered(
                account, produce, units=len(prepared.image_slots) * self.settings.price_per_image,
                images=len(prepared.image_slots), texts=0, fingerprint=fingerprint, idempotency_key=idempotency_key,
            )

    async def _class_embeddings(self, prompts: list[str]) -> np.ndarray:
        """Class prompt embeddings, cached per class list (LRU): the question, not the product,
        so they are never charged."""
        key = tuple(prompts)
        if key in self._class_cache:
            self._class_cache.move_to_end(key)
            return self._class_cache[key]
        loop = asyncio.get_running_loop()
        tokens = await loop.run_in_executor(self._cpu_pool, self.teacher.tokenize, prompts)
        rows, _ = await self.batcher.submit("text", list(tokens))
        self._class_cache[key] = rows
        while len(self._class_cache) > _CLASS_CACHE_SIZE:
            self._class_cache.popitem(last=False)
        return rows

    async def _metered(
        self, account: Account, produce: Produce, *, units: int, images: int, texts: int, fingerprint: str,
        idempotency_key: str | None,
    ) -> EmbedOutcome:
        """Debit, produce, settle: the one path every billable answer takes. A replay returns the
        stored body; any failure while producing (model, protection state, rendering) refunds."""
        debit = await self.meter.debit(
            account, units=units, images=images, texts=texts, fingerprint=fingerprint, idempotency_key=idempotency_key,
        )
        if isinstance(debit, Replay):
            self.metrics.replays.inc()
            return EmbedOutcome(body=debit.body, units_charged=0, units_remaining=debit.remaining, replayed=True)
        self.metrics.units.inc(units)
        return await self._run_and_settle(account, produce, debit, idempotency_key)

    async def _run_and_settle(
        self, account: Account, produce: Produce, debit: Debit, idempotency_key: str | None
    ) -> EmbedOutcome:
        try:
            body, timing = await produce(debit)
        except BaseException as exc:  # includes cancellation (client went away): refund, then re-raise
            await asyncio.shield(self._refund(account, debit, idempotency_key, reason=type(exc).__name__))
            if isinstance(exc, Exception) and not isinstance(exc, (InvalidRequest, MeteringUnavailable)):
                raise InferenceFailed("inference failed; the request was not charged") from exc
            raise
        # If the answer cannot be recorded as delivered, it is not served: the lease reaper refunds it.
        remaining = await self.meter.settle(account, debit, delivered=True, idempotency_key=idempotency_key, body=body)
        return EmbedOutcome(
            body=body, units_charged=debit.units, units_remaining=remaining, timing=timing,
            rate_remaining=debit.rate_remaining, rate_limit=debit.rate_limit, rate_reset_s=debit.rate_reset_s,
        )

    async def _refund(self, account: Account, debit: Debit, idempotency_key: str | None, *, reason: str) -> None:
        try:
            await self.meter.settle(account, debit, delivered=False, idempotency_key=idempotency_key, reason=reason)
            self.metrics.refunds.inc(debit.units)
        except MeteringUnavailable:
            pass  # Redis is down: the in-flight lease expires and the reaper refunds it

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


def _content_hash(item: str | ImageInput) -> str:
    """What deterministic noise is keyed on: the input's content and kind, not its position."""
    kind, payload = ("text", item) if isinstance(item, str) else ("image", item.image)
    return hashlib.sha256(kind.encode() + b"\x00" + payload.encode()).hexdigest()
