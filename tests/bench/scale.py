"""Scale-out: the same nightly over N studies with one and with two Prefect workers. Do two do twice the work?

The setup of tests/integration/test_scale_out.py, as processes on loopback: Postgres (nightread's database and
the Prefect server's), Orthanc seeded with N small synthetic studies (tests/chaos.py `chaos_studies`), moto
S3, a Prefect server on Postgres, the pool, queues and deployments of flows/deployments.py (`deploy()`), and
`prefect worker start --pool nightread --type process --limit 1` workers with data dirs of their own. The
nightly (`nightread run`, NIGHTREAD_FLOW__DISPATCH=work_pool) discovers the studies and submits them as
annotate-studies runs; a fresh database and bucket for each worker count, the same studies.

Sizing, so that the workers and not the machine's two cores are the limit. The model is the fixed-service-
time stand-in of `make bench-triton` (tests/bench/sleep_model.py): every batch takes `--service-ms` (5 s)
whatever its size. A worker takes one run at a time (`--limit 1`) and its runs keep at most `--in-flight`
(4) requests at Triton (NIGHTREAD_TRITON__MAX_IN_FLIGHT), so one worker does at most 4 / 5 s = 0.8
requests/s (a study is ~3.1 requests here: ~0.26 studies/s), two at most 1.6 requests/s. The server has
`--instances` (8) model instances, as many as two workers' requests in flight, so a request never waits
for another batch to end (with 2 instances, batches of one worker's trickling requests held both and the
other worker's waited: two workers did 1.6x one); its ceiling, 12.8 requests/s, is far above both. A run
takes 12 studies (NIGHTREAD_FLOW__STUDIES_PER_RUN), enough to keep its 4 slots full while two at a time are
retrieved and rendered. What the cores spend on a study (retrieval, rendering 64-pixel images, S3,
Postgres, the Prefect server's task runs, each run's process start) is about 1.4 CPU-s, so a worker at its
bound needs about a third of a core, two about a third of the machine: a second worker finds idle cores
even with other work on the machine. (With 2 s per batch a worker needed most of a core, its retrieval and
rendering fell behind under the machine's other load, and two workers did 1.47x one.) The bench prints
the CPU seconds its own processes used, the machine's busy share (other work on it included) and the
server's request rate.

Figures: studies/s from the nightly flow's start (its run row) to the last annotate-studies run's end: the
work the workers share, with discovery and every run's process start in it (measured from the first run's
start instead, one worker pays three run starts and each of two workers one: 2.05x); also `nightread run`'s
wall time end to end (the command's own start included).
Measured one, two, two, one worker(s) (`--repeat 1`: one, two), so a drift in the machine's load falls on
both alike; each figure is the mean of its two runs.
Run: `make bench-scale` (NIGHTREAD_SCALE_STUDIES or --studies, default 48). Last line:
`P7 two_workers_vs_one=<ratio>` (studies/s with two workers ÷ with one). Nothing is asserted.
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # before prefect is imported
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench.triton import ServerStats, server_stats
from tests.chaos import NIGHTREAD, Setup, chaos_studies, seed_orthanc
from tests.services import (
    PREFECT,
    REPO,
    Orthanc,
    Postgres,
    S3Server,
    free_port,
    pg_bin,
    prefect_server,
    triton_on_free_ports,
    wait_until,
)

MODEL = "nightread_sleep"
CORES = os.cpu_count() or 1
ORDER = (1, 2, 2, 1)  # worker counts, in the order measured


# --- services -------------------------------------------------------------------------------------------------


@dataclass
class Services:
    work: Path
    postgres: Postgres
    orthanc: Orthanc
    s3: S3Server
    triton: Any
    prefect_api: str


@contextmanager
def services(
    work: Path, *, studies: int, service_ms: float, instances: int, say: Callable[[str], None]
) -> Iterator[Services]:
    """Postgres, Orthanc with `studies` studies, moto S3, tritonserver with the stand-in, a Prefect server on
    Postgres with nightread's pool and deployments: all stopped when the block ends."""

    binaries = pg_bin()
    if binaries is None:
        raise SystemExit("bench-scale needs PostgreSQL server binaries (apt-get install postgresql)")
    with ExitStack() as stack:
        t0 = time.monotonic()
        pg_folder = work / "postgres"
        pg_folder.mkdir(parents=True)
        pg_folder.chmod(0o755)  # the postgres user must enter it
        work.chmod(0o755)
        pg = Postgres(folder=pg_folder, port=free_port(), bin=binaries)
        stack.callback(pg.stop)
        pg.start()
        orthanc = Orthanc.on_free_ports(work / "orthanc")
        stack.callback(orthanc.stop)
        orthanc.start()
        seed_orthanc(orthanc, chaos_studies(studies, first_seed=601))
        s3 = S3Server(folder=work / "s3", port=free_port())
        stack.callback(s3.stop)
        s3.start()
        triton = triton_on_free_ports(
            work / "triton",
            repository=REPO / "tests" / "bench" / "triton_repository",
            instances=instances,
            env={"PYTHONPATH": str(REPO), "NIGHTREAD_SLEEP_MS": str(service_ms)},
        )
        stack.callback(triton.stop)
        triton.start()
        api = stack.enter_context(prefect_server(pg, work / "prefect-server"))
        say(f"services up in {time.monotonic() - t0:.0f} s: Postgres, Orthanc ({studies} studies), S3, Triton, Prefect")
        yield Services(work, pg, orthanc, s3, triton, api)


