"""`nightread` command line (Typer). Heavy imports happen inside commands, after the environment
defaults below are set, so `nightread --help` is quick and Prefect never phones home."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from flows.wiring.settings import NightreadSettings

app = typer.Typer(
    help="nightread: pre-read radiology studies overnight with a vision-language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
model_app = typer.Typer(help="Models.", no_args_is_help=True)
triton_app = typer.Typer(help="Triton Inference Server.", no_args_is_help=True)
sources_app = typer.Typer(help="PACS sources (configured in settings or added here).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(model_app, name="model")
app.add_typer(sources_app, name="sources")
app.add_typer(triton_app, name="triton")
console = Console()
err = Console(stderr=True)

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_UI_ENABLED": "false",
}


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


# the commands that run flows on Prefect's temporary API server
FLOW_COMMANDS = frozenset({"run", "demo", "backfill", "reannotate", "validate"})


@app.callback()
def _main(ctx: typer.Context) -> None:
    # everything a command creates (the SQLite database, objects, the inbox, exports, Prefect's home and
    # database, and what the servers it starts create) is its user's alone: files 0600, folders 0700
    os.umask(0o077)
    # a container stop or `kill` asks as Ctrl-C does: every command's KeyboardInterrupt path (a run
    # stops its studies without failing them, servers stop their children) serves SIGTERM too
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    if ctx.invoked_subcommand in FLOW_COMMANDS:
        _prefect_server_stops_with_us()
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _settings(**overrides: Any) -> NightreadSettings:
    from pydantic import ValidationError

    from flows.wiring.settings import NightreadSettings

    try:
        return NightreadSettings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = "__".join(str(p) for p in first["loc"]).upper()
        err.print(f"[red]invalid setting NIGHTREAD_{loc}: {first['msg']}[/red]")
        raise typer.Exit(2) from None


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]{message}[/red]")
    return typer.Exit(code)


# --- config, db, status -----------------------------------------------------------------------------


@app.command()
def config() -> None:
    """Print the effective settings (secrets masked) as JSON."""
    console.print_json(json.dumps(_settings().masked()))


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Create or migrate the database schema (Alembic)."""
    from db.migrate import current_revision, upgrade
    from db.session import make_engine
    from flows.wiring.settings import mask_url

    settings = _settings()
    upgrade(settings.database_url, revision)
    engine = make_engine(settings.database_url)
    try:
        console.print(f"database {mask_url(settings.database_url)} at revision {current_revision(engine)}")
    finally:
        engine.dispose()


def _status_data(settings: NightreadSettings) -> dict[str, Any]:
    from db import ledger
    from db import repository as repo
    from db.migrate import current_revision, head_revision
    from db.session import make_engine, session_scope

    engine = make_engine(settings.database_url)
    try:
        if current_revision(engine) != head_revision():
            raise _fail("the database schema is not up to date: run `nightread db upgrade` first")
        with session_scope(engine) as session:
            data = repo.status_counts(session=session)
            data["stranded"] = ledger.stranded(session=session, max_attempts=settings.flow.max_attempts)
            return data
    finally:
        engine.dispose()


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False) -> None:
    """Counts: studies by status, images, captions, findings, flags, failures, last run."""
    data = _status_data(_settings())
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
        return
    table = Table(title="nightread status", show_header=False)
    for key, value in data["studies"].items():
        table.add_row(f"studies {key}", str(value))
    for key in ("images", "captions", "findings", "flags", "failures", "model_versions", "reports", "reports_sent"):
        table.add_row(key, str(data[key]))
    last = data["last_run"]
    table.add_row(
        "last run", "none" if last is None else f"#{last['id']} {last['kind']} {last['status']} {last['started_at']}"
    )
    console.print(table)
    stranded = {key: n for key, n in data["stranded"].items() if n}
    if stranded:  # work nobody will pick up as things stand; the next run recovers or fails it with a reason
        console.print(
            "[yellow]stranded:[/yellow] "
            + ", ".join(f"{n} {key.replace('_', ' ')}" for key, n in stranded.items())
            + " (the next `nightread run` recovers them, or fails them with a reason)"
        )


def _serve_metrics(settings: NightreadSettings, engine: Any = None) -> None:
    """The /metrics endpoint of a long-running command, when NIGHTREAD_METRICS__PORT is set."""
    from db.session import make_engine
    from flows.wiring.telemetry import serve_metrics

    if settings.metrics.port is None:
        return
    port = serve_metrics(settings, engine if engine is not None else make_engine(settings.database_url))
    console.print(f"metrics on http://{settings.metrics.host}:{port}/metrics")


@app.command()
def doctor() -> None:
    """Check every configured service (database and schema, object store, each PACS with its TLS,
    Triton, review secret, disk space): one line each; exit 1 when any fails."""
    from flows.doctor import run_checks

    checks = run_checks(_settings())
    for check in checks:
        console.print(check.line(), markup=False, highlight=False)
    failed = [c for c in checks if not c.ok]
    if failed:
        console.print(f"{len(failed)} of {len(checks)} checks failed", markup=False)
        raise typer.Exit(1)
    console.print(f"all {len(checks)} checks passed", markup=False)


# --- running ----------------------------------------------------------------------------------------


