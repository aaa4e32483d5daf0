"""Per-study work: retrieve → select/render → annotate → record, as Prefect tasks.

Every task is idempotent by key: images by (SOP Instance UID, frame, render version), captions by
(image, model version, prompt version), findings by (image, model version, question, bank version),
object keys by the hashes of the same. A crashed or repeated run finishes the work without writing
anything twice. Logs name database ids and hashes, never UIDs or patient data.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from pydicom import Dataset
from sqlalchemy import text

from db import ledger
from db import repository as repo
from db.models import Image, ModelVersion, Study, utcnow
from db.session import is_disconnect, session_scope
from flows.rules.selection import Decision, select_images
from flows.wiring.runtime import Runtime
from flows.wiring.settings import NightreadSettings
from flows.wiring.telemetry import INFERENCE_BATCH, INFERENCE_SECONDS, RETRIEVAL_BYTES, RETRIEVAL_SECONDS
from integrations.errors import (
    ConfigurationError,
    Interrupted,
    NightreadError,
    PermanentError,
    RetrievalIncomplete,
    is_transient,
)
from integrations.imaging import InstanceInfo, read_dataset, read_instance_info, render, window_key
from integrations.ports import AnnotationRequest, ImageContext, Question, RetrievedStudy
from integrations.query import uid_hash

log = logging.getLogger(__name__)
T = TypeVar("T")

ANNOTATE_BATCH = 8  # images per annotator call within a study; results are committed per call


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """The retry policy of every task (Prefect's retry condition): retry what `is_transient` says is
    worth it (a TransientError) and a database that could not be reached (a restart); a PermanentError
    (ProtocolError, PeerRefused, ...) fails at once."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and (is_transient(exc) or is_disconnect(exc))


def object_key(*, study_uid: str, sop_uid: str, frame: int, render_version: str) -> str:
    study = repo.pseudonym(study_uid, namespace="study")[:20]
    sop = repo.pseudonym(sop_uid, namespace="sop")[:20]
    return f"images/{study}/{sop}/f{frame}-{render_version}.png"


@task(name="retrieve-study", cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def retrieve_study(rt: Runtime, study_id: int, dest: Path) -> RetrievedStudy:
    with session_scope(rt.engine) as session:
        study = session.get(Study, study_id)
        assert study is not None
        uid, expected, source_id = study.study_instance_uid, study.expected_instances, study.source_id
    if source_id is None:
        raise PermanentError(f"study {study_id} has no source to retrieve it from")
    # a retry starts from an empty folder so counts are honest
    shutil.rmtree(dest, ignore_errors=True)
    started = time.perf_counter()
    try:
        retrieved = rt.source(source_id).retrieve_study(uid, dest=dest, expected=expected)
    except RetrievalIncomplete as exc:
        with session_scope(rt.engine) as session:
            repo.update_study(session=session, study_id=study_id, received_instances=exc.received)
        raise
    with session_scope(rt.engine) as session:
        repo.update_study(session=session, study_id=study_id, received_instances=len(retrieved.files))
    source = rt.source_settings(source_id).name
    RETRIEVAL_SECONDS.labels(source).observe(time.perf_counter() - started)
    RETRIEVAL_BYTES.labels(source).inc(sum(f.stat().st_size for f in retrieved.files))
    return retrieved


@task(name="render-study", cache_policy=NO_CACHE)
def render_study(rt: Runtime, study_id: int, retrieved: RetrievedStudy, run_id: int | None) -> dict[str, Any]:
    """Select and render; every instance gets an outcome: rendered, skipped (why) or failed (why)."""
    logger = get_run_logger()
    counts: Counter[str] = Counter()
    infos: list[InstanceInfo] = []
    with session_scope(rt.engine) as session:
        for path in retrieved.files:
            try:
                infos.append(read_instance_info(path))
            except PermanentError as exc:
                repo.record_failure(
                    session=session,
                    stage="read",
                    object_ref=f"study:{study_id}:{path.stem}",
                    error=exc,
                    study_id=study_id,
                    run_id=run_id,
                )
                counts["failed"] += 1
    if rt.settings.review.show_patient_identifiers and retrieved.files:
        _keep_identity(rt, study_id, retrieved)
    decisions = select_images(infos, rt.rules)
    max_edge = rt.settings.render.max_long_edge
    image_ids: list[int] = []
    for decision in decisions:
        info = decision.info
        if not decision.selected:
            counts["skipped"] += 1
            continue
        # CT is rendered once per window setting its questions need (the default first); others once
        window_sets = (
            rt.bank.ct_window_sets(body_part=info.body_part, default_windows=list(rt.settings.render.ct_windows))
            if info.modality == "CT"
            else [[]]
        )
        dataset: Dataset | None = None  # read and decoded once for all its frames and windows
        for frame in decision.frames:
            ref = f"sop:{uid_hash(info.sop_instance_uid)}:f{frame}"
            try:
                if dataset is None:
                    dataset = read_dataset(info.path)
                for windows in window_sets:
                    image_ids.append(_render_one(rt, study_id, decision, dataset, frame, windows, max_edge))
                with session_scope(rt.engine) as session:
                    repo.resolve_failures(session=session, stage="render", object_ref=ref)
                counts["rendered"] += 1
            except NightreadError as exc:
                if is_transient(exc):
                    raise
                with session_scope(rt.engine) as session:
                    repo.record_failure(
                        session=session, stage="render", object_ref=ref, error=exc, study_id=study_id, run_id=run_id
                    )
                logger.warning("study %d: instance %s not rendered: %s", study_id, ref, exc)
                counts["failed"] += 1
    # each readable instance's file, by SOP Instance UID (the SR reads its evidence headers from them)
    sources = {info.sop_instance_uid: info.path for info in infos}
    return {"image_ids": image_ids, "sources": sources, **counts}


def _keep_identity(rt: Runtime, study_id: int, retrieved: RetrievedStudy) -> None:
    """Patient name/ID and accession for the review page (setting review.show_patient_identifiers)."""
    from pydicom import dcmread

    for path in retrieved.files:
        try:
            ds = dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # an unreadable file has its own failure row; try the next
            continue
        with session_scope(rt.engine) as session:
            repo.save_study_identity(
                session=session,
                study_id=study_id,
                values={
                    "patient_name": str(ds.get("PatientName", ""))[:255] or None,
                    "patient_id": str(ds.get("PatientID", ""))[:64] or None,
                    "accession_number": str(ds.get("AccessionNumber", ""))[:64] or None,
                },
            )
        return


def _render_one(
    rt: Runtime,
    study_id: int,
    decision: Decision,
    dataset: Dataset,
    frame: int,
    windows: list[tuple[float, float]],
    max_edge: int,
) -> int:
    info = decision.info
    rendered = render(dataset, frame=frame, max_long_edge=max_edge, ct_windows=windows)
    key = object_key(
        study_uid=info.study_instance_uid,
        sop_uid=info.sop_instance_uid,
        frame=frame,
        render_version=rendered.render_version,
    )
    rt.store.put(key, rendered.png, content_type="image/png")
    with session_scope(rt.engine) as session:
        return repo.upsert_image(
            session=session,
            values={
                "study_id": study_id,
                "sop_instance_uid": info.sop_instance_uid,
                "series_instance_uid": info.series_instance_uid,
                "modality": info.modality,
                "body_part": info.body_part or None,
                "view": info.view_position or None,
                "patient_position": info.patient_position or None,
                "ct_window": window_key(windows) if info.modality == "CT" else None,
                "view_role": decision.role,
                "paired_sop_instance_uid": decision.paired_with,
                "frame": frame,
                "render_version": rendered.render_version,
                "object_key": key,
                "sha256": rendered.sha256,
                "width": rendered.width,
                "height": rendered.height,
                "created_at": utcnow(),
            },
        )


@task(name="annotate-images", cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def annotate_images(rt: Runtime, study_id: int, image_ids: list[int], model_version_id: int) -> dict[str, int]:
    """Caption and question bank for each image not yet annotated by this model and bank version."""
    bank = rt.bank
    with session_scope(rt.engine) as session:
        model_version = session.get(ModelVersion, model_version_id)
        assert model_version is not None
        temperature = model_version.temperature  # 1.0 until the validation flow calibrates this model version
        answered, captioned = repo.annotation_state(
            session=session, image_ids=image_ids, model_version_id=model_version_id, bank_version=bank.version
        )
        images = [session.get(Image, i) for i in image_ids]
    default_windows = window_key(rt.settings.render.ct_windows)

    def questions_for(image: Image) -> tuple[Question, ...]:
        return bank.for_image(
            modality=image.modality,
            body_part=image.body_part or "",
            ct_window=image.ct_window,
            default_windows=default_windows,
        )

    def wants_caption(image: Image) -> bool:
        # one caption per view and model: on the default rendering (other CT windows serve their questions)
        return image.id not in captioned and (image.ct_window is None or image.ct_window == default_windows)

    # an image is done when this bank version's questions are answered (or it has none) and it is captioned
    todo = [
        im for im in images if im is not None and ((im.id not in answered and questions_for(im)) or wants_caption(im))
    ]
    counts: Counter[str] = Counter()
    if not todo:
        return dict(counts)
    annotator = rt.annotator()
    max_tokens = rt.settings.inference.caption_max_new_tokens
    for start in range(0, len(todo), ANNOTATE_BATCH):
        chunk = todo[start : start + ANNOTATE_BATCH]
        requests = []
        for image in chunk:
            ctx = ImageContext(
                modality=image.modality,
                body_part=image.body_part or "",
                view=image.view or "",
                patient_position=image.patient_position or "",
            )
            requests.append(
                AnnotationRequest(
                    image_png=rt.store.get(image.object_key),
                    context=ctx,
                    questions=() if image.id in answered else questions_for(image),
                    caption=wants_caption(image),
                    caption_max_new_tokens=max_tokens,
                )
            )
        started = time.perf_counter()
        results = annotator.annotate(requests)
        INFERENCE_SECONDS.observe(time.perf_counter() - started)
        INFERENCE_BATCH.observe(len(requests))
        captions, findings = [], []
        for image, request, result in zip(chunk, requests, results, strict=True):
            assert image.id is not None
            if result.caption is not None:
                captions.append(
                    {
                        "image_id": image.id,
                        "model_version_id": model_version_id,
                        "prompt_version": result.prompt_version,
                        "render_version": image.render_version,
                        "text": result.caption,
                        "latency_ms": result.timings_ms.get("caption_ms"),
                        "created_at": utcnow(),
                    }
                )
            by_id = {q.id: q for q in request.questions}
            for answer in result.answers:
                q = by_id[answer.question_id]
                p_yes = calibrate(answer.p_yes, temperature) if answer.p_yes is not None else None
                flagged = (
                    q.kind == "closed"
                    and q.flag_threshold is not None
                    and p_yes is not None
                    and (p_yes >= q.flag_threshold)
                )
                findings.append(
                    {
                        "study_id": study_id,
                        "image_id": image.id,
                        "model_version_id": model_version_id,
                        "question_id": q.id,
                        "bank_version": bank.version,
                        "prompt_version": result.prompt_version,
                        "render_version": image.render_version,
                        "kind": q.kind,
                        "answer": ("yes" if p_yes >= 0.5 else "no") if p_yes is not None else answer.text,
                        "probability": p_yes,
                        "flagged": flagged,
                        "flag_reason": (f"P(yes)={p_yes:.3f} >= threshold {q.flag_threshold:.2f}" if flagged else None),
                        "created_at": utcnow(),
                    }
                )
        with session_scope(rt.engine) as session:
            counts["captions"] += repo.insert_captions(session=session, rows=captions)
            counts["findings"] += repo.insert_findings(session=session, rows=findings)
            counts["flags"] += sum(1 for f in findings if f["flagged"])
    return dict(counts)


def calibrate(p_yes: float, temperature: float) -> float:
    """Temperature scaling of a probability: sigmoid(logit(p) / T). T = 1 leaves it unchanged."""
    if temperature == 1.0:
        return p_yes
    p = min(max(p_yes, 1e-7), 1 - 1e-7)
    return 1.0 / (1.0 + math.exp(-math.log(p / (1 - p)) / temperature))


def ensure_model_version(rt: Runtime) -> int:
    info = rt.annotator().model_info
    with session_scope(rt.engine) as session:
        mv = repo.upsert_model_version(
            session=session,
            name=info.name,
            revision=info.revision,
            backend=info.backend,
            options=info.options,
            offline_stand_in=info.offline_stand_in,
        )
        assert mv.id is not None
        return mv.id


def _report(
    rt: Runtime, study_id: int, model_version_id: int, sources: dict[str, Path], run_id: int | None
) -> dict[str, int]:
    """The study's SR (and its write-back). A failure here is recorded; the findings stay valid."""
    from flows.writeback import write_report

    ref = f"study:{study_id}:mv:{model_version_id}"
    try:
        counts = write_report(rt, study_id, model_version_id, sources)
    except NightreadError as exc:
        with session_scope(rt.engine) as session:
            repo.record_failure(
                session=session, stage="report", object_ref=ref, error=exc, study_id=study_id, run_id=run_id
            )
        get_run_logger().warning("study %d: report not written or not sent: %s", study_id, exc)
        return {"report_failures": 1}
    with session_scope(rt.engine) as session:
        repo.resolve_failures(session=session, stage="report", object_ref=ref)
    return counts


def check_promoted(rt: Runtime) -> int:
    """The model version a run will use; with `inference.require_promoted` it must be the promoted one."""
    model_version_id = ensure_model_version(rt)
    if rt.settings.inference.require_promoted:
        with session_scope(rt.engine) as session:
            mv = session.get(ModelVersion, model_version_id)
            assert mv is not None
            if mv.promoted_at is None:
                raise ConfigurationError(
                    f"model version {model_version_id} ({mv.name}) is not promoted and inference.require_promoted "
                    f"is on: validate it, then `nightread models promote {model_version_id}`"
                )
    return model_version_id


def _through_outages(rt: Runtime, step: Callable[[], T]) -> T:
    """`step()` (a task, safe to run again), run again once the database answers when it failed because
    the database could not be reached: a task's own retries are seconds apart, a database restart or
    failover takes longer, and it must not cost the study an attempt. Waits up to `database.outage_s`."""
    deadline = time.monotonic() + rt.settings.database.outage_s
    while True:
        try:
            return step()
        except Exception as exc:
            if not is_disconnect(exc) or rt.stopping.is_set() or time.monotonic() > deadline:
                raise
            get_run_logger().warning("the database could not be reached: waiting for it, then again")
            rt.record(lambda session: session.execute(text("SELECT 1")))  # returns once it answers


@task(name="process-study", cache_policy=NO_CACHE)
def process_study(rt: Runtime, study_id: int, run_id: int | None) -> dict[str, int]:
    """One study end to end, its state kept by the ledger. Never raises for the study's own problems:
    they are recorded. A stop (rt.stopping) before the study's retrieval starts leaves it untouched;
    during its attempt, the attempt is abandoned and not counted."""
    logger = get_run_logger()
    counts: Counter[str] = Counter()
    flow_settings = rt.settings.flow
    workdir: Path | None = None
    attempt_started = False
    lease: LeaseKeeper | None = None
    owner = ledger.lease_owner()
    try:
        with rt.fetch_gate:
            rt.check_stop()
            claimed = rt.record(
                lambda session: ledger.claim(
                    session=session,
                    study_id=study_id,
                    owner=owner,
                    lease_s=flow_settings.lease_s,
                    max_attempts=flow_settings.max_attempts,
                )
            )
            if claimed is None:  # another worker has it (or it needs nothing): not ours to touch
                logger.info("study %d: taken by another worker, or nothing left to do", study_id)
                counts["studies_skipped"] += 1
                return dict(counts)
            attempt_started = True
            lease = LeaseKeeper(rt, study_id, owner).start()
            workdir = rt.work_dir(f"study-{study_id}")
            dest = workdir / "dicom"
            retrieved = _through_outages(
                rt,
                lambda: retrieve_study.with_options(
                    retries=flow_settings.retries, retry_delay_seconds=flow_settings.retry_delay_s
                )(rt, study_id, dest),
            )
            counts["retrieved"] += 1
            counts["instances"] += len(retrieved.files)
            rt.check_stop()
            rendered = _through_outages(rt, lambda: render_study(rt, study_id, retrieved, run_id))
        image_ids = rendered.pop("image_ids")
        sources = rendered.pop("sources")
        counts.update(rendered)
        rt.check_stop()
        model_version_id = _through_outages(rt, lambda: ensure_model_version(rt))
        counts.update(
            _through_outages(
                rt,
                lambda: annotate_images.with_options(
                    retries=flow_settings.retries, retry_delay_seconds=flow_settings.retry_delay_s
                )(rt, study_id, image_ids, model_version_id),
            )
        )
        rt.check_stop()
        counts.update(_through_outages(rt, lambda: _report(rt, study_id, model_version_id, sources, run_id)))
        if rt.settings.fhir.enabled:  # its own failures are recorded there; fhir.resources loads only when on
            from flows.fhir_export import export_study_fhir

            counts.update(export_study_fhir(rt, study_id, model_version_id, run_id))
        study = rt.record(lambda session: ledger.finish(session=session, study_id=study_id))
        uid, source_id = study.study_instance_uid, study.source_id
        forget = getattr(rt.source(source_id), "forget", None) if source_id is not None else None
        if forget is not None:  # pushed studies leave the inbox once their results are recorded
            forget(uid)
        counts["studies_done"] += 1
    except Exception as exc:  # recorded below, never swallowed: the study's failure row says what happened
        if isinstance(exc, Interrupted) or rt.stopping.is_set():  # a stop, not the study's fault
            with session_scope(rt.engine) as session:  # a stop does not wait out a database outage
                ledger.abandon(session=session, study_id=study_id, counted=attempt_started)
            logger.warning("study %d: stopped before it finished; it stays pending", study_id)
            counts["studies_interrupted"] += 1
            return dict(counts)
        if isinstance(exc, NightreadError):
            message = str(exc)
        elif is_disconnect(exc):  # the database went away past the tasks' retries: try the study again
            message = f"the database could not be reached ({type(exc).__name__})"
        else:
            message = f"unexpected {type(exc).__name__}"
        error: NightreadError | str = exc if isinstance(exc, NightreadError) else message
        permanent = isinstance(exc, PermanentError)
        status = rt.record(
            lambda session: ledger.fail(
                session=session,
                study_id=study_id,
                error=error,
                permanent=permanent,
                max_attempts=flow_settings.max_attempts,
                run_id=run_id,
            )
        )
        logger.error(
            "study %d %s: %s: %s",
            study_id,
            status,
            type(exc).__name__,
            message,
            exc_info=not isinstance(exc, NightreadError),
        )
        counts["studies_failed"] += 1
    finally:
        if lease is not None:
            lease.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return dict(counts)


class LeaseKeeper:
    """Renews our lease on a study every third of `flow.lease_s` while we work on it, so a worker that
    dies loses the study within one lease and a live one never does."""

    def __init__(self, rt: Runtime, study_id: int, owner: str) -> None:
        self.rt, self.study_id, self.owner = rt, study_id, owner
        self.lost = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{study_id}", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def _run(self) -> None:
        lease_s = self.rt.settings.flow.lease_s
        while not self._done.wait(lease_s / 3):
            try:
                ours = self.rt.record(
                    lambda session: ledger.renew(
                        session=session, study_id=self.study_id, owner=self.owner, lease_s=lease_s
                    )
                )
            except Exception as exc:  # the database is away past its outage: the lease may run out
                log.warning("study %d: lease not renewed (%s)", self.study_id, type(exc).__name__)
                continue
            if not ours and not self._done.is_set():
                self.lost = True
                log.warning("study %d: its lease ran out and another worker took it", self.study_id)
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=10)


@flow(name="annotate-studies", log_prints=False)
def annotate_studies(
    study_ids: list[int], run_id: int | None = None, settings: NightreadSettings | None = None
) -> dict[str, int]:
    """A worker's share of a nightly or backfill (flows/dispatch.py): each study claimed under a lease and
    processed end to end; a study another worker has, or that needs nothing, is skipped. Settings come
    from the worker's environment; `flow.concurrency` studies at once."""
    settings = settings or NightreadSettings()
    flow_run = getattr(get_run_context(), "flow_run", None)
    counts: Counter[str] = Counter()
    with Runtime.build(settings) as rt:
        rt.register_sources()
        # this share as a run row of its own: who took it (host, pid, data dir) and what came of it
        share = rt.record(
            lambda session: repo.start_run(
                session=session,
                kind="annotate-studies",
                flow_run_id=str(flow_run.id) if flow_run is not None else None,
                parameters={
                    "studies": list(study_ids),
                    "dispatched_by_run": run_id,
                    "owner": ledger.owner(),
                    "data_dir": str(settings.data_dir),
                },
            )
        )
        status = "failed"
        try:
            futures = [process_study.submit(rt, study_id, run_id) for study_id in study_ids]  # fetch_gate bounds them
            for future in futures:
                counts.update(future.result())
            status = "completed_with_failures" if counts["studies_failed"] else "completed"
        except BaseException:
            status = ledger.INTERRUPTED
            raise
        finally:
            rt.record(lambda session: repo.finish_run(session=session, run_id=share, status=status, counts=counts))
    return dict(counts)


@flow(name="annotate-study", log_prints=False)
def annotate_study(study_id: int, settings: NightreadSettings | None = None) -> dict[str, int]:
    """Re-run one study (by database id) end to end; writes nothing twice."""
    settings = settings or NightreadSettings()
    with Runtime.build(settings) as rt:
        rt.register_sources()
        with session_scope(rt.engine) as session:
            if session.get(Study, study_id) is None:
                raise ValueError(f"no study with id {study_id}")
            ledger.reset(session=session, study_id=study_id)
        return process_study(rt, study_id, None)
