"""De-identified cohort export: the cohort's images re-written per PS3.15 Annex E (integrations/deid.py),
retrieved again from their PACS, with a table using the same pseudonyms, the rendered PNGs under
pseudonymous names, a manifest, and the encrypted map back stored in `reid_map`.

An instance that may show identifying information in its pixels (BurnedInAnnotation YES,
RecognizableVisualFeatures YES, overlay bits inside Pixel Data) is left out with its PNGs and table
rows, and so is one the PACS did not return (it could not be checked); the manifest counts them and
gives each one's pseudonymous SOP Instance UID and reason, nothing else."""

from __future__ import annotations

import csv
import datetime as dt
import importlib.metadata
import json
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlmodel import Session, col, select

from db import repository as repo
from db.cohort import CohortResult
from db.models import Image, ReidMap, Study, utcnow
from db.session import session_scope
from flows.wiring.runtime import Runtime
from integrations.deid import (
    ACTION_TABLE,
    METHOD,
    METHOD_CODES,
    Pseudonymizer,
    deidentify,
    exclusion_reason,
    patient_key,
)
from integrations.errors import ConfigurationError
from integrations.sr import nightread_version


def pseudonymizer(rt: Runtime) -> Pseudonymizer:
    from integrations.secrets import load_secret

    key = load_secret(rt.settings.deid_secret_key.get_secret_value(), rt.settings.data_dir, "deid-secret")
    return Pseudonymizer(key=key.encode())


def export_deidentified(rt: Runtime, *, result: CohortResult, out_dir: Path) -> dict[str, Any]:
    """Write out_dir/dicom/<study>/<sop>.dcm, out_dir/images/<sop>-f<frame>.png, out_dir/cohort.csv and
    out_dir/manifest.json; returns the manifest (counts, the excluded instances and why, the profile and
    its options, the action table's edition). Raises ConfigurationError if out_dir is not empty."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigurationError(f"{out_dir} is not empty: a de-identified export goes into a new folder")
    p = pseudonymizer(rt)
    rt.register_sources()
    study_ids = sorted({int(r["study_id"]) for r in result.rows})
    wanted_images = {int(r["image_id"]) for r in result.rows} if result.unit == "image" else None
    scores = {int(r["study_id"] if result.unit == "study" else r["image_id"]): r for r in result.rows}
    with Session(rt.engine) as session:
        studies = {s.id: s for s in session.exec(select(Study).where(col(Study.id).in_(study_ids))).all()}
        images_by_study: dict[int, list[Image]] = defaultdict(list)
        for im in session.exec(select(Image).where(col(Image.study_id).in_(study_ids)).order_by(col(Image.id))).all():
            if wanted_images is None or im.id in wanted_images:
                images_by_study[im.study_id].append(im)
    (out_dir / "dicom").mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    counts = {"studies": 0, "dicom_files": 0, "pngs": 0}
    excluded: list[dict[str, str]] = []  # pseudonymous SOP Instance UID and a reason naming no value
    burned_in_unknown = 0
    for study_id in study_ids:
        study = studies.get(study_id)
        images = images_by_study.get(study_id, [])
        if study is None or study.source_id is None or not images:
            continue
        sops = {im.sop_instance_uid for im in images}
        written: set[str] = set()
        patient, offset = "", 0
        with tempfile.TemporaryDirectory(prefix="nightread-deid-") as tmp:
            retrieved = rt.source(study.source_id).retrieve_study(
                study.study_instance_uid, dest=Path(tmp), expected=study.expected_instances
            )
            for path in retrieved.files:
                ds = dcmread(path, force=True)
                sop = str(ds.get("SOPInstanceUID", ""))
                if sop not in sops or sop in written:
                    continue
                reason = exclusion_reason(ds)
                if reason is not None:
                    excluded.append({"sop_instance": p.uid(sop), "reason": reason})
                    sops.discard(sop)
                    continue
                if "BurnedInAnnotation" not in ds:
                    burned_in_unknown += 1
                patient = patient_key(ds)
                offset = p.date_offset(patient)
                deidentify(ds, p)
                folder = out_dir / "dicom" / str(ds.StudyInstanceUID)
                folder.mkdir(exist_ok=True)
                ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
                written.add(sop)
                counts["dicom_files"] += 1
            shutil.rmtree(tmp, ignore_errors=True)
        for sop in sorted(sops - written):
            excluded.append({"sop_instance": p.uid(sop), "reason": "not returned by the PACS (could not be checked)"})
        if not written:
            continue
        counts["studies"] += 1
        study_pseudo = p.uid(study.study_instance_uid)
        patient_pseudo = p.identifier("patient", patient) if patient else ""
        shifted = _shift(study.study_date, offset)
        for im in images:
            if im.sop_instance_uid not in written:
                continue  # excluded or not returned: its PNG would show the same pixels
            sop_pseudo = p.uid(im.sop_instance_uid)
            png_name = f"images/{sop_pseudo}-f{im.frame}-{im.render_version}.png"
            (out_dir / png_name).write_bytes(rt.store.get(im.object_key))
            counts["pngs"] += 1
            source_row = scores.get(im.id if result.unit == "image" else study_id, {})  # type: ignore[arg-type]
            rows.append(
                {
                    "patient": patient_pseudo,
                    "study": study_pseudo,
                    "study_date": shifted,
                    "sop_instance": sop_pseudo,
                    "frame": im.frame,
                    "modality": im.modality,
                    "body_part": im.body_part or "",
                    "view": im.view or "",
                    "ct_window": im.ct_window or "",
                    "png": png_name,
                    **{k: v for k, v in source_row.items() if k.startswith(("p_", "answer_"))},
                }
            )
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    with (out_dir / "cohort.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns) or ["study"])
        writer.writeheader()
        writer.writerows(rows)
    _store_map(rt, p)
    manifest = {
        "query": result.where,
        "unit": result.unit,
        **counts,
        "rows": len(rows),
        "excluded": len(excluded),
        "excluded_instances": excluded,
        "burned_in_annotation_unknown": burned_in_unknown,
        "method": METHOD,
        "profile": "DICOM PS3.15 Annex E "
        + ", ".join(f"{meaning} ({code})" for code, meaning in METHOD_CODES)
        + "; Retain UIDs not applied: every UID replaced",
        "action_table": ACTION_TABLE,
        "action_table_library": f"dicom-anonymizer {_version('dicom-anonymizer')}",
        "question_bank_versions": result.bank_versions,
        "model_version_ids": result.model_version_ids,
        "nightread_version": nightread_version(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _shift(date: str | None, days: int) -> str:
    if not date:
        return ""
    try:
        return f"{dt.datetime.strptime(date, '%Y%m%d').date() - dt.timedelta(days=days):%Y%m%d}"
    except ValueError:
        return ""


def _store_map(rt: Runtime, p: Pseudonymizer) -> None:
    rows = [
        {"kind": kind, "pseudonym": pseudo, "original_encrypted": p.encrypt(original), "created_at": utcnow()}
        for (kind, pseudo), original in p.seen.items()
    ]
    with session_scope(rt.engine) as session:
        for start in range(0, len(rows), 500):
            repo.record_reid(session=session, rows=rows[start : start + 500])


def reidentify(rt: Runtime, pseudonym: str) -> list[tuple[str, str]]:
    """(kind, original) for a pseudonym, decrypted with the de-identification key."""
    p = pseudonymizer(rt)
    with Session(rt.engine) as session:
        rows = session.exec(select(ReidMap).where(ReidMap.pseudonym == pseudonym)).all()
    return [(r.kind, p.decrypt(r.original_encrypted)) for r in rows]
