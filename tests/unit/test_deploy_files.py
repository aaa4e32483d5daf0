"""The deploy files, read as their tools read them: deploy/compose.yaml (alone and with compose.test.yaml
merged on top), the Kubernetes manifests of deploy/k8s/ with the work pool's base job template, and the
Dockerfiles. Every NIGHTREAD_* name is a setting (NightreadSettings walked field by field), secrets are
never in a ConfigMap, images are named alike everywhere, ports agree with the settings and the commands,
every long-running Kubernetes container has probes. `make deploy-check` runs the compose stack; the
Kubernetes manifests are only parsed here (no cluster)."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, SecretStr

from flows.wiring.settings import ListenSettings, NightreadSettings, ReviewSettings, TritonSettings
from tests.deploy_check import COMPOSE_FILES, as_list, depends_on, load_compose, start_order

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# nightread's own services in compose.yaml (the others are third-party servers)
NIGHTREAD_SERVICES = {"prefect", "migrate", "deployments", "worker", "listener", "review", "worker-gpu"}


# --- the settings' names ------------------------------------------------------------------------------


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _is_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    return SecretStr in getattr(annotation, "__args__", ())


def _walk(model: type[BaseModel], prefix: str) -> dict[str, bool]:
    """Env name → is it a secret, for a model's fields and (recursively) its sub-models' fields."""
    names: dict[str, bool] = {}
    for field_name, info in model.model_fields.items():
        name = f"{prefix}{field_name.upper()}"
        names[name] = _is_secret(info.annotation)
        sub = _model_of(info.annotation)
        if sub is not None:
            names.update(_walk(sub, f"{name}__"))
    return names


SETTINGS = _walk(NightreadSettings, "NIGHTREAD_")
SECRET_SETTINGS = {name for name, secret in SETTINGS.items() if secret}
# what the Triton model (deploy/triton/.../model.py) reads itself, beside the settings
MODEL_ENV = set(
    re.findall(
        r"os\.environ\.get\(\"(NIGHTREAD_[A-Z_]+)\"",
        (DEPLOY / "triton" / "model_repository" / "nightread_vlm" / "1" / "model.py").read_text(),
    )
)


def test_the_walk_finds_nested_and_secret_settings():
    assert {"NIGHTREAD_DATABASE__URL", "NIGHTREAD_PACS__TLS__CA_FILE", "NIGHTREAD_LISTEN__ALLOWED_AES"} <= set(SETTINGS)
    assert {"NIGHTREAD_DATABASE__URL", "NIGHTREAD_STORAGE__SECRET_KEY", "NIGHTREAD_REVIEW__SECRET_KEY"} <= (
        SECRET_SETTINGS
    )
    assert "NIGHTREAD_STORAGE__ACCESS_KEY" not in SECRET_SETTINGS
    assert "NIGHTREAD_TRITON_MODEL" in MODEL_ENV


# --- compose ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE_FILES[0], env={})


@pytest.fixture(scope="module")
def merged() -> dict[str, Any]:
    return load_compose(*COMPOSE_FILES, env={})


def test_compose_env_names_are_settings(compose, merged):
    for spec in (compose, merged):
        for name, service in spec["services"].items():
            allowed = set(SETTINGS) | (MODEL_ENV if name == "triton" else set())
            unknown = {k for k in service.get("environment", {}) if k.startswith("NIGHTREAD_")} - allowed
            assert not unknown, f"{name}: {sorted(unknown)} are not settings"


def test_compose_starts_in_order_and_health_conditions_have_healthchecks(compose, merged):
    for spec in (compose, merged):
        services = spec["services"]
        for profiles in (frozenset(), frozenset({"gpu"})):
            order = start_order(services, profiles)
            for name in order:
                for dep, condition in depends_on(services[name]).items():
                    assert order.index(dep) < order.index(name)
                    if condition == "service_healthy":
                        assert services[dep].get("healthcheck", {}).get("test"), f"{dep} has no healthcheck"


def test_compose_images_are_named_alike(compose):
    services = compose["services"]
    for name in NIGHTREAD_SERVICES - {"worker-gpu"}:
        assert services[name]["image"] == "nightread:latest", name
    assert services["worker-gpu"]["image"] == "nightread-triton-worker:latest"
    assert services["migrate"]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert services["triton"]["image"] == "nightread-triton:latest"
    assert services["triton"]["build"]["dockerfile"] == "deploy/triton/Dockerfile"
    # the triton image is built FROM the nightread image, by the name compose gives it
    triton_dockerfile = (DEPLOY / "triton" / "Dockerfile").read_text()
    assert "ARG NIGHTREAD_IMAGE=nightread:latest" in triton_dockerfile


def test_the_override_changes_images_and_network_only(compose, merged):
    """nightread's services run with compose.yaml's image, commands and settings; the upstream images become
    local builds whose Containerfiles take the base image as an argument."""
    for name in NIGHTREAD_SERVICES:
        base, test = compose["services"][name], merged["services"][name]
        for key in ("image", "entrypoint", "command"):
            assert base.get(key) == test.get(key), f"{name}.{key}"
        changed = {k for k, v in test.get("environment", {}).items() if base.get("environment", {}).get(k) != v}
        assert changed <= {"NIGHTREAD_LISTEN__QUIET_PERIOD_S"}, f"{name}: {changed}"
        assert test["network_mode"] == "host"
    for name in ("postgres", "minio", "orthanc"):
        image = merged["services"][name]["image"]
        assert image.startswith("localhost/nightread-test-")
        assert image != compose["services"][name]["image"]
        build = merged["services"][name]["build"]
        containerfile = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
        assert containerfile.is_relative_to(DEPLOY / "test-images")
        assert "ARG BASE=" in containerfile.read_text()
    for service in merged["services"].values():  # with host networking nothing is published
        assert not service.get("ports")


def _published(service: dict[str, Any]) -> set[int]:
    """Container ports of a service's `ports` entries ("127.0.0.1:8080:8080", "11112:11112")."""
    return {int(str(p).rsplit(":", 1)[-1]) for p in service.get("ports", [])}


