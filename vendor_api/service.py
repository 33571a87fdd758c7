"""The embedding service: validate, decode, meter, batch, protect, answer.

Independent of HTTP (routes in `app.py` only translate), so the whole metered path can be
driven and benchmarked in-process. Order matters and is deliberate:
validate and decode everything first (bad input costs nothing), reserve queue room (a full
server refuses before charging), debit in one atomic script, run the model, then settle:
deliver (and store the answer for idempotent replay) or refund.
"""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from shared import codec
from shared.hashing import fingerprint_json
from shared.protocol import (
    EmbeddingItem,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ErrorCode,
    ImageInput,
    ModelCard,
)

from .batcher import BatchTiming, DynamicBatcher
from .errors import InferenceFailed, InvalidRequest, MeteringUnavailable, NotFound
from .images import ImageLimits, decode_image
from .metering import Account, Debit, Meter, Replay
from .metrics import VendorMetrics
from .protection import ProtectionContext, parse_protection
from .settings import VendorSettings
from .teacher import Teacher


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

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self._cpu_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ descriptions
    def model_card(self, account: Account) -> ModelCard:
        return ModelCard(
            id=self.teacher.model_id,
            created=0,
            owned_by="vendor",
            embedding_dim=self.teacher.embed_dim,
            image_size=self.teacher.image_size,
            context_length=self.teacher.context_length,
            price_per_image=self.settings.price_per_image,
            price_per_text=self.settings.price_per_text,
            logit_scale=round(self.teacher.logit_scale, 4),
            protection=account.protection,
        )

    # ------------------------------------------------------------------ the metered path
    async def embed(self, account: Account, request: EmbeddingRequest, idempotency_key: str | None) -> EmbedOutcome:
        self._check_request(request)
        items = request.items()
        with self.batcher.reserve(len(items), retry_after_s=self.settings.retry_after_s):
            prepared = await self._prepare(items)
            units = (len(prepared.image_slots) * self.settings.price_per_image
                     + len(prepared.text_slots) * self.settings.price_per_text)
            fingerprint = fingerprint_json(request.model_dump(mode="json"))
            debit = await self.meter.debit(
                account, units=units, images=len(prepared.image_slots), texts=len(prepared.text_slots),
                fingerprint=fingerprint, idempotency_key=idempotency_key,
            )
            if isinstance(debit, Replay):
                self.metrics.replays.inc()
                return EmbedOutcome(body=debit.body, units_charged=0, units_remaining=debit.remaining, replayed=True)
            self.metrics.units.inc(units)
            return await self._run_and_settle(account, request, prepared, debit, idempotency_key)

    async def _run_and_settle(
        self, account: Account, request: EmbeddingRequest, prepared: _Prepared, debit: Debit, idempotency_key: str | None
    ) -> EmbedOutcome:
        try:
            rows, timing = await self._infer(prepared)
            mode = parse_protection(account.protection)
            rows = mode.apply(rows, ProtectionContext(account.digest, prepared.input_hashes))
            body = self._render(request, rows, prepared, debit)
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
    def _check_request(self, request: EmbeddingRequest) -> None:
        if request.model != self.teacher.model_id:
            raise NotFound(
                f"model {request.model!r} is not served here; this vendor serves {self.teacher.model_id!r}",
                code=ErrorCode.UNKNOWN_MODEL, param="model",
            )
        if request.dimensions is not None and request.dimensions != self.teacher.embed_dim:
            raise InvalidRequest(
                f"dimensions must be {self.teacher.embed_dim} for this model", param="dimensions"
            )
        count = len(request.items())
        if count == 0:
            raise InvalidRequest("input is empty", code=ErrorCode.EMPTY_INPUT, param="input")
        if count > self.settings.max_items_per_request:
            raise InvalidRequest(
                f"{count} inputs; at most {self.settings.max_items_per_request} per request",
                code=ErrorCode.TOO_MANY_INPUTS, param="input",
            )

    async def _prepare(self, items: list[str | ImageInput]) -> _Prepared:
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
        hashes = [
            hashlib.sha256(item.encode() if isinstance(item, str) else item.image.encode()).hexdigest()
            for item in items
        ]
        return _Prepared(image_slots, list(results), text_slots, tokens, prompt_tokens, hashes)  # type: ignore[arg-type]

    def _prepare_image(self, payload: str, param: str) -> torch.Tensor:
        image = decode_image(payload, self.limits, param=param)
        return self.teacher.preprocess(image)

    def _check_texts(self, texts: list[str], slots: list[int]) -> int:
        total = 0
        for text, slot in zip(texts, slots):
            param = f"input[{slot}]"
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
