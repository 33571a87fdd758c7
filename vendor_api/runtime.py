"""Start-up wiring shared by `vendor-api serve`, `vendor-admin` and the benchmarks:
which teacher to load and which Redis to meter against."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Iterator

from .embedded_redis import EmbeddedRedis
from .redis_client import as_cluster_url
from .settings import VendorSettings

if TYPE_CHECKING:  # torch is imported only by commands that load a model, not by vendor-admin
    from .teacher import Teacher

log = logging.getLogger(__name__)


def teacher_spec(settings: VendorSettings, *, show_progress: bool = True) -> str:
    """`VENDOR_TEACHER`, or the offline demo teacher (built once into the data dir, then reused)."""
    if settings.teacher:
        return settings.teacher
    from .demo_teacher import ensure_demo_teacher

    log.info("VENDOR_TEACHER is unset: using the offline demo teacher in %s", settings.demo_teacher_dir)
    return f"local-dir:{ensure_demo_teacher(settings.demo_teacher_dir, show_progress=show_progress)}"


def load_teacher(settings: VendorSettings, *, show_progress: bool = True) -> "Teacher":
    from .teacher import Teacher

    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    return Teacher.load(
        teacher_spec(settings, show_progress=show_progress),
        device=settings.device,
        precision=settings.precision,
        model_config_dir=settings.model_config_dir,
        model_id=settings.model_name,
    )


@contextlib.contextmanager
def redis_url(settings: VendorSettings) -> Iterator[str]:
    """The configured Redis, or an embedded one in the data dir for as long as the block runs.
    With `VENDOR_REDIS_CLUSTER=true` the URL is turned into its `redis+cluster://` form, so every
    consumer (server, admin, benchmarks) picks the cluster client from the URL alone."""
    if settings.redis_url:
        yield as_cluster_url(settings.redis_url) if settings.redis_cluster else settings.redis_url
        return
    if settings.redis_cluster:
        raise ValueError("VENDOR_REDIS_CLUSTER=true needs REDIS_URL (a seed node of the cluster)")
    embedded = EmbeddedRedis(settings.embedded_redis_dir)
    url = embedded.start()
    log.info("REDIS_URL is unset: metering against an embedded Redis at %s", url)
    try:
        yield url
    finally:
        embedded.stop()