def test_compose_ports_agree_with_settings_and_commands(compose):
    services = compose["services"]
    listener = services["listener"]
    assert int(listener["environment"]["NIGHTREAD_LISTEN__PORT"]) in _published(listener)
    review = as_list(services["review"]["command"])
    port = int(review[review.index("--port") + 1])
    assert port == ReviewSettings().port
    assert port in _published(services["review"])
    assert f":{port}/" in services["review"]["healthcheck"]["test"][-1]
    api_port = int(re.search(r":(\d+)/api", services["worker"]["environment"]["PREFECT_API_URL"]).group(1))  # type: ignore[union-attr]
    assert api_port in _published(services["prefect"])
    triton = TritonSettings()
    assert _published(services["triton"]) == {triton.http_port, triton.grpc_port, triton.metrics_port}
    assert services["worker-gpu"]["environment"]["NIGHTREAD_TRITON__URL"] == f"triton:{triton.grpc_port}"
    pacs_port = int(services["worker"]["environment"]["NIGHTREAD_PACS__PORT"])
    orthanc = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    assert orthanc["DicomPort"] == pacs_port


def test_orthanc_accepts_the_worker_and_pushes_to_the_listener(compose):
    orthanc = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    env = compose["services"]["worker"]["environment"]
    listener = compose["services"]["listener"]["environment"]
    # container addresses change: peers are known by AE title, not by host
    assert orthanc["DicomCheckModalityHost"] is False
    by_aet = {m["AET"]: m for m in orthanc["DicomModalities"].values()}
    worker = by_aet[env["NIGHTREAD_PACS__CALLING_AE"]]
    assert worker["AllowFind"]
    assert worker["AllowGet"]
    assert worker["AllowMove"]
    assert env["NIGHTREAD_PACS__CALLED_AE"] == orthanc["DicomAet"]
    push = by_aet[listener["NIGHTREAD_LISTEN__AE_TITLE"]]
    assert (push["Host"], push["Port"]) == ("listener", int(listener["NIGHTREAD_LISTEN__PORT"]))
    assert orthanc["DicomAet"] in json.loads(listener["NIGHTREAD_LISTEN__ALLOWED_AES"])


def test_prefect_has_a_database_of_its_own(compose):
    """Prefect and nightread both keep an Alembic `alembic_version` table: one database each."""
    services = compose["services"]
    prefect_db = services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].rsplit("/", 1)[1]
    nightread_db = services["worker"]["environment"]["NIGHTREAD_DATABASE__URL"].rsplit("/", 1)[1]
    assert prefect_db != nightread_db
    init = (DEPLOY / "postgres" / "init-prefect.sql").read_text()
    assert f"CREATE DATABASE {prefect_db};" in init
    assert any("init-prefect.sql:/docker-entrypoint-initdb.d/" in v for v in services["postgres"]["volumes"])


