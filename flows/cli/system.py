"""`nightread config`, `doctor` and `db upgrade`: the settings in effect, the services they name, the schema."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from flows.cli._common import console, database, load_settings

app = typer.Typer()
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)


@app.command()
def config() -> None:
    """Print the effective settings (secrets masked) as JSON."""
    console.print_json(json.dumps(load_settings().masked()))


@app.command()
def doctor() -> None:
    """Check every configured service (database and schema, object store, each PACS with its TLS,
    Triton, review secret, disk space): one line each; exit 1 when any fails."""
    from flows.doctor import run_checks

    checks = run_checks(load_settings())
    for check in checks:
        console.print(check.line(), markup=False, highlight=False)
    failed = [c for c in checks if not c.ok]
    if failed:
        console.print(f"{len(failed)} of {len(checks)} checks failed", markup=False)
        raise typer.Exit(1)
    console.print(f"all {len(checks)} checks passed", markup=False)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Create or migrate the database schema (Alembic)."""
    from db.migrate import current_revision
    from flows.wiring.settings import mask_url

    settings = load_settings()
    with database(settings, upgrade_to=revision) as engine:
        console.print(f"database {mask_url(settings.database_url)} at revision {current_revision(engine)}")


app.add_typer(db_app, name="db")