# --- workers and runs ------------------------------------------------------------------------------------------


def start_worker(name: str, env: dict[str, str], folder: Path) -> subprocess.Popen[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "worker.log").open("wb") as log:
        return subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "nightread", "--type", "process", "--name", name, "--limit", "1"],
            env={**env, "NIGHTREAD_DATA_DIR": str(folder / "data"), "TMPDIR": str(folder / "tmp")},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the worker and the flow-run processes it starts: one group to stop
            cwd=REPO,
        )


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def online_workers(api: str) -> set[str]:
    """Names of the pool's workers that sent a heartbeat lately."""
    req = urllib.request.Request(
        f"{api}/work_pools/nightread/workers/filter",
        data=b"{}",
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return {w["name"] for w in json.load(r) if w.get("status") == "ONLINE"}


def own_cpu_s(postgres: Postgres) -> float:
    """CPU seconds used so far by this bench's processes: itself and every process under it, and Postgres's
    (a daemon of its own). A process that ended counts in its parent's children's times once waited for."""
    import psutil

    roots = [psutil.Process()]
    with contextlib.suppress(OSError, ValueError, psutil.Error):
        pid = int((postgres.folder / "data" / "postmaster.pid").read_text().split()[0])
        roots.append(psutil.Process(pid))
    seen: dict[int, Any] = {}
    for root in roots:
        with contextlib.suppress(psutil.Error):
            for proc in [root, *root.children(recursive=True)]:
                seen[proc.pid] = proc
    total = 0.0
    for proc in seen.values():
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine so far (/proc/stat)."""
    fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


@dataclass(frozen=True)
class Outcome:
    workers: int
    studies_done: int
    wall_s: float  # the nightly end to end
    span_s: float  # the nightly flow's start → the last annotate-studies run's end
    shares_s: float  # the first annotate-studies run's start → the last one's end
    runs: int
    runs_by_worker: dict[str, int]
    cpu_busy: float  # the machine's CPU busy share during the nightly (other work on it included)
    own_cpu_s: float  # CPU seconds this bench's processes used during the nightly
    server: ServerStats

    @property
    def studies_per_s(self) -> float:
        return self.studies_done / self.span_s


def measure(
    svc: Services, *, workers: int, label: str, args: argparse.Namespace, say: Callable[[str], None]
) -> Outcome:
    """A fresh database and bucket, `workers` workers, one nightly over every study."""
    from sqlalchemy import text

    name = f"w{workers}{label}"
    setup = Setup(
        name=name,
        work=svc.work / name,
        database_url=svc.postgres.create_database(f"nightread_{name}"),
        s3_endpoint=svc.s3.endpoint,
        bucket=f"scale-{name}",
        pacs_port=svc.orthanc.dicom_port,
        orthanc=svc.orthanc,
        inference={
            "NIGHTREAD_INFERENCE__BACKEND": "triton",
            "NIGHTREAD_TRITON__URL": svc.triton.grpc_url,
            "NIGHTREAD_TRITON__MODEL": MODEL,
            "NIGHTREAD_TRITON__MAX_IN_FLIGHT": str(args.in_flight),
        },
        max_attempts=3,
        timeout_s=10.0,
    )
    env = {
        **setup.env(),
        "PREFECT_API_URL": svc.prefect_api,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "2",
        "NIGHTREAD_FLOW__DISPATCH": "work_pool",
        "NIGHTREAD_FLOW__STUDIES_PER_RUN": str(args.studies_per_run),
        "NIGHTREAD_FLOW__RUNS_IN_FLIGHT": str(2 * workers),
        "NIGHTREAD_FLOW__CONCURRENCY": "2",
        "NIGHTREAD_PACS__RETRIEVE_DEADLINE_S": "120",
    }
    subprocess.run([NIGHTREAD, "db", "upgrade"], env=env, check=True, capture_output=True, timeout=300)
    procs = {
        f"{name}-{i + 1}": start_worker(f"{name}-{i + 1}", env, setup.work / f"worker{i + 1}") for i in range(workers)
    }
    engine = setup.engine()
    try:
        wait_until(lambda: set(procs) <= online_workers(svc.prefect_api), timeout=120, what=f"{workers} workers online")
        before = server_stats(svc.triton, MODEL)
        cpu0, own0 = cpu_times(), own_cpu_s(svc.postgres)
        t0 = time.monotonic()
        with (setup.work / "nightly.log").open("wb") as log:
            nightly = subprocess.run(
                [NIGHTREAD, "run"], env=env, stdout=log, stderr=subprocess.STDOUT, timeout=3600, cwd=REPO, check=False
            )
        wall = time.monotonic() - t0
        cpu1, own1 = cpu_times(), own_cpu_s(svc.postgres)
        if nightly.returncode != 0:
            say((setup.work / "nightly.log").read_text(errors="replace")[-3000:])
            raise SystemExit(f"the nightly with {workers} worker(s) exited with {nightly.returncode}")
        after = server_stats(svc.triton, MODEL)

        def shares_finished() -> bool:
            with engine.connect() as conn:
                return not conn.execute(
                    text("SELECT count(*) FROM run WHERE kind = 'annotate-studies' AND finished_at IS NULL")
                ).scalar_one()

        wait_until(shares_finished, timeout=120, what="every annotate-studies run recorded")
        with engine.connect() as conn:
            done = int(conn.execute(text("SELECT count(*) FROM study WHERE status = 'done'")).scalar_one())
            first, last = conn.execute(
                text("SELECT min(started_at), max(finished_at) FROM run WHERE kind = 'annotate-studies'")
            ).one()
            nightly_started = conn.execute(text("SELECT min(started_at) FROM run WHERE kind = 'nightly'")).scalar_one()
            shares = conn.execute(text("SELECT parameters FROM run WHERE kind = 'annotate-studies'")).all()
    finally:
        engine.dispose()
        for proc in procs.values():
            stop_worker(proc)
    by_worker: dict[str, int] = {}
    for (parameters,) in shares:
        data_dir = str((parameters if isinstance(parameters, dict) else json.loads(parameters)).get("data_dir", ""))
        who = next((w for i, w in enumerate(procs) if f"worker{i + 1}" in data_dir), "?")
        by_worker[who] = by_worker.get(who, 0) + 1
    busy = (cpu1[0] - cpu0[0]) / max(cpu1[1] - cpu0[1], 1.0)
    server = ServerStats(
        requests=after.requests - before.requests,
        executions=after.executions - before.executions,
        busy_s=after.busy_s - before.busy_s,
        compute_metric_s=after.compute_metric_s - before.compute_metric_s,
    )
    return Outcome(
        workers=workers,
        studies_done=done,
        wall_s=wall,
        span_s=(last - nightly_started).total_seconds(),
        shares_s=(last - first).total_seconds(),
        runs=len(shares),
        runs_by_worker=by_worker,
        cpu_busy=busy,
        own_cpu_s=own1 - own0,
        server=server,
    )


def describe(o: Outcome, args: argparse.Namespace, say: Callable[[str], None]) -> None:
    ceiling = 8 * args.instances / args.service_ms * 1000
    say(
        f"{o.workers} worker(s): {o.studies_done} studies done in {o.span_s:.0f} s ({o.studies_per_s:.3f} studies/s; "
        f"the runs {o.shares_s:.0f} s from the first one's start, the command {o.wall_s:.0f} s), {o.runs} runs "
        f"{dict(sorted(o.runs_by_worker.items()))}; Triton {o.server.requests} requests in {o.server.executions} "
        f"batches, {o.server.requests / o.span_s:.2f} requests/s of a {ceiling:.0f} requests/s ceiling; the bench's "
        f"processes used {o.own_cpu_s:.0f} CPU-s ({o.own_cpu_s / o.wall_s / CORES:.0%} of {CORES} cores; the machine "
        f"was {o.cpu_busy:.0%} busy, other work on it included)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=int(os.environ.get("NIGHTREAD_SCALE_STUDIES", "48")))
    parser.add_argument("--studies-per-run", type=int, default=12, help="NIGHTREAD_FLOW__STUDIES_PER_RUN")
    parser.add_argument("--service-ms", type=float, default=5000.0, help="the stand-in's time per batch")
    parser.add_argument("--instances", type=int, default=8, help="model instances (of up to 8 requests a batch)")
    parser.add_argument("--in-flight", type=int, default=4, help="a worker's requests at Triton at once")
    parser.add_argument("--repeat", type=int, default=2, choices=(1, 2), help="2: one, two, two, one worker(s)")
    args = parser.parse_args()

    def say(line: str) -> None:
        print(line, flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        with services(work, studies=args.studies, service_ms=args.service_ms, instances=args.instances, say=say) as svc:
            deployed = subprocess.run(
                [sys.executable, "-c", "from flows.deployments import deploy; print(deploy())"],
                env={**os.environ, "PREFECT_API_URL": svc.prefect_api, "PREFECT_HOME": str(work / "prefect-client")},
                capture_output=True,
                text=True,
                timeout=300,
                cwd=REPO,
                check=False,
            )
            if deployed.returncode != 0:
                raise SystemExit(f"deploy() failed: {deployed.stderr[-2000:]}")
            outcomes: dict[int, list[Outcome]] = {1: [], 2: []}
            for i, workers in enumerate(ORDER[: 2 * args.repeat]):  # 1, 2, 2, 1: a drift falls on both alike
                outcome = measure(svc, workers=workers, label=chr(ord("a") + i), args=args, say=say)
                describe(outcome, args, say)
                outcomes[workers].append(outcome)

        def mean(values: list[float]) -> float:
            return sum(values) / len(values)

        one, two = ([o.studies_per_s for o in outcomes[w]] for w in (1, 2))
        one_wall, two_wall = ([o.wall_s for o in outcomes[w]] for w in (1, 2))
        say(
            f"    studies/s: one worker {', '.join(f'{v:.3f}' for v in one)}; "
            f"two {', '.join(f'{v:.3f}' for v in two)}; end to end (the nightly's wall time) "
            f"{mean(one_wall) / mean(two_wall):.2f}x"
        )
        say(f"P7 two_workers_vs_one={mean(two) / mean(one):.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
