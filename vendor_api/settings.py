"""All vendor configuration in one pydantic-settings class (environment variables `VENDOR_*`).

One object, read once at start-up, passed explicitly: the engine, the meter and the HTTP layer
never read the environment themselves, so tests build a server from a `VendorSettings(...)`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class VendorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VENDOR_", env_file=None, extra="ignore")

    # --- teacher
    teacher: str | None = Field(
        default=None,
        description="open_clip spec: MODEL:TAG, MODEL:/path/weights.safetensors, or "
        "local-dir:/path. Unset: the offline demo teacher, built on first start.",
    )
    model_config_dir: Path | None = Field(
        default=None, description="Extra open_clip model config JSON files (custom architectures)."
    )
    model_name: str | None = Field(default=None, description="Model id shown to clients.")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    precision: str = Field(default="auto", description="auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16")
    torch_threads: int | None = Field(default=None, ge=1)

    # --- storage
    data_dir: Path = Field(default=Path("var/vendor"), description="Embedded Redis data, demo teacher.")
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "VENDOR_REDIS_URL"),
        description="Redis to meter against; unset: an embedded Redis in data_dir.",
    )
    redis_timeout_s: float = Field(default=2.0, gt=0)
    redis_cluster: bool = Field(
        default=False,
        description="REDIS_URL names a Redis Cluster seed node (same as a redis+cluster:// URL).",
    )

    # --- prices and default limits for new keys
    price_per_image: int = Field(default=1, ge=0)
    price_per_text: int = Field(default=1, ge=0)
    default_rate_per_s: float = Field(default=50.0, gt=0)
    default_burst: int = Field(default=100, ge=1)
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=60)
    idempotency_max_bytes_per_key: int = Field(
        default=1024 * 1024 * 1024, ge=0,
        description="Bytes of stored answers one key may hold for Idempotency-Key replays; when full, a "
        "request with a new Idempotency-Key is 429 idempotency_store_full (free) until the oldest expires. "
        "0: no bound (the TTL alone).",
    )

    # --- request limits
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    max_items_per_request: int = Field(default=256, ge=1)
    max_text_chars: int = Field(default=2000, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=64)
    max_image_side: int = Field(default=8192, ge=8)
    min_image_side: int = Field(default=8, ge=1)

    # --- batching
    max_batch_size: int = Field(default=32, ge=1)
    max_wait_ms: float = Field(default=5.0, ge=0)
    max_queue_items: int = Field(default=2048, ge=1)
    preprocess_workers: int = Field(default=2, ge=1)
    retry_after_s: int = Field(default=1, ge=1)

    # --- admin and secrets
    admin_secret: SecretStr | None = Field(
        default=None, description="Bearer secret for /admin routes; unset: admin routes disabled."
    )
    protection_secret: SecretStr | None = Field(
        default=None,
        description="Seeds every per-key protection transform (noise, rotate, b4b, watermark). Unset: "
        "generated once and kept in data_dir/protection-secret (0600). Replicas must share it.",
    )
    watermark_calibration_dir: Path | None = Field(
        default=None,
        description="Representative images the watermark trigger is calibrated on (so ~10% of real "
        "inputs trigger); unset: a built-in synthetic set.",
    )

    # --- server
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: str = "info"

    # --- key guessing and crashed requests (appended by issue 7)
    auth_max_failures: int = Field(
        default=20, ge=0,
        description="Failed authentications per client address per window before it gets 429; 0 disables.",
    )
    auth_failure_window_s: int = Field(default=60, ge=1, description="Window of auth_max_failures, seconds.")
    inflight_lease_s: int = Field(
        default=60, ge=1,
        description="A debit whose lease is not renewed for this many seconds (its replica died) is refunded "
        "by the reaper. A live request renews its own lease every third of it, so it may run longer.",
    )

    # --- protection under attack (issue 13)
    classify_max_top_k: int = Field(
        default=5, ge=1, le=1000,
        description="Most classes per image /v1/classifications returns to an embedding-mode key "
        "(a probabilities:K key gets its own K).",
    )
    classify_decimals: int = Field(
        default=3, ge=0, le=17,
        description="Decimals every class probability is rounded to, so probabilities do not invert "
        "to the embedding (17 = full float precision).",
    )
    classify_lists_per_image: int = Field(
        default=2, ge=0,
        description="Distinct class lists one key may ask of one image (what the model sees) within "
        "VENDOR_OVERLAP_TTL_S; asking a list again is free of this limit. Many small lists of one image "
        "invert to its embedding (25 lists: centred cos 0.98 in the attack harness, 2: 0.79). 0 = no limit.",
    )
    overlap_detection: bool = Field(
        default=True, description="Record which keys query the same model input, for vendor-admin suspects.")
    overlap_ttl_s: int = Field(default=30 * 24 * 3600, ge=60, description="How long one input's keys are kept.")
    overlap_max_keys: int = Field(
        default=8, ge=2,
        description="An input queried through more keys than this is common (a public prompt), not evidence.",
    )
    overlap_min_shared: int = Field(
        default=20, ge=1, description="Score (of one modality) from which a key pair is a suspect: shared "
        "inputs, each worth 1 / (keys that asked for it - 1), so honest keys asking the same popular "
        "inputs are not flagged.")

    # --- hardening (issue 12)
    trusted_proxies: str = Field(
        default="",
        description="Comma-separated addresses or CIDR networks of reverse proxies whose X-Forwarded-For "
        "is believed; empty (default): the peer address is the client, and forwarded headers are ignored.",
    )
    class_prompts_per_image: int = Field(
        default=8, ge=1,
        description="New class prompts one paid image buys encoding of in /v1/classifications (a CLIP text "
        "encoding costs about a seventh of an image's); prompts already cached are free.",
    )
    ready_probe_interval_s: float = Field(
        default=5.0, gt=0,
        description="/readyz runs a model probe at most this often, and only when no batch succeeded lately.",
    )
    metrics_public: bool = Field(default=True, description="Serve /metrics on the public port.")
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Also serve /metrics on this port of VENDOR_HOST (e.g. for a "
        "scraper on a private network); unset: no separate port.")

    @field_validator("teacher", "redis_url", "model_name", "model_config_dir", "torch_threads", "admin_secret",
                     "protection_secret", "watermark_calibration_dir", "metrics_port", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        """docker-compose passes `VAR=` for unset optionals; treat it as not given."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_parse(cls, value: str) -> str:
        """A typo here must stop the server, not silently trust (or ignore) a proxy."""
        import ipaddress

        for part in value.split(","):
            if part.strip():
                ipaddress.ip_network(part.strip(), strict=False)
        return value

    @property
    def demo_teacher_dir(self) -> Path:
        return self.data_dir / "demo-teacher"

    @property
    def embedded_redis_dir(self) -> Path:
        return self.data_dir / "redis"
