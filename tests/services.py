"""Real servers as local processes for the integration tests: Postgres, Orthanc, an S3 server (moto).

Each listens on 127.0.0.1 on a free port, is waited for by polling its readiness (never by
sleeping a fixed time), and is stopped by the fixture that started it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmwrite
from pydicom.dataset import Dataset

REPO = Path(__file__).resolve().parents[1]
PG_BIN_CANDIDATES = [Path(f"/usr/lib/postgresql/{v}/bin") for v in (17, 16, 15, 14)]
ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready\n{tail}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(delay)  # polling interval, not a fixed wait for readiness
        delay = min(delay * 1.5, 0.25)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s\n{tail}")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- Postgres ------------------------------------------------------------------------------------------


def pg_bin() -> Path | None:
    return next((p for p in PG_BIN_CANDIDATES if (p / "initdb").exists()), None)


@dataclass
class Postgres:
    folder: Path
    port: int
    bin: Path

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _as_postgres(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        subprocess.run(
            self._as_postgres(
                str(self.bin / "initdb"),
                "-D",
                str(self.folder / "data"),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ),
            check=True,
            capture_output=True,
        )
        self.up()

    def _pg_ctl(self, *args: str) -> None:
        command = self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), *args)
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def up(self) -> None:
        """Start the server on its folder and port (again, after `down`), polled until it answers."""
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        self._pg_ctl("-l", str(self.folder / "postgres.log"), "-o", opts, "start")
        wait_until(self.ready, timeout=60, what="postgres", log=self.folder / "postgres.log")

    def down(self) -> None:
        """Stop it with a fast shutdown: open sessions are cut, as a crash or a failover cuts them."""
        self._pg_ctl("-m", "fast", "-w", "stop")

    def ready(self) -> bool:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", connect_timeout=2):
            return True

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(
            self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop"),
            check=False,
            capture_output=True,
        )


# --- Orthanc -------------------------------------------------------------------------------------------


@dataclass
class Orthanc:
    folder: Path
    http_port: int
    dicom_port: int
    nightread_ae: str
    nightread_port: int
    aet: str = "ORTHANC"
    proc: subprocess.Popen[bytes] | None = None
    extra_config: dict[str, object] | None = None  # e.g. {"LimitFindResults": 2}
    user: tuple[str, str] | None = None  # HTTP basic authentication required for REST and DICOMweb

    @classmethod
    def on_free_ports(cls, folder: Path, **kwargs: Any) -> Orthanc:
        """An Orthanc in `folder` on free loopback ports, knowing nightread as NIGHTREAD (not started)."""
        return cls(
            folder=folder,
            http_port=free_port(),
            dicom_port=free_port(),
            nightread_ae="NIGHTREAD",
            nightread_port=free_port(),
            **kwargs,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _open(self, request: str | urllib.request.Request, timeout: float) -> Any:
        """urlopen with this Orthanc's credentials."""
        req = request if isinstance(request, urllib.request.Request) else urllib.request.Request(request)
        if self.user is not None:
            token = base64.b64encode(f"{self.user[0]}:{self.user[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        return urllib.request.urlopen(req, timeout=timeout)

    def config(self) -> dict[str, object]:
        """deploy/orthanc/orthanc.json (what compose uses) with this instance's folders and ports."""
        cfg: dict[str, object] = json.loads((REPO / "deploy" / "orthanc" / "orthanc.json").read_text())
        cfg.update(
            {
                "StorageDirectory": str(self.folder / "storage"),
                "IndexDirectory": str(self.folder / "index"),
                "TemporaryDirectory": str(self.folder / "tmp"),
                "HttpPort": self.http_port,
                "DicomPort": self.dicom_port,
                "DicomAet": self.aet,
                "DicomModalities": {
                    "nightread": {
                        "AET": self.nightread_ae,
                        "Host": "127.0.0.1",
                        "Port": self.nightread_port,
                        "AllowEcho": True,
                        "AllowFind": True,
                        "AllowGet": True,
                        "AllowMove": True,
                        "AllowStore": True,
                    },
                    "getscu": {
                        "AET": "GETSCU",
                        "Host": "127.0.0.1",
                        "Port": free_port(),
                        "AllowEcho": True,
                        "AllowFind": True,
                        "AllowGet": True,
                        "AllowMove": True,
                        "AllowStore": True,
                    },
                },
            }
        )
        if self.user is not None:
            cfg.update({"AuthenticationEnabled": True, "RegisteredUsers": {self.user[0]: self.user[1]}})
        cfg.update(self.extra_config or {})
        return cfg

    def start(self) -> None:
        assert ORTHANC is not None
        for sub in ("storage", "index", "tmp"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        cfg_path = self.folder / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(), indent=1))
        log = self.folder / "orthanc.log"
        env = {**os.environ, "TCP_NODELAY": "1"}  # DCMTK inside Orthanc leaves Nagle on otherwise
        with log.open("wb") as fh:
            self.proc = subprocess.Popen([ORTHANC, str(cfg_path)], stdout=fh, stderr=subprocess.STDOUT, env=env)
        wait_until(self.ready, timeout=60, what="orthanc", proc=self.proc, log=log)

    def ready(self) -> bool:
        with self._open(f"{self.url}/system", timeout=2) as r:
            return bool(r.status == 200)

    def upload_datasets(self, datasets: Iterable[Dataset]) -> None:
        for ds in datasets:
            buf = io.BytesIO()
            dcmwrite(buf, ds, enforce_file_format=True)
            self.upload(buf.getvalue())

    def upload(self, data: bytes) -> None:
        req = urllib.request.Request(
            f"{self.url}/instances", data=data, method="POST", headers={"Content-Type": "application/dicom"}
        )
        with self._open(req, timeout=30) as r:
            assert r.status == 200

    def get_json(self, path: str) -> object:
        with self._open(f"{self.url}{path}", timeout=30) as r:
            return json.loads(r.read())

    def post_json(self, path: str, body: object) -> object:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method="POST")
        with self._open(req, timeout=60) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        with self._open(f"{self.url}{path}", timeout=60) as r:
            return bytes(r.read())

    def delete(self, path: str) -> None:
        self._open(urllib.request.Request(f"{self.url}{path}", method="DELETE"), timeout=30).close()

    def delete_all(self) -> None:
        for pid in self.get_json("/patients"):  # type: ignore[union-attr]
            req = urllib.request.Request(f"{self.url}/patients/{pid}", method="DELETE")
            self._open(req, timeout=30).close()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)  # Orthanc needs ~1 s to exit; wait for it before reusing the folder


