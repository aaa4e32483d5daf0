"""Where studies come from: `nightread sources …` (the PACS a run queries), `listen` (studies pushed to
us by C-STORE) and `sample-pacs` (the built-in PACS of the demo and the tests)."""

from __future__ import annotations

import threading
from contextlib import ExitStack, suppress
from typing import Annotated

import typer
from rich.table import Table

from flows.cli._common import console, database, database_session, fail, load_settings, print_json, serve_metrics

app = typer.Typer()
sources_app = typer.Typer(help="PACS sources (configured in settings or added here).", no_args_is_help=True)


@sources_app.command("list")
def sources_list(as_json: Annotated[bool, typer.Option("--json", help="one JSON array")] = False) -> None:
    """Every source: from settings (NIGHTREAD_SOURCES / NIGHTREAD_PACS__*) and added with `sources add`."""
    from db import repository as repo
    from flows.wiring.runtime import source_row

    settings = load_settings()
    with database_session(settings) as session:
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
        print_json(rows)
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
        raise fail(f"invalid source: {'.'.join(str(p) for p in first['loc']) or 'source'}: {first['msg']}", 2) from None
    with database_session() as session:
        repo.upsert_source(session=session, **source_row(pacs))
    console.print(f"source {name!r} ({kind}) saved")


def _set_enabled(name: str, enabled: bool) -> None:
    from db import repository as repo

    with database_session() as session:
        if repo.set_source_enabled(session=session, name=name, enabled=enabled) is None:
            raise fail(f"no source named {name!r} (see `nightread sources list`)")
    console.print(f"source {name!r} {'enabled' if enabled else 'disabled'}")


@sources_app.command("disable")
def sources_disable(name: Annotated[str, typer.Argument()]) -> None:
    """Stop discovering and retrieving from a source (its studies and cursor are kept)."""
    _set_enabled(name, False)


@sources_app.command("enable")
def sources_enable(name: Annotated[str, typer.Argument()]) -> None:
    """Use a disabled source again."""
    _set_enabled(name, True)


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
            raise fail(f"--move-destination must look like AE=HOST:PORT, not {item!r}", 2) from None
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

    settings = load_settings()
    allowed = list(allow or settings.listen.allowed_aes)
    with database(settings) as engine, ExitStack() as stack:  # the schema checked here, one engine
        serve_metrics(settings, engine)
        record = make_arrival_recorder(settings, engine)
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
            raise fail(f"{exc} (set NIGHTREAD_LISTEN__ALLOWED_AES='[\"MODALITY1\"]' or pass --allow)", 2) from None
        stack.callback(receiver.stop)
        console.print(
            f"receiving as {settings.listen.ae_title} on {settings.listen.host}:{receiver.port} from "
            f"{', '.join(allowed)} into {settings.inbox}; a study is complete after "
            f"{settings.listen.quiet_period_s:g} s without new instances; Ctrl-C stops"
        )
        with suppress(KeyboardInterrupt):  # Ctrl-C (or SIGTERM) stops the receiver, then the engines
            threading.Event().wait()


app.add_typer(sources_app, name="sources")
