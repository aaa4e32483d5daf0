"""`make deploy-check`: the images and deploy/compose.yaml proven by running them, not only read.

1. the base image (Debian 12 with Python 3.11, made with mmdebstrap) when it is missing;
2. the wheels of the images' part of requirements.lock in a local folder (pip's own configuration and
   cache on this machine), mounted read-only into the builds: the builds install offline, hash-checked;
3. every image that deploy/compose.yaml + deploy/compose.test.yaml build: the nightread image from
   deploy/Dockerfile and local builds of Postgres, Orthanc and an S3 server in place of the upstream images;
4. `nightread demo` inside the nightread image (its summary printed);
5. the stack up, service by service in dependency order, waiting for the conditions compose.yaml names
   (healthy, completed successfully): Postgres, S3, Orthanc, the Prefect server, the migration, the work
   pool and deployments of deploy/prefect.yaml, a Prefect worker, the C-STORE listener, the review page;
6. Orthanc seeded with the synthetic sample studies; one study pushed by Orthanc to the listener (and then
   deleted from Orthanc, so only the push can bring it);
7. a run of the `nightly` deployment, picked up by the worker container, which also runs the
   annotate-studies flow runs the nightly submits (compose.yaml's workers dispatch studies to the pool);
8. checks: every study done in Postgres (the pushed one too), images in S3, the review page answers and its
   API lists the run's findings to a user added in the review container;
9. everything it started removed, also on failure or Ctrl-C.

Each phase prints its time. No docker-compose here: this module reads the two compose files (the
compose specification's merge rules, `!reset`, `${VAR:-default}`) and runs each service with `podman run`,
with the images, commands, entrypoints, environment and volumes the files give. Podman is run as the
recipe for this machine says: rootful, runc, cgroupfs, no default ulimits, host networking.
Options: --keep (leave the stack up; --down removes it), --no-demo, --triton (also the gpu profile's images
on CPU: the Triton image serves a tiny model, and the Triton worker's image, without torch, runs
`nightread demo` with the model in Triton).
"""

from __future__ import annotations

import argparse
import base64
import http.cookiejar
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE_FILES = (DEPLOY / "compose.yaml", DEPLOY / "compose.test.yaml")
BASE_IMAGE = "localhost/debian-python:bookworm"
PROJECT = "nightread-check"
WHEELS = Path(os.environ.get("NIGHTREAD_DEPLOY_WHEELS", "/var/tmp/nightread-deploy/wheels"))
# the parts of requirements.lock the images install (deploy/Dockerfile's EXTRAS; the S3 test image's roots)
WHEEL_SETS = (["--extras", "inference triton"], ["--roots", "moto[s3]", "flask-cors"])
# what the stack listens on with host networking (compose.yaml's ports; Orthanc's HTTP side for seeding)
HOST_PORTS = {
    "postgres": 5432,
    "minio": 9000,
    "orthanc dicom": 4242,
    "orthanc http": 8042,
    "prefect": 4200,
    "listener": 11112,
    "review": 8080,
}


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class CheckFailed(Exception):
    """A phase found something wrong (the message says what)."""


# --- compose files ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tagged:
    """A value tagged `!reset` or `!override` in an override file (compose specification, merge)."""

    tag: str
    value: Any


class _ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(tag: str) -> Callable[[yaml.SafeLoader, yaml.Node], Tagged]:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Tagged:
        value: Any
        if isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        elif isinstance(node, yaml.MappingNode):
            value = loader.construct_mapping(node, deep=True)
        else:
            value = loader.construct_scalar(node)  # type: ignore[arg-type]
        return Tagged(tag, value)

    return construct


_ComposeLoader.add_constructor("!reset", _tagged("reset"))
_ComposeLoader.add_constructor("!override", _tagged("override"))

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<sep>:?-)(?P<default>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """`${VAR}`, `${VAR:-default}`, `${VAR-default}`, `$VAR` and `$$` in every string, as compose does."""
    if isinstance(value, str):

        def one(match: re.Match[str]) -> str:
            if match.group("escaped"):
                return "$"
            name = match.group("braced") or match.group("named")
            if match.group("sep") == ":-" and not env.get(name):
                return match.group("default")
            if match.group("sep") == "-" and name not in env:
                return match.group("default")
            return env.get(name, "")

        return _VARIABLE.sub(one, value)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, Tagged):
        return Tagged(value.tag, interpolate(value.value, env))
    return value


