"""The fault harness: unattended nights under chaos, on Postgres + Orthanc + S3 (moto) + Triton.

`make chaos` (`python -m tests.chaos`) starts every server on loopback, seeds Orthanc with small
synthetic studies (NIGHTREAD_CHAOS_STUDIES, default 20) and runs `nightread run` as an operator would,
as subprocesses, while it breaks things:

R1  runs killed at random points (a fixed, printed seed), alternately by SIGKILL and SIGTERM; a run
    whose Postgres stops and starts again under it; a run whose object store fails (every S3
    connection reset, new ones refused, for a few seconds: a fault proxy in front of moto, which keeps
    its objects in memory and would lose them if stopped); then clean runs until every study is done
    or failed (at most 3). When killed runs left every slot of the PACS's association limit held (a
    Prefect global concurrency limit), the next run would wait for a slot forever: R1 says so, skips
    its other runs and shows it with one clean run of 60 s. Figures after the last run:
      lost        studies in Orthanc not `done` (or done without an annotated image)
      duplicated  rows twice under one key (studies, images, captions, findings, failures, SR reports),
                  model versions beyond one, image rows sharing an object, objects in S3 (images,
                  reports) without their row
      stranded    what `nightread status` names as stranded, plus studies still pending or retrieving
      temp_left   files under data_dir/work and nightread-* entries in the runs' temporary folder
R2  a fresh database and bucket; during a run, tritonserver stops for 30 s and starts again on the
    same ports. lost = studies that run did not finish (`NIGHTREAD_TRITON__OUTAGE_S` is 90).
R3  a fresh database and bucket; every run goes through a fault proxy in front of Orthanc's DICOM port
    that aborts, resets mid-PDU, stalls and drips a share of the associations; runs until nothing is
    settled (at most 6; `MAX_ATTEMPTS` 3, so a study ends done or failed with a reason). faults = what
    the proxy injected; the share = studies done or failed with a reason, over all studies.

It prints figures and asserts nothing (tests/integration/test_chaos.py is the small version that
asserts). The last three lines:

    R1 kills=<n> lost=<n> duplicated=<n> stranded=<n> temp_left=<n>
    R2 outage_s=<n> lost=<n>
    R3 faults=<n> done_or_failed_with_reason=<share>

Goals: every count 0 and the share 1.0. Every server and run it started is stopped, Ctrl-C included.
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # before prefect is imported
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fault_proxy import FaultProxy
from tests.services import REPO, Orthanc, Postgres, S3Server, free_port, triton_on_free_ports

NIGHTREAD = str(Path(sys.executable).with_name("nightread"))
PACS_FAULTS = {"abort": 0.1, "reset": 0.1, "stall": 0.1, "drip": 0.1}
_LIVE_RUNS: set[subprocess.Popen[bytes]] = set()  # every `nightread run` under way, ended on the way out


# --- studies ---------------------------------------------------------------------------------------------


def chaos_studies(count: int, *, first_seed: int = 201) -> list[Any]:
    """`count` small synthetic studies (5 per seed: chest CR/DX pairs, a 4-slice CT, an MR), dated over
    the last 5 days."""
    from integrations.sample_pacs import generate_studies

    studies: list[Any] = []
    seed = first_seed
    while len(studies) < count:
        studies += generate_studies(seed=seed, xr_size=64, ct_size=32, ct_slices=4)
        seed += 1
    return studies[:count]


def seed_orthanc(orthanc: Orthanc, studies: Sequence[Any]) -> set[str]:
    orthanc.upload_datasets(ds for study in studies for ds in study.instances)
    return {s.study_instance_uid for s in studies}


# --- Postgres and S3 outages -------------------------------------------------------------------------------


def postgres_down(pg: Postgres) -> None:
    pg.down()


def postgres_up(pg: Postgres) -> None:
    pg.up()


def s3_down(proxy: FaultProxy) -> None:
    """Every S3 connection reset, new ones closed at once."""
    proxy.set_faults({"abort": 1.0})
    proxy.drop_connections()


def s3_up(proxy: FaultProxy) -> None:
    proxy.set_faults({})


# --- one nightread setup -------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What one phase's runs share: a database, a bucket, a data dir, the PACS (through `pacs_port`)."""

    name: str
    work: Path
    database_url: str
    s3_endpoint: str
    bucket: str
    pacs_port: int
    orthanc: Orthanc
    inference: dict[str, str]  # the model: NIGHTREAD_INFERENCE__* (and NIGHTREAD_TRITON__*) variables
    max_attempts: int = 10
    timeout_s: float = 3.0
    runs: int = 0

    @property
    def data_dir(self) -> Path:
        return self.work / "data"

    @property
    def tmp(self) -> Path:
        return self.work / "tmp"

    def env(self) -> dict[str, str]:
        self.tmp.mkdir(parents=True, exist_ok=True)
        keep = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTREAD_")}
        return {
            **keep,
            "PREFECT_HOME": str(self.work / "prefect"),
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TMPDIR": str(self.tmp),
            "NIGHTREAD_DATA_DIR": str(self.data_dir),
            "NIGHTREAD_DATABASE__URL": self.database_url,
            "NIGHTREAD_STORAGE__BACKEND": "s3",
            "NIGHTREAD_STORAGE__ENDPOINT": self.s3_endpoint,
            "NIGHTREAD_STORAGE__BUCKET": self.bucket,
            "NIGHTREAD_STORAGE__ACCESS_KEY": "testing",
            "NIGHTREAD_STORAGE__SECRET_KEY": "testing",
            "NIGHTREAD_STORAGE__SECURE": "false",
            "NIGHTREAD_STORAGE__REGION": "us-east-1",
            "NIGHTREAD_PACS__NAME": "orthanc-chaos",
            "NIGHTREAD_PACS__KIND": "dimse",
            "NIGHTREAD_PACS__HOST": "127.0.0.1",
            "NIGHTREAD_PACS__PORT": str(self.pacs_port),
            "NIGHTREAD_PACS__CALLED_AE": self.orthanc.aet,
            "NIGHTREAD_PACS__CALLING_AE": self.orthanc.nightread_ae,
            "NIGHTREAD_PACS__RETRIEVE": "get",
            "NIGHTREAD_PACS__TIMEOUT_S": str(self.timeout_s),
            "NIGHTREAD_PACS__RETRIEVE_DEADLINE_S": "20",
            "NIGHTREAD_PACS__RETRIEVE_DEADLINE_PER_INSTANCE_S": "0.5",
            "NIGHTREAD_PACS__LOOKBACK_DAYS": "10",
            "NIGHTREAD_FLOW__MAX_ATTEMPTS": str(self.max_attempts),
            "NIGHTREAD_FLOW__RETRY_DELAY_S": "0.2",
            **self.inference,
        }

    def engine(self) -> Any:
        from db.session import make_engine

        return make_engine(self.database_url, pool_size=1, max_overflow=1)


