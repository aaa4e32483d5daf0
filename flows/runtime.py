"""The composition root of a run: settings → adapters (db engine, object store, PACS, annotator).

Built once per flow run at the edge and handed to tasks; nothing here exists at import time.
"""

from __future__ import annotations

import threading
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from db.session import make_engine
from flows.questions import QuestionBank, load_bank
from flows.selection import RuleSet, load_rules
from flows.settings import NightreadSettings
from integrations.pacs import DimseStudySource
from integrations.ports import Annotator, ObjectStore, StudySource
from integrations.storage import LocalObjectStore, S3ObjectStore


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


def build_source(settings: NightreadSettings) -> StudySource:
    p = settings.pacs
    return DimseStudySource(
        name=p.name,
        host=p.host,
        port=p.port,
        called_ae=p.called_ae,
        calling_ae=p.calling_ae,
        retrieve=p.retrieve,
        move_port=p.move_port,
        timeout_s=p.timeout_s,
    )


def build_annotator(settings: NightreadSettings) -> tuple[Annotator, str]:
    """The configured annotator and a note to show the user ("" when the configured model loaded)."""
    inf = settings.inference
    if inf.threads:
        import torch

        torch.set_num_threads(inf.threads)
    from integrations.vlm.engine import EngineOptions
    from integrations.vlm.local import LocalAnnotator, resolve_checkpoint

    resolved = resolve_checkpoint(
        inf.model,
        revision=inf.revision,
        cache_dir=settings.data_dir / "models",
        offline_fallback=inf.offline_fallback,
        tiny_family=inf.tiny_family,
        hub_timeout_s=inf.hub_timeout_s,
    )
    annotator = LocalAnnotator.from_checkpoint(resolved, options=EngineOptions(dtype=inf.dtype, device=inf.device))
    return annotator, resolved.note


@dataclass
class Runtime:
    settings: NightreadSettings
    engine: Engine
    store: ObjectStore
    source: StudySource
    bank: QuestionBank
    rules: RuleSet
    _annotator: tuple[Annotator, str] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(cls, settings: NightreadSettings) -> Runtime:
        db = settings.database
        return cls(
            settings=settings,
            engine=make_engine(
                settings.database_url, pool_size=db.pool_size, max_overflow=db.max_overflow, echo=db.echo
            ),
            store=build_store(settings),
            source=build_source(settings),
            bank=load_bank(settings.questions_file),
            rules=load_rules(settings.rules_file),
        )

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
        close: Any = getattr(self.source, "close", None)
        if close is not None:
            with suppress(Exception):
                close()
        self.engine.dispose()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