# multi-value options that an override adds to rather than replaces (compose specification, merge)
_CONCATENATED = frozenset({"ports", "expose", "extra_hosts", "dns", "dns_search", "tmpfs", "volumes", "devices"})


def _environment_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in value)
    return dict(value or {})


def merge(base: Any, override: Any, key: str = "") -> Any:
    if isinstance(override, Tagged):
        return None if override.tag == "reset" else override.value
    if key == "environment":
        return {**_environment_dict(base), **_environment_dict(override)}
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base.get(k), v, k) if k in base else _untag(v)
        return {k: v for k, v in out.items() if v is not None}
    if isinstance(base, list) and isinstance(override, list) and key in _CONCATENATED:
        return base + [v for v in override if v not in base]
    return _untag(override)


def _untag(value: Any) -> Any:
    if isinstance(value, Tagged):
        return None if value.tag == "reset" else value.value
    if isinstance(value, dict):
        return {k: _untag(v) for k, v in value.items() if not (isinstance(v, Tagged) and v.tag == "reset")}
    return value


def load_compose(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose files merged in order, interpolated from `env` (default: the environment)."""
    env = dict(os.environ if env is None else env)
    merged: dict[str, Any] = {}
    for path in files:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_ComposeLoader) or {}  # a SafeLoader with two tags
        data = {k: v for k, v in data.items() if not k.startswith("x-")}
        merged = merge(merged, interpolate(data, env)) if merged else _untag(interpolate(data, env))
    for service in merged.get("services", {}).values():
        if "environment" in service:
            service["environment"] = _environment_dict(service["environment"])
    return merged


def as_list(value: Any) -> list[str]:
    """A command or entrypoint as a list (a string is split as a shell would)."""
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Dependency name → condition."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def start_order(services: dict[str, dict[str, Any]], profiles: frozenset[str] = frozenset()) -> list[str]:
    """The active services (no profile, or one enabled), each after what it depends on."""
    active = {n: s for n, s in services.items() if not s.get("profiles") or profiles & set(s["profiles"])}
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise ValueError(f"dependency cycle: {' -> '.join((*path, name))}")
        if name not in active:
            raise ValueError(f"{path[-1]} depends on {name}, which is not active")
        for dep in depends_on(active[name]):
            visit(dep, (*path, name))
        order.append(name)

    for name in active:
        visit(name, ())
    return order


# --- podman -------------------------------------------------------------------------------------------


class Podman:
    """Rootful podman as this machine needs it (shared/recipes/containers.sh)."""

    def __init__(self, work: Path) -> None:
        conf = work / "containers.conf"
        conf.write_text("[containers]\ndefault_ulimits = []\n", encoding="utf-8")
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.prefix = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]

    def __call__(
        self, *args: str, check: bool = True, capture: bool = False, stdin: str | None = None, quiet: bool = False
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.prefix, *args],
            env=self.env,
            text=True,
            input=stdin,
            stdout=subprocess.PIPE if capture or quiet else None,
            stderr=subprocess.PIPE if capture or quiet else None,
            check=False,
        )
        if check and result.returncode != 0:
            detail = (result.stderr or "").strip()[-2000:] if capture or quiet else ""
            raise CheckFailed(f"podman {' '.join(args[:3])} … exited {result.returncode}\n{detail}")
        return result

    def image_exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False, quiet=True).returncode == 0

    def image_size_mb(self, image: str) -> float:
        out = self("image", "inspect", "--format", "{{.Size}}", image, capture=True).stdout.strip()
        return int(out) / 1e6


@dataclass
class Stack:
    """The services of the merged compose files run with `podman run` under one project name."""

    podman: Podman
    compose: dict[str, Any]
    project: str = PROJECT
    profiles: frozenset[str] = frozenset()
    started: list[str] = field(default_factory=list)
    volumes: set[str] = field(default_factory=set)
    met: set[tuple[str, str]] = field(default_factory=set)  # (service, condition) already seen to hold

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        services: dict[str, dict[str, Any]] = self.compose["services"]
        return services

    def container(self, service: str) -> str:
        return f"{self.project}-{service}"

    def run_args(self, name: str) -> list[str]:
        svc = self.services[name]
        args = ["run", "-d", "--name", self.container(name), "--label", f"nightread.check={self.project}"]
        if svc.get("network_mode") == "host":
            args += ["--network", "host"]
        for host in svc.get("extra_hosts", []):
            args += ["--add-host", host]
        for key, value in svc.get("environment", {}).items():
            args += ["-e", key if value is None else f"{key}={value}"]
        for volume in svc.get("volumes", []):
            source, _, target = str(volume).partition(":")
            if source.startswith((".", "/")):
                args += ["-v", f"{(DEPLOY / source).resolve()}:{target}"]
            else:
                self.volumes.add(f"{self.project}_{source}")
                args += ["-v", f"{self.project}_{source}:{target}"]
        if "entrypoint" in svc:
            args += ["--entrypoint", json.dumps(as_list(svc["entrypoint"]))]
        if "shm_size" in svc:
            args += ["--shm-size", str(svc["shm_size"])]
        args.append(svc["image"])
        args += as_list(svc.get("command"))
        return args

    def up(self) -> None:
        for name in start_order(self.services, self.profiles):
            for dep, condition in depends_on(self.services[name]).items():
                self.wait_for(dep, condition)
            t0 = time.perf_counter()
            self.podman(*self.run_args(name), quiet=True)
            self.started.append(name)
            say(f"  started {name:<12} ({self.services[name]['image']}) in {time.perf_counter() - t0:.1f} s")

    def state(self, name: str) -> tuple[str, int]:
        out = self.podman(
            "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", self.container(name), capture=True
        ).stdout.split()
        return out[0], int(out[1])

    def wait_for(self, name: str, condition: str) -> None:
        if condition == "service_started" or (name, condition) in self.met:
            return
        t0 = time.perf_counter()
        if condition == "service_completed_successfully":
            code = int(self.podman("wait", self.container(name), capture=True).stdout.strip() or 1)
            if code != 0:
                raise CheckFailed(f"{name} exited {code}\n{self.logs(name)}")
        elif condition == "service_healthy":
            self.wait_healthy(name)
        else:
            raise CheckFailed(f"unknown depends_on condition {condition!r}")
        self.met.add((name, condition))
        say(f"  {name} {condition.removeprefix('service_').replace('_', ' ')} after {time.perf_counter() - t0:.1f} s")

    def wait_healthy(self, name: str) -> None:
        check = self.services[name].get("healthcheck") or {}
        test = check.get("test")
        if not test:
            raise CheckFailed(f"{name}: depends_on service_healthy, but it has no healthcheck")
        command = test[1:] if test[0] == "CMD" else ["/bin/sh", "-c", test[1] if test[0] == "CMD-SHELL" else test]
        interval = _seconds(check.get("interval", "30s"))
        deadline = time.monotonic() + max(interval * int(check.get("retries", 3)), 60.0)
        while True:
            status, code = self.state(name)
            if status != "running":
                raise CheckFailed(f"{name} is {status} (exit {code})\n{self.logs(name)}")
            if self.podman("exec", self.container(name), *command, check=False, quiet=True).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise CheckFailed(f"{name} not healthy in time\n{self.logs(name)}")
            time.sleep(1.0)  # polling interval

    def exec(self, name: str, *command: str, stdin: str | None = None) -> str:
        result = self.podman("exec", "-i", self.container(name), *command, capture=True, stdin=stdin, check=False)
        if result.returncode != 0:
            raise CheckFailed(f"{name}: {' '.join(command)} exited {result.returncode}\n{result.stderr[-3000:]}")
        return result.stdout

    def logs(self, name: str, lines: int = 40) -> str:
        result = self.podman("logs", "--tail", str(lines), self.container(name), check=False, capture=True)
        text = (result.stdout + result.stderr).rstrip()
        return f"--- last {lines} log lines of {name} ---\n{text}"

    def down(self) -> None:
        ids = self.podman(
            "ps", "-a", "-q", "--filter", f"label=nightread.check={self.project}", capture=True, check=False
        ).stdout.split()
        if ids:  # -v: with the anonymous volumes of the images' VOLUME
            self.podman("rm", "-f", "-v", "-t", "10", *ids, check=False, quiet=True)
        names = self.podman("volume", "ls", "--format", "{{.Name}}", capture=True, check=False).stdout.split()
        for volume in sorted(self.volumes | {n for n in names if n.startswith(f"{self.project}_")}):
            self.podman("volume", "rm", "-f", volume, check=False, quiet=True)


def _seconds(text: str | int | float) -> float:
    if isinstance(text, int | float):
        return float(text)
    total, units = 0.0, {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    for number, unit in re.findall(r"([\d.]+)(ms|h|m|s)", text):
        total += float(number) * units[unit]
    return total


# --- phases -------------------------------------------------------------------------------------------


@dataclass
class Timer:
    phases: list[tuple[str, float, str]] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        say(f"\n== {name}")
        t0 = time.perf_counter()
        outcome = "failed"
        try:
            yield
            outcome = "ok"
        finally:
            elapsed = time.perf_counter() - t0
            self.phases.append((name, elapsed, outcome))
            say(f"== {name}: {outcome} in {elapsed:.1f} s")

    def report(self, total: float) -> None:
        say("\ndeploy-check phases:")
        for name, elapsed, outcome in self.phases:
            say(f"  {name:<58} {elapsed:7.1f} s  {outcome}")
        say(f"  {'total':<58} {total:7.1f} s")


def ensure_tools() -> None:
    missing = [tool for tool in ("podman", "mmdebstrap", "runc") if shutil.which(tool) is None]
    if missing:  # as .ci/run installs servers: Debian's packages
        say(f"installing {' '.join(missing)} (apt)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "podman", "mmdebstrap", "runc"], check=True, env=env)


def ports_free() -> None:
    busy = []
    for what, port in HOST_PORTS.items():
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                busy.append(f"{port} ({what})")
    if busy:
        raise CheckFailed(f"ports in use on this machine, needed by the stack: {', '.join(busy)}")


def build_base(podman: Podman, work: Path) -> None:
    if podman.image_exists(BASE_IMAGE):
        say(f"{BASE_IMAGE} exists")
        return
    rootfs = work / "rootfs.tar"
    subprocess.run(
        ["mmdebstrap", "--quiet", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
         "bookworm", str(rootfs)],
        check=True,
    )  # fmt: skip
    podman("import", str(rootfs), BASE_IMAGE, quiet=True)
    rootfs.unlink()


def download_wheels() -> None:
    """The images' pins into WHEELS with this machine's pip configuration (indexes, CA, cache)."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    have = {_wheel_key(p.name) for p in WHEELS.iterdir()}
    for selection in WHEEL_SETS:
        lock = subprocess.run(
            [sys.executable, str(DEPLOY / "lock_subset.py"), *selection], check=True, capture_output=True, text=True
        ).stdout
        pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", lock, flags=re.MULTILINE)
        missing = [f"{n}=={v}" for n, v in pins if (_canonical(n), v) not in have]
        if not missing:
            say(f"  {len(pins)} wheels of {' '.join(selection)} already in {WHEELS}")
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".lock") as fh:
            fh.write(lock)
            fh.flush()
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--require-hashes", "--no-deps", "-r", fh.name,
                 "-d", str(WHEELS)],
                check=True,
                stderr=subprocess.DEVNULL,  # pip's warnings about index pages a local index lacks
            )  # fmt: skip
        say(f"  {len(missing)} of {len(pins)} wheels of {' '.join(selection)} downloaded to {WHEELS}")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_key(filename: str) -> tuple[str, str]:
    stem = filename.removesuffix(".whl").removesuffix(".tar.gz").removesuffix(".zip")
    name, _, rest = stem.partition("-")
    # names in wheel files use _ for -; sdists keep the name's dashes: split at the first "-<digit>"
    match = re.match(r"^(.*?)-(\d[^-]*)", stem)
    if match is not None:
        name, version = match.group(1), match.group(2)
    else:
        version = rest.split("-")[0]
    return _canonical(name), version


