"""NightreadSettings: every setting in one place, read from NIGHTREAD_* variables (nested with `__`).

Built at the edge (the CLI, a flow run's start, a test) and passed down; nothing reads the
environment at import time. Defaults are the embedded ones: SQLite and an object folder under
one data dir, the in-process model and the built-in sample PACS.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"


class DatabaseSettings(BaseModel):
    # secret: the URL may carry the database password, and settings travel as Prefect flow-run parameters
    # (stored by Prefect) and into logs and errors; SecretStr prints and serializes as ********** there
    model_config = ConfigDict(hide_input_in_errors=True)

    url: SecretStr | None = Field(
        default=None,
        description="SQLAlchemy URL (sqlite:///… or postgresql+psycopg://user:password@host/db), kept secret; "
        "default: a SQLite file in data_dir",
    )
    pool_size: int = Field(default=5, ge=1)
    max_overflow: int = Field(default=5, ge=0)
    echo: bool = False
    outage_s: float = Field(
        default=60.0,
        ge=0,
        description="a database that cannot be reached (a restart, a failover) is waited for this long "
        "before a study's bookkeeping gives up; its tasks retry it as a transient error",
    )


class StorageSettings(BaseModel):
    model_config = ConfigDict(hide_input_in_errors=True)  # a validation error never echoes the secret key

    backend: Literal["local", "s3"] = "local"
    root: Path | None = Field(default=None, description="local backend: folder; default data_dir/objects")
    endpoint: str = "127.0.0.1:9000"
    bucket: str = "nightread"
    access_key: str = ""
    secret_key: SecretStr = SecretStr("")
    secure: bool = True
    region: str | None = None


class TlsSettings(BaseModel):
    """DICOM TLS (PS3.15 B.1, B.9): TLS 1.2 or newer on a DIMSE connection. As a client (our C-ECHO,
    C-FIND, C-GET, C-MOVE and SR write-back) `ca_file` verifies the PACS; `cert_file`/`key_file` are
    our certificate for a PACS that asks for one (mutual TLS). As a server (our C-MOVE storage SCP,
    `nightread listen`) `cert_file`/`key_file` are required, and with `require_client_cert` only
    peers with a certificate signed by `ca_file` get through."""

    enabled: bool = False
    ca_file: Path | None = Field(default=None, description="CA bundle (PEM) that signs the peers' certificates")
    cert_file: Path | None = Field(default=None, description="our certificate chain (PEM)")
    key_file: Path | None = Field(default=None, description="our private key (PEM)")
    check_hostname: bool = Field(default=True, description="client: the PACS certificate must name its host")
    require_client_cert: bool = Field(default=False, description="server: mutual TLS")

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if self.enabled and (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls: cert_file and key_file go together")
        if self.enabled and self.require_client_cert and self.ca_file is None:
            raise ValueError("tls: require_client_cert needs a ca_file to check client certificates against")
        return self


class PacsSettings(BaseModel):
    kind: Literal["dimse", "dicomweb", "push"] = Field(
        default="dimse", description="dimse/dicomweb: we query and retrieve; push: studies sent to `nightread listen`"
    )
    name: str = Field(default="sample-pacs", min_length=1, max_length=64)
    url: str | None = Field(default=None, description="DICOMweb root, e.g. http://pacs:8042/dicom-web")
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    called_ae: str = "SAMPLEPACS"
    calling_ae: str = "NIGHTREAD"
    retrieve: Literal["get", "move"] = "get"
    move_port: int = Field(default=0, ge=0, le=65535, description="our storage SCP port for C-MOVE (0: any)")
    move_bind_host: str = Field(
        default="", description="address our C-MOVE storage SCP binds ('': 127.0.0.1 for a PACS on loopback, else all)"
    )
    move_allowed_aes: list[str] = Field(
        default_factory=list,
        description="AE titles besides called_ae allowed to send us C-MOVE sub-operations (JSON list)",
    )
    move_allowed_hosts: list[str] = Field(
        default_factory=list, description="addresses allowed to connect to our C-MOVE storage SCP ([]: any)"
    )
    parallel_associations: int = Field(
        default=1, ge=1, le=16, description="split a study over this many C-GET/C-MOVE associations at once"
    )
    dimse_receiver: Literal["direct", "pynetdicom"] = Field(
        default="direct",
        description="C-GET/C-MOVE: nightread's receiver (one thread per association, streams to disk) or pynetdicom's",
    )
    timeout_s: float = Field(default=30.0, gt=0, description="per read: a PACS silent this long is gone")
    query_deadline_s: float = Field(
        default=300.0,
        gt=0,
        description="a whole query (C-FIND, C-ECHO, the SR's C-STORE) may take this long, however the PACS drips",
    )
    retrieve_deadline_s: float | None = Field(
        default=600.0, gt=0, description="a study's whole retrieval may take this long, plus the per-instance allowance"
    )
    retrieve_deadline_per_instance_s: float = Field(
        default=2.0, ge=0, description="added to retrieve_deadline_s for each instance the study is said to have"
    )
    max_associations_day: int = Field(
        default=2, ge=1, le=64, description="associations with this PACS at once outside night_window (pacs:<name>)"
    )
    max_associations_night: int = Field(
        default=4, ge=1, le=64, description="associations with this PACS at once within night_window"
    )
    night_window: str = Field(default="19:00-07:00", description="HH:MM-HH:MM when the night profile applies")
    queries_per_minute: float = Field(
        default=0, ge=0, description="at most this many queries a minute (pacs-queries:<name>; 0: no limit)"
    )
    orthanc_url: str | None = Field(
        default=None,
        description="the PACS's Orthanc REST root (e.g. http://pacs:8042): its /changes also finds studies "
        "archived late, whatever their date (username/password and tls.ca_file apply)",
    )
    requery_days: int = Field(
        default=7,
        ge=0,
        le=365,
        description="each discovery asks again this many days before its cursor (late arrivals)",
    )
    modalities: list[str] = Field(default_factory=list, description="only studies with these modalities")
    lookback_days: int = Field(default=7, ge=0, description="first discovery looks back this far")
    quiet_period_s: float = Field(
        default=120.0, ge=0, description="push: a study with no new instance for this long is complete"
    )
    write_back: bool = Field(
        default=False, description="send each study's SR back to this PACS (C-STORE; STOW-RS for dicomweb)"
    )
    tls: TlsSettings = Field(default_factory=TlsSettings, description="DICOM TLS to this PACS (and our C-MOVE SCP)")
    # DICOMweb: HTTPS is verified against tls.ca_file when set (else the system's CAs)
    auth: Literal["none", "bearer", "basic"] = Field(default="none", description="dicomweb: HTTP authentication")
    username: str = Field(default="", description="dicomweb (and orthanc_url) basic auth")
    password: SecretStr = Field(default=SecretStr(""), description="dicomweb (and orthanc_url) basic auth")
    token: SecretStr = Field(default=SecretStr(""), description="dicomweb bearer token")

    @model_validator(mode="after")
    def _url_for_dicomweb(self) -> PacsSettings:
        if self.kind == "dicomweb" and not self.url:
            raise ValueError(f'source "{self.name}": kind dicomweb needs a url')
        if self.url and "@" in self.url.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError(
                f'source "{self.name}": credentials go in username/password or token (kept secret), not in the url'
            )
        if self.kind == "push" and self.write_back:
            raise ValueError(f'source "{self.name}": a push source has no PACS to write back to')
        return self

    @field_validator("night_window")
    @classmethod
    def _window(cls, v: str) -> str:
        parse_window(v)  # names the problem
        return v

    @field_validator("called_ae", "calling_ae")
    @classmethod
    def _ae_title(cls, v: str) -> str:
        if not v or len(v) > 16 or not v.isascii() or "\\" in v:
            raise ValueError("an AE title is 1-16 ASCII characters without backslash")
        return v


class ListenSettings(BaseModel):
    """`nightread listen`: the C-STORE receiver for studies pushed to nightread."""

    ae_title: str = "NIGHTREAD"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)
    allowed_aes: list[str] = Field(default_factory=list, description="calling AE titles allowed to push (JSON list)")
    allowed_hosts: list[str] = Field(
        default_factory=list, description="addresses allowed to connect ([]: any; JSON list)"
    )
    max_associations: int = Field(default=16, ge=1, le=256, description="associations at once (more: busy)")
    artim_s: float = Field(default=10.0, gt=0, le=300, description="time a connection has to request an association")
    tls: TlsSettings = Field(default_factory=TlsSettings, description="DICOM TLS for pushes (cert_file/key_file)")
    quiet_period_s: float = Field(default=120.0, ge=0, description="no new instance for this long: study complete")
    source_name: str = "push"
    dimse_receiver: Literal["direct", "pynetdicom"] = Field(
        default="direct", description="nightread's receiver (streams to disk) or pynetdicom's"
    )


class InferenceSettings(BaseModel):
    backend: Literal["local", "triton"] = "local"
    model: str = Field(default=DEFAULT_MODEL, description="Hugging Face id or local folder of the checkpoint")
    revision: str | None = None
    offline_fallback: bool = Field(
        default=True,
        description="when the model cannot be loaded, build and use a tiny random model of the same family",
    )
    tiny_family: str = "smolvlm"
    adapter: str | None = Field(default=None, description="PEFT LoRA adapter on top of the model, merged")
    engine: str = Field(default="transformers", description="or an installed `nightread.engines` plugin")
    trust_remote_code_for: list[str] = Field(
        default_factory=list, description="checkpoints allowed to run their own code (JSON list; default none)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    caption_max_new_tokens: int = Field(default=48, ge=1, le=1024)
    stop_strings: list[str] = Field(
        default_factory=lambda: ["\n"], description="captions and open answers end at the first of these"
    )
    hub_timeout_s: float = Field(default=10.0, gt=0)
    threads: int | None = Field(default=None, ge=1, description="torch intra-op threads (default: torch's)")
    require_promoted: bool = Field(
        default=False, description="refuse to annotate with a model version not promoted by `nightread models promote`"
    )


class TritonSettings(BaseModel):
    """The Triton client (inference.backend=triton) and `nightread triton serve`."""

    url: str = Field(default="127.0.0.1:8001", description="gRPC host:port (HTTP host:port with protocol=http)")
    urls: list[str] = Field(
        default_factory=list,
        description="several Triton endpoints (JSON list of host:port): requests balanced by requests in flight, "
        "failover when one goes down; empty: `url` alone",
    )
    protocol: Literal["grpc", "http"] = "grpc"
    model: str = "nightread_vlm"
    version: str = Field(default="", description="model version to require ('' = latest)")
    timeout_s: float = Field(default=300.0, gt=0, description="per request")
    max_in_flight: int = Field(
        default=16, ge=1, le=256, description="requests in flight per endpoint (lets batches form)"
    )
    retries: int = Field(default=3, ge=0, le=10)
    backoff_s: float = Field(default=0.5, ge=0)
    outage_s: float = Field(
        default=90.0, ge=0, description="keep retrying a transient failure this long (a Triton restart)"
    )
    # `nightread triton serve` (development server from the nvidia-pytriton wheel)
    repository: Path = Field(default=Path("deploy/triton/model_repository"))
    instance_count: int = Field(default=1, ge=1, le=16)
    instance_kind: Literal["KIND_CPU", "KIND_GPU"] = "KIND_CPU"
    http_port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    metrics_port: int = Field(default=8002, ge=0, le=65535)
    bind_host: str = Field(
        default="127.0.0.1", description="address `nightread triton serve` listens on (0.0.0.0 in its image)"
    )


class RenderSettings(BaseModel):
    max_long_edge: int = Field(default=512, ge=32, le=8192, description="long edge of rendered images, pixels")
    ct_windows: list[tuple[float, float]] = Field(
        default_factory=list,
        description=(
            "CT windows in HU for questions that name none: [] = the file's own window, one [center, width]"
            " pair = that window, three = stacked as RGB, e.g. [[-600,1500],[40,400],[400,1800]]"
        ),
    )

    @field_validator("ct_windows")
    @classmethod
    def _one_or_three_windows(cls, v: list[tuple[float, float]]) -> list[tuple[float, float]]:
        from integrations.imaging import check_ct_windows  # numpy and pydicom: not at `nightread --help`

        return check_ct_windows(v)


class ReviewSettings(BaseModel):
    """`nightread review`: the QA web page."""

    verified_reports: bool = Field(
        default=True,
        description="when a study's last flagged finding is decided, write a new, VERIFIED version of its SR",
    )
    verifying_organization: str = Field(
        default="nightread", min_length=1, max_length=64, description="Verifying Organization in verified SRs"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    secret_key: SecretStr = Field(
        default=SecretStr(""),
        description="signs session cookies and API tokens; empty: a random key kept in data_dir/review-secret",
    )
    secure_cookies: bool = Field(default=False, description="mark cookies Secure (on when served over HTTPS)")
    session_max_age_s: int = Field(default=8 * 3600, ge=60)
    token_ttl_s: int = Field(default=3600, ge=60, description="lifetime of a bearer token from POST /api/token")
    show_patient_identifiers: bool = Field(
        default=False,
        description="keep patient name/ID/accession of each study and show them on the page (off: never stored)",
    )
    page_size: int = Field(default=25, ge=1, le=500)
    login_max_failures: int = Field(
        default=5, ge=0, description="failed logins of one name within login_window_s before a lock (0: no limit)"
    )
    login_max_failures_per_address: int = Field(
        default=20, ge=0, description="the same per client address (0: no limit; behind a proxy, raise it)"
    )
    login_window_s: int = Field(default=900, ge=1, description="window failed logins are counted in")
    login_lockout_s: int = Field(
        default=900, ge=1, description="first lock; each further one doubles, at most a day (`users unlock` lifts it)"
    )
    api_docs: bool = Field(default=False, description="Swagger UI at /docs behind login (needs api_docs_assets)")
    api_docs_assets: Path | None = Field(
        default=None, description="folder with swagger-ui-bundle.js and swagger-ui.css (never a CDN)"
    )
    hsts_max_age_s: int = Field(default=365 * 24 * 3600, ge=0, description="HSTS max-age, sent over https only")


class MetricsSettings(BaseModel):
    """Prometheus metrics of the long-running processes (`serve`, `listen`, `review`)."""

    port: int | None = Field(default=None, ge=0, le=65535, description="serve /metrics on this port (unset: off)")
    host: str = Field(default="127.0.0.1", description="address the metrics endpoint listens on")
    database_refresh_s: float = Field(
        default=60.0,
        ge=0,
        description="read the database gauges (studies, failures, review queue) at most this often; scrapes "
        "in between get the last reading (counting the queue takes seconds at a million studies)",
    )


class ValidationSettings(BaseModel):
    """The promotion gate: `nightread models promote` needs a validation run meeting these."""

    min_examples: int = Field(default=50, ge=1)
    min_closed_accuracy: float = Field(default=0.70, ge=0, le=1)
    min_auroc: float = Field(default=0.70, ge=0, le=1)
    max_ece: float = Field(default=0.15, ge=0, le=1)


class BackfillSettings(BaseModel):
    """Retrospective backfill: query limits and manners towards the PACS."""

    result_limit: int = Field(
        default=500,
        ge=1,
        description="the PACS's query result cap: a period with this many answers is asked again in pieces",
    )
    window: str | None = Field(
        default=None, description="off-peak hours HH:MM-HH:MM (e.g. 19:00-07:00); outside them a backfill pauses"
    )
    studies_per_hour: float | None = Field(
        default=None, gt=0, description="at most this many studies retrieved per hour"
    )
    associations: int | None = Field(
        default=None, ge=1, le=64, description="studies retrieved at once by a backfill (default: flow.concurrency)"
    )

    @field_validator("window")
    @classmethod
    def _window(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        parse_window(v)
        return v


def parse_window(text: str) -> tuple[int, int]:
    """'19:00-07:00' -> (1140, 420) minutes after midnight; raises ValueError naming the problem."""
    import re

    m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", text)
    if not m:
        raise ValueError(f"window {text!r} is not HH:MM-HH:MM")
    h1, m1, h2, m2 = (int(x) for x in m.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        raise ValueError(f"window {text!r} has an impossible time")
    return h1 * 60 + m1, h2 * 60 + m2


class FhirSettings(BaseModel):
    """FHIR R4 output (docs/fhir.md): per study a transaction Bundle (a DiagnosticReport, one Observation
    per finding, the model as a Device), kept in the object store when `enabled`, and POSTed to
    `endpoint` when it is set."""

    model_config = ConfigDict(hide_input_in_errors=True)  # a validation error never echoes the token

    enabled: bool = Field(default=False, description="build each study's FHIR Bundle and keep it in the object store")
    endpoint: str | None = Field(
        default=None,
        description="base URL of the FHIR server the Bundle is POSTed to as one transaction (unset: stored only)",
    )
    bearer_token: SecretStr = Field(
        default=SecretStr(""), description="sent as `Authorization: Bearer …` to the endpoint; kept secret"
    )
    ca_file: Path | None = Field(
        default=None, description="CA bundle (PEM) that verifies an https endpoint (default: the system's CAs)"
    )
    timeout_s: float = Field(default=30.0, gt=0, le=600, description="per request to the endpoint")
    patient_identifier_system: str | None = Field(
        default=None,
        description="system URI of the PACS's Patient IDs: with review.show_patient_identifiers on, the report's "
        "subject is the patient by this identifier (unset: no subject, no patient data in the Bundle)",
    )

    @model_validator(mode="after")
    def _endpoint(self) -> FhirSettings:
        if self.endpoint is not None:
            if not self.enabled:
                raise ValueError("fhir: an endpoint needs enabled on (the Bundle is stored, then sent)")
            if not re.match(r"^https?://[^/?#]+", self.endpoint):
                raise ValueError("fhir: endpoint must be an http:// or https:// URL")
            if "@" in self.endpoint.split("://", 1)[1].split("/", 1)[0]:
                raise ValueError("fhir: credentials go in bearer_token (kept secret), not in the endpoint")
        return self


class FlowSettings(BaseModel):
    concurrency: int = Field(default=2, ge=1, le=64, description="studies retrieved and rendered at once")
    annotating_studies: int = Field(
        default=32,
        ge=1,
        le=256,
        description="studies that may wait on the annotator at once (keeps a Triton server's batches full)",
    )
    retries: int = Field(default=2, ge=0, le=10)
    retry_delay_s: float = Field(default=2.0, ge=0)
    max_attempts: int = Field(default=3, ge=1, description="runs a failing study is tried in before it is failed")
    lease_s: float = Field(
        default=120.0,
        ge=5,
        description="a study is worked on by one worker at a time under a lease renewed every third of this; "
        "a dead worker's study is taken again once its lease runs out",
    )
    dispatch: Literal["threads", "work_pool"] = Field(
        default="threads",
        description="threads: studies run in this process; work_pool: as runs of the annotate-studies deployment "
        "on a Prefect work pool (any number of workers; needs PREFECT_API_URL and `nightread deploy`)",
    )
    studies_per_run: int = Field(
        default=4, ge=1, le=256, description="work_pool: studies per annotate-studies flow run"
    )
    runs_in_flight: int = Field(
        default=8, ge=1, le=1024, description="work_pool: annotate-studies flow runs submitted and not yet finished"
    )


class NightreadSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="NIGHTREAD_",
        env_nested_delimiter="__",
        extra="ignore",
        validate_default=True,
        hide_input_in_errors=True,  # a validation error would otherwise echo every setting, secrets included
    )

    data_dir: Path = Field(default=Path(".nightread"), description="where embedded defaults keep their files")
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    pacs: PacsSettings = Field(default_factory=PacsSettings)
    sources: list[PacsSettings] = Field(
        default_factory=list, description="several PACS at once (JSON list); when empty, `pacs` is the one source"
    )
    listen: ListenSettings = Field(default_factory=ListenSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    render: RenderSettings = Field(default_factory=RenderSettings)
    flow: FlowSettings = Field(default_factory=FlowSettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)
    deid_secret_key: SecretStr = Field(
        default=SecretStr(""),
        description="keys pseudonyms, date offsets and the encrypted re-identification map of de-identified "
        "exports; empty: a random key kept in data_dir/deid-secret (keep it: the same key gives the same pseudonyms)",
    )
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    backfill: BackfillSettings = Field(default_factory=BackfillSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    fhir: FhirSettings = Field(default_factory=FhirSettings)
    questions_file: Path | None = Field(default=None, description="question bank YAML; default: the bundled one")
    rules_file: Path | None = Field(default=None, description="selection rules YAML; default: the bundled one")

    @model_validator(mode="after")
    def _absolute_data_dir(self) -> NightreadSettings:
        self.data_dir = self.data_dir.expanduser().resolve()
        return self

    @model_validator(mode="after")
    def _unique_source_names(self) -> NightreadSettings:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique: {', '.join(dupes)}")
        return self

    def configured_sources(self) -> list[PacsSettings]:
        return list(self.sources) or [self.pacs]

    @property
    def database_url(self) -> str:
        """The database URL in clear, for the engine and migrations only: show it with mask_url()."""
        url = self.database.url.get_secret_value() if self.database.url is not None else ""
        return url or f"sqlite:///{self.data_dir / 'nightread.db'}"

    @property
    def inbox(self) -> Path:
        """Where `nightread listen` files pushed studies (shared with the workers that run the flows)."""
        return self.data_dir / "inbox"

    def push_source(self) -> PacsSettings:
        return PacsSettings(name=self.listen.source_name, kind="push", quiet_period_s=self.listen.quiet_period_s)

    @property
    def storage_root(self) -> Path:
        return (self.storage.root or self.data_dir / "objects").expanduser().resolve()

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data, secrets and URL passwords masked."""
        data = self.model_dump(mode="json")
        data["database"]["url"] = mask_url(self.database_url)
        data["storage"]["root"] = str(self.storage_root)
        return data


# user:password@ (up to the last @ before a query: an unencoded @ or / in a password stays hidden) and
# password query parameters
_URL_PASSWORD = re.compile(r"^(?P<head>[\w+.-]+://[^:/@?#]*):[^?#]*@")
_QUERY_PASSWORD = re.compile(r"(?i)(?P<key>[?&](?:password|passwd|pwd)=)[^&#]*")


def mask_url(url: str) -> str:
    """A URL fit to show: postgresql+psycopg://user:secret@host/db -> postgresql+psycopg://user:***@host/db
    (a password=... query parameter becomes *** too)."""
    return _QUERY_PASSWORD.sub(r"\g<key>***", _URL_PASSWORD.sub(r"\g<head>:***@", url, count=1))