def _summary_table(result: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    table.add_column("")
    table.add_column("count", justify="right")
    rows = [
        ("studies found", result.get("found", 0)),
        ("studies new", result.get("new", 0)),
        ("studies retrieved", result.get("retrieved", 0)),
        ("instances received", result.get("instances", 0)),
        ("images rendered", result.get("rendered", 0)),
        ("instances skipped", result.get("skipped", 0)),
        ("captions", result.get("captions", 0)),
        ("findings", result.get("findings", 0)),
        ("flags", result.get("flags", 0)),
        ("SR reports (sent to PACS)", f"{result.get('reports', 0)} ({result.get('reports_sent', 0)})"),
        ("failures", result.get("failed", 0) + result.get("studies_failed", 0) + result.get("report_failures", 0)),
        ("wall time", f"{result.get('wall_s', 0):.1f} s"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def _run_with_progress(settings: NightreadSettings) -> dict[str, Any]:
    """Run the nightly flow; a side thread polls the database to drive a progress bar."""
    from sqlmodel import col, func, select

    from db.models import Study, StudyStatus, utcnow
    from db.session import make_engine, session_scope
    from flows.nightly import run_nightly

    started = utcnow()
    done = threading.Event()
    engine = make_engine(settings.database_url)

    def poll(progress: Progress, task_id: Any) -> None:
        while not done.wait(0.5):
            try:
                with session_scope(engine) as session:
                    touched = session.exec(
                        select(Study.status, func.count())
                        .where((col(Study.updated_at) >= started) | col(Study.status).in_(StudyStatus.PENDING))
                        .group_by(Study.status)
                    ).all()
            except Exception:  # the schema may be mid-migration; the bar is cosmetic, the run is not
                continue
            by_status = dict(touched)
            total = sum(by_status.values())
            finished = by_status.get(StudyStatus.DONE, 0) + by_status.get(StudyStatus.FAILED, 0)
            progress.update(task_id, total=max(total, 1), completed=finished)

    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True) as progress:
        task_id = progress.add_task("annotating studies", total=None)
        poller = threading.Thread(target=poll, args=(progress, task_id), daemon=True)
        poller.start()
        try:
            return run_nightly(settings)
        finally:
            done.set()
            poller.join()
            engine.dispose()


def _print_result(settings: NightreadSettings, result: dict[str, Any], title: str) -> None:
    from flows.wiring.settings import mask_url

    console.print(_summary_table(result, title))
    if result.get("model_note"):
        console.print(f"[yellow]note:[/yellow] {result['model_note']}")
    console.print(f"database: {mask_url(settings.database_url)}")
    if settings.storage.backend == "local":
        console.print(f"objects:  {settings.storage_root}")
    else:
        console.print(f"objects:  s3://{settings.storage.bucket} at {settings.storage.endpoint}")


@app.command()
def run(study: Annotated[int | None, typer.Option(help="re-run one study by its database id")] = None) -> None:
    """Run the nightly job once against the configured PACS."""
    from db.migrate import upgrade
    from integrations.errors import NightreadError

    settings = _settings()
    upgrade(settings.database_url)
    try:
        if study is not None:
            from flows.annotate import annotate_study

            console.print_json(json.dumps(annotate_study(study_id=study, settings=settings)))
            return
        result = _run_with_progress(settings)
    except NightreadError as exc:
        raise _fail(f"{type(exc).__name__}: {exc}") from None
    _print_result(settings, result, "nightread run")


@app.command()
def demo(
    fresh: Annotated[bool, typer.Option(help="delete the demo's data dir first")] = False,
    data_dir: Annotated[Path | None, typer.Option(help="default: NIGHTREAD_DATA_DIR or ./.nightread")] = None,
) -> None:
    """Start the built-in sample PACS and run the nightly job against it on embedded defaults."""
    import shutil

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the summary table says what happened
    from db.migrate import upgrade
    from integrations.sample_pacs import SamplePacs

    settings = _settings(**({"data_dir": data_dir} if data_dir else {}))
    if fresh and settings.data_dir.exists():
        shutil.rmtree(settings.data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with console.status("generating synthetic studies and starting the sample PACS"):
        pacs = SamplePacs(ae_title=settings.pacs.called_ae)
        pacs.start()
    try:
        settings = settings.model_copy(
            update={
                "pacs": settings.pacs.model_copy(
                    update={"host": "127.0.0.1", "port": pacs.port, "name": "sample-pacs", "write_back": True}
                )
            }
        )
        console.print(
            f"sample PACS {pacs.ae_title} on 127.0.0.1:{pacs.port} with {len(pacs.archive.studies)} synthetic studies"
        )
        upgrade(settings.database_url)
        t0 = time.perf_counter()
        result = _run_with_progress(settings)
        result["wall_s"] = round(time.perf_counter() - t0, 2)
    finally:
        pacs.stop()
    _print_result(settings, result, "nightread demo")
    console.print(
        "Run `make demo` again: it finds nothing new and writes nothing twice. "
        "`.venv/bin/nightread status` shows the counts."
    )


@app.command("sample-pacs")
def sample_pacs(
    port: Annotated[int, typer.Option(help="TCP port")] = 11112,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    ae_title: Annotated[str, typer.Option(help="its AE title")] = "SAMPLEPACS",
    seed: Annotated[int, typer.Option(help="which synthetic studies")] = 7,
    move_destination: Annotated[
        list[str] | None, typer.Option(help="AE=HOST:PORT a C-MOVE may send to (repeatable)")
    ] = None,
) -> None:
    """Run the built-in sample PACS (C-ECHO, C-FIND, C-GET, C-MOVE) until interrupted."""
    from integrations.sample_pacs import SamplePacs

    destinations: dict[str, tuple[str, int]] = {}
    for item in move_destination or []:
        try:
            ae, _, address = item.partition("=")
            dest_host, _, dest_port = address.rpartition(":")
            destinations[ae] = (dest_host, int(dest_port))
        except ValueError:
            raise _fail(f"--move-destination must look like AE=HOST:PORT, not {item!r}", 2) from None
    pacs = SamplePacs(ae_title=ae_title, host=host, port=port, seed=seed, move_destinations=destinations)
    pacs.start()
    console.print(
        f"sample PACS {ae_title} listening on {host}:{pacs.port} ({len(pacs.archive.studies)} studies); Ctrl-C stops it"
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        pacs.stop()


def _flow_settings() -> NightreadSettings:
    """Settings for a command that runs a flow: Prefect's log level at WARNING (the command prints its own
    summary) and the database schema at head."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    settings = _settings()
    _upgrade(settings)
    return settings


def _upgrade(settings: NightreadSettings) -> None:
    """The database at its latest migration (a no-op when it is there already)."""
    from db.migrate import upgrade

    upgrade(settings.database_url)


def _engine_at_head(settings: NightreadSettings) -> Any:
    from db.session import make_engine

    _upgrade(settings)
    return make_engine(settings.database_url)


@contextmanager
def _database(settings: NightreadSettings | None = None) -> Iterator[Any]:
    """A session on the database at its latest migration: committed when the block ends, rolled back
    on an error; the engine is disposed either way."""
    from db.session import session_scope

    engine = _engine_at_head(settings or _settings())
    try:
        with session_scope(engine) as session:
            yield session
    finally:
        engine.dispose()


@sources_app.command("list")
def sources_list(as_json: Annotated[bool, typer.Option("--json", help="one JSON array")] = False) -> None:
    """Every source: from settings (NIGHTREAD_SOURCES / NIGHTREAD_PACS__*) and added with `sources add`."""
    from db import repository as repo
    from flows.wiring.runtime import source_row

    settings = _settings()
    with _database(settings) as session:
        for p in settings.configured_sources():
            repo.upsert_source(session=session, **source_row(p))
        rows = [
            {
                "name": r.name,
                "kind": r.kind,
                "address": r.url or f"{r.ae_title}@{r.host}:{r.port}",
                "retrieve": (r.config or {}).get("retrieve") if r.kind == "dimse" else "wado-rs",
                "receiver": (r.config or {}).get("dimse_receiver", "direct") if r.kind == "dimse" else None,
                "enabled": r.enabled,
                "cursor": f"{r.cursor_date or ''} {r.cursor_time or ''}".strip() or None,
            }
            for r in repo.list_sources(session=session)
        ]
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table(title="PACS sources")
    columns = ("name", "kind", "address", "retrieve", "receiver", "enabled", "cursor")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) if row[c] is not None else "-" for c in columns))
    console.print(table)


@sources_app.command("add")
def sources_add(
    name: Annotated[str, typer.Argument(help="a unique name")],
    kind: Annotated[str, typer.Option(help="dimse or dicomweb")] = "dimse",
    host: Annotated[str, typer.Option(help="DIMSE: PACS host")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="DIMSE: PACS port")] = 104,
    called_ae: Annotated[str, typer.Option(help="DIMSE: the PACS's AE title")] = "PACS",
    calling_ae: Annotated[str, typer.Option(help="DIMSE: our AE title")] = "NIGHTREAD",
    retrieve: Annotated[str, typer.Option(help="DIMSE: get or move")] = "get",
    move_port: Annotated[int, typer.Option(help="DIMSE: our storage SCP port for C-MOVE")] = 0,
    dimse_receiver: Annotated[
        str, typer.Option(help="DIMSE: direct (nightread's receive path) or pynetdicom")
    ] = "direct",
    url: Annotated[str | None, typer.Option(help="DICOMweb: root URL")] = None,
    modalities: Annotated[str, typer.Option(help="comma-separated, e.g. CR,DX (default: all)")] = "",
    lookback_days: Annotated[int, typer.Option(help="how far the first discovery looks back")] = 7,
) -> None:
    """Add (or update) a source in the database; the next run discovers studies in it too."""
    from pydantic import ValidationError

    from db import repository as repo
    from flows.wiring.runtime import source_row
    from flows.wiring.settings import PacsSettings

    try:
        pacs = PacsSettings(
            name=name,
            kind=kind,
            host=host,
            port=port,
            called_ae=called_ae,
            calling_ae=calling_ae,  # type: ignore[arg-type]
            retrieve=retrieve,
            move_port=move_port,
            dimse_receiver=dimse_receiver,
            url=url,
            lookback_days=lookback_days,  # type: ignore[arg-type]
            modalities=[m.strip().upper() for m in modalities.split(",") if m.strip()],
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise _fail(
            f"invalid source: {'.'.join(str(p) for p in first['loc']) or 'source'}: {first['msg']}", 2
        ) from None
    with _database() as session:
        repo.upsert_source(session=session, **source_row(pacs))
    console.print(f"source {name!r} ({kind}) saved")


def _set_enabled(name: str, enabled: bool) -> None:
    from sqlmodel import select

    from db.models import PacsSource

    with _database() as session:
        row = session.exec(select(PacsSource).where(PacsSource.name == name)).first()
        if row is None:
            raise _fail(f"no source named {name!r} (see `nightread sources list`)")
        row.enabled = enabled
        session.add(row)
    console.print(f"source {name!r} {'enabled' if enabled else 'disabled'}")


@sources_app.command("disable")
def sources_disable(name: Annotated[str, typer.Argument()]) -> None:
    """Stop discovering and retrieving from a source (its studies and cursor are kept)."""
    _set_enabled(name, False)


@sources_app.command("enable")
def sources_enable(name: Annotated[str, typer.Argument()]) -> None:
    """Use a disabled source again."""
    _set_enabled(name, True)


@app.command()
def listen(
    port: Annotated[int | None, typer.Option(help="default NIGHTREAD_LISTEN__PORT")] = None,
    allow: Annotated[list[str] | None, typer.Option(help="allowed calling AE title (repeatable)")] = None,
) -> None:
    """Receive studies pushed by C-STORE from allow-listed AE titles; the next run reads them."""
    from flows.wiring.arrivals import make_arrival_recorder
    from flows.wiring.runtime import tls_config
    from integrations.errors import ConfigurationError
    from integrations.receiver import StoreReceiver

    settings = _settings()
    allowed = list(allow or settings.listen.allowed_aes)
    record, engine = make_arrival_recorder(settings)
    _serve_metrics(settings, engine)
    try:
        receiver = StoreReceiver(
            inbox=settings.inbox,
            allowed_aes=allowed,
            ae_title=settings.listen.ae_title,
            host=settings.listen.host,
            port=settings.listen.port if port is None else port,
            on_arrival=record,
            dimse_receiver=settings.listen.dimse_receiver,
            allowed_hosts=settings.listen.allowed_hosts,
            max_associations=settings.listen.max_associations,
            artim_s=settings.listen.artim_s,
            tls=tls_config(settings.listen.tls),
        )
        receiver.start()
    except ConfigurationError as exc:
        engine.dispose()
        raise _fail(f"{exc} (set NIGHTREAD_LISTEN__ALLOWED_AES='[\"MODALITY1\"]' or pass --allow)", 2) from None
    console.print(
        f"receiving as {settings.listen.ae_title} on {settings.listen.host}:{receiver.port} from "
        f"{', '.join(allowed)} into {settings.inbox}; a study is complete after "
        f"{settings.listen.quiet_period_s:g} s without new instances; Ctrl-C stops"
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()
        engine.dispose()


@triton_app.command("serve")
def triton_serve(
    model: Annotated[str | None, typer.Option(help="checkpoint folder or hub id (default: the repository's)")] = None,
) -> None:
    """Run tritonserver (from the nvidia-pytriton wheel) on nightread's model repository, for development."""
    from integrations.errors import NightreadError
    from integrations.triton_server import TritonServer, prepare_repository

    settings = _settings()
    t = settings.triton
    work = settings.data_dir / "triton"
    try:
        repo = prepare_repository(
            t.repository, work / "model_repository", instance_count=t.instance_count, instance_kind=t.instance_kind
        )
        env = {"NIGHTREAD_TRITON_MODEL": model} if model else {}
        env["NIGHTREAD_TRITON_CACHE"] = str(settings.data_dir / "models")
        server = TritonServer(
            repository=repo,
            work_dir=work,
            http_port=t.http_port,
            grpc_port=t.grpc_port,
            metrics_port=t.metrics_port,
            host=t.bind_host,
            env=env,
        )
    except NightreadError as exc:
        raise _fail(str(exc)) from None
    try:
        with console.status("starting tritonserver and loading the model"):
            server.start()
        console.print(
            f"tritonserver ready: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics "
            f"{t.bind_host}:{t.metrics_port}; log {server.log_path}; Ctrl-C stops"
        )
        while server.proc is not None and server.proc.poll() is None:
            threading.Event().wait(1)  # until Ctrl-C or the server exits
    except KeyboardInterrupt:
        pass  # Ctrl-C, also while the model loads: stop the server below
    except NightreadError as exc:
        raise _fail(str(exc)) from None
    finally:
        server.stop()


rules_app = typer.Typer(help="Series and view selection rules.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")

INSPECT_TAGS = (
    "SOPClassUID",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "PatientPosition",
    "ImageType",
    "SeriesDescription",
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "PlanarConfiguration",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "SliceThickness",
)
IDENTIFYING_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "StudyDate",
)


@rules_app.command("check")
def rules_check(file: Annotated[Path, typer.Argument(help="rules YAML")]) -> None:
    """Validate a selection rules file; print its rules, or the field that is wrong."""
    from flows.rules.selection import load_rules
    from integrations.errors import ConfigurationError

    try:
        rules = load_rules(file)
    except ConfigurationError as exc:
        raise _fail(str(exc), 2) from None
    for rule in rules.rules:
        what = rule.reason if rule.action == "skip" else (f"{rule.count} per series" if rule.count else "")
        role = f" (role {rule.role})" if rule.role else ""
        console.print(f"{rule.name}: {rule.action} {what}".rstrip() + role)
    if rules.pair:
        console.print(f"pairs {rules.pair[0]} with {rules.pair[1]} images within a study")
    console.print(f"{file}: {len(rules.rules)} rules, valid (sha {rules.sha})")


@rules_app.command("explain")
def rules_explain(
    study: Annotated[
        str, typer.Argument(help="the study's database id (see `nightread status`) or its Study Instance UID")
    ],
) -> None:
    """Retrieve one study from its PACS and show which images the rules would send, and why."""
    import tempfile

    from sqlmodel import select as sql_select

    from db.models import Study
    from db.session import session_scope
    from flows.rules.selection import select_images
    from flows.wiring.runtime import Runtime
    from integrations.errors import NightreadError
    from integrations.imaging import read_instance_info
    from integrations.query import uid_hash

    settings = _settings()
    _upgrade(settings)
    with Runtime.build(settings) as rt:
        rt.register_sources()
        with session_scope(rt.engine) as session:
            query = sql_select(Study).where(
                (Study.id == int(study)) if study.isdigit() else (Study.study_instance_uid == study)
            )
            row = session.exec(query).first()
            if row is None or row.source_id is None:
                raise _fail("no such study in the database (discover it first with `nightread run`)")
            uid, source_id, expected = row.study_instance_uid, row.source_id, row.expected_instances
        with tempfile.TemporaryDirectory(prefix="nightread-explain-") as tmp:
            try:
                retrieved = rt.source(source_id).retrieve_study(uid, dest=Path(tmp), expected=expected)
            except NightreadError as exc:
                raise _fail(f"{type(exc).__name__}: {exc}") from None
            infos, unreadable = [], 0
            for path in retrieved.files:
                try:
                    infos.append(read_instance_info(path))
                except NightreadError:
                    unreadable += 1
            table = Table(title=f"study {row.id}: {len(retrieved.files)} instances")
            for column in ("instance", "modality", "view", "series", "number", "image type", "decision", "why"):
                table.add_column(column)
            decisions = sorted(
                select_images(infos, rt.rules), key=lambda d: (d.info.series_number or 0, d.info.instance_number or 0)
            )
            short = {d.info.sop_instance_uid: uid_hash(d.info.sop_instance_uid)[:10] for d in decisions}
            for d in decisions:
                i = d.info
                paired = f" (paired with {short.get(d.paired_with, '?')})" if d.paired_with else ""
                table.add_row(
                    uid_hash(i.sop_instance_uid)[:10],
                    i.modality,
                    i.view_position or "-",
                    str(i.series_number or "-"),
                    str(i.instance_number or "-"),
                    "\\".join(i.image_type),
                    "send" if d.selected else "skip",
                    f"{d.rule}: {d.reason}{paired}",
                )
            console.print(table)
            if unreadable:
                console.print(f"{unreadable} instance(s) could not be read and would be recorded as failures")


@app.command()
def render(
    source: Annotated[Path, typer.Argument(help="a DICOM file")],
    out: Annotated[Path, typer.Option(help="PNG to write")] = Path("out.png"),
    frame: Annotated[int | None, typer.Option(help="frame of a multi-frame image (default: the flows' choice)")] = None,
) -> None:
    """Render one file through exactly the pipeline the flows use, and say what happened."""
    from flows.rules.selection import load_rules, select_images
    from integrations.errors import DecodeError
    from integrations.imaging import read_instance_info
    from integrations.imaging import render as render_image

    settings = _settings()
    try:
        info = read_instance_info(source)
    except DecodeError as exc:
        raise _fail(f"failed (read): {exc}") from None
    (decision,) = select_images([info], load_rules(settings.rules_file))
    chosen = frame if frame is not None else decision.frames[0]
    try:
        rendered = render_image(
            source, frame=chosen, max_long_edge=settings.render.max_long_edge, ct_windows=settings.render.ct_windows
        )
    except DecodeError as exc:
        raise _fail(f"failed (render): {exc}") from None
    out.write_bytes(rendered.png)
    console.print(
        f"rendered {out} ({rendered.width}x{rendered.height}, frame {chosen}, render version "
        f"{rendered.render_version}): {' → '.join(rendered.steps)}"
    )
    console.print(
        f"selection: {'selected' if decision.selected else 'skipped'} by rule {decision.rule!r} ({decision.reason})"
    )


@app.command()
def inspect(
    source: Annotated[Path, typer.Argument(help="a DICOM file")],
    show_identifiers: Annotated[bool, typer.Option(help="also print patient and study identifiers")] = False,
) -> None:
    """The tags that drive selection and rendering (no identifiers unless --show-identifiers)."""
    from pydicom import dcmread
    from pydicom.uid import UID

    try:
        ds = dcmread(source, force=True, defer_size="4 KB")
    except Exception as exc:
        raise _fail(f"cannot read {source}: {type(exc).__name__}") from None
    table = Table(title=str(source.name), show_header=False)
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    table.add_row("TransferSyntaxUID", f"{UID(ts).name} ({ts})" if ts else "(none: no file meta)")
    for keyword in INSPECT_TAGS + (IDENTIFYING_TAGS if show_identifiers else ()):
        if keyword in ds:
            value = ds.get(keyword)
            text = UID(str(value)).name if keyword == "SOPClassUID" else str(value)
            table.add_row(keyword, text)
    for keyword in ("VOILUTSequence", "ModalityLUTSequence", "PixelData"):
        table.add_row(keyword, "present" if keyword in ds else "absent")
    console.print(table)


@model_app.command("tiny")
def model_tiny(
    family: Annotated[str, typer.Option(help="architecture family")] = "smolvlm",
    out: Annotated[Path, typer.Option(help="folder to write")] = Path("tiny-model"),
) -> None:
    """Build a tiny randomly initialised checkpoint offline (for tests and demos; its answers mean nothing)."""
    from integrations.vlm.tiny import build_tiny, families

    if family not in families():
        raise _fail(f"unknown family {family!r}; choose one of: {', '.join(families())}", 2)
    path = build_tiny(family, out)
    console.print(f"tiny {family} checkpoint written to {path}")


# --- review page, users, audit --------------------------------------------------------------------------
users_app = typer.Typer(help="Users of the review page.", no_args_is_help=True)
audit_app = typer.Typer(help="The review audit trail.", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(audit_app, name="audit")


def build_review_app(settings: NightreadSettings) -> Any:
    """The review app wired to the configured database, object store and question bank."""
    from flows.rules.questions import load_bank
    from flows.wiring.runtime import build_store
    from integrations.secrets import load_secret
    from review.app import ReviewConfig, create_app

    r = settings.review
    bank = load_bank(settings.questions_file)
    config = ReviewConfig(
        secret=load_secret(r.secret_key.get_secret_value(), settings.data_dir, "review-secret"),
        secure_cookies=r.secure_cookies,
        session_max_age_s=r.session_max_age_s,
        token_ttl_s=r.token_ttl_s,
        show_patient_identifiers=r.show_patient_identifiers,
        page_size=r.page_size,
        critical_ids=tuple(q.id for q in bank.questions if q.critical),
        question_texts={q.id: q.text for q in bank.questions},
        login_max_failures=r.login_max_failures,
        login_max_failures_per_address=r.login_max_failures_per_address,
        login_window_s=r.login_window_s,
        login_lockout_s=r.login_lockout_s,
        api_docs=r.api_docs,
        api_docs_assets=r.api_docs_assets,
        hsts_max_age_s=r.hsts_max_age_s,
    )
    return create_app(engine=_engine_at_head(settings), store=build_store(settings), config=config)


@app.command()
def review(
    host: Annotated[str | None, typer.Option(help="address to listen on (default NIGHTREAD_REVIEW__HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default NIGHTREAD_REVIEW__PORT)")] = None,
) -> None:
    """Serve the QA review page (and its /api) until interrupted."""
    import uvicorn

    settings = _settings()
    application = build_review_app(settings)
    _serve_metrics(settings)
    h, p = host or settings.review.host, port if port is not None else settings.review.port
    console.print(
        f"review page on http://{h}:{p}/ (API schema at /openapi.json after logging in; "
        "Swagger UI at /docs only with NIGHTREAD_REVIEW__API_DOCS)"
    )
    uvicorn.run(application, host=h, port=p, log_level="warning", proxy_headers=False)


def _read_new_password(password_stdin: bool) -> str:
    """A new password from stdin (`--password-stdin`, one line) or a hidden prompt asked twice; never echoed."""
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return str(typer.prompt("password", hide_input=True, confirmation_prompt=True))


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="user name")],
    role: Annotated[str, typer.Option(help="reviewer | viewer | admin")] = "reviewer",
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="read the password from stdin")] = False,
) -> None:
    """Add a user; the password comes from stdin (`--password-stdin`) or a hidden prompt. Audited."""
    from db import reviews
    from review.auth import hash_password

    password = _read_new_password(password_stdin)
    try:
        hashed = hash_password(password)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    try:
        with _database() as session:
            reviews.add_user(session=session, name=name, role=role, password_hash=hashed, actor=reviews.cli_actor())
    except reviews.ReviewError as exc:
        raise _fail(str(exc), 2) from None
    console.print(f"user {name} added ({role})")


