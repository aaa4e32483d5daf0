"""Leak scans for the tests: look for secrets or synthetic patient data wherever a run leaves text behind
(log records, stderr, Prefect's database, object keys, nightread's database).

A scan reads everything as text and searches it, case-insensitively, for every needle; each hit names
where it was found (`prefect:flow_run.parameters`, `log:prefect.task_runs`, ...) so a failing
assertion says what leaked and into which place.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, MetaData, select

Texts = Iterable[tuple[str, str]]  # (where, text)


@dataclass(frozen=True)
class Hit:
    where: str
    needle: str
    excerpt: str

    def __str__(self) -> str:
        return f"{self.needle!r} in {self.where}: …{self.excerpt}…"


@dataclass(frozen=True)
class SyntheticPatient:
    """Patient identifiers distinctive enough that finding one anywhere cannot be a coincidence."""

    family: str
    given: str
    patient_id: str
    birth_date: str  # YYYYMMDD
    accession: str

    @classmethod
    def number(cls, n: int) -> SyntheticPatient:
        return cls(
            family=f"ZZPHIFAMILY{n:02d}",
            given=f"ZZPHIGIVEN{n:02d}",
            patient_id=f"ZZPHIPID{n:04d}",
            birth_date=f"190{n % 10}0{1 + n % 9}2{n % 10}",
            accession=f"ZZPHIACC{n:04d}",
        )

    @property
    def name(self) -> str:
        return f"{self.family}^{self.given}"

    def needles(self) -> list[str]:
        """Every form a value could leak in: the DICOM PN and its components (a formatted name drops the
        ^), the birth date as stored and as an ISO date."""
        d = self.birth_date
        return [self.name, self.family, self.given, self.patient_id, d, f"{d[:4]}-{d[4:6]}-{d[6:]}", self.accession]


def find(texts: Texts, needles: Iterable[str]) -> list[Hit]:
    wanted = [n for n in dict.fromkeys(needles) if n]
    hits = []
    for where, text in texts:
        folded = text.casefold()
        for needle in wanted:
            at = folded.find(needle.casefold())
            if at >= 0:
                hits.append(Hit(where, needle, text[max(0, at - 60) : at + len(needle) + 60]))
    return hits


def as_text(value: Any) -> str | None:
    """A stored value as text (None for numbers, dates and NULLs: they carry no text)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str)
    return None


# --- logs ----------------------------------------------------------------------------------------------


def log_texts(records: Iterable[logging.LogRecord]) -> Iterator[tuple[str, str]]:
    """Each record's message with its arguments, and its traceback when it has one."""
    formatter = logging.Formatter()
    for record in records:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + formatter.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + record.stack_info
        yield f"log:{record.name}", text


# --- databases -----------------------------------------------------------------------------------------


def sqlite_texts(path: Path) -> Iterator[tuple[str, str]]:
    """Every text and blob value of every table of a SQLite file (read-only; a running server may hold it)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            cur = conn.execute(f'SELECT * FROM "{table}"')
            columns = [d[0] for d in cur.description]
            for row in cur:
                for column, value in zip(columns, row, strict=True):
                    text = as_text(value)
                    if text:
                        yield f"{path.name}:{table}.{column}", text
    finally:
        conn.close()


def database_texts(engine: Engine, *, skip: Iterable[str] = ()) -> Iterator[tuple[str, str]]:
    """Every text value (strings, JSON) of every table of nightread's database (SQLite or Postgres),
    except the `table.column`s in `skip`."""
    skipped = set(skip)
    meta = MetaData()
    meta.reflect(engine)
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            columns = [c for c in table.columns if f"{table.name}.{c.name}" not in skipped]
            if not columns:
                continue
            for row in conn.execute(select(*columns)):
                for column, value in zip(columns, row, strict=True):
                    text = as_text(value)
                    if text:
                        yield f"db:{table.name}.{column.name}", text


def text_columns(engine: Engine) -> set[str]:
    """`table.column` of every column of nightread's database that can hold text."""
    meta = MetaData()
    meta.reflect(engine)
    out = set()
    for table in meta.sorted_tables:
        for column in table.columns:
            try:
                python_type = column.type.python_type
            except NotImplementedError:  # JSON and other types without one: text all the same
                python_type = str
            if python_type in (str, bytes, dict, list):
                out.add(f"{table.name}.{column.name}")
    return out


# --- Prefect -------------------------------------------------------------------------------------------


def prefect_database() -> Path:
    """The SQLite file of the Prefect API the tests run against (prefect_test_harness's temporary one)."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = str(PREFECT_API_DATABASE_CONNECTION_URL.value())
    scheme, sep, rest = url.partition(":///")
    if not sep or not scheme.startswith("sqlite"):
        raise RuntimeError(f"the Prefect API database is not a SQLite file: {scheme}")
    return Path(rest)


def flush_prefect_logs() -> None:
    """Send the log records still queued for the Prefect API (blocks until sent)."""
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()


def prefect_logs_stored(db: Path, flow_run_id: str, marker: str) -> bool:
    """True once the Prefect log table has a line of this flow run containing `marker`."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT count(*) FROM log WHERE flow_run_id = ? AND message LIKE ?",
            (str(uuid.UUID(flow_run_id)), f"%{marker}%"),  # Prefect keeps UUIDs as text, with dashes
        ).fetchone()
        return bool(row[0])
    finally:
        conn.close()
