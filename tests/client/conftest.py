"""The client's tests: buying (cache, ledger, purchaser, policy), training (loop, methods,
students, recipe, DDP), the commands (distill, compare, experiment) and the deployed student,
against a real vendor on 127.0.0.1 where they buy. Fixtures: the shared vendor and Redis ones of
``tests/conftest.py``, and the tiny offline benchmark, tiny seeded CLIP and its targets of
:mod:`tests.support.client` (``one_thread``, autouse, stays a per-module import)."""

from tests.support.client import bench_targets, tiny_bench, tiny_clip  # noqa: F401  (fixtures)