# --- runs ------------------------------------------------------------------------------------------------------


@dataclass
class RunOutcome:
    returncode: int | None
    wall_s: float
    signal_sent: str = ""  # "SIGKILL" / "SIGTERM" when the harness stopped it at its point
    hung: bool = False  # did not end within its time (or after SIGTERM): killed
    log: Path | None = None

    def tail(self, n: int = 1500) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log and self.log.exists() else ""

    def last_words(self, lines: int = 3) -> str:
        """The end of its output on one line (the CLI prints its error last, wrapped)."""
        words = [line.strip() for line in self.tail(2000).splitlines() if line.strip()][-lines:]
        return " ".join(words)[-240:]


def start_run(setup: Setup) -> tuple[subprocess.Popen[bytes], Path]:
    setup.work.mkdir(parents=True, exist_ok=True)
    if setup.runs == 0:  # `nightread run` refuses a database whose schema is not at the latest migration
        subprocess.run([NIGHTREAD, "db", "upgrade"], env=setup.env(), capture_output=True, timeout=300, check=True)
    setup.runs += 1
    log = setup.work / f"run-{setup.runs:02d}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([NIGHTREAD, "run"], env=setup.env(), stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    _LIVE_RUNS.add(proc)
    return proc, log


def end_run(proc: subprocess.Popen[bytes], *, timeout_s: float) -> bool:
    """Wait for a run to end; False (and SIGKILL) when it does not within `timeout_s` (0: now)."""
    ended = True
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=60)
        ended = False
    _LIVE_RUNS.discard(proc)  # not on Ctrl-C while waiting: then stop_live_runs ends it
    return ended


