"""The vendor's Lua scripts, read from package data (`vendor_api/lua/`).

A Redis script is one source text: it cannot load another. What two scripts share therefore lives
in a prelude file whose local functions are prepended to each script when it is loaded
(`request_prelude.lua`, for `admit.lua` and `debit.lua`). The prelude names its keys only as
`KEYS[i]`, so each script still declares every key it touches, all in one hash slot (Redis Cluster).
"""

from __future__ import annotations

from importlib import resources

#: the reaper and the key and idempotency checks of the two request scripts
REQUEST_PRELUDE = "request_prelude.lua"


def lua_source(name: str, *, prelude: str | None = None) -> str:
    """The source of `lua/<name>`, after `lua/<prelude>` when one is given."""
    folder = resources.files("vendor_api").joinpath("lua")
    source = folder.joinpath(name).read_text()
    return source if prelude is None else folder.joinpath(prelude).read_text() + "\n" + source
