"""What every benchmark script shares: naming the machine, and publishing its Markdown result
(printed, and written where the committed copy lives)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from client_distiller.reporting.machine import cpu_model  # noqa: F401 (re-exported: one home for the CPU's name)


def cpu_summary() -> str:
    return f"{os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}"


def invocation(script: str) -> str:
    """This run's command line, in backticks, for a report's footer (no trailing space without args)."""
    return "`" + " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]]) + "`"


def publish(lines: list[str], out: Path, *, quick: bool = False) -> None:
    """Print the report; write it to ``out`` too unless this was a ``--quick`` run, whose numbers
    are not the committed ones."""
    text = "\n".join(lines) + "\n"
    if quick:
        print("\n".join(lines))
        return
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