def run_once(setup: Setup, *, timeout_s: float = 300) -> RunOutcome:
    t0 = time.monotonic()
    proc, log = start_run(setup)
    ended = end_run(proc, timeout_s=timeout_s)
    return RunOutcome(proc.returncode, time.monotonic() - t0, hung=not ended, log=log)


@dataclass
class Point:
    """Where in a run the harness strikes: `kind` is startup (`extra_s` after the start), retrieving (a
    study retrieving), rendered (a study of this run in flight with its images rendered: counting image
    rows would miss it, since a killed run may have rendered every image already and a later run's
    renders are upserts), annotated (a caption or finding more) or done (`n` studies more done); then
    `extra_s` more."""

    kind: str
    extra_s: float = 0.0
    n: int = 1

    def __str__(self) -> str:
        return f"{self.kind}{f'+{self.n}' if self.kind == 'done' else ''}+{self.extra_s:.1f}s"


def random_point(rng: random.Random) -> Point:
    kind = rng.choice(["startup", "retrieving", "rendered", "annotated", "done"])
    if kind == "startup":
        return Point(kind, rng.uniform(1.0, 10.0))
    return Point(kind, rng.uniform(0.0, 1.5), n=rng.randint(1, 2))


def progress(engine: Any) -> dict[str, int]:
    """Counts the harness watches while a run goes: studies by status, images, captions + findings, runs."""
    from sqlalchemy import text

    try:
        with engine.connect() as conn:
            by_status = dict(conn.execute(text("SELECT status, count(*) FROM study GROUP BY status")).all())
            images = conn.execute(text("SELECT count(*) FROM image")).scalar_one()
            answers = conn.execute(text("SELECT (SELECT count(*) FROM caption) + (SELECT count(*) FROM finding)"))
            runs = conn.execute(text("SELECT count(*) FROM run")).scalar_one()
            rendered_in_flight = conn.execute(
                text(
                    "SELECT count(*) FROM study s WHERE s.status = 'retrieving' "
                    "AND EXISTS (SELECT 1 FROM image i WHERE i.study_id = s.id)"
                )
            ).scalar_one()
            return {
                **{str(k): int(v) for k, v in by_status.items()},
                "images": int(images),
                "rendered_in_flight": int(rendered_in_flight),
                "answers": int(answers.scalar_one()),
                "runs": int(runs),
            }
    except Exception:  # no schema yet, or the database is down: no progress seen
        return {}


def wait_for_point(
    proc: subprocess.Popen[bytes], engine: Any, point: Point, *, timeout_s: float, started: float
) -> bool:
    """Poll until the run reaches `point` (True) or ends or runs out of time (False)."""
    base = progress(engine)
    deadline = time.monotonic() + timeout_s
    delay = 0.05

    def reached() -> bool:
        if point.kind == "startup":
            return time.monotonic() - started >= point.extra_s
        now = progress(engine)
        if now.get("runs", 0) <= base.get("runs", 0):  # this run's row: what it sees is its own (recovered)
            return False
        if point.kind == "retrieving":
            return now.get("retrieving", 0) > 0
        if point.kind == "rendered":
            return now.get("rendered_in_flight", 0) > 0 or now.get("images", 0) > base.get("images", 0)
        if point.kind == "annotated":
            return now.get("answers", 0) > base.get("answers", 0)
        return now.get("done", 0) >= base.get("done", 0) + point.n

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if reached():
            break
        time.sleep(delay)  # polling interval
        delay = min(delay * 1.5, 0.2)
    else:
        return False
    if point.kind != "startup" and point.extra_s:
        end = time.monotonic() + point.extra_s
        while time.monotonic() < end and proc.poll() is None:
            time.sleep(0.05)  # the random extra part of the point
    return proc.poll() is None


def run_stopped(setup: Setup, engine: Any, *, sig: signal.Signals, point: Point, timeout_s: float = 90) -> RunOutcome:
    """A run that the harness stops with `sig` at `point`, if it gets there before it ends. A run still
    going after `timeout_s` without reaching its point hangs: it is killed and said to."""
    t0 = time.monotonic()
    proc, log = start_run(setup)
    sent = ""
    if wait_for_point(proc, engine, point, timeout_s=timeout_s, started=t0):
        proc.send_signal(sig)
        sent = sig.name
        ended = end_run(proc, timeout_s=90)
    else:
        ended = end_run(proc, timeout_s=0)
    return RunOutcome(proc.returncode, time.monotonic() - t0, signal_sent=sent, hung=not ended, log=log)


