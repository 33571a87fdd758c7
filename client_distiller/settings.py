"""Client configuration: command-line flags override `CLIENT_*` environment variables, which
override these defaults. One object, passed explicitly."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLIENT_", env_file=None, extra="ignore")

    vendor_url: str | None = Field(default=None, description="Base URL of the vendor API")
    api_key: SecretStr | None = Field(default=None, description="Vendor API key (vk-...)")
    budget: int = Field(default=100_000, ge=0, description="Hard ceiling on units spent for training targets")
    eval_budget: int = Field(default=0, ge=0, description="Separate ceiling for the teacher zero-shot row")
    cache_dir: Path = Field(default=Path("var/client-cache"), description="Content-addressed embedding cache")
    request_batch: int = Field(default=64, ge=1, le=256, description="Inputs per vendor request")
    timeout_s: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=8, ge=1)
    selection: str = Field(default="balanced", description="Which images to buy when the budget is short")
