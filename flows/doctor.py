"""`nightread doctor`: every configured service checked, one actionable line each.

Each check says what it tried and, when it fails, what to do; `run_checks` never raises for a service's
own problem (it becomes a failed check), so one unreachable PACS does not hide the rest.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from flows.wiring.runtime import build_annotator, build_source, build_store
from flows.wiring.settings import NightreadSettings, mask_url
from integrations.errors import NightreadError

MIN_FREE_BYTES = 5 << 30  # the data dir holds retrieved studies while they are worked on


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str  # what was found, or what went wrong
    fix: str = ""  # what to do about it (failures only)

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        return f"{mark} {self.name}: {self.detail}" + (f" — {self.fix}" if self.fix and not self.ok else "")


def _attempt(name: str, probe: Callable[[], str], fix: str) -> Check:
    try:
        return Check(name, True, probe())
    except NightreadError as exc:
        return Check(name, False, str(exc), fix)
    except Exception as exc:  # a probe's unexpected error is a finding too, named by its class
        return Check(name, False, f"{type(exc).__name__}: {exc}", fix)


def check_database(settings: NightreadSettings) -> Check:
    from db.migrate import current_revision, head_revision
    from db.session import make_engine

    def probe() -> str:
        engine = make_engine(settings.database_url)
        try:
            current, head = current_revision(engine), head_revision()
        finally:
            engine.dispose()
        where = mask_url(settings.database_url)
        if current != head:
            raise NightreadError(f"{where} is at revision {current or 'none'}, the code needs {head}")
        return f"{where} at revision {head}"

    return _attempt("database", probe, "run `nightread db upgrade` (and check NIGHTREAD_DATABASE__URL)")


def check_object_store(settings: NightreadSettings) -> Check:
    def probe() -> str:
        store = build_store(settings)
        key = f"doctor/{uuid.uuid4().hex}"
        store.put(key, b"nightread doctor")
        try:
            if store.get(key) != b"nightread doctor":
                raise NightreadError("an object written could not be read back the same")
        finally:
            store.delete(key)
        return f"{settings.storage.backend} store: write, read and delete work"

    return _attempt("object store", probe, "check NIGHTREAD_STORAGE__* (endpoint, bucket, keys, folder rights)")


def check_sources(settings: NightreadSettings) -> list[Check]:
    checks = []
    for p in settings.configured_sources():
        what = {"dimse": "C-ECHO", "dicomweb": "QIDO-RS", "push": "inbox"}[p.kind]
        tls = " over TLS" if p.kind == "dimse" and p.tls.enabled else ""

        def probe(p=p, what=what, tls=tls) -> str:  # type: ignore[no-untyped-def]
            source = build_source(p, inbox=settings.inbox)
            try:
                source.echo()
            finally:
                close = getattr(source, "close", None)
                if close is not None:
                    close()
            return f"{what}{tls} answered"

        checks.append(
            _attempt(
                f"PACS {p.name}",
                probe,
                "check the host, port and AE titles (our AE title must be declared in the PACS), "
                "the TLS files, or the DICOMweb URL and credentials",
            )
        )
    return checks


def check_model(settings: NightreadSettings) -> Check:
    if settings.inference.backend != "triton":
        return Check("model", True, f"in-process engine ({settings.inference.model}), loaded when a run needs it")

    def probe() -> str:
        annotator, note = build_annotator(settings)  # Triton: server live, model ready, provenance read
        pool = getattr(annotator, "endpoints", None)
        down = [e.url for e in pool.endpoints if e.suspect] if pool is not None else []
        close = getattr(annotator, "close", None)
        if close is not None:
            close()
        if down:  # the run would go on with the others: still a problem to fix
            raise NightreadError(f"{note}; but endpoint(s) {', '.join(down)} not ready")
        return note

    return _attempt("model", probe, "start Triton (`nightread triton serve`) or fix NIGHTREAD_TRITON__URL(S)/__MODEL")


def check_review_secret(settings: NightreadSettings) -> Check:
    if settings.review.secret_key.get_secret_value():
        return Check("review secret", True, "set in NIGHTREAD_REVIEW__SECRET_KEY")
    path = settings.data_dir / "review-secret"
    if not path.exists():
        return Check("review secret", True, f"none yet: `nightread review` makes one in {path}")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        return Check("review secret", False, f"{path} is readable by others (mode {mode:o})", f"chmod 600 {path}")
    return Check("review secret", True, f"kept in {path} (mode {mode:o})")


def check_disk(settings: NightreadSettings) -> Check:
    folder = settings.data_dir if settings.data_dir.exists() else settings.data_dir.parent
    free = shutil.disk_usage(folder).free
    detail = f"{free / 2**30:.1f} GiB free for {settings.data_dir}"
    if free < MIN_FREE_BYTES:
        return Check(
            "disk", False, detail, f"free space: studies are retrieved there (at least {MIN_FREE_BYTES >> 30} GiB)"
        )
    return Check("disk", True, detail)


def run_checks(settings: NightreadSettings) -> list[Check]:
    return [
        check_database(settings),
        check_object_store(settings),
        *check_sources(settings),
        check_model(settings),
        check_review_secret(settings),
        check_disk(settings),
    ]