def run_disturbed(
    setup: Setup,
    engine: Any,
    *,
    point: Point,
    down: Callable[[], None],
    up: Callable[[], None],
    down_s: float,
    timeout_s: float = 300,
) -> tuple[RunOutcome, bool]:
    """A run during which, at `point`, `down()` breaks a service for `down_s` seconds, then `up()`.
    Returns the outcome and whether the outage happened while the run was going."""
    t0 = time.monotonic()
    proc, log = start_run(setup)
    struck = wait_for_point(proc, engine, point, timeout_s=timeout_s, started=t0)
    if struck:
        down()
        try:
            until = time.monotonic() + down_s
            while time.monotonic() < until:
                time.sleep(0.1)  # the outage's length, not a wait for readiness
        finally:
            up()
    ended = end_run(proc, timeout_s=max(30.0, timeout_s - (time.monotonic() - t0)))
    return RunOutcome(proc.returncode, time.monotonic() - t0, hung=not ended, log=log), struck


# --- what a phase left -----------------------------------------------------------------------------------


@dataclass
class Tally:
    studies: int  # in Orthanc
    by_status: dict[str, int]
    lost: int
    duplicated: dict[str, int]
    stranded: dict[str, int]
    temp_left: list[str]
    failed_with_reason: int
    failed_without_reason: int
    reasons: Counter[str] = field(default_factory=Counter)  # why studies failed (first words of last_error)

    @property
    def duplicates(self) -> int:
        return sum(self.duplicated.values())

    @property
    def stranded_total(self) -> int:
        return sum(self.stranded.values())

    @property
    def done_or_failed_with_reason(self) -> float:
        return (self.by_status.get("done", 0) + self.failed_with_reason) / max(self.studies, 1)


DUPLICATE_KEYS = {
    "studies": ("study", "study_instance_uid"),
    "images": ("image", "sop_instance_uid, frame, render_version"),
    "captions": ("caption", "image_id, model_version_id, prompt_version"),
    "findings": ("finding", "image_id, model_version_id, question_id, bank_version"),
    "failures": ("failure", "stage, object_ref"),
    "reports": ("structured_report", "study_id, model_version_id, bank_version"),
    "image_object_keys": ("image", "object_key"),
}


def tally(setup: Setup, *, expected_uids: set[str], store: Any = None) -> Tally:
    """Lost, duplicated, stranded and temporary files after a phase (see the module docstring)."""
    from sqlalchemy import text
    from sqlmodel import Session

    from db import ledger

    engine = setup.engine()
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT study_instance_uid, status, last_error, id FROM study")).all()
            duplicated = {
                name: int(
                    conn.execute(
                        text(
                            f"SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM {table} GROUP BY {key}) g"
                        )
                    ).scalar_one()
                )
                for name, (table, key) in DUPLICATE_KEYS.items()
            }
            duplicated["model_versions_beyond_one"] = max(
                0, int(conn.execute(text("SELECT count(*) FROM model_version")).scalar_one()) - 1
            )
            # a done study lacks an annotation: an image with neither caption nor finding, or no image
            unannotated = {
                int(i)
                for (i,) in conn.execute(
                    text(
                        "SELECT s.id FROM study s WHERE s.status = 'done' AND (NOT EXISTS "
                        "(SELECT 1 FROM image i WHERE i.study_id = s.id) OR EXISTS (SELECT 1 FROM image i "
                        "WHERE i.study_id = s.id AND NOT EXISTS (SELECT 1 FROM caption c WHERE c.image_id = i.id) "
                        "AND NOT EXISTS (SELECT 1 FROM finding f WHERE f.image_id = i.id)))"
                    )
                ).all()
            }
            image_keys = {str(k) for (k,) in conn.execute(text("SELECT object_key FROM image")).all()}
            report_keys = {str(k) for (k,) in conn.execute(text("SELECT object_key FROM structured_report")).all()}
        with Session(engine) as session:
            stranded = ledger.stranded(session=session, max_attempts=setup.max_attempts)
    finally:
        engine.dispose()
    status_of = {str(uid): str(status) for uid, status, _, _ in rows}
    by_status = Counter(status_of.get(uid, "missing") for uid in expected_uids)
    lost = sum(1 for uid in expected_uids if status_of.get(uid) != "done")
    lost += sum(1 for uid, _, _, sid in rows if uid in expected_uids and sid in unannotated)
    pending = sum(1 for s in status_of.values() if s in ("new", "incomplete", "retrieving", "receiving"))
    stranded = {**stranded, "studies_pending_or_retrieving": pending}
    if store is not None:
        duplicated["image_objects_without_a_row"] = len(set(store.list("images/")) - image_keys)
        duplicated["report_objects_without_a_row"] = len(set(store.list("reports/")) - report_keys)
    failed = [(uid, err) for uid, status, err, _ in rows if status == "failed" and uid in expected_uids]
    return Tally(
        studies=len(expected_uids),
        by_status=dict(by_status),
        lost=lost,
        duplicated=duplicated,
        stranded=stranded,
        temp_left=temp_left(setup),
        failed_with_reason=sum(1 for _, err in failed if err),
        failed_without_reason=sum(1 for _, err in failed if not err),
        reasons=Counter(str(err)[:90] for _, err in failed if err),
    )