def build_images(podman: Podman, compose: dict[str, Any], profiles: frozenset[str]) -> dict[str, float]:
    """Every image the active services build (once each), offline from WHEELS; their sizes in MB."""
    sizes: dict[str, float] = {}
    for name in start_order(compose["services"], profiles):
        svc = compose["services"][name]
        build, image = svc.get("build"), svc["image"]
        if not build or image in sizes:
            continue
        context = (DEPLOY / build["context"]).resolve()
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        args = ["build", "--network=host", "-f", str(dockerfile), "-t", image]
        ignore = Path(f"{dockerfile}.dockerignore")
        if ignore.exists():
            args += ["--ignorefile", str(ignore)]
        for key, value in (build.get("args") or {}).items():
            args += ["--build-arg", f"{key}={value}"]
        args += ["-v", f"{WHEELS}:/run/wheels:ro", "--build-arg", "PIP_NO_INDEX=1"]
        args += ["--build-arg", "PIP_FIND_LINKS=/run/wheels", str(context)]
        t0 = time.perf_counter()
        result = podman(*args, check=False, capture=True)
        if result.returncode != 0:
            raise CheckFailed(f"building {image} failed:\n{(result.stdout + result.stderr)[-4000:]}")
        cached = result.stdout.count("Using cache")
        sizes[image] = podman.image_size_mb(image)
        say(f"  {image}: {sizes[image]:,.0f} MB ({time.perf_counter() - t0:.0f} s, {cached} cached steps)")
    return sizes


