"""The house rules a newcomer relies on, checked on the source itself: no module imports another
module's private name, command-line namespaces stay in the command layer, the client's data path
reads off its folder tree, and the commands' shared setup behaves as documented."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = {"client_distiller", "vendor_api", "shared", "offline_data", "tests"}
SOURCE_DIRS = ("client_distiller", "vendor_api", "shared", "offline_data", "tests", "benchmarks", "studies")


def _python_files() -> list[Path]:
    return [p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py")]


def test_no_module_imports_a_private_name_of_another() -> None:
    found = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            ours = node.level > 0 or (node.module or "").split(".")[0] in FIRST_PARTY
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names
                      if ours and a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def test_argparse_namespaces_stay_in_the_command_layer() -> None:
    """Library code takes typed configs; only the CLI and the command modules read a Namespace."""
    allowed = {ROOT / "client_distiller" / "cli.py", *(ROOT / "client_distiller" / "commands").glob("*.py")}
    found = []
    for path in (ROOT / "client_distiller").rglob("*.py"):
        if path in allowed:
            continue
        text = path.read_text()
        if "argparse" in text:
            found.append(str(path.relative_to(ROOT)))
    assert found == []


def test_library_code_never_imports_the_command_layer() -> None:
    """Commands build configs and call the library; the library never reaches back into a command
    (a shared step it needs lives in the library, as `reporting.command_line` and `data.OFFLINE_BENCHMARK` do)."""
    commands = ROOT / "client_distiller" / "commands"
    found = []
    for path in (ROOT / "client_distiller").rglob("*.py"):
        if path.parent == commands or path.name == "cli.py" and path.parent == ROOT / "client_distiller":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("client_distiller.commands"):
                found.append(f"{path.relative_to(ROOT)}: {node.module}")
    assert found == []


def test_the_client_tree_names_its_data_path() -> None:
    pkg = ROOT / "client_distiller"
    for folder in ("commands", "buying", "training", "training/methods", "reporting", "sweep"):
        init = pkg / folder / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), folder
    flat = sorted(p.name for p in pkg.glob("*.py"))
    assert len(flat) <= 10, flat  # the library's top level is the data path's spine, not a flat heap


def test_client_settings_flags_beat_environment_beat_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    from client_distiller.commands.setup import client_settings

    def args(**given: object) -> argparse.Namespace:
        base = dict(vendor_url=None, api_key=None, budget=None, eval_budget=None, cache_dir=None, selection=None)
        return argparse.Namespace(**{**base, **given})

    monkeypatch.delenv("CLIENT_BUDGET", raising=False)
    assert client_settings(args(), budget=3000).budget == 3000            # fallback over the default
    monkeypatch.setenv("CLIENT_BUDGET", "70")
    assert client_settings(args(), budget=3000).budget == 70              # environment over the fallback
    assert client_settings(args(budget=5), budget=3000).budget == 5       # the flag over both
    assert client_settings(args(budget=0), budget=3000).budget == 0       # 0 is a flag, not "unset"


def test_shell_command_quotes_values_and_names_secrets() -> None:
    from client_distiller.reporting.command_line import shell_command

    assert shell_command(["client-distill", "--out", "a b", "--api-key", "$CLIENT_API_KEY", "--modes", "noise:0.1,b4b"]) \
        == "client-distill --out 'a b' --api-key $CLIENT_API_KEY --modes noise:0.1,b4b"


def test_ensure_benchmark_builds_once_then_reuses(tmp_path: Path) -> None:
    from offline_data import ensure_benchmark

    out = ensure_benchmark("fashion-domains", tmp_path / "fd", size="tiny")
    first = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    marker = out / "benchmark.json"
    stamp = marker.stat().st_mtime_ns
    assert ensure_benchmark("fashion-domains", tmp_path / "fd", size="tiny") == out
    assert marker.stat().st_mtime_ns == stamp and sorted(p.relative_to(out) for p in out.rglob("*.png")) == first