def temp_left(setup: Setup) -> list[str]:
    """Files under data_dir/work, nightread-* entries in the runs' temporary folder, and half-written
    files (.tmp-*, .part-*) anywhere in the data dir."""
    left: list[str] = []
    work = setup.data_dir / "work"
    if work.exists():
        left += [str(p) for p in work.rglob("*") if p.is_file()]
    if setup.tmp.exists():
        left += [str(p) for p in setup.tmp.iterdir() if p.name.startswith("nightread-")]
    if setup.data_dir.exists():
        left += [str(p) for p in setup.data_dir.rglob("*") if p.name.startswith((".tmp-", ".part-"))]
    return left


def s3_store(setup: Setup, endpoint: str) -> Any:
    """The phase's bucket, reached directly (not through the fault proxy)."""
    from integrations.storage import S3ObjectStore

    return S3ObjectStore(
        endpoint=endpoint,
        bucket=setup.bucket,
        access_key="testing",
        secret_key="testing",
        secure=False,
        region="us-east-1",
    )


def unsettled(setup: Setup, uids: set[str]) -> int:
    """Studies of the PACS neither done nor failed: pending, retrieving, or not even registered yet (a run
    whose discovery failed)."""
    from sqlalchemy import text

    engine = setup.engine()
    try:
        with engine.connect() as conn:
            settled = {
                str(uid)
                for (uid,) in conn.execute(
                    text("SELECT study_instance_uid FROM study WHERE status IN ('done', 'failed')")
                ).all()
            }
    except Exception:  # no schema yet: nothing settled
        settled = set()
    finally:
        engine.dispose()
    return len(uids - settled)


