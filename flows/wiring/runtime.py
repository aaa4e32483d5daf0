"""The composition root of a run: settings → adapters (db engine, object store, PACS, annotator).

Built once per flow run at the edge and handed to tasks; nothing here exists at import time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlmodel import Session

from db.ledger import process_alive
from db.session import make_engine, session_scope, while_unreachable
from flows.rules.questions import QuestionBank, load_bank
from flows.rules.selection import RuleSet, load_rules
from flows.wiring.settings import NightreadSettings, PacsSettings, TlsSettings
from flows.wiring.throttle import association_gate, query_gate
from integrations.dimse.tls import TlsConfig
from integrations.errors import ConfigurationError, Interrupted
from integrations.pacs import DimseStudySource
from integrations.ports import Annotator, ObjectStore, StudySource
from integrations.storage import LocalObjectStore, S3ObjectStore

T = TypeVar("T")


def build_store(settings: NightreadSettings) -> ObjectStore:
    s = settings.storage
    if s.backend == "s3":
        return S3ObjectStore(
            endpoint=s.endpoint,
            bucket=s.bucket,
            access_key=s.access_key,
            secret_key=s.secret_key.get_secret_value(),
            secure=s.secure,
            region=s.region,
        )
    return LocalObjectStore(settings.storage_root)


def tls_config(t: TlsSettings) -> TlsConfig | None:
    """The DICOM TLS of a source or receiver (None when tls.enabled is off)."""
    if not t.enabled:
        return None
    return TlsConfig(
        ca_file=t.ca_file,
        cert_file=t.cert_file,
        key_file=t.key_file,
        check_hostname=t.check_hostname,
        require_client_cert=t.require_client_cert,
    )


def dicomweb_auth(p: PacsSettings) -> tuple[str, str] | None:
    """(scheme, credential) of a DICOMweb source: ("bearer", token) or ("basic", "user:password")."""
    if p.auth == "bearer":
        if not p.token.get_secret_value():
            raise ConfigurationError(f'source "{p.name}": auth bearer needs a token')
        return "bearer", p.token.get_secret_value()
    if p.auth == "basic":
        if not p.username:
            raise ConfigurationError(f'source "{p.name}": auth basic needs a username')
        return "basic", f"{p.username}:{p.password.get_secret_value()}"
    return None


def build_source(
    p: PacsSettings,
    *,
    inbox: Path,
    stop: threading.Event | None = None,
    work_root: Path | None = None,
    throttle: bool = False,
) -> StudySource:
    """The adapter for one configured source."""
    if p.kind == "push":
        from integrations.receiver import InboxStudySource

        return InboxStudySource(name=p.name, inbox=inbox)
    if p.kind == "dicomweb":
        from integrations.dicomweb import DicomWebStudySource

        assert p.url is not None
        return DicomWebStudySource(
            name=p.name,
            url=p.url,
            timeout_s=p.timeout_s,
            ca_file=p.tls.ca_file,
            auth=dicomweb_auth(p),
        )
    return DimseStudySource(
        name=p.name,
        host=p.host,
        port=p.port,
        called_ae=p.called_ae,
        calling_ae=p.calling_ae,
        retrieve=p.retrieve,
        move_port=p.move_port,
        parallel=p.parallel_associations,
        dimse_receiver=p.dimse_receiver,
        timeout_s=p.timeout_s,
        query_deadline_s=p.query_deadline_s,
        move_bind_host=p.move_bind_host,
        move_allowed_aes=p.move_allowed_aes,
        move_allowed_hosts=p.move_allowed_hosts,
        tls=tls_config(p.tls),
        stop=stop,
        staging_root=work_root,
        deadline_base_s=p.retrieve_deadline_s,
        deadline_per_instance_s=p.retrieve_deadline_per_instance_s,
        association_gate=association_gate(p) if throttle else None,
        query_gate=query_gate(p) if throttle else None,
    )


def build_annotator(settings: NightreadSettings) -> tuple[Annotator, str]:
    """The configured annotator and a note to show the user ("" when the configured model loaded)."""
    inf = settings.inference
    if inf.backend == "triton":
        from integrations.triton import TritonAnnotator

        t = settings.triton
        triton = TritonAnnotator(
            url=t.url,
            urls=t.urls,
            protocol=t.protocol,
            model=t.model,
            version=t.version,
            timeout_s=t.timeout_s,
            max_in_flight=t.max_in_flight,
            retries=t.retries,
            backoff_s=t.backoff_s,
            outage_s=t.outage_s,
        )
        info = triton.check_ready()  # before the run starts: server and model ready, provenance known
        note = f"model {info.name} ({info.revision}) on Triton at {', '.join(t.urls or [t.url])}"
        return triton, note + (": a tiny random stand-in, its answers mean nothing" if info.offline_stand_in else "")
    if inf.threads:
        import torch

        torch.set_num_threads(inf.threads)
    from integrations.vlm.engine import EngineOptions, remote_code_allowed
    from integrations.vlm.local import LocalAnnotator, resolve_checkpoint
    from integrations.vlm.plugins import PLUGIN_BUILDERS

    resolved = resolve_checkpoint(
        inf.model,
        revision=inf.revision,
        cache_dir=settings.data_dir / "models",
        offline_fallback=inf.offline_fallback,
        # a seed plugin's offline stand-in is that plugin's tiny build (a SmolVLM could not load in it)
        tiny_family=inf.engine if inf.engine in PLUGIN_BUILDERS else inf.tiny_family,
        hub_timeout_s=inf.hub_timeout_s,
    )
    options = EngineOptions(
        dtype=inf.dtype,
        device=inf.device,
        adapter=inf.adapter,
        engine=inf.engine,
        trust_remote_code=remote_code_allowed(inf.model, inf.trust_remote_code_for),
        stop_strings=tuple(inf.stop_strings),
    )
    annotator = LocalAnnotator.from_checkpoint(resolved, options=options)
    return annotator, resolved.note


SOURCE_SECRETS = {"password", "token"}


def source_row(p: PacsSettings) -> dict[str, Any]:
    """The `pacs_source` columns for a configured source; its secrets (DICOMweb password and token) stay
    in the settings and never reach the database."""
    return {
        "name": p.name,
        "kind": p.kind,
        "ae_title": p.called_ae if p.kind == "dimse" else None,
        "host": p.host if p.kind == "dimse" else None,
        "port": p.port if p.kind == "dimse" else None,
        "url": p.url,
        "config": p.model_dump(mode="json", exclude=SOURCE_SECRETS),
    }


@dataclass
class Runtime:
    settings: NightreadSettings
    engine: Engine
    store: ObjectStore
    bank: QuestionBank
    rules: RuleSet
    _annotator: tuple[Annotator, str] | None = None
    _sources: dict[int, tuple[PacsSettings, StudySource]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # retrieval and rendering (PACS and CPU work) are bounded by flow.concurrency; a study waiting on
    # the annotator does not hold one of these slots
    fetch_gate: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(1))
    # set by a stop (SIGTERM, Ctrl-C, a cancellation): studies not yet started stay pending, studies in
    # flight end at their next checkpoint (a direct C-GET at its next PDU) without failing
    stopping: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def build(cls, settings: NightreadSettings) -> Runtime:
        db = settings.database
        return cls(
            settings=settings,
            engine=make_engine(
                settings.database_url, pool_size=db.pool_size, max_overflow=db.max_overflow, echo=db.echo
            ),
            store=build_store(settings),
            bank=load_bank(settings.questions_file),
            rules=load_rules(settings.rules_file),
            fetch_gate=threading.BoundedSemaphore(settings.flow.concurrency),
        )

    def register_sources(self, *, throttle: bool = False) -> list[int]:
        """Upsert the configured sources into `pacs_source`; return the ids of every enabled source
        (configured ones and those added with `nightread sources add`). With `throttle` (a flow run
        against Prefect's API), every association holds a slot of its source's pacs:<name> limit."""
        from db import repository as repo
        from db.session import session_scope

        configured = {p.name: p for p in self.settings.configured_sources()}
        with session_scope(self.engine) as session:
            for p in configured.values():
                repo.upsert_source(session=session, **source_row(p))
            rows = repo.list_sources(session=session, enabled_only=True)
            ids = []
            for row in rows:
                if row.config is None or row.id is None:
                    continue
                # a configured source keeps its secrets from the settings; one added by `sources add` has none
                pacs = configured.get(row.name) or PacsSettings.model_validate(row.config)
                with self._lock:
                    if row.id not in self._sources:
                        source = build_source(
                            pacs,
                            inbox=self.settings.inbox,
                            stop=self.stopping,
                            work_root=self.work_root,
                            throttle=throttle,
                        )
                        self._sources[row.id] = (pacs, source)
                ids.append(row.id)
            return ids

    def _source_entry(self, source_id: int) -> tuple[PacsSettings, StudySource]:
        with self._lock:
            entry = self._sources.get(source_id)
        if entry is None:
            raise ConfigurationError(f"PACS source {source_id} is not configured or not enabled")
        return entry

    def source(self, source_id: int) -> StudySource:
        return self._source_entry(source_id)[1]

    def source_settings(self, source_id: int) -> PacsSettings:
        return self._source_entry(source_id)[0]

    def record(self, change: Callable[[Session], T]) -> T:
        """`change(session)` in a transaction of its own, tried again while the database is unreachable
        (a restart) for up to `database.outage_s`: the bookkeeping of a study (its ledger transitions,
        its failure row) outlives a database restart instead of ending the run."""

        def transaction() -> T:
            with session_scope(self.engine) as session:
                return change(session)

        return while_unreachable(transaction, outage_s=self.settings.database.outage_s, stopping=self.stopping)

    def check_stop(self) -> None:
        """A checkpoint: Interrupted once a stop was asked for."""
        if self.stopping.is_set():
            raise Interrupted("nightread is stopping")

    @property
    def work_root(self) -> Path:
        """This process's scratch folder (data_dir/work/<pid>); a dead process's is removed by `clean_work`."""
        return self.settings.data_dir / "work" / str(os.getpid())

    def work_dir(self, name: str) -> Path:
        """A fresh scratch folder for one study (retrieved DICOM files: 0700, removed when done)."""
        self.work_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.work_root))

    def clean_work(self) -> int:
        """Remove the scratch folders of processes that are gone (a crash leaves complete DICOM files)."""
        removed = 0
        root = self.settings.data_dir / "work"
        for folder in root.glob("*") if root.is_dir() else []:
            if folder.name.isdigit() and int(folder.name) != os.getpid() and not process_alive(int(folder.name)):
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed

    def annotator(self) -> Annotator:
        """Loaded on first use (a run with nothing to annotate never loads a model)."""
        with self._lock:
            if self._annotator is None:
                self._annotator = build_annotator(self.settings)
            return self._annotator[0]

    @property
    def model_note(self) -> str:
        return self._annotator[1] if self._annotator else ""

    def close(self) -> None:
        with self._lock:
            sources = [s for _, s in self._sources.values()]
            self._sources.clear()
            annotator, self._annotator = (self._annotator[0] if self._annotator else None), None
        close_annotator: Any = getattr(annotator, "close", None)
        if close_annotator is not None:
            close_annotator()
        for source in sources:
            close: Any = getattr(source, "close", None)
            if close is not None:
                with suppress(Exception):  # best effort at shutdown; the run's outcome is already recorded
                    close()
        self.engine.dispose()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
