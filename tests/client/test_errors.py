"""The client's exception family: every error it raises on purpose is a ClientError through exactly
one branch (UsageError: exit 2, RunError: exit 1), and errors.py's drawn tree names every class."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import client_distiller
from client_distiller import errors
from client_distiller.errors import ClientError, RunError, UsageError


def _client_exceptions() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(client_distiller.__path__, prefix="client_distiller."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            # a private class (purchase._Rejected) is control flow that never leaves its module
            if issubclass(obj, BaseException) and obj.__module__ == info.name and not obj.__name__.startswith("_"):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return list(found.values())


def test_every_client_exception_has_one_root_and_one_branch() -> None:
    classes = _client_exceptions()
    assert len(classes) > 25  # the walk really found the package's errors
    for cls in classes:
        if cls in (ClientError, UsageError, RunError):
            continue
        assert issubclass(cls, ClientError), f"{cls.__module__}.{cls.__name__} is outside the family"
        assert issubclass(cls, UsageError) != issubclass(cls, RunError), f"{cls.__name__}: exactly one branch"


def test_the_drawn_tree_names_every_class() -> None:
    doc = errors.__doc__ or ""
    for cls in _client_exceptions():
        if cls not in (ClientError, UsageError, RunError):
            assert cls.__name__ in doc, f"errors.py's tree does not name {cls.__name__}"


@pytest.mark.parametrize("raised, code", [(UsageError("bad flag"), 2), (RunError("vendor down"), 1)])
def test_the_cli_maps_each_branch_to_its_exit_code(raised: Exception, code: int, capsys) -> None:
    from client_distiller import cli

    def boom(_args) -> int:
        raise raised

    command = cli.Command(help="raises", add_arguments=lambda p: None, run=boom)
    original = dict(cli.COMMANDS)
    cli.COMMANDS["boom"] = command
    try:
        assert cli.main(["boom"]) == code
    finally:
        cli.COMMANDS.clear()
        cli.COMMANDS.update(original)
    err = capsys.readouterr().err
    assert err.strip() == f"client-distill: error: {raised}"


@pytest.mark.parametrize("argv", [
    ["distill", "--data", "d", "--nproc", "0"],
    ["distill", "--data", "d", "--steps", "-3"],
    ["distill", "--data", "d", "--batch-size", "0"],
    ["distill", "--data", "d", "--dist-timeout-min", "nan"],
    ["compare", "--seeds", "-1"],
    ["tune", "--data", "d", "--targets", "t", "--lr", "0"],
])
def test_bad_counts_are_usage_errors_at_parse_time(argv: list[str], capsys) -> None:
    from client_distiller import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert "client-distill" in capsys.readouterr().err