@users_app.command("list")
def users_list(as_json: Annotated[bool, typer.Option("--json", help="one JSON array")] = False) -> None:
    """Every user with role and state, and the end of a login lock in force (never a password hash)."""
    from db import reviews

    with _database() as session:
        rows: list[dict[str, Any]] = []
        for u in reviews.list_users(session=session):
            until = reviews.locked_until(session=session, name=u.name)
            rows.append(
                {
                    "name": u.name,
                    "role": u.role,
                    "disabled": u.disabled,
                    "locked_until": until.isoformat(timespec="seconds") if until else None,
                    "created_at": u.created_at.isoformat(),
                }
            )
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table(title="users")
    for column in ("name", "role", "state", "created"):
        table.add_column(column)
    for r in rows:
        state = "disabled" if r["disabled"] else "active"
        if r["locked_until"]:
            state += f", locked until {r['locked_until']}"
        table.add_row(r["name"], r["role"], state, r["created_at"][:19])
    console.print(table)


@contextmanager
def _user_change() -> Iterator[tuple[Any, str]]:
    """A session for one of db.reviews' user changes and this command line's user as the actor (the
    change audits itself); committed at the end, and a refused change exits 2 with the reason."""
    from db import reviews

    try:
        with _database() as session:
            yield session, reviews.cli_actor()
    except reviews.ReviewError as exc:
        raise _fail(str(exc), 2) from None


