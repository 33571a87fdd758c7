"""Many concurrent clients spending keys down to their last unit: the workload behind every
"served == charged == ledger == quota" test (replicas on one Redis, replicas on a Redis Cluster).

Each client thread asks through one replica (round robin) with one key, in random-size requests
of made-up texts; a 402 turns it to single-item requests, and a 402 on a single item (not even one
unit left) ends it. Anything but 200 or 402 fails the test at once.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


@dataclass
class Drained:
    """Per key name: items served and units charged (``x-units-charged``); every status seen."""

    served: dict[str, int] = field(default_factory=dict)
    charged: dict[str, int] = field(default_factory=dict)
    statuses: list[int] = field(default_factory=list)


def drain_quotas(replicas: Sequence[Any], key_of: Callable[[int], tuple[str, str]], *, clients: int,
                 max_size: int) -> Drained:
    """Run ``clients`` threads until every key they use is spent; ``key_of(i)`` is client i's
    (key name, API key)."""
    result, lock = Drained(), threading.Lock()

    def client_loop(client_id: int) -> None:
        vendor = replicas[client_id % len(replicas)]
        name, api_key = key_of(client_id)
        rng = random.Random(client_id)
        size = rng.randint(1, max_size)
        with vendor.client(api_key) as client:
            while True:
                body = {"model": vendor.model_id, "input": [f"c{client_id} {rng.random()}" for _ in range(size)]}
                r = client.post("/v1/embeddings", json=body)
                with lock:
                    result.statuses.append(r.status_code)
                    if r.status_code == 200:
                        result.served[name] = result.served.get(name, 0) + len(r.json()["data"])
                        result.charged[name] = result.charged.get(name, 0) + int(r.headers["x-units-charged"])
                if r.status_code == 402:
                    if size == 1:
                        return  # not even one unit left
                    size = 1
                else:
                    assert r.status_code == 200, r.text
                    size = rng.randint(1, max_size) if size > 1 else 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    return result
