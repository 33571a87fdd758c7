"""One ledger entry as a billing event: CloudEvents 1.0 JSON (what OpenMeter ingests, and what
maps one-to-one onto Lago's and Stripe's usage events) or a CSV row.

Why these fields: a billing system needs to deduplicate (a stable `id`), to know whose usage it
is (`subject` = the key's name, the customer-facing handle; never the API key), when (`time`,
from the entry's Redis stream id, i.e. Redis' clock when the script ran), what kind (`type`),
and how much (`data.units`, and `data.net_units`, the entry's effect on the key's spend:
+units for a debit, -units for a refund, 0 otherwise, so one SUM meter bills exactly `spent`).

The `id` is `<first 32 hex of the key's digest>-<stream id>`: stream ids are unique and
increasing within one account's ledger for its whole life (trimming keeps the last id), so the
same entry always gets the same id, and two entries never share one.

Mapping for other systems: Lago `transaction_id` = `id`, `external_subscription_id` = `subject`,
`code` = `type`, `timestamp` = `time`, `properties` = `data`; Stripe meter events:
`identifier` = `id`, `event_name` = `type`, `payload.value` = `data.net_units`.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone

EVENT_KINDS = ("create", "debit", "refund", "replay", "top_up", "revoke")
CSV_COLUMNS = ("id", "source", "type", "subject", "time", "event", "units", "net_units", "items", "images",
               "texts", "request_id", "idempotency", "reason")
ID_DIGEST_CHARS = 32


@dataclass(frozen=True)
class LedgerEntry:
    """One entry of one account's ledger stream, as Redis returned it."""

    digest: str
    name: str
    stream_id: str
    fields: dict[str, str]

    @property
    def event_id(self) -> str:
        return f"{self.digest[:ID_DIGEST_CHARS]}-{self.stream_id}"

    @property
    def kind(self) -> str:
        return self.fields.get("event", "unknown")

    @property
    def time(self) -> str:
        """RFC 3339, UTC, milliseconds: the stream id's first part is Redis' clock in ms."""
        ms = int(self.stream_id.split("-", 1)[0])
        return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"

    @property
    def units(self) -> int:
        return int(self.fields.get("units", "0"))

    @property
    def net_units(self) -> int:
        return {"debit": self.units, "refund": -self.units}.get(self.kind, 0)

    def _count(self, field: str) -> int | None:
        raw = self.fields.get(field)
        return int(raw) if raw is not None else None

    @property
    def items(self) -> int | None:
        """Images + texts of a debit. None where the entry does not record them: refunds (their
        items are those of the debit with the same request id), replays (free; the stored answer
        is served again) and a re-debit after a lease expired (`reason`), which records 0 and 0."""
        images, texts = self._count("images"), self._count("texts")
        if images is None or texts is None or self.fields.get("reason") == "redebit_after_lease_expired":
            return None
        return images + texts

    def data(self) -> dict[str, object]:
        return {
            "event": self.kind,
            "units": self.units,
            "net_units": self.net_units,
            "items": self.items,
            "images": None if self.items is None else self._count("images"),
            "texts": None if self.items is None else self._count("texts"),
            "request_id": self.fields.get("request_id") or None,
            "idempotency": self.fields.get("idempotency") or None,
            "reason": self.fields.get("reason") or None,
        }

    def cloudevent(self, source: str, type_prefix: str) -> dict[str, object]:
        return {"specversion": "1.0", "id": self.event_id, "source": source, "type": f"{type_prefix}.{self.kind}",
                "subject": self.name, "time": self.time, "datacontenttype": "application/json", "data": self.data()}


def format_cloudevents(entries: list[LedgerEntry], source: str, type_prefix: str) -> str:
    """JSON lines, one CloudEvent each (OpenMeter's batch ingest takes them as they are)."""
    return "".join(json.dumps(e.cloudevent(source, type_prefix), separators=(",", ":")) + "\n" for e in entries)


def csv_header() -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(CSV_COLUMNS)
    return buffer.getvalue()


def format_csv(entries: list[LedgerEntry], source: str, type_prefix: str) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for e in entries:
        event = e.cloudevent(source, type_prefix)
        data = event["data"]
        assert isinstance(data, dict)
        writer.writerow([event["id"], source, event["type"], e.name, event["time"],
                         *("" if data[c] is None else data[c] for c in CSV_COLUMNS[5:])])
    return buffer.getvalue()


def event_id_of_line(line: str, fmt: str) -> str | None:
    """The `id` of one written line (None for the CSV header or a line that is not an event)."""
    if fmt == "cloudevents":
        try:
            value = json.loads(line).get("id")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None
    first = next(csv.reader([line]), [""])[0]
    return None if first == "id" else first or None


def split_event_id(event_id: str) -> tuple[str, str]:
    """(digest prefix, stream id) of an event id."""
    prefix, _, stream_id = event_id.partition("-")
    if len(prefix) != ID_DIGEST_CHARS or "-" not in stream_id:
        raise ValueError(f"{event_id!r} is not a ledger event id")
    return prefix, stream_id
