"""Run the `tritonserver` binary that ships inside the nvidia-pytriton wheel on a standard model
repository, on the CPU (development, tests). Production runs NVIDIA's tritonserver container.

The binary needs (found out the hard way, see README): a backend directory made of the wheel's
backends plus the Python-backend stub built for this interpreter; LD_LIBRARY_PATH starting with
this interpreter's LIBDIR (else the stub binds the system libpython and the stdlib mismatches),
then the wheel's vendored libraries; and this environment's bin first on PATH so the stub's
interpreter sees its site-packages.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from integrations.errors import ConfigurationError, TransientError
from integrations.processes import stop_with_parent


def pytriton_dir() -> Path:
    try:
        import pytriton
    except ImportError as exc:
        raise ConfigurationError(
            "tritonserver needs the nvidia-pytriton wheel: pip install 'nightread[triton]'"
        ) from exc
    return Path(pytriton.__file__).resolve().parent


def backend_directory(cache: Path) -> Path:
    """The wheel's backends with this interpreter's Python-backend stub, copied once into `cache`."""
    root = pytriton_dir() / "tritonserver"
    target = cache / "backends"
    stub = target / "python" / "triton_python_backend_stub"
    if not stub.exists():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(root / "backends", target)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        source = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not source.exists():
            raise ConfigurationError(f"nvidia-pytriton has no Python-backend stub for Python {version}")
        shutil.copy2(source, stub)
    return target


def server_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    vendored = pytriton_dir().parent / "nvidia_pytriton.libs"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, str(vendored), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def prepare_repository(source: Path, target: Path, *, instance_count: int, instance_kind: str) -> Path:
    """A copy of `source` whose models' instance_group says `count` × `kind` (KIND_CPU / KIND_GPU)."""
    if instance_kind not in ("KIND_CPU", "KIND_GPU"):
        raise ConfigurationError(f"instance kind must be KIND_CPU or KIND_GPU, not {instance_kind!r}")
    if not source.is_dir():
        raise ConfigurationError(f"model repository {source} does not exist")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    group = f"instance_group [ {{ count: {instance_count} kind: {instance_kind} }} ]"
    for config in target.glob("*/config.pbtxt"):
        text = config.read_text()
        text, n = re.subn(r"instance_group\s*\[[^\]]*\]", group, text)
        config.write_text(text if n else f"{text}\n{group}\n")
    return target


@dataclass
class TritonServer:
    """`with TritonServer(...) as server:` — HTTP, gRPC and metrics on 127.0.0.1 (or `host`)."""

    repository: Path
    work_dir: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    host: str = "127.0.0.1"
    env: dict[str, str] = field(default_factory=dict)
    log_verbose: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "tritonserver.log"

    def command(self) -> list[str]:
        binary = pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
        return [
            str(binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_directory(self.work_dir)}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            f"--log-verbose={self.log_verbose}",
        ]

    def start(self, *, timeout_s: float = 300.0) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_environment(self.env),
                preexec_fn=stop_with_parent,
            )
        self.wait_ready(timeout_s)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise TransientError(f"tritonserver exited with {self.proc.returncode}:\n{self._log_tail()}")
            if self.ready():
                return
            time.sleep(delay)  # polling interval while the server loads its models
            delay = min(delay * 1.5, 0.5)
        raise TransientError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