@users_app.command("disable")
def users_disable(name: Annotated[str, typer.Argument(help="user name")]) -> None:
    """Disable a user: they can no longer log in, and their sessions and tokens stop working. Audited."""
    from db import reviews

    with _user_change() as (session, actor):
        reviews.disable_user(session=session, name=name, actor=actor)
    console.print(f"user {name} disabled")


@users_app.command("enable")
def users_enable(name: Annotated[str, typer.Argument(help="user name")]) -> None:
    """Enable a disabled user again (and lift a login lock on the name). Audited."""
    from db import reviews

    with _user_change() as (session, actor):
        reviews.enable_user(session=session, name=name, actor=actor)
    console.print(f"user {name} enabled")


@users_app.command("set-role")
def users_set_role(
    name: Annotated[str, typer.Argument(help="user name")],
    role: Annotated[str, typer.Argument(help="reviewer | viewer | admin")],
) -> None:
    """Give a user another role (in force at their next request). Audited."""
    from db import reviews

    with _user_change() as (session, actor):
        reviews.set_role(session=session, name=name, role=role, actor=actor)
    console.print(f"user {name} is now {role}")


@users_app.command("reset-password")
def users_reset_password(
    name: Annotated[str, typer.Argument(help="user name")],
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="read the password from stdin")] = False,
) -> None:
    """Set a new password (stdin or a hidden prompt): the user's sessions end, their API tokens stop
    working, and a login lock on the name is lifted. Audited."""
    from db import reviews
    from review.auth import hash_password

    password = _read_new_password(password_stdin)
    try:
        hashed = hash_password(password)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    with _user_change() as (session, actor):
        reviews.set_password(session=session, name=name, password_hash=hashed, actor=actor, by_admin=True)
    console.print(f"password of {name} reset; their sessions and API tokens no longer work")


