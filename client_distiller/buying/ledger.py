"""The client's budget ledger (SQLite): the budget is a hard ceiling, whatever happens.

Every paid request is *reserved* here before it is sent, under its Idempotency-Key, and
*settled* with the units the vendor reports. Spend is counted conservatively as
settled charges + open reservations, so a timeout, a crash or a kill between sending and hearing
back can only make the client stop early, never overspend. A reservation left open by a crash
is settled when the same batch is asked for again (same content, same key: the vendor replays
the stored answer and charges nothing new).
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from client_distiller.errors import RunError


class BudgetExhausted(RunError):
    """The next request would take spend past the budget; nothing was sent."""

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(f"the next request costs {needed} units but only {available} of the budget remain")
        self.needed = needed
        self.available = available


@dataclass(frozen=True)
class Reservation:
    idempotency_key: str
    units: int
    state: str
    charged: int | None
    item_keys: bytes = b""  # the batch's cache keys, concatenated, so a lost batch can be re-sent exactly


_SCHEMA = """
CREATE TABLE IF NOT EXISTS reservations (
    scope TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    units INTEGER NOT NULL,
    charged INTEGER,
    state TEXT NOT NULL CHECK (state IN ('open', 'settled', 'released')),
    items INTEGER NOT NULL,
    created_at REAL NOT NULL,
    settled_at REAL,
    vendor_remaining INTEGER,
    item_keys BLOB NOT NULL DEFAULT x'',
    PRIMARY KEY (scope, idempotency_key)
);
"""


class Ledger:
    """Reservations per *scope* (e.g. one run's training purchases); budgets apply per scope."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def committed(self, scope: str) -> int:
        """Units counted against the budget: settled charges plus open reservations."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(CASE state WHEN 'settled' THEN charged WHEN 'open' THEN units ELSE 0 END), 0) "
            "FROM reservations WHERE scope = ?", (scope,)).fetchone()
        return int(row[0])

    def settled(self, scope: str) -> int:
        row = self._db.execute("SELECT COALESCE(SUM(charged), 0) FROM reservations WHERE scope = ? AND state = 'settled'",
                               (scope,)).fetchone()
        return int(row[0])

    def reserve(self, scope: str, idempotency_key: str, units: int, items: int, budget: int,
                item_keys: bytes = b"") -> Reservation:
        """Reserve `units` under `budget`, or raise `BudgetExhausted` without sending anything.

        Re-reserving an open key (the retry of a batch whose answer was lost) costs nothing new:
        its units are already counted."""
        with self._transaction() as db:
            prior = db.execute("SELECT units, state, item_keys FROM reservations WHERE scope = ? AND idempotency_key = ?",
                               (scope, idempotency_key)).fetchone()
            if prior is not None and prior[1] == "open":
                return Reservation(idempotency_key, prior[0], "open", None, prior[2])
            committed = self.committed(scope)
            if committed + units > budget:
                raise BudgetExhausted(units, max(0, budget - committed))
            db.execute(
                "INSERT OR REPLACE INTO reservations (scope, idempotency_key, units, charged, state, items, created_at, "
                "item_keys) VALUES (?, ?, ?, NULL, 'open', ?, ?, ?)",
                (scope, idempotency_key, units, items, time.time(), item_keys))
        return Reservation(idempotency_key, units, "open", None, item_keys)

    def settle(self, scope: str, idempotency_key: str, charged: int, vendor_remaining: int | None = None) -> None:
        """Record what the vendor actually charged for this batch (its own count, not ours)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE reservations SET state = 'settled', charged = ?, settled_at = ?, vendor_remaining = ? "
                "WHERE scope = ? AND idempotency_key = ? AND state = 'open'",
                (charged, time.time(), vendor_remaining, scope, idempotency_key))

    def release(self, scope: str, idempotency_key: str) -> None:
        """The vendor certainly did not charge (a 4xx refusal): free the reservation."""
        with self._transaction() as db:
            db.execute("UPDATE reservations SET state = 'released', charged = 0, settled_at = ? "
                       "WHERE scope = ? AND idempotency_key = ? AND state = 'open'", (time.time(), scope, idempotency_key))

    def open_reservations(self, scope: str) -> list[Reservation]:
        rows = self._db.execute("SELECT idempotency_key, units, state, charged, item_keys FROM reservations "
                                "WHERE scope = ? AND state = 'open' ORDER BY created_at", (scope,)).fetchall()
        return [Reservation(*row) for row in rows]

    def close(self) -> None:
        self._db.close()