def test_the_gpu_worker_uses_triton_from_an_image_with_the_triton_extra(compose):
    worker = compose["services"]["worker-gpu"]
    assert worker["environment"]["NIGHTREAD_INFERENCE__BACKEND"] == "triton"
    assert "triton" in depends_on(worker)
    assert worker["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile", "args": {"EXTRAS": "triton"}}
    assert as_list(worker["command"]) == as_list(compose["services"]["worker"]["command"])


# --- images -------------------------------------------------------------------------------------------


def test_dockerfiles_take_their_base_and_install_from_the_lock():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim" in text
    assert "--require-hashes --no-deps -r" in text
    assert "lock_subset.py --extras" in text
    assert re.search(r"^USER 10001", text, flags=re.MULTILINE)
    assert 'ENTRYPOINT ["nightread"]' in text
    extras = re.search(r'^ARG EXTRAS="([^"]*)"', text, flags=re.MULTILINE)
    assert extras is not None
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras.group(1).split()) <= set(optional) - {"dev"}
    triton = (DEPLOY / "triton" / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{NIGHTREAD_IMAGE\}", triton, flags=re.MULTILINE)


def _lock_subset() -> Any:
    spec = importlib.util.spec_from_file_location("lock_subset", DEPLOY / "lock_subset.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_lock_subset_closure():
    """The images' packages are the lock's: every extra together gives the whole lock back; the image's
    extras leave the dev tools out."""
    ls = _lock_subset()
    closure, pyproject_roots = ls.closure, ls.pyproject_roots
    pins = ls.read_lock((ROOT / "requirements.lock").read_text())
    every = closure(pins, pyproject_roots(ROOT / "pyproject.toml", ["inference", "triton", "dev"]) | set(ls.ALWAYS))
    assert set(every) == set(pins)
    image = closure(pins, pyproject_roots(ROOT / "pyproject.toml", ["inference", "triton"]))
    assert {"torch", "tritonclient", "nvidia-pytriton", "prefect", "asyncpg"} <= set(image)
    assert not {"pytest", "playwright", "moto", "mypy"} & set(image)
    slim = closure(pins, pyproject_roots(ROOT / "pyproject.toml", ["triton"]))
    assert "tritonclient" in slim
    assert "torch" not in slim


# --- Kubernetes ---------------------------------------------------------------------------------------


def _documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for doc in _documents():
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in found, f"{key} twice"
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "nightread", key
        found[key] = doc
    return found


@pytest.fixture(scope="module")
def job_template(k8s) -> dict[str, Any]:
    template: dict[str, Any] = json.loads(k8s["ConfigMap", "nightread-work-pool"]["data"]["base-job-template.json"])
    return template


def _pod_specs(k8s, job_template) -> dict[str, dict[str, Any]]:
    specs = {
        name: doc["spec"]["template"]["spec"] for (kind, name), doc in k8s.items() if kind in ("Deployment", "Job")
    }
    specs["flow-run job"] = job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    return specs


def _image_default(job_template) -> str:
    return str(job_template["variables"]["properties"]["image"]["default"])


def test_k8s_images_are_named_alike(k8s, job_template):
    lock = (ROOT / "requirements.lock").read_text()
    prefect = re.search(r"^prefect==(\S+)", lock, flags=re.MULTILINE).group(1)  # type: ignore[union-attr]
    images = {}
    for name, spec in _pod_specs(k8s, job_template).items():
        for container in spec["containers"]:
            image = container["image"]
            if image == "{{ image }}":
                image = _image_default(job_template)
            images[f"{name}/{container['name']}"] = image
    nightread = {k: v for k, v in images.items() if v.rsplit("/", 1)[-1].startswith("nightread:")}
    assert set(nightread.values()) == {f"registry.example.org/nightread:{PROJECT_VERSION}"}, nightread
    assert {"flow-run job/prefect-job", "nightread-review/review", "nightread-listen/listen"} <= set(nightread)
    assert images["nightread-triton/triton"] == f"registry.example.org/nightread-triton:{PROJECT_VERSION}"
    assert images["nightread-prefect-worker/worker"] == f"prefecthq/prefect:{prefect}-python3.11-kubernetes"


def test_k8s_env_names_are_settings_and_secrets_stay_in_secrets(k8s, job_template):
    config = k8s["ConfigMap", "nightread-settings"]["data"]
    secret = k8s["Secret", "nightread-secrets"]["stringData"]
    names = set(config) | set(secret)
    for name, spec in _pod_specs(k8s, job_template).items():
        for container in spec["containers"]:
            env = container.get("env", [])
            if isinstance(env, list):
                names |= {e["name"] for e in env}
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                assert (("ConfigMap" if "configMapRef" in source else "Secret"), ref["name"]) in k8s, name
    unknown = {n for n in names if n.startswith("NIGHTREAD_")} - set(SETTINGS) - MODEL_ENV
    assert not unknown, sorted(unknown)
    assert not SECRET_SETTINGS & set(config), "a secret in a ConfigMap"
    assert not {n for n in config if re.search(r"PASSWORD|TOKEN|SECRET|_KEY$", n) and n in SECRET_SETTINGS}
    assert set(secret) <= SECRET_SETTINGS | {"HF_TOKEN"}
    assert "NIGHTREAD_DATABASE__URL" in secret


def test_k8s_ports_agree_with_settings_and_commands(k8s):
    config = k8s["ConfigMap", "nightread-settings"]["data"]

    def container(deployment: str) -> dict[str, Any]:
        return dict(k8s["Deployment", deployment]["spec"]["template"]["spec"]["containers"][0])

    def ports(c: dict[str, Any]) -> dict[str, int]:
        return {p["name"]: p["containerPort"] for p in c["ports"]}

    def service_targets(name: str) -> dict[int, str]:
        return {p["port"]: p["targetPort"] for p in k8s["Service", name]["spec"]["ports"]}

    review = container("nightread-review")
    args = review["args"]
    assert args[0] == "review"
    assert int(args[args.index("--port") + 1]) == ports(review)["http"] == ReviewSettings().port
    assert service_targets("review") == {8080: "http"}
    listen = container("nightread-listen")
    listen_port = int(config.get("NIGHTREAD_LISTEN__PORT", ListenSettings().port))
    assert listen["args"] == ["listen"]
    assert ports(listen)["dicom"] == listen_port
    assert service_targets("listen") == {listen_port: "dicom"}
    triton = container("nightread-triton")
    t = TritonSettings()
    assert ports(triton) == {"http": t.http_port, "grpc": t.grpc_port, "metrics": t.metrics_port}
    host, port = config["NIGHTREAD_TRITON__URL"].rsplit(":", 1)
    assert host.split(".")[0] == "triton"
    assert service_targets("triton")[int(port)] == "grpc"


def test_k8s_probes_and_gpu(k8s):
    for (kind, name), doc in k8s.items():
        if kind != "Deployment":
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            assert c.get("readinessProbe"), f"{name}/{c['name']} has no readiness probe"
            assert c.get("livenessProbe"), f"{name}/{c['name']} has no liveness probe"
            assert c.get("resources", {}).get("limits", {}).get("memory"), f"{name}/{c['name']} has no memory limit"
    triton = k8s["Deployment", "nightread-triton"]["spec"]["template"]["spec"]["containers"][0]
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    review = k8s["Deployment", "nightread-review"]["spec"]["template"]["spec"]["containers"][0]
    assert review["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_k8s_commands_are_nightread_commands(k8s, job_template):
    import typer

    from flows.cli import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    compose = load_compose(COMPOSE_FILES[0], env={})["services"]
    for name in NIGHTREAD_SERVICES:  # those on the image's `nightread` entrypoint run its commands
        if "entrypoint" not in compose[name]:
            assert as_list(compose[name]["command"])[0] in commands, name
    for name in ("nightread-review", "nightread-listen"):
        args = k8s["Deployment", name]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[0] in commands, name
    setup = k8s["Job", "nightread-setup"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "nightread db upgrade" in setup
    assert setup.endswith("&& nightread deploy")
    assert "--type kubernetes" in setup
    assert "/etc/nightread/work-pool/base-job-template.json" in setup
    worker = k8s["Deployment", "nightread-prefect-worker"]["spec"]["template"]["spec"]["containers"][0]
    command = worker["command"]
    assert command[command.index("--pool") + 1] == "nightread"
    assert command[command.index("--type") + 1] == "kubernetes"
    assert {d["work_pool"]["name"] for d in yaml.safe_load((DEPLOY / "prefect.yaml").read_text())["deployments"]} == {
        "nightread"
    }
    # the flow-run container replaces the image's `nightread` entrypoint with Prefect's command
    job = job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == shlex.split("prefect flow-run execute")
    assert job["args"] == []


def test_base_job_template_variables(job_template):
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(job_template["job_configuration"])))
    declared = set(job_template["variables"]["properties"])
    assert used <= declared, sorted(used - declared)
    manifest = job_template["job_configuration"]["job_manifest"]
    assert manifest["kind"] == "Job"
    assert manifest["apiVersion"] == "batch/v1"
    volumes = manifest["spec"]["template"]["spec"]["volumes"]
    assert volumes == [{"name": "data", "persistentVolumeClaim": {"claimName": "nightread-data"}}]
