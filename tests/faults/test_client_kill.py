"""`client-distill` SIGKILLed at seeded random points of a run, then rerun with the same command:
the rerun finishes, and the total spend equals an uninterrupted run's.

This extends `test_client_distill.py::test_killed_client_resumes_without_paying_twice` (a kill
after a fixed number of settled purchases) to the other places a run can die:

- `buying`: after a seeded random number of settled purchases;
- `paid-not-cached`: while a purchase is reserved in the run's ledger but not settled, i.e. sent
  to the vendor, maybe charged, its answer maybe half-written to the cache: the rerun must get that
  batch replayed for free under the same Idempotency-Key, not buy it again;
- `training`: after every target was bought, while the students train (or are evaluated; the run
  writes `summary.json` last, and it must not exist yet): the rerun buys nothing.

A kill point is where the poll of the run's ledger saw the condition; the SIGKILL follows within
milliseconds, so `paid-not-cached` usually, not provably, lands before that purchase settles.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from client_distiller.cli import main
from tests.support.client import one_thread  # noqa: F401  (one_thread: autouse in this module)
from tests.support.client import PROMPTS, TRAIN_IMAGES, distill_argv

FULL = PROMPTS + TRAIN_IMAGES  # what an uninterrupted run with a budget above it spends


def _ledger_state(ledger: Path) -> tuple[int, int, int] | None:
    """(settled purchases, open reservations, units settled) of the run's training scope."""
    if not ledger.exists():
        return None
    try:
        with sqlite3.connect(ledger, timeout=0.05) as db:
            settled, units = db.execute("SELECT COUNT(*), COALESCE(SUM(charged), 0) FROM reservations "
                                        "WHERE state = 'settled' AND scope = 'train'").fetchone()
            open_ = db.execute("SELECT COUNT(*) FROM reservations WHERE state = 'open'").fetchone()[0]
            return settled, open_, units
    except sqlite3.OperationalError:
        return None


def _after_settled(k: int) -> Callable[[tuple[int, int, int]], bool]:
    return lambda s: s[0] >= k


def _while_open(k: int) -> Callable[[tuple[int, int, int]], bool]:
    return lambda s: s[0] >= k and s[1] > 0


def _all_bought(_: int) -> Callable[[tuple[int, int, int]], bool]:
    return lambda s: s[2] >= FULL and s[1] == 0


KILL_POINTS = {"buying": (_after_settled, 2), "paid-not-cached": (_while_open, 2), "training": (_all_bought, 60)}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_client_killed_anywhere_reruns_to_the_same_total_spend(vendor, tiny_bench, tmp_path, point):
    rng = random.Random(f"kill-{point}")  # seeded: the same "random" point on every run
    when, steps = KILL_POINTS[point]
    condition = when(rng.randint(5, 40))
    key = vendor.create_key(quota=10_000)
    args = distill_argv(vendor, key, tiny_bench, tmp_path / "run", tmp_path / "cache", FULL + 100)
    args[args.index("--steps") + 1] = str(steps)
    env = {**os.environ, "CLIENT_REQUEST_BATCH": "4", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "client_distiller.cli", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = tmp_path / "run" / "ledger.sqlite"
    deadline = time.monotonic() + 120
    try:
        while not ((state := _ledger_state(ledger)) and condition(state)):
            assert process.poll() is None, f"the client finished before it was killed ({point})"
            assert time.monotonic() < deadline, f"never reached the kill point {point}"
            time.sleep(0.002)
        if point == "training":
            time.sleep(rng.uniform(0.0, 0.2))  # somewhere in training (60 steps a stage)
        assert process.poll() is None, f"the client finished before it was killed ({point})"
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    partial = vendor.account().spent
    assert not (tmp_path / "run" / "summary.json").exists()  # it really died before the end
    assert (0 < partial < FULL) if point != "training" else partial == FULL
    assert main(args) == 0
    assert vendor.account().spent == FULL  # the same total as an uninterrupted run
    assert (tmp_path / "run" / "summary.json").exists() and (tmp_path / "run" / "results.jsonl").exists()