class TlsTerminator:
    """HTTPS in front of a plain HTTP server on loopback, as a hospital's reverse proxy puts it (Orthanc
    1.10's own HTTPS crashes on the first handshake in Debian's build): `with TlsTerminator(...) as t:`
    serves https://127.0.0.1:{t.port} with `cert`/`key` and forwards each connection to `target_port`."""

    def __init__(self, *, target_port: int, cert: Path, key: Path) -> None:
        self.target_port = target_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []

    def __enter__(self) -> TlsTerminator:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        with suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for thread in self.threads:
            thread.join(timeout=10)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._spawn(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(client, server_side=True)
        except (OSError, ssl.SSLError):  # an untrusting client gives up the handshake
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        self._spawn(self._pump, upstream, tls)
        self._pump(tls, upstream)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


# --- S3 (moto server mode) -----------------------------------------------------------------------------


@dataclass
class S3Server:
    folder: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = self.folder / "moto.log"
        exe = Path(sys.executable).parent / "moto_server"
        with log.open("wb") as fh:
            self.proc = subprocess.Popen(
                [str(exe), "-H", "127.0.0.1", "-p", str(self.port)], stdout=fh, stderr=subprocess.STDOUT
            )
        wait_until(self.ready, timeout=60, what="moto S3 server", proc=self.proc, log=log)

    def ready(self) -> bool:
        with urllib.request.urlopen(f"http://{self.endpoint}/", timeout=2) as r:
            return bool(r.status == 200)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def moto_available() -> bool:
    return (Path(sys.executable).parent / "moto_server").exists()


def triton_on_free_ports(
    work: Path,
    model: Path | None = None,
    *,
    repository: Path = REPO / "deploy" / "triton" / "model_repository",
    instances: int = 1,
    env: dict[str, str] | None = None,
) -> Any:
    """A tritonserver (the nvidia-pytriton wheel's) on a copy of `repository` (by default nightread's own,
    serving `model`) with `instances` CPU instances per model, on free ports, not started yet (start()/stop()
    it, or use it as a context manager)."""
    from integrations.triton_server import TritonServer, prepare_repository

    repo = prepare_repository(repository, work / "repository", instance_count=instances, instance_kind="KIND_CPU")
    return TritonServer(
        repository=repo,
        work_dir=work,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        env={**({"NIGHTREAD_TRITON_MODEL": str(model)} if model is not None else {}), **(env or {})},
    )


# --- Prefect ------------------------------------------------------------------------------------------

PREFECT = str(Path(sys.executable).with_name("prefect"))


def _prefect_healthy(api: str) -> bool:
    with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
        return bool(r.status == 200)


@contextmanager
def prefect_server(pg: Postgres, folder: Path, *, database: str = "prefect") -> Iterator[str]:
    """`prefect server start` on loopback (PREFECT_HOME and its log in `folder`), its database `database` on
    `pg`; its API URL. Stopped when the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    url = pg.create_database(database).replace("+psycopg", "+asyncpg")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(folder),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    log = folder / "server.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_until(lambda: _prefect_healthy(api), timeout=180, what="the Prefect server", proc=proc, log=log)
        yield api
    finally:
        stop_process(proc)