@users_app.command("unlock")
def users_unlock(
    name: Annotated[str | None, typer.Argument(help="user name whose login lock to lift")] = None,
    address: Annotated[str | None, typer.Option(help="also lift the lock on this client address")] = None,
) -> None:
    """Lift a login lock (too many failed logins) on a user name, a client address, or both. Audited."""
    from db import reviews
    from db.models import AuditAction

    if name is None and address is None:
        raise _fail("name a user, or give --address", 2)
    with _database() as session:
        if name is not None and reviews.get_user(session=session, name=name) is None:
            raise _fail(f"no user {name!r}", 2)
        for subject, key in (
            (name, reviews.user_throttle_key(name) if name else None),
            (address, reviews.address_throttle_key(address) if address else None),
        ):
            if subject is None or key is None:
                continue
            refused = reviews.unlock(session=session, keys=[key])
            detail = "was not locked" if refused is None else f"lock lifted; {refused} attempt(s) refused during it"
            reviews.audit(
                session=session,
                action=AuditAction.USER_UNLOCKED,
                actor=reviews.cli_actor(),
                subject=subject,
                client="cli",
                detail=detail,
            )
            console.print(f"{subject}: {detail}")


@audit_app.command("export")
def audit_export(
    out: Annotated[Path, typer.Option("--out", help="CSV file to write ('-' for stdout)")] = Path("-"),
    events: Annotated[
        bool, typer.Option("--events", help="the audit log (logins, user changes, exports) instead of the decisions")
    ] = False,
) -> None:
    """Every review decision (who, when, what, from which answer to which), or with --events the audit log,
    as CSV, oldest first. Cells a spreadsheet would run as formulas start with a '. Audited."""
    from db import reviews
    from db.models import AuditAction

    with _database() as session:
        rows = reviews.audit_events(session=session) if events else reviews.audit_rows(session=session)
        what = "audit event(s)" if events else "decision(s)"
        reviews.audit(
            session=session,
            action=AuditAction.AUDIT_EXPORTED,
            actor=reviews.cli_actor(),
            client="cli",
            detail=f"{len(rows)} {what} to {'stdout' if str(out) == '-' else 'a file'}",
        )
    fields = reviews.AUDIT_EVENT_FIELDS if events else reviews.AUDIT_DECISION_FIELDS
    if str(out) == "-":
        reviews.write_csv(rows=rows, fields=fields, out=sys.stdout)
        return
    with out.open("w", newline="", encoding="utf-8") as fh:
        reviews.write_csv(rows=rows, fields=fields, out=fh)
    console.print(f"{len(rows)} {what} written to {out}")


