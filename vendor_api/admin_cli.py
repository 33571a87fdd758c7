"""`vendor-admin`: manage API keys against the same Redis the server meters with.

Each subcommand is one entry of `COMMANDS` (name -> arguments + handler). Output is plain text
for people; `create-key` prints the new key alone on the last line so scripts can take
`| tail -n1`. Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from pydantic import ValidationError

from .accounts import Account
from .errors import VendorError
from .key_admin import KeyAdmin
from .protection import read_teacher_dim, validate_protection
from .runtime import redis_url
from .settings import VendorSettings

Handler = Callable[[argparse.Namespace, KeyAdmin, VendorSettings], Awaitable[None]]


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Handler | None = None  # None: a command that needs no Redis (handled by `offline`)
    offline: Callable[[argparse.Namespace, VendorSettings], None] | None = None


def _describe(account: Account) -> str:
    state = "active" if account.active else "revoked"
    return (f"{account.name}: quota={account.quota} spent={account.spent} remaining={account.remaining} "
            f"rate={account.rate_per_s:g}/s burst={account.burst} protection={account.protection} {state}")


async def _check_mode(keys: KeyAdmin, spec: str) -> None:
    """Parse the spec; also check it against the teacher's size once a vendor has recorded it."""
    validate_protection(spec, await read_teacher_dim(keys.redis))


async def _create_key(args: argparse.Namespace, keys: KeyAdmin, settings: VendorSettings) -> None:
    await _check_mode(keys, args.protection)
    api_key, account = await keys.create_key(
        args.name, quota=args.quota, rate_per_s=args.rate_per_s or settings.default_rate_per_s,
        burst=args.burst or settings.default_burst, protection=args.protection,
    )
    print(_describe(account))
    print("The key is shown once; store it now:")
    print(api_key)


async def _list(args: argparse.Namespace, keys: KeyAdmin, settings: VendorSettings) -> None:
    accounts = await keys.list_accounts()
    if not accounts:
        print("no keys")
    for account in accounts:
        print(_describe(account))


async def _usage(args: argparse.Namespace, keys: KeyAdmin, settings: VendorSettings) -> None:
    print(_describe(await keys.get_account(args.name)))


async def _top_up(args: argparse.Namespace, keys: KeyAdmin, settings: VendorSettings) -> None:
    print(_describe(await keys.top_up(args.name, args.units)))


async def _revoke(args: argparse.Namespace, keys: KeyAdmin, settings: VendorSettings) -> None:
    print(_describe(await keys.revoke(args.name)))


async def _trace_watermark(args: argparse.Namespace, keys: KeyAdmin, settings: VendorSettings) -> None:
    from .watermark_check import trace_watermark

    trace = await trace_watermark(keys, settings, probe=args.probe, suspect=args.suspect, alpha=args.alpha)
    if args.json:
        print(json.dumps(trace.to_json()))
        return
    print(f"{len(trace.verdicts)} keys tested; detection at p < {args.alpha:g} / {len(trace.verdicts)} = "
          f"{trace.threshold:.3g} (family-wise error rate {args.alpha:g})")
    for verdict in trace.verdicts[: args.limit]:
        print(f"{verdict.name}: p-value={verdict.report.p_value:.3g} "
              f"{'DETECTED' if verdict.detected else 'not detected'} (protection={verdict.protection}, "
              f"directions tested={verdict.report.directions_tested})")
    found = ", ".join(v.name for v in trace.detected)
    print(f"detected: {found}" if found else "detected: none")


async def _set_protection(args: argparse.Namespace, keys: KeyAdmin, settings: VendorSettings) -> None:
    await _check_mode(keys, args.mode)
    print(_describe(await keys.set_protection(args.name, args.mode)))


async def _verify_watermark(args: argparse.Namespace, keys: KeyAdmin, settings: VendorSettings) -> None:
    from .watermark_check import verify_key_watermark

    report = await verify_key_watermark(keys, settings, args.name, probe=args.probe, suspect=args.suspect)
    if args.json:
        print(json.dumps(report.to_json()))
        return
    print(f"{args.name}: p-value={report.p_value:.3g} ({'DETECTED' if report.detected else 'not detected'} "
          f"at alpha={report.alpha:g}); triggered probes={report.triggered} untriggered={report.untriggered}; "
          f"mean cos to target triggered={report.mean_cos_triggered:.4f} untriggered={report.mean_cos_untriggered:.4f}; "
          f"directions tested={report.directions_tested}"
          + (" (inconclusive: no probe falls in the key's trigger regions; use probes like its traffic)"
             if report.inconclusive else ""))