def run_demo(podman: Podman, image: str) -> None:
    result = podman("run", "--rm", "--network", "host", image, "demo", capture=True, check=False)
    say(result.stdout.rstrip())
    if result.returncode != 0:
        raise CheckFailed(f"nightread demo exited {result.returncode}\n{result.stderr[-3000:]}")
    if "nightread demo" not in result.stdout:
        raise CheckFailed("nightread demo printed no summary")


@dataclass
class Http:
    """urllib with a base URL (and optional basic auth)."""

    base: str
    auth: tuple[str, str] | None = None
    opener: urllib.request.OpenerDirector = field(
        default_factory=lambda: urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )
    )

    def request(
        self, method: str, path: str, data: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {})
        if self.auth is not None:
            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with self.opener.open(req, timeout=120) as r:
                return int(r.status), bytes(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        status, payload = self.request(method, path, data)
        if status >= 300:
            raise CheckFailed(f"{method} {self.base}{path}: HTTP {status} {payload[:300]!r}")
        return json.loads(payload) if payload else None


def wait_until(ready: Callable[[], bool], *, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ready():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what} not ready after {timeout_s:.0f} s")
        time.sleep(0.5)  # polling interval


def seed_orthanc(stack: Stack) -> tuple[int, str]:
    """The sample studies into Orthanc; the first pushed from Orthanc to the listener, then deleted from
    Orthanc. Returns (studies, pushed study's UID)."""
    import io

    from pydicom import dcmwrite

    from integrations.sample_pacs import generate_studies

    orthanc = Http("http://127.0.0.1:8042")
    wait_until(lambda: orthanc.request("GET", "/system")[0] == 200, what="Orthanc's REST API")
    studies = generate_studies()
    instances = 0
    for study in studies:
        for ds in study.instances:
            buf = io.BytesIO()
            dcmwrite(buf, ds, enforce_file_format=True)
            orthanc.json("POST", "/instances", buf.getvalue())
            instances += 1
    say(f"  {len(studies)} studies ({instances} instances) uploaded to Orthanc")
    pushed = studies[0].study_instance_uid
    (found,) = orthanc.json("POST", "/tools/lookup", pushed.encode())
    wait_until(lambda: _listening(11112), what="the listener (port 11112)")
    orthanc.json("POST", "/modalities/nightread-listener/store", {"Resources": [found["ID"]], "Synchronous": True})
    orthanc.request("DELETE", f"/studies/{found['ID']}")
    left = len(orthanc.json("GET", "/studies"))
    say(f"  study 1 pushed by Orthanc to the listener (C-STORE) and deleted from Orthanc; {left} left there")
    return len(studies), pushed


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_nightly(stack: Stack) -> None:
    # the listener calls a pushed study complete after its quiet period (compose.test.yaml: 2 s) without
    # new instances; the nightly's discovery must come after that
    time.sleep(3.0)
    t0 = time.perf_counter()
    out = stack.exec("worker", "prefect", "deployment", "run", "nightly/nightly", "--watch", "--watch-timeout", "900")
    state = re.findall(r"finished in state (\w+)|state (\w+)", out)
    say(f"  nightly/nightly run by the worker container in {time.perf_counter() - t0:.0f} s")
    for line in out.splitlines():
        if "Flow run" in line or "finished" in line.lower():
            say(f"  | {line.strip()}")
    if "Completed" not in out:
        raise CheckFailed(f"the nightly did not complete ({state}):\n{out[-2000:]}\n{stack.logs('worker', 80)}")


def check_results(stack: Stack, *, studies: int, pushed_uid: str, compose: dict[str, Any]) -> None:
    def sql(query: str) -> list[list[str]]:
        out = stack.exec("postgres", "psql", "-U", "nightread", "-d", "nightread", "-At", "-F", "|", "-c", query)
        return [line.split("|") for line in out.splitlines() if line]

    by_status = dict(sql("SELECT status, count(*) FROM study GROUP BY status"))
    say(f"  Postgres, studies by status: {by_status}")
    counts = sql("SELECT (SELECT count(*) FROM image), (SELECT count(*) FROM caption), (SELECT count(*) FROM finding)")[
        0
    ]
    runs = dict(sql("SELECT kind, count(*) FROM run GROUP BY kind"))
    say(f"  Postgres: {counts[0]} images, {counts[1]} captions, {counts[2]} findings; runs by kind {runs}")
    # with dispatch work_pool the nightly submits its studies as annotate-studies flow runs, run by the worker too
    dispatched = compose["services"]["worker"]["environment"].get("NIGHTREAD_FLOW__DISPATCH") == "work_pool"
    if dispatched and not int(runs.get("annotate-studies", 0)):
        raise CheckFailed(f"dispatch work_pool, but no annotate-studies run: {runs}")
    pushed = sql(
        "SELECT s.status, p.name FROM study s JOIN pacs_source p ON p.id = s.source_id "
        f"WHERE s.study_instance_uid = '{pushed_uid}'"
    )
    say(f"  the pushed study: {pushed}")
    if by_status != {"done": str(studies)}:
        raise CheckFailed(f"expected {studies} studies done, found {by_status}\n{stack.logs('worker', 80)}")
    if pushed != [["done", "push"]]:
        raise CheckFailed(f"the study pushed to the listener is {pushed}, not done through the push source")
    if int(counts[0]) == 0 or int(counts[2]) == 0:
        raise CheckFailed("no images or no findings recorded")

    from minio import Minio

    env = compose["services"]["worker"]["environment"]
    client = Minio(
        "127.0.0.1:9000",
        access_key=env["NIGHTREAD_STORAGE__ACCESS_KEY"],
        secret_key=env["NIGHTREAD_STORAGE__SECRET_KEY"],
        secure=False,
    )
    keys = [o.object_name or "" for o in client.list_objects(env["NIGHTREAD_STORAGE__BUCKET"], recursive=True)]
    images = [k for k in keys if k.startswith("images/")]
    say(f"  S3 bucket {env['NIGHTREAD_STORAGE__BUCKET']}: {len(keys)} objects, {len(images)} rendered images")
    if len(images) != int(counts[0]):
        raise CheckFailed(f"{counts[0]} images in Postgres but {len(images)} in S3")

    review = Http("http://127.0.0.1:8080")
    health = review.json("GET", "/healthz")
    status, page = review.request("GET", "/login")
    say(f"  review page: /healthz {health}, /login HTTP {status} ({len(page)} bytes)")
    if status != 200:
        raise CheckFailed(f"the review page's /login answered {status}")
    password = secrets.token_urlsafe(18)
    stack.exec("review", "nightread", "users", "add", "deploycheck", "--role", "reviewer", "--password-stdin",
               stdin=password + "\n")  # fmt: skip
    form = urllib.parse.urlencode({"username": "deploycheck", "password": password}).encode()
    status, body = review.request(
        "POST", "/api/token", form, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    if status != 200:
        raise CheckFailed(f"POST /api/token answered {status}: {body[:300]!r}")
    token = json.loads(body)["access_token"]
    status, body = review.request("GET", "/api/queue?state=any", headers={"Authorization": f"Bearer {token}"})
    queue = json.loads(body) if status == 200 else {}
    say(f"  review API as a new reviewer: /api/queue?state=any HTTP {status}, {queue.get('total')} findings")
    if status != 200 or not queue.get("total"):
        raise CheckFailed(f"the review queue is empty or unreadable (HTTP {status})")


def triton_path(podman: Podman, compose: dict[str, Any]) -> None:
    """The gpu profile's two images on CPU: the Triton image serving a tiny model built in the container, and
    the Triton worker's image (the triton extra, no torch) running `nightread demo` with the model in Triton."""
    services = compose["services"]
    name = f"{PROJECT}-triton"
    script = (
        "nightread models tiny --out /tmp/tiny-model >/dev/null && "
        "NIGHTREAD_TRITON_MODEL=/tmp/tiny-model NIGHTREAD_TRITON_DTYPE=float32 exec nightread triton serve"
    )
    podman(
        "run", "-d", "--name", name, "--label", f"nightread.check={PROJECT}", "--network", "host",
        "-e", "NIGHTREAD_TRITON__INSTANCE_KIND=KIND_CPU", "-e", "NIGHTREAD_TRITON__BIND_HOST=127.0.0.1",
        "--entrypoint", "sh", services["triton"]["image"], "-c", script,
        quiet=True,
    )  # fmt: skip
    ready = Http("http://127.0.0.1:8000")
    try:
        wait_until(lambda: ready.request("GET", "/v2/health/ready")[0] == 200, what="tritonserver", timeout_s=300)
        model = ready.json("GET", "/v2/models/nightread_vlm")
        say(f"  tritonserver ready in {services['triton']['image']}: {model.get('name')} {model.get('versions')}")
        worker = services["worker-gpu"]
        env = ["-e", "NIGHTREAD_INFERENCE__BACKEND=triton", "-e", "NIGHTREAD_TRITON__URL=127.0.0.1:8001"]
        result = podman("run", "--rm", "--network", "host", *env, worker["image"], "demo", capture=True, check=False)
        summary = result.stdout.rstrip()
        say(summary)
        if result.returncode != 0 or not re.search(r"captions\s+│\s+[1-9]", summary):
            raise CheckFailed(f"nightread demo through Triton failed ({result.returncode}):\n{result.stderr[-3000:]}")
        say(f"  {worker['image']} (no torch) ran the demo with the model in Triton")
    except CheckFailed:
        logs = podman("logs", "--tail", "40", name, check=False, capture=True)
        say((logs.stdout + logs.stderr)[-3000:])
        raise
    finally:
        podman("rm", "-f", "-v", "-t", "5", name, check=False, quiet=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.deploy_check", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the stack running (remove it with --down)")
    parser.add_argument("--down", action="store_true", help="only remove what an earlier --keep left")
    parser.add_argument("--no-demo", action="store_true", help="skip `nightread demo` in the image")
    parser.add_argument(
        "--triton", action="store_true", help="also the gpu profile's images: Triton serving a tiny model on CPU"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stop tears the stack down as Ctrl-C does
    started = time.perf_counter()
    timer = Timer()
    with tempfile.TemporaryDirectory(prefix="deploy-check-") as tmp:
        work = Path(tmp)
        ensure_tools()
        podman = Podman(work)
        env = {**os.environ, "POSTGRES_PASSWORD": os.environ.get("POSTGRES_PASSWORD", secrets.token_urlsafe(16))}
        compose = load_compose(*COMPOSE_FILES, env=env)
        profiles = frozenset({"gpu"}) if args.triton else frozenset()
        stack = Stack(podman, compose)
        if args.down:
            stack.down()
            return 0
        try:
            with timer.phase("preflight: leftovers of an earlier run removed, ports free"):
                stack.down()
                ports_free()
            with timer.phase("base image (mmdebstrap, when missing)"):
                build_base(podman, work)
            with timer.phase("wheels of the images' lock subsets"):
                download_wheels()
            with timer.phase("build images"):
                sizes = build_images(podman, compose, profiles)
            image = compose["services"]["worker"]["image"]
            if not args.no_demo:
                with timer.phase("nightread demo in the image"):
                    run_demo(podman, image)
            if args.triton:
                with timer.phase("gpu profile on CPU: Triton image, Triton worker"):
                    triton_path(podman, compose)
            with timer.phase("stack up (compose.yaml + compose.test.yaml)"):
                stack.up()
                stack.wait_healthy("review")
            with timer.phase("seed Orthanc; Orthanc pushes a study to listen"):
                studies, pushed = seed_orthanc(stack)
            with timer.phase("nightly deployment run by the Prefect worker"):
                run_nightly(stack)
            with timer.phase("check Postgres, S3 and the review page"):
                check_results(stack, studies=studies, pushed_uid=pushed, compose=compose)
        except CheckFailed as exc:
            say(f"\nFAILED: {exc}")
            for name in stack.started:
                say(stack.logs(name, 15))
            return 1
        finally:
            if not args.keep:
                with timer.phase("tear down"):
                    stack.down()
            timer.report(time.perf_counter() - started)
    say("image sizes: " + ", ".join(f"{k} {v:,.0f} MB" for k, v in sizes.items()))
    say("deploy-check passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
