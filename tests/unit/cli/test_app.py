"""flows/cli/__init__.py and __main__.py: every command of every group module is registered and answers
`--help` under both `nightread` and `python -m flows.cli`; importing the app stays cheap; the command
modules hold no SQL and reach the database one way only."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from flows import cli
from tests.unit.cli.invoke import ENTRY_POINTS, NIGHTREAD, PYTHON_M, nightread

CLI_DIR = Path(cli.__file__).resolve().parent
WIDE = {"COLUMNS": "200"}  # no wrapped or cut names in rich's help panels


# every command, by the module that holds it (the old `model tiny` is a hidden alias of `models tiny`)
COMMANDS = {
    "system": ["config", "doctor", "db upgrade"],
    "pipeline": ["status", "run", "demo", "backfill", "reannotate", "serve", "deploy"],
    "sources": ["sample-pacs", "listen", "sources list", "sources add", "sources disable", "sources enable"],
    "rules": ["render", "inspect", "rules check", "rules explain"],
    "review": [
        "review",
        "users add",
        "users list",
        "users disable",
        "users enable",
        "users set-role",
        "users reset-password",
        "users unlock",
        "audit export",
    ],
    "data": ["cohort", "deid reidentify"],
    "models": ["score", "validate", "models list", "models promote", "models tiny", "model tiny", "triton serve"],
}


def _tree(app: typer.Typer) -> tuple[dict[tuple[str, ...], tuple[list[str], list[str]]], list[tuple[str, ...]]]:
    """Every group of `app` by its path, with its (visible, hidden) sub-command names, and the path of
    every command that is not a group."""
    groups: dict[tuple[str, ...], tuple[list[str], list[str]]] = {}
    leaves: list[tuple[str, ...]] = []

    def walk(command: Any, path: tuple[str, ...]) -> None:
        subs = getattr(command, "commands", None)
        if not isinstance(subs, dict):
            leaves.append(path)
            return
        groups[path] = (
            [name for name, sub in subs.items() if not sub.hidden],
            [name for name, sub in subs.items() if sub.hidden],
        )
        for name, sub in subs.items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return groups, leaves


GROUPS, LEAVES = _tree(cli.app)


def test_each_group_module_holds_its_commands() -> None:
    held = {m.__name__.rsplit(".", 1)[1]: sorted(" ".join(p) for p in _tree(m.app)[1]) for m in cli.GROUPS}
    assert held == {name: sorted(commands) for name, commands in COMMANDS.items()}
    assert sorted(" ".join(p) for p in LEAVES) == sorted(c for commands in COMMANDS.values() for c in commands)
    assert GROUPS[()][1] == ["model"], "the old `model tiny` is hidden from help and docs"


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_group_lists_its_commands(entry: str) -> None:
    """One `--help` per group: each lists every visible sub-command, and no hidden one."""
    for path, (visible, hidden) in GROUPS.items():
        r = nightread(*path, "--help", entry=ENTRY_POINTS[entry], env=WIDE, timeout=60)
        assert r.returncode == 0, (path, r.stderr)
        assert f"Usage: nightread {' '.join(path)}".rstrip() in r.stdout, (path, r.stdout)
        listed = set(re.findall(r"^│ (\S+)", r.stdout, re.M))  # a panel's first column
        assert set(visible) <= listed, (path, set(visible) - listed)
        assert not set(hidden) & listed, path


# Runs the entry point in one process, once per command: `nightread` through its installed script,
# `python -m flows.cli` through its __main__; prints {command: [exit code, output]}.
HELP_DRIVER = """
import contextlib, io, json, runpy, sys
entry, paths = sys.argv[1], json.loads(sys.argv[2])
found = {}
for path in paths:
    sys.argv = [entry, *path, "--help"]
    out, code = io.StringIO(), None
    with contextlib.redirect_stdout(out):
        try:
            if entry == "-m":
                runpy.run_module("flows.cli", run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(entry, run_name="__main__")
        except SystemExit as exc:
            code = exc.code
    found[" ".join(path)] = [code, out.getvalue()]
sys.__stdout__.write(json.dumps(found))
"""


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_command_answers_help(entry: str) -> None:
    target = NIGHTREAD if entry == "nightread" else "-m"
    r = subprocess.run(
        [sys.executable, "-c", HELP_DRIVER, target, json.dumps(LEAVES)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **WIDE},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout)
    assert sorted(found) == sorted(" ".join(p) for p in LEAVES)
    for command, (code, out) in found.items():
        assert code in (0, None), (command, out)
        assert f"Usage: nightread {command} [OPTIONS]" in out, (command, out)


def test_python_dash_m_runs_a_nested_command(tmp_path: Path) -> None:
    env = {"NIGHTREAD_DATA_DIR": str(tmp_path)}
    r = nightread("db", "upgrade", entry=PYTHON_M, env=env)
    assert r.returncode == 0, r.stderr
    r = nightread("users", "list", "--json", entry=PYTHON_M, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_importing_the_app_is_cheap() -> None:
    """`nightread --help` imports no database, DICOM, Prefect or model library (the commands do)."""
    r = subprocess.run(
        [sys.executable, "-c", "import flows.cli, json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    heavy = {"prefect", "sqlmodel", "sqlalchemy", "alembic", "pydicom", "pynetdicom", "torch", "fastapi", "numpy"}
    loaded = {name.split(".")[0] for name in json.loads(r.stdout)}
    assert heavy & loaded == set()
    assert not any(name.startswith(("db.", "integrations.", "flows.wiring")) for name in json.loads(r.stdout))


def test_help_lists_the_commands() -> None:
    out = nightread("--help", env=WIDE).stdout
    for command in ("demo", "run", "config", "db", "status", "sample-pacs", "models"):
        assert command in out


def _violations(path: Path) -> list[str]:
    """SQL or a second way to a database in one command module."""
    found = []
    common = path.name == "_common.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            for alias in node.names:
                if root in ("sqlmodel", "sqlalchemy") and alias.name not in ("Engine", "Session"):
                    found.append(f"imports {alias.name} from {node.module}")
                if not common and alias.name in ("make_engine", "upgrade", "Runtime"):
                    found.append(f"imports {alias.name} (use _common's database() / runtime())")
        elif isinstance(node, ast.Attribute) and node.attr in ("exec", "execute", "query", "scalars"):
            found.append(f"calls .{node.attr}()")
    return [f"{path.name}: {v}" for v in found]


def test_no_sql_in_the_command_modules_and_one_way_to_the_database() -> None:
    modules = sorted(CLI_DIR.glob("*.py"))
    assert len(modules) >= 9
    assert [v for m in modules for v in _violations(m)] == []