# --- cohorts --------------------------------------------------------------------------------------------


@app.command("cohort")
def cohort_cmd(
    where: Annotated[
        str, typer.Option("--where", help="cohort expression, e.g. 'pleural_effusion >= 0.8 and not pneumothorax'")
    ] = "",
    out: Annotated[
        Path | None, typer.Option("--out", help="write the rows to FILE.csv or FILE.parquet (+ manifest)")
    ] = None,
    per: Annotated[str, typer.Option(help="one row per study or per image")] = "study",
    model_version: Annotated[int | None, typer.Option(help="only this model version's findings")] = None,
    link_expiry: Annotated[int, typer.Option(help="per-image rows: presigned links valid this many seconds")] = 3600,
    finetune: Annotated[Path | None, typer.Option(help="also write images + train.jsonl (LLaVA format) here")] = None,
    answers: Annotated[str, typer.Option(help="fine-tuning answers: reviewed (labels only) or model")] = "reviewed",
    deid_out: Annotated[
        Path | None, typer.Option(help="also write a de-identified export (PS3.15 Annex E) into this new folder")
    ] = None,
) -> None:
    """Select studies or images by findings and metadata; print the count, or export them."""
    from db.cohort import CohortSyntaxError
    from flows.cohort_export import cohort, model_version_info, write_finetune, write_table
    from flows.rules.questions import load_bank
    from flows.wiring.runtime import build_store

    if per not in ("study", "image"):
        raise _fail("--per takes study or image", 2)
    if answers not in ("reviewed", "model"):
        raise _fail("--answers takes reviewed or model", 2)
    settings = _settings()
    bank = load_bank(settings.questions_file)
    engine = _engine_at_head(settings)
    try:
        result = cohort(
            engine,
            where,
            unit=per,  # type: ignore[arg-type]
            model_version_id=model_version,
            known_questions=[q.id for q in bank.questions],
        )
    except CohortSyntaxError as exc:
        engine.dispose()
        raise _fail(f"cohort expression: {exc}", 2) from None
    store = build_store(settings)
    console.print(f"{len(result.rows)} {per}(s) match")
    if out is not None:
        try:
            manifest = write_table(
                result,
                out,
                store=store,
                link_expiry_s=link_expiry,
                model_versions=model_version_info(engine, result.model_version_ids),
            )
        except ValueError as exc:
            engine.dispose()
            raise _fail(str(exc), 2) from None
        console.print(f"wrote {manifest['rows']} row(s) to {out} and {out.name}.manifest.json")
    if finetune is not None:
        counts = write_finetune(
            engine,
            store,
            result=result,
            out_dir=finetune,
            question_texts={q.id: q.text for q in bank.questions},
            answers=answers,  # type: ignore[arg-type]
            model_version_id=model_version,
        )
        console.print(
            f"fine-tuning set: {counts['images']} image(s), {counts['turns']} turn(s) in {finetune}/train.jsonl"
        )
    engine.dispose()
    if deid_out is not None:
        from flows.deid_export import export_deidentified
        from flows.wiring.runtime import Runtime
        from integrations.errors import NightreadError

        with Runtime.build(settings) as rt:
            try:
                m = export_deidentified(rt, result=result, out_dir=deid_out)
            except NightreadError as exc:
                raise _fail(str(exc), 2) from None
        console.print(
            f"de-identified: {m['studies']} studies, {m['dicom_files']} DICOM files, {m['pngs']} PNGs in {deid_out}"
        )
    if out is not None or finetune is not None or deid_out is not None:  # an export leaves the database: audited
        from db import reviews
        from db.models import AuditAction
        from db.session import make_engine, session_scope

        audit_engine = make_engine(settings.database_url)
        try:
            with session_scope(audit_engine) as session:
                reviews.audit(
                    session=session,
                    action=AuditAction.COHORT_EXPORTED,
                    actor=reviews.cli_actor(),
                    client="cli",
                    detail=(
                        f"{len(result.rows)} {per} row(s); table={out is not None} finetune={finetune is not None} "
                        f"deid={deid_out is not None}; where: {where[:400]}"
                    ),
                )
        finally:
            audit_engine.dispose()


