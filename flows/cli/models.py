"""Models: `nightread models list/promote/tiny`, `score` and `validate` (the promotion gate's evidence),
and `triton serve` (a development Triton Inference Server). `model tiny` is the old, hidden name of
`models tiny`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from flows.cli._common import console, database, database_session, err, fail, flow_settings, load_settings, print_json

app = typer.Typer()
models_app = typer.Typer(help="Model versions: list them, promote one (after validation).", no_args_is_help=True)
model_app = typer.Typer(help="Deprecated: use `nightread models`.", no_args_is_help=True)
triton_app = typer.Typer(help="Triton Inference Server.", no_args_is_help=True)


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
        raise fail(str(exc), 2) from None
    if as_json:
        print_json(metrics, indent=2)
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

    settings = flow_settings()
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
        raise fail(str(exc), 2) from None
    if as_json:
        print_json(result, indent=2)
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
    from db import repository as repo

    with database_session() as session:
        rows: list[dict[str, Any]] = []
        for mv, run in repo.model_versions_with_validation(session=session):
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
        print_json(rows)
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

    settings = load_settings()
    with database(settings) as engine:
        try:
            mv = promote(
                engine, model_version_id=model_version, minimums=settings.validation, actor=reviews.cli_actor()
            )
        except ValueError as exc:
            raise fail(str(exc), 2) from None
        except PermissionError as exc:
            raise fail(f"model version {model_version} not promoted: {exc}", 1) from None
    console.print(f"model version {mv.id} ({mv.name}) promoted")


@models_app.command("tiny")
def models_tiny(
    family: Annotated[str, typer.Option(help="architecture family")] = "smolvlm",
    out: Annotated[Path, typer.Option(help="folder to write")] = Path("tiny-model"),
) -> None:
    """Build a tiny randomly initialised checkpoint offline (for tests and demos; its answers mean nothing)."""
    from integrations.vlm.tiny import build_tiny, families

    if family not in families():
        raise fail(f"unknown family {family!r}; choose one of: {', '.join(families())}", 2)
    path = build_tiny(family, out)
    console.print(f"tiny {family} checkpoint written to {path}")


@model_app.command("tiny", help="Deprecated: use `nightread models tiny`.")
def model_tiny(
    family: Annotated[str, typer.Option(help="architecture family")] = "smolvlm",
    out: Annotated[Path, typer.Option(help="folder to write")] = Path("tiny-model"),
) -> None:
    err.print("[yellow]`nightread model tiny` is deprecated: use `nightread models tiny`[/yellow]")
    models_tiny(family=family, out=out)


@triton_app.command("serve")
def triton_serve(
    model: Annotated[str | None, typer.Option(help="checkpoint folder or hub id (default: the repository's)")] = None,
) -> None:
    """Run tritonserver (from the nvidia-pytriton wheel) on nightread's model repository, for development."""
    import threading

    from integrations.errors import NightreadError
    from integrations.triton_server import TritonServer, prepare_repository

    settings = load_settings()
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
        raise fail(str(exc)) from None
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
        raise fail(str(exc)) from None
    finally:
        server.stop()


app.add_typer(models_app, name="models")
app.add_typer(model_app, name="model", hidden=True)
app.add_typer(triton_app, name="triton")
