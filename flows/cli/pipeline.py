"""The nightly pipeline: `nightread status`, `run`, `demo`, `backfill`, `reannotate` and `serve`."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from flows.cli._common import (
    console,
    database,
    database_session,
    err,
    fail,
    flow_settings,
    load_settings,
    print_json,
    serve_metrics,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from flows.wiring.settings import NightreadSettings

app = typer.Typer()


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False) -> None:
    """Counts: studies by status, images, captions, findings, flags, failures, last run."""
    from db import ledger
    from db import repository as repo

    settings = load_settings()
    with database_session(settings) as session:
        data = repo.status_counts(session=session)
        data["stranded"] = ledger.stranded(session=session, max_attempts=settings.flow.max_attempts)
    if as_json:
        print_json(data)
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


def _run_with_progress(settings: NightreadSettings, engine: Engine) -> dict[str, Any]:
    """Run the nightly flow; a side thread polls the database (through `engine`) to drive a progress bar."""
    from db import repository as repo
    from db.models import StudyStatus, utcnow
    from db.session import session_scope
    from flows.nightly import run_nightly

    started = utcnow()
    done = threading.Event()

    def poll(progress: Progress, task_id: Any) -> None:
        while not done.wait(0.5):
            try:
                with session_scope(engine) as session:
                    by_status = repo.studies_by_status(session=session, touched_since=started)
            except Exception:  # a busy or restarting database: the bar is cosmetic, the run is not
                continue
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
    from integrations.errors import NightreadError

    settings = load_settings()
    with database(settings) as engine:
        try:
            if study is not None:
                from flows.annotate import annotate_study

                console.print_json(json.dumps(annotate_study(study_id=study, settings=settings)))
                return
            result = _run_with_progress(settings, engine)
        except NightreadError as exc:
            raise fail(f"{type(exc).__name__}: {exc}") from None
    _print_result(settings, result, "nightread run")


@app.command()
def demo(
    fresh: Annotated[bool, typer.Option(help="delete the demo's data dir first")] = False,
    data_dir: Annotated[Path | None, typer.Option(help="default: NIGHTREAD_DATA_DIR or ./.nightread")] = None,
) -> None:
    """Start the built-in sample PACS and run the nightly job against it on embedded defaults."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the summary table says what happened
    from integrations.sample_pacs import SamplePacs

    settings = load_settings(**({"data_dir": data_dir} if data_dir else {}))
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
        with database(settings, upgrade_to="head") as engine:  # the demo sets its database up itself
            t0 = time.perf_counter()
            result = _run_with_progress(settings, engine)
            result["wall_s"] = round(time.perf_counter() - t0, 2)
    finally:
        pacs.stop()
    _print_result(settings, result, "nightread demo")
    console.print(
        "Run `make demo` again: it finds nothing new and writes nothing twice. "
        "`.venv/bin/nightread status` shows the counts."
    )


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

    settings = flow_settings()
    try:
        result = run_backfill(settings, start_date=start, end_date=end, modalities=modality or [], source=source)
    except ConfigurationError as exc:
        raise fail(str(exc), 2) from None
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

    settings = flow_settings()
    try:
        result = reannotate_flow(where=where, model=model, revision=revision, settings=settings)
    except (CohortSyntaxError, ConfigurationError) as exc:
        raise fail(str(exc), 2) from None
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

    settings = load_settings()
    with database(settings) as engine:  # the schema checked once (the deployments' runs open their own)
        serve_metrics(settings, engine)
        if os.environ.get("PREFECT_API_URL") or not server:
            prefect_serve(*build_deployments(settings, cron=cron, timezone=timezone))
            return
        # a SIGTERM ends as Ctrl-C does (the app's callback): the local server is stopped with us
        with local_prefect_server(server_port or None) as api:
            os.environ["PREFECT_API_URL"] = api
            console.print(f"Prefect server at {api.removesuffix('/api')} (UI); serving nightly, backfill, reannotate")
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings({PREFECT_API_URL: api}):
                prefect_serve(*build_deployments(settings, cron=cron, timezone=timezone))


@app.command()
def deploy(
    pool: Annotated[str, typer.Option(help="the process work pool (created with its queues if missing)")] = "nightread",
    timezone: Annotated[str, typer.Option(help="time zone of the nightly's 01:00 schedule")] = "UTC",
) -> None:
    """Create the work pool, its queues (urgent, nightly, backfill by priority) and the nightly,
    annotate-studies, backfill and reannotate deployments on the Prefect server of PREFECT_API_URL, for
    `prefect worker start --pool nightread` on any number of machines (docs/scale-out.md)."""
    if not os.environ.get("PREFECT_API_URL"):
        raise fail("deploy needs a Prefect server: set PREFECT_API_URL (e.g. http://prefect:4200/api)", code=2)
    from flows.deployments import deploy as deploy_all

    settings = load_settings()
    with database(settings):  # the schema the workers will need, checked before anything is created
        pass
    names = deploy_all(pool=pool, timezone=timezone)
    console.print(f"deployed on pool {pool!r}: {', '.join(names)}")
    if settings.flow.dispatch != "work_pool":
        console.print("note: NIGHTREAD_FLOW__DISPATCH is not work_pool here: set it where the nightly runs")