# --- validation and the promotion gate ----------------------------------------------------------------
models_app = typer.Typer(help="Model versions: list them, promote one (after validation).", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _metrics_table(title: str, metrics: dict[str, Any]) -> Table:
    from flows.rules.metrics import METRICS

    table = Table(title=title)
    table.add_column("scope")
    table.add_column("n", justify="right")
    for m in METRICS:
        table.add_column(m, justify="right")
    rows = [("overall", metrics["overall"])]
    rows += [(f"modality {k}", v) for k, v in metrics.get("per_modality", {}).items()]
    rows += [(f"question {k}", v) for k, v in metrics.get("per_question", {}).items()]
    for name, m in rows:
        table.add_row(name, str(m["n"]), *("–" if m[k] is None else f"{m[k]:.3f}" for k in METRICS))
    return table


@app.command()
def score(
    dataset: Annotated[Path, typer.Option(help="labeled folder (VQA-RAD / SLAKE JSON layout)")],
    predictions: Annotated[Path, typer.Option(help="JSON lines: image, question (null: caption), answer, p_yes")],
    as_json: Annotated[bool, typer.Option("--json", help="print the metrics as JSON")] = False,
) -> None:
    """Metrics of a predictions file against a labeled set, without running a model."""
    from flows.rules.metrics import DatasetError, load_dataset, load_predictions
    from flows.rules.metrics import score as compute

    try:
        metrics = compute(load_dataset(dataset), load_predictions(predictions))
    except DatasetError as exc:
        raise _fail(str(exc), 2) from None
    if as_json:
        sys.stdout.write(json.dumps(metrics, indent=2) + "\n")
    else:
        console.print(_metrics_table(f"{predictions.name} on {dataset.name}", metrics))


@app.command()
def validate(
    dataset: Annotated[str, typer.Option(help="labeled folder (VQA-RAD / SLAKE layout), or 'reviews'")],
    report: Annotated[Path | None, typer.Option(help="write report.md and reliability diagrams here")] = None,
    predictions_out: Annotated[Path | None, typer.Option(help="write the predictions (JSON lines) here")] = None,
    apply_temperature: Annotated[
        bool, typer.Option(help="store the fitted temperature on the model version (later P(yes) calibrated)")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    model: Annotated[
        str | None, typer.Option(help="checkpoint to validate instead of NIGHTREAD_INFERENCE__MODEL")
    ] = None,
    revision: Annotated[str | None, typer.Option(help="its revision")] = None,
) -> None:
    """Run the configured model over a labeled set; metrics per modality and question; stored per model version."""
    from flows.rules.metrics import DatasetError
    from flows.validate import validate as validate_flow
    from integrations.errors import ConfigurationError

    settings = _flow_settings()
    try:
        result = validate_flow(
            dataset,
            settings=settings,
            report=report,
            predictions_out=predictions_out,
            apply_temperature=apply_temperature,
            model=model,
            revision=revision,
        )
    except (DatasetError, ConfigurationError) as exc:
        raise _fail(str(exc), 2) from None
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
        return
    console.print(
        _metrics_table(f"model version {result['model_version_id']} on {result['dataset']}", result["metrics"])
    )
    t = result.get("temperature")
    console.print(
        f"validation run {result['validation_run_id']}: {result['examples']} examples; fitted temperature "
        + (f"{t:.3f}" + (" (stored on the model version)" if apply_temperature else " (not stored)") if t else "–")
    )
    if result.get("report"):
        console.print(f"report: {result['report']}")


@models_app.command("list")
def models_list(as_json: Annotated[bool, typer.Option("--json", help="one JSON array")] = False) -> None:
    """Model versions with their temperature, latest validation and promotion."""
    from sqlmodel import col, select

    from db.models import ModelVersion, ValidationRun

    with _database() as session:
        rows: list[dict[str, Any]] = []
        for mv in session.exec(select(ModelVersion).order_by(col(ModelVersion.id))).all():
            run = session.exec(
                select(ValidationRun)
                .where(ValidationRun.model_version_id == mv.id)
                .order_by(col(ValidationRun.id).desc())
            ).first()
            overall = run.metrics.get("overall", {}) if run else {}
            rows.append(
                {
                    "id": mv.id,
                    "name": mv.name,
                    "revision": mv.revision,
                    "backend": mv.backend,
                    "temperature": mv.temperature,
                    "promoted": mv.promoted_at is not None,
                    "validation": None
                    if run is None
                    else {
                        "run": run.id,
                        "dataset": run.dataset,
                        "examples": run.examples,
                        **{k: overall.get(k) for k in ("closed_accuracy", "auroc", "ece")},
                    },
                }
            )
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table(title="model versions")
    for column in ("id", "name", "revision", "backend", "T", "validated", "promoted"):
        table.add_column(column)
    for r in rows:
        v = r["validation"]
        table.add_row(
            str(r["id"]),
            r["name"],
            r["revision"][:12],
            r["backend"],
            f"{r['temperature']:.2f}",
            "-" if v is None else f"run {v['run']} on {v['dataset']} ({v['examples']})",
            "yes" if r["promoted"] else "",
        )
    console.print(table)


@models_app.command("promote")
def models_promote(model_version: Annotated[int, typer.Argument(help="model version id (see `models list`)")]) -> None:
    """Make a model version the default; refused unless its latest validation meets NIGHTREAD_VALIDATION__*."""
    from db import reviews
    from flows.validate import promote

    settings = _settings()
    engine = _engine_at_head(settings)
    try:
        mv = promote(engine, model_version_id=model_version, minimums=settings.validation, actor=reviews.cli_actor())
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    except PermissionError as exc:
        raise _fail(f"model version {model_version} not promoted: {exc}", 1) from None
    finally:
        engine.dispose()
    console.print(f"model version {mv.id} ({mv.name}) promoted")


# --- backfill, reannotate, serve ------------------------------------------------------------------------


@app.command("backfill")
def backfill_cmd(
    start: Annotated[str, typer.Option("--from", help="first study date, YYYY-MM-DD")],
    end: Annotated[str, typer.Option("--to", help="last study date, YYYY-MM-DD")],
    modality: Annotated[list[str] | None, typer.Option(help="only these modalities (repeat)")] = None,
    source: Annotated[str | None, typer.Option(help="source name (default: the first enabled one)")] = None,
) -> None:
    """Discover and annotate past studies day by day; run it again to resume after a stop or a pause."""
    from flows.backfill import run_backfill
    from integrations.errors import ConfigurationError

    settings = _flow_settings()
    try:
        result = run_backfill(settings, start_date=start, end_date=end, modalities=modality or [], source=source)
    except ConfigurationError as exc:
        raise _fail(str(exc), 2) from None
    console.print(
        f"backfill {result['status']}: {result.get('days', 0)} day(s), {result.get('found', 0)} studies found "
        f"({result.get('new', 0)} new), {result.get('studies_done', 0)} annotated, {result.get('queries', 0)} "
        f"C-FIND/QIDO queries; next day {result['next_date']}"
    )
    if result.get("windows_at_limit"):
        err.print(
            f"[yellow]{result['windows_at_limit']} one-minute window(s) still reached the PACS's result limit "
            "(NIGHTREAD_BACKFILL__RESULT_LIMIT): studies may be missing there[/yellow]"
        )


@app.command()
def reannotate(
    where: Annotated[str, typer.Option("--where", help="cohort expression ('' = every study)")] = "",
    model: Annotated[str | None, typer.Option(help="checkpoint to use instead of NIGHTREAD_INFERENCE__MODEL")] = None,
    revision: Annotated[str | None, typer.Option(help="its revision")] = None,
) -> None:
    """Annotate stored images of a cohort with a new model or question bank; the PACS is not contacted."""
    from db.cohort import CohortSyntaxError
    from flows.reannotate import reannotate as reannotate_flow
    from integrations.errors import ConfigurationError

    settings = _flow_settings()
    try:
        result = reannotate_flow(where=where, model=model, revision=revision, settings=settings)
    except (CohortSyntaxError, ConfigurationError) as exc:
        raise _fail(str(exc), 2) from None
    console.print(
        f"model version {result['model_version_id']}: {result.get('studies', 0)} studies, "
        f"{result.get('images', 0)} images, {result.get('captions', 0)} new captions, "
        f"{result.get('findings', 0)} new findings"
    )


@app.command()
def serve(
    cron: Annotated[str, typer.Option(help="the nightly schedule")] = "0 1 * * *",
    timezone: Annotated[str, typer.Option(help="time zone of the schedule")] = "UTC",
    server: Annotated[bool, typer.Option(help="start a local Prefect server when PREFECT_API_URL is not set")] = True,
    server_port: Annotated[int, typer.Option(help="its port (0: any free port)")] = 4200,
) -> None:
    """Serve the nightly (cron), backfill and reannotate deployments from this process until interrupted."""
    from prefect import serve as prefect_serve

    from flows.serve import build_deployments, local_prefect_server

    settings = _settings()
    _upgrade(settings)
    _serve_metrics(settings)
    if os.environ.get("PREFECT_API_URL") or not server:
        prefect_serve(*build_deployments(settings, cron=cron, timezone=timezone))
        return
    import signal

    def _stop(*_: object) -> None:  # SIGTERM ends like Ctrl-C: the local server is stopped with us
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    with local_prefect_server(server_port or None) as api:
        os.environ["PREFECT_API_URL"] = api
        console.print(f"Prefect server at {api.removesuffix('/api')} (UI); serving nightly, backfill, reannotate")
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}):
            prefect_serve(*build_deployments(settings, cron=cron, timezone=timezone))


deid_app = typer.Typer(help="De-identified exports.", no_args_is_help=True)
app.add_typer(deid_app, name="deid")


@deid_app.command("reidentify")
def deid_reidentify(pseudonym: Annotated[str, typer.Argument(help="a pseudonym from a de-identified export")]) -> None:
    """The original identifier behind a pseudonym (needs the de-identification key; an admin's task)."""
    from db import reviews
    from db.models import AuditAction
    from db.session import session_scope
    from flows.deid_export import reidentify
    from flows.wiring.runtime import Runtime

    settings = _settings()
    _upgrade(settings)
    with Runtime.build(settings) as rt:
        found = reidentify(rt, pseudonym)
        with session_scope(rt.engine) as session:  # who asked, and what kinds were found (never the originals)
            reviews.audit(
                session=session,
                action=AuditAction.REIDENTIFIED,
                actor=reviews.cli_actor(),
                subject=pseudonym[:80],
                client="cli",
                detail=f"{len(found)} original(s): {', '.join(k for k, _ in found) or 'none'}",
            )
    if not found:
        raise _fail("no such pseudonym", 1)
    for kind, original in found:
        console.print(f"{kind}: {original}")


if __name__ == "__main__":  # pragma: no cover - after every command is registered
    app()
