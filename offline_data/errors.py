"""Typed errors of the offline benchmark builders.

Every failure a user can cause (a wrong name, an output folder that cannot be written, a missing
system package) is raised as one of these, with a message that fits on one line and says what to
do, so that command-line front ends can print it and exit without a traceback.
"""

from __future__ import annotations


class OfflineDataError(Exception):
    """Base class: any error the offline data builders raise on purpose."""


class UnknownNameError(OfflineDataError, KeyError):
    """A benchmark, domain, split, size or concept-set name that is not registered."""

    def __init__(self, kind: str, name: str, known: list[str] | tuple[str, ...]) -> None:
        self.kind, self.name, self.known = kind, name, list(known)
        super().__init__(f"unknown {kind} {name!r}; choose one of: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return str(self.args[0])


class MissingSourceError(OfflineDataError):
    """A package or system data set the builder needs is not installed."""


class OutputNotWritableError(OfflineDataError):
    """The output folder cannot be created or written."""


class InvalidArgumentError(OfflineDataError, ValueError):
    """An argument has a value outside its allowed range."""