async def suspect_rows(keys: KeyAdmin, settings: VendorSettings, *, min_images: float | None,
                       min_texts: float | None) -> list[dict[str, Any]]:
    """Key pairs that asked for the same model inputs (see `protection.overlap`), by key name:
    what `vendor-admin suspects --json` prints; a function so that the attack harness asks the
    vendor's Redis in-process rather than starting a CLI per check."""
    from .protection.overlap import OverlapDetector

    detector = OverlapDetector(keys.redis, ttl_s=settings.overlap_ttl_s, max_keys=settings.overlap_max_keys,
                               min_shared=settings.overlap_min_shared)
    pairs = await detector.suspects(min_images=min_images, min_texts=min_texts)
    names = {account.digest: account.name for account in await keys.list_accounts()}
    return [{"key_a": names.get(p.digest_a, p.digest_a[:12]), "key_b": names.get(p.digest_b, p.digest_b[:12]),
             "shared_images": p.shared_images, "shared_texts": p.shared_texts,
             "near_images": p.near_images, "near_texts": p.near_texts,
             "score_images": p.score_images, "score_texts": p.score_texts,
             "near_score_images": p.near_score_images, "near_score_texts": p.near_score_texts} for p in pairs]


async def _suspects(args: argparse.Namespace, keys: KeyAdmin, settings: VendorSettings) -> None:
    rows = await suspect_rows(keys, settings, min_images=args.min_shared, min_texts=args.min_shared_texts)
    if args.json:
        print(json.dumps(rows))
        return
    for row in rows:
        print(f"{row['key_a']} <-> {row['key_b']}: image score={max(row['score_images'], row['near_score_images']):g} "
              f"(shared images={row['shared_images']}, near-duplicates={row['near_images']}), "
              f"text score={max(row['score_texts'], row['near_score_texts']):g} (shared texts={row['shared_texts']}, "
              f"near-duplicates={row['near_texts']})")
    if not rows:
        print("no suspect key pairs")


async def _ledger(args: argparse.Namespace, keys: KeyAdmin, settings: VendorSettings) -> None:
    for event in await keys.ledger(args.name, count=args.limit):
        print(" ".join(f"{k}={v}" for k, v in event.items()))


async def _export_ledger(args: argparse.Namespace, keys: KeyAdmin, settings: VendorSettings) -> None:
    """Every ledger entry once, to stdout or a file, as CloudEvents JSON lines or CSV
    (`vendor_api/ledger_export.py`). The events go to stdout; the summary to stderr."""
    from .ledger_export import ExportOptions, FileSink, LedgerExporter, StreamSink

    options = ExportOptions(consumer=args.consumer, fmt=args.format, source=args.source,
                            type_prefix=args.type_prefix, trim=args.trim, since=args.since,
                            batch=args.batch, lock_ttl_s=args.lock_ttl, interval_s=args.interval).validate()
    sink = FileSink(args.out, options.fmt) if args.out else StreamSink(sys.stdout, options.fmt)
    exporter = LedgerExporter(keys.redis, sink, options)
    await exporter.acquire()
    try:
        await exporter.resume_from_sink()
        if args.follow:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)  # stop after the current pass, cursors committed
            await exporter.follow(stop)
        else:
            await exporter.export_once()
    finally:
        await exporter.release()
        if isinstance(sink, FileSink):
            sink.close()
    print(f"exported {exporter.exported} ledger events for consumer {options.consumer!r}"
          + (f"; trimmed {exporter.trimmed} exported entries" if options.trim else ""), file=sys.stderr)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", metavar="CURSOR",
                   help="backfill from here, without the stored cursor: a ledger cursor MS-SEQ (exclusive), 0 "
                        "(all still in Redis), epoch milliseconds or an ISO 8601 time (inclusive)")
    p.add_argument("--format", choices=("cloudevents", "csv"), default="cloudevents")
    p.add_argument("--out", type=Path, help="append to this file (fsynced per batch; resumes exactly); default stdout")
    p.add_argument("--follow", action="store_true", help="keep exporting new events until SIGTERM/SIGINT")
    p.add_argument("--interval", type=_positive_float, default=5.0, help="seconds between passes with --follow")
    p.add_argument("--trim", action="store_true", help="remove entries every consumer has exported (XTRIM MINID)")
    p.add_argument("--consumer", default="billing", help="the cursor's name: one per billing sink")
    p.add_argument("--source", default="vendor-api", help="CloudEvents source of every event")
    p.add_argument("--type-prefix", default="vendor.ledger", help="CloudEvents type = PREFIX.EVENT")
    p.add_argument("--batch", type=_positive_int, default=1000, help="entries per read, write and commit")
    p.add_argument("--lock-ttl", type=_positive_float, default=30.0,
                   help="seconds after which a dead exporter's lock lapses (a second exporter is refused until then)")


def _build_demo_teacher(args: argparse.Namespace, settings: VendorSettings) -> None:
    from .demo_teacher import build_demo_teacher

    report = build_demo_teacher(args.out, seed=args.seed, size=args.size, show_progress=True)
    print(report)
    print(f"local-dir:{Path(args.out).resolve()}")


