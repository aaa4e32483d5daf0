"""`nightread` command line (Typer): the app assembled from one module per command group.

    system    config, doctor, db upgrade
    pipeline  status, run, demo, backfill, reannotate, serve
    sources   sources list/add/enable/disable, listen, sample-pacs
    rules     rules check/explain, render, inspect
    review    review, users …, audit export
    data      cohort, deid reidentify
    models    models list/promote/tiny, score, validate, triton serve

Importing this package is cheap: heavy imports (Prefect, SQLModel, pydicom, torch) happen inside the
commands, after the callback below has set the environment defaults, so `nightread --help` is quick
and Prefect never phones home. Shared helpers (settings, failing, the database) are in `_common`."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import typer

from flows.cli import data, models, pipeline, review, rules, sources, system

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_UI_ENABLED": "false",
}

# the commands that run flows on Prefect's temporary API server
FLOW_COMMANDS = frozenset({"run", "demo", "backfill", "reannotate", "validate"})

GROUPS = (system, pipeline, sources, rules, review, data, models)


def _prefect_server_stops_with_us() -> None:
    """Prefect's temporary API server (the ephemeral mode `run` and `demo` use) is a child process that
    outlives a killed nightread, holding its port and its output pipe: started here with the kernel's
    parent-death signal, it ends with us (pinned Prefect 3.8.8: `SubprocessASGIServer` starts it with
    the `subprocess` module it imported, which this shim stands in for)."""
    import subprocess
    import types
    from functools import partial

    from prefect.server.api import server as prefect_server

    from integrations.processes import stop_with_parent

    module: Any = prefect_server
    if isinstance(module.subprocess, types.SimpleNamespace):
        return
    shim = types.SimpleNamespace(**vars(subprocess))
    shim.Popen = partial(subprocess.Popen, preexec_fn=stop_with_parent)
    module.subprocess = shim


def _main(ctx: typer.Context) -> None:
    # everything a command creates (the SQLite database, objects, the inbox, exports, Prefect's home and
    # database, and what the servers it starts create) is its user's alone: files 0600, folders 0700
    os.umask(0o077)
    # a container stop or `kill` asks as Ctrl-C does: every command's KeyboardInterrupt path (a run
    # stops its studies without failing them, servers stop their children) serves SIGTERM too
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    for key, value in PREFECT_DEFAULTS.items():  # before anything imports Prefect
        os.environ.setdefault(key, value)
    if ctx.invoked_subcommand in FLOW_COMMANDS:
        _prefect_server_stops_with_us()


def build_app() -> typer.Typer:
    """The `nightread` app: every group module's commands and sub-groups at the top level."""
    root = typer.Typer(
        help="nightread: pre-read radiology studies overnight with a vision-language model.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_show_locals=False,
    )
    root.callback()(_main)
    for group in GROUPS:
        root.add_typer(group.app)  # no name: its commands join the top level
    return root


app = build_app()

__all__ = ["FLOW_COMMANDS", "GROUPS", "PREFECT_DEFAULTS", "app", "build_app"]
