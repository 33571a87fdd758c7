"""The command line a committed table names under "Made by": every setting spelled out and quoted,
so that a newcomer can paste it and get the table again, and secrets named, never written."""

from __future__ import annotations

import shlex
from typing import Sequence


def shell_command(parts: Sequence[str]) -> str:
    """``parts`` as one shell line, quoted; ``$VARIABLE`` parts stay unquoted so a secret is
    named, never written."""
    return " ".join(p if p.startswith("$") else shlex.quote(p) for p in parts)