def _check_protection(args: argparse.Namespace, settings: VendorSettings) -> None:
    """Parse specs without touching Redis or a model: lets tools (the client's experiment runner)
    refuse a bad mode before they spend minutes starting a vendor."""
    from .protection import parse_protection

    normalised = [parse_protection(spec).spec() for spec in args.specs]  # all checked before any output
    print("\n".join(normalised))


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _name(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")


COMMANDS: dict[str, Command] = {
    "create-key": Command(
        "create an API key (printed once, on the last line)",
        lambda p: (p.add_argument("--name", required=True), p.add_argument("--quota", type=_non_negative_int, required=True),
                   p.add_argument("--rate-per-s", type=float), p.add_argument("--burst", type=_positive_int),
                   p.add_argument("--protection", default="none")),
        _create_key,
    ),
    "list": Command("list keys and their balances", lambda p: None, _list),
    "usage": Command("show one key's quota and spend", _name, _usage),
    "top-up": Command("add units to a key's quota",
                      lambda p: (p.add_argument("name"), p.add_argument("units", type=_positive_int)), _top_up),
    "revoke": Command("revoke a key (its ledger is kept)", _name, _revoke),
    "set-protection": Command("set a key's output protection mode",
                              lambda p: (p.add_argument("name"), p.add_argument("mode")), _set_protection),
    "verify-watermark": Command(
        "test whether a suspect model's embeddings carry a key's watermark (p-value)",
        lambda p: (p.add_argument("name"),
                   p.add_argument("--probe", type=Path, required=True,
                                  help="folder of probe images (sorted by relative path) or .npz of their clean embeddings"),
                   p.add_argument("--suspect", type=Path, required=True,
                                  help=".npy of the suspect's embeddings of the probes, same row order"),
                   p.add_argument("--json", action="store_true")),
        _verify_watermark,
    ),
    "trace-watermark": Command(
        "test a suspect model against every key's watermark (which key leaked?), Bonferroni-corrected",
        lambda p: (p.add_argument("--probe", type=Path, required=True,
                                  help="folder of probe images (sorted by relative path) or .npz of their clean embeddings"),
                   p.add_argument("--suspect", type=Path, required=True,
                                  help=".npy of the suspect's embeddings of the probes, same row order"),
                   p.add_argument("--alpha", type=float, default=0.001,
                                  help="family-wise false-accusation rate over all keys (default 0.001)"),
                   p.add_argument("--limit", type=_positive_int, default=10,
                                  help="keys listed, smallest p first (default 10; --json lists all)"),
                   p.add_argument("--json", action="store_true")),
        _trace_watermark,
    ),
    "check-protection": Command(
        "check protection mode specs (MODE[:PARAM]) and print them normalised; no Redis, no model",
        lambda p: p.add_argument("specs", nargs="+", metavar="SPEC"),
        offline=_check_protection,
    ),
    "suspects": Command(
        "key pairs that queried the same model inputs (sybil alignment needs shared queries)",
        lambda p: (p.add_argument("--min-shared", type=_positive_int,
                                  help="image score from which a pair is listed: shared images, each worth 1 / (keys that "
                                  "asked it - 1) (default VENDOR_OVERLAP_MIN_SHARED)"),
                   p.add_argument("--min-shared-texts", type=_positive_int,
                                  help="also list pairs with this text score (default: images only)"),
                   p.add_argument("--json", action="store_true")),
        _suspects,
    ),
    "ledger": Command("print a key's billing events",
                      lambda p: (p.add_argument("name"), p.add_argument("--limit", type=_positive_int)), _ledger),
    "export-ledger": Command(
        "write every ledger event once (CloudEvents JSON lines or CSV) for a billing system; cursor in Redis",
        _export_arguments, _export_ledger,
    ),
    "build-demo-teacher": Command(
        "build the offline demo teacher (EfficientNet-Lite2 + MiniLM, LiT-aligned) as an open_clip local-dir",
        lambda p: (p.add_argument("--out", type=Path, required=True), p.add_argument("--seed", type=int, default=0),
                   p.add_argument("--size", choices=["tiny", "full"], default="full")),
        offline=_build_demo_teacher,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vendor-admin", description="Manage the vendor's API keys and teacher.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    try:
        settings = VendorSettings()
        if command.offline is not None:
            command.offline(args, settings)
            return 0
        assert command.run is not None
        with redis_url(settings) as url:
            asyncio.run(_with_keys(url, settings, command.run, args))
        return 0
    except (VendorError, OSError, ValueError) as exc:  # VendorError includes SetupError (teacher, Redis)
        message = exc.message if isinstance(exc, VendorError) else str(exc)
        print(f"vendor-admin: {message}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        print(f"vendor-admin: invalid configuration: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2


async def _with_keys(url: str, settings: VendorSettings, handler: Handler, args: argparse.Namespace) -> None:
    keys = KeyAdmin.from_url(url, timeout_s=settings.redis_timeout_s)
    try:
        await handler(args, keys, settings)
    finally:
        await keys.close()


if __name__ == "__main__":
    sys.exit(main())
