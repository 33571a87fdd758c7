"""The client's one exception family, and the exit code each branch maps to.

Every error the client raises on purpose derives from :class:`ClientError`, through one of two
branches, so the CLI (``client_distiller.cli.main``) catches two classes instead of a list that
drifts out of date::

    ClientError
    ├── UsageError (also a ValueError)       exit 2: the user can fix it and run again
    │   CliError, DatasetLayoutError, TargetsError, PromptError, SentenceBankError, PlanError,
    │   ModeMismatch, MethodError (UnknownMethodError, HparamError, MissingTeacherOutputError,
    │   MissingTeacherWeightsError), JobSetupError, JobError, StudentLoadError, StudentFormatError,
    │   CompareError, ExperimentError, KeyBookError, TuneError
    └── RunError (also a RuntimeError)       exit 1: the run failed; what was bought is kept
        VendorError (QuotaExhausted, AuthenticationError), VendorUnreachable, LocalVendorError,
        BudgetExhausted, BudgetTooSmall, InputRejected, OutputUnavailable, CacheError,
        TrainingError, ExportError, PeerFailed

Each branch also derives from the built-in it replaced (``ValueError``, ``RuntimeError``), so code
that caught those still works. Outside the family the CLI also maps pydantic's ``ValidationError``
and ``offline_data.OfflineDataError`` (usage) and ``OSError`` (run).
"""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_RUN = 1


class ClientError(Exception):
    """The root of every error the client raises on purpose."""

    exit_code: int = EXIT_RUN


class UsageError(ClientError, ValueError):
    """Bad arguments, data or configuration: reported as one line, exit code 2."""

    exit_code = EXIT_USAGE


class RunError(ClientError, RuntimeError):
    """A failure while running (the vendor, the budget, the network, a training step): one line,
    exit code 1. Nothing already bought is lost: it is in the cache and the ledger."""

    exit_code = EXIT_RUN