def held_slots(setup: Setup) -> dict[str, tuple[int, int]]:
    """(active slots, limit) of each Prefect global concurrency limit in this setup's Prefect database
    (pacs:<name>, the association limit): with no run going, any slot held is a leak."""
    import sqlite3

    db = setup.work / "prefect" / "prefect.db"
    if not db.exists():
        return {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        try:
            rows = conn.execute('SELECT name, active_slots, "limit" FROM concurrency_limit_v2').fetchall()
        except sqlite3.Error:
            return {}
    return {str(name): (int(active), int(limit)) for name, active, limit in rows}


def exhausted_limits(setup: Setup) -> dict[str, tuple[int, int]]:
    """The limits whose every slot is held with no run going: the next run waits for one forever."""
    return {name: held for name, held in held_slots(setup).items() if held[0] >= held[1]}


def clean_runs(setup: Setup, *, uids: set[str], at_most: int, timeout_s: float, say: Callable[[str], None]) -> int:
    """Runs while a study is unsettled (at most `at_most`, and none after two in a row that did not end
    in time: the next would hang the same way); returns how many ran."""
    ran = hung_in_a_row = 0
    while ran < at_most and hung_in_a_row < 2 and unsettled(setup, uids):
        outcome = run_once(setup, timeout_s=timeout_s)
        ran += 1
        hung_in_a_row = hung_in_a_row + 1 if outcome.hung else 0
        say(
            f"  {setup.name.upper()} clean run {setup.runs}: exit {outcome.returncode} in {outcome.wall_s:.0f} s"
            + (" (did not end in time: killed)" if outcome.hung else "")
        )
        if outcome.returncode not in (0, None) and not outcome.hung:
            say(f"    {outcome.last_words()}")
    return ran


# --- services -------------------------------------------------------------------------------------------


@dataclass
class Services:
    work: Path
    postgres: Postgres
    orthanc: Orthanc
    s3: S3Server
    pacs_proxy: FaultProxy
    s3_proxy: FaultProxy
    triton: Any = None
    extra: list[str] = field(default_factory=list)


@contextmanager
def services(work: Path, *, triton_model: Path | None, seed: int, say: Callable[[str], None]) -> Iterator[Services]:
    """Postgres, Orthanc, moto S3, a fault proxy in front of Orthanc's DICOM port and one in front of
    S3, and (with `triton_model`) tritonserver serving it: all stopped when the block ends."""
    from tests.services import pg_bin

    binaries = pg_bin()
    if binaries is None:
        raise SystemExit("the chaos harness needs PostgreSQL server binaries (apt-get install postgresql)")
    with ExitStack() as stack:
        pg_folder = Path(tempfile.mkdtemp(prefix="chaos-pg-"))  # not 0700: the postgres user must enter
        pg_folder.chmod(0o755)
        stack.callback(shutil.rmtree, pg_folder, True)
        pg = Postgres(folder=pg_folder, port=free_port(), bin=binaries)
        stack.callback(pg.stop)
        pg.start()
        orthanc = Orthanc.on_free_ports(work / "orthanc")
        stack.callback(orthanc.stop)
        orthanc.start()
        s3 = S3Server(folder=work / "s3", port=free_port())
        stack.callback(s3.stop)
        s3.start()
        pacs_proxy = stack.enter_context(
            FaultProxy(target_port=orthanc.dicom_port, seed=seed, stall_s=5.0, drip_s=2.0, drip_bytes=256)
        )
        s3_proxy = stack.enter_context(FaultProxy(target_port=s3.port, seed=seed + 1))
        found = Services(work, pg, orthanc, s3, pacs_proxy, s3_proxy)
        if triton_model is not None:
            triton = triton_on_free_ports(work / "triton", triton_model)
            stack.callback(triton.stop)
            t0 = time.monotonic()
            triton.start()
            say(f"tritonserver ready in {time.monotonic() - t0:.0f} s")
            found.triton = triton
        try:
            yield found
        finally:
            stop_live_runs()


def stop_live_runs() -> None:
    for proc in list(_LIVE_RUNS):
        if proc.poll() is None:
            proc.kill()
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        _LIVE_RUNS.discard(proc)


def make_setup(svc: Services, name: str, *, inference: dict[str, str], max_attempts: int) -> Setup:
    url = svc.postgres.create_database(f"chaos_{name}")
    return Setup(
        name=name,
        work=svc.work / name,
        database_url=url,
        s3_endpoint=f"127.0.0.1:{svc.s3_proxy.port}",
        bucket=f"chaos-{name}",
        pacs_port=svc.pacs_proxy.port,
        orthanc=svc.orthanc,
        inference=inference,
        max_attempts=max_attempts,
    )


# --- the phases ------------------------------------------------------------------------------------------


def phase_r1(
    svc: Services,
    *,
    uids: set[str],
    inference: dict[str, str],
    kills: int,
    rng: random.Random,
    say: Callable[..., None],
) -> tuple[int, Tally]:
    setup = make_setup(svc, "r1", inference=inference, max_attempts=10)
    engine = setup.engine()
    delivered = hung_in_a_row = 0
    # S3 failing at the second run and the Postgres restart at the fourth, early, while work remains (the
    # runs go on once each is back): a run that survives its fault finishes the night, and a later event
    # finds every study done (the S3 failure did so when it came sixth)
    events: list[str] = [f"kill{i}" for i in range(kills)]
    events.insert(min(1, len(events)), "s3")
    events.insert(min(3, len(events)), "postgres")
    run_timeout_s = 60.0 + 3.0 * len(uids)
    try:
        for event in events:
            if exhausted_limits(setup):
                say(
                    f"  R1: killed runs left every slot of {exhausted_limits(setup)} (held, limit) held: every "
                    "later run waits for a slot forever; R1's other runs skipped"
                )
                break
            if hung_in_a_row >= 2:
                say("  R1: two runs in a row did not end in time; the rest of its runs would hang too: skipped")
                break
            if event.startswith("kill"):
                sig = signal.SIGKILL if int(event[4:]) % 2 == 0 else signal.SIGTERM
                point = random_point(rng)
                outcome = run_stopped(setup, engine, sig=sig, point=point, timeout_s=run_timeout_s)
                delivered += bool(outcome.signal_sent)
                what = f"sent after {outcome.wall_s:.1f} s" if outcome.signal_sent else "not reached"
                if outcome.hung:
                    what += (
                        ", and it did not end within 90 s: killed"
                        if outcome.signal_sent
                        else f": the run hung for {outcome.wall_s:.0f} s, killed"
                    )
                say(f"  R1 run {setup.runs}: {sig.name} at {point}: {what}; exit {outcome.returncode}")
            else:
                on_postgres = event == "postgres"
                point = Point("rendered", rng.uniform(0.0, 1.0))
                before = svc.s3_proxy.faults
                outcome, struck = run_disturbed(
                    setup,
                    engine,
                    point=point,
                    down=(lambda: postgres_down(svc.postgres)) if on_postgres else (lambda: s3_down(svc.s3_proxy)),
                    up=(lambda: postgres_up(svc.postgres)) if on_postgres else (lambda: s3_up(svc.s3_proxy)),
                    down_s=5.0 if on_postgres else 8.0,
                    timeout_s=run_timeout_s + 30,
                )
                if on_postgres:
                    engine.dispose()  # its connections died with the server
                what = (
                    "Postgres stopped for 5 s"
                    if on_postgres
                    else f"S3 failing for 8 s ({svc.s3_proxy.faults - before} connections reset or refused)"
                )
                say(
                    f"  R1 run {setup.runs}: {what} at {point}"
                    + ("" if struck else " (not reached: no outage)")
                    + f"; exit {outcome.returncode} after {outcome.wall_s:.0f} s"
                    + (" (did not end in time: killed)" if outcome.hung else "")
                    + (
                        f"\n    {outcome.last_words()}"
                        if outcome.returncode not in (0, None) and not outcome.hung
                        else ""
                    )
                )
            hung_in_a_row = hung_in_a_row + 1 if outcome.hung else 0
        slots = {name: held for name, held in held_slots(setup).items() if held[0]}
        if slots:
            say(f"  R1: Prefect concurrency slots (held, limit) with no run going: {slots}")
        if exhausted_limits(setup):  # one clean run, to show that it hangs
            clean_runs(setup, uids=uids, at_most=1, timeout_s=60, say=say)
        else:
            clean_runs(setup, uids=uids, at_most=3, timeout_s=run_timeout_s, say=say)
    finally:
        engine.dispose()
    return delivered, tally(setup, expected_uids=uids, store=s3_store(setup, svc.s3.endpoint))


def phase_r2(
    svc: Services, *, uids: set[str], inference: dict[str, str], outage_s: float, say: Callable[..., None]
) -> tuple[float, Tally]:
    setup = make_setup(svc, "r2", inference=inference, max_attempts=10)
    engine = setup.engine()
    triton = svc.triton
    stopped_for = 0.0

    def down() -> None:
        nonlocal stopped_for
        stopped_for = time.monotonic()
        triton.stop()

    def up() -> None:
        nonlocal stopped_for
        triton.start()  # same ports; waits until its model is ready
        stopped_for = time.monotonic() - stopped_for

    try:
        point = Point("annotated", 0.0)
        outcome, struck = run_disturbed(
            setup, engine, point=point, down=down, up=up, down_s=outage_s, timeout_s=180 + outage_s + 3.0 * len(uids)
        )
    finally:
        engine.dispose()
    say(
        f"  R2 run: tritonserver stopped at {point} for {outage_s:.0f} s"
        + ("" if struck else " (the run ended first: no outage)")
        + f", unavailable {stopped_for:.0f} s in all with its restart; exit {outcome.returncode} "
        f"after {outcome.wall_s:.0f} s" + (" (did not end in time: killed)" if outcome.hung else "")
    )
    if outcome.returncode not in (0, None) and not outcome.hung:
        say(f"    {outcome.last_words()}")
    return (outage_s if struck else 0.0), tally(setup, expected_uids=uids)


def phase_r3(
    svc: Services, *, uids: set[str], inference: dict[str, str], runs: int, say: Callable[..., None]
) -> tuple[int, Tally]:
    setup = make_setup(svc, "r3", inference=inference, max_attempts=3)
    proxy = svc.pacs_proxy
    before, injected, connections = proxy.faults, Counter(proxy.injected), proxy.connections
    proxy.set_faults(PACS_FAULTS)
    try:
        for n in range(1, runs + 1):
            outcome = run_once(setup, timeout_s=90.0 + 4.0 * len(uids))
            say(
                f"  R3 run {n}: exit {outcome.returncode} in {outcome.wall_s:.0f} s; faults so far: "
                f"{dict(proxy.injected - injected)} in {proxy.connections - connections} associations"
                + (" (did not end in time: killed)" if outcome.hung else "")
                + (f"\n    {outcome.last_words()}" if outcome.returncode not in (0, None) and not outcome.hung else "")
            )
            if not unsettled(setup, uids):
                break
    finally:
        proxy.set_faults({})
    return proxy.faults - before, tally(setup, expected_uids=uids)


def describe(name: str, t: Tally, say: Callable[..., None]) -> None:
    say(
        f"  {name}: {t.studies} studies {t.by_status}; duplicated {t.duplicated}; stranded {t.stranded}; "
        f"failed with a reason {t.failed_with_reason}, without {t.failed_without_reason}; "
        f"temporary files left {len(t.temp_left)}" + (f" {t.temp_left[:5]}" if t.temp_left else "")
    )
    for reason, n in t.reasons.most_common(5):
        say(f"    failed ({n}): {reason}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=int(os.environ.get("NIGHTREAD_CHAOS_STUDIES", "20")))
    parser.add_argument("--kills", type=int, default=int(os.environ.get("NIGHTREAD_CHAOS_KILLS", "6")))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("NIGHTREAD_CHAOS_SEED", "20240611")))
    parser.add_argument("--outage-s", type=float, default=30.0, help="R2: how long tritonserver is down")
    parser.add_argument("--r3-runs", type=int, default=6, help="R3: faulted runs at most")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs of every run)")
    args = parser.parse_args(argv)

    started = time.monotonic()

    def say(line: str) -> None:
        sys.stdout.write(f"[{time.monotonic() - started:5.0f} s] {line}\n")
        sys.stdout.flush()

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a `kill` stops it as Ctrl-C does
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    say(f"chaos: seed {args.seed}, {args.studies} studies, {args.kills} kills, work folder {work}")
    results: list[str] = []
    try:
        from integrations.vlm.tiny import build_tiny

        model = build_tiny("smolvlm", work / "tiny-smolvlm")
        with services(work, triton_model=model, seed=args.seed, say=say) as svc:
            studies = chaos_studies(args.studies)
            uids = seed_orthanc(svc.orthanc, studies)
            say(f"services up: Postgres, Orthanc ({len(uids)} studies), S3, tritonserver, 2 fault proxies")
            inference = {"NIGHTREAD_INFERENCE__BACKEND": "triton", "NIGHTREAD_TRITON__URL": svc.triton.grpc_url}

            say("R1: kills at random points, a Postgres restart, S3 failing; then clean runs")
            kills, r1 = phase_r1(svc, uids=uids, inference=inference, kills=args.kills, rng=rng, say=say)
            describe("R1", r1, say)
            results.append(
                f"R1 kills={kills} lost={r1.lost} duplicated={r1.duplicates} stranded={r1.stranded_total} "
                f"temp_left={len(r1.temp_left)}"
            )

            say(f"R2: tritonserver down for {args.outage_s:.0f} s in the middle of a run")
            outage, r2 = phase_r2(svc, uids=uids, inference=inference, outage_s=args.outage_s, say=say)
            describe("R2", r2, say)
            results.append(f"R2 outage_s={outage:.0f} lost={r2.lost}")

            say(f"R3: the PACS behind a fault proxy {PACS_FAULTS}")
            faults, r3 = phase_r3(svc, uids=uids, inference=inference, runs=args.r3_runs, say=say)
            describe("R3", r3, say)
            results.append(f"R3 faults={faults} done_or_failed_with_reason={r3.done_or_failed_with_reason:.2f}")
    except KeyboardInterrupt:
        say("interrupted: every server and run is stopped")
        raise SystemExit(130) from None
    finally:
        stop_live_runs()
        if args.keep:
            say(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    say(f"wall time {time.monotonic() - started:.0f} s")
    for line in results:
        sys.stdout.write(line + "\n")


if __name__ == "__main__":
    main()
