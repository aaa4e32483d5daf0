"""Known review data: two studies, findings with chosen probabilities, flags and critical questions,
captions and real PNGs in the object store; users of each role. Used by the review unit tests (in
process) and the browser tests (a real server, a real Chromium)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from db import reviews
from db.models import Caption, Finding, Image, ModelVersion, Study, StudyIdentity, utcnow
from db.session import session_scope
from integrations.ports import ObjectStore
from review.auth import hash_password

PASSWORD = "correct horse battery"
CRITICAL = ("pleural_effusion", "pneumothorax", "ct_lung_nodule")
TEXTS = {
    "pleural_effusion": "Is there a pleural effusion?",
    "pneumothorax": "Is there a pneumothorax?",
    "cardiomegaly": "Is the heart enlarged (cardiomegaly)?",
    "consolidation": "Is there a lung consolidation?",
    "ct_lung_nodule": "Is there a lung nodule?",
    "ct_fracture": "Is there a fracture?",
    "xr_impression": "What is the most important finding?",
}
# (study, question, P(yes), flagged)
CLOSED = [
    ("cr", "pleural_effusion", 0.95, True),
    ("cr", "pneumothorax", 0.65, True),
    ("cr", "cardiomegaly", 0.80, True),
    ("cr", "consolidation", 0.52, False),
    ("ct", "ct_lung_nodule", 0.75, True),
    ("ct", "ct_fracture", 0.10, False),
]
# expected queue orders (by question id) for the two priorities, flagged first
ORDER_CRITICAL = ["pleural_effusion", "ct_lung_nodule", "pneumothorax", "cardiomegaly", "consolidation", "ct_fracture"]
ORDER_UNCERTAIN = ["pneumothorax", "ct_lung_nodule", "cardiomegaly", "pleural_effusion", "consolidation", "ct_fracture"]


@dataclass
class Seeded:
    study_ids: dict[str, int]
    finding_ids: dict[str, int]  # question id -> finding id
    image_ids: dict[str, int]
    model_version_id: int


def _pngs() -> dict[str, tuple[bytes, int, int]]:
    """A synthetic chest radiograph and CT slice from the sample PACS, through the real render pipeline."""
    from integrations.imaging import render
    from integrations.sample_pacs import generate_studies

    out: dict[str, tuple[bytes, int, int]] = {}
    for study in generate_studies(seed=7):
        modality = str(study.instances[0].Modality)
        first = (
            study.instances[0] if modality == "CR" else study.instances[len(study.instances) // 2]
        )  # PA; a mid slice
        key = {"CR": "cr", "CT": "ct"}.get(modality)
        if key and key not in out and "LOCALIZER" not in [str(v) for v in first.get("ImageType", [])]:
            r = render(first)
            out[key] = (r.png, r.width, r.height)
    return out


def seed(engine: Engine, store: ObjectStore, *, identities: bool = False) -> Seeded:
    with session_scope(engine) as session:
        mv = ModelVersion(name="tiny-random-smolvlm", revision="r1", backend="local", options_hash="x", options={})
        session.add(mv)
        session.flush()
        assert mv.id is not None
        studies, images, findings = {}, {}, {}
        pngs = _pngs()
        for key, modality, date in (("cr", "CR", "20240105"), ("ct", "CT", "20240106")):
            study = Study(
                study_instance_uid=f"1.2.826.0.1.3680043.10.1071.999{len(studies)}",
                study_date=date,
                modalities=modality,
                status="done",
            )
            session.add(study)
            session.flush()
            assert study.id is not None
            studies[key] = study.id
            object_key = f"images/seed/{key}.png"
            png, width, height = pngs[key]
            store.put(object_key, png, content_type="image/png")
            image = Image(
                study_id=study.id,
                sop_instance_uid=f"1.2.826.0.1.3680043.10.1071.888{len(images)}",
                series_instance_uid="1.2.3",
                modality=modality,
                view="PA" if key == "cr" else None,
                render_version="r1-512",
                object_key=object_key,
                sha256="0" * 64,
                width=width,
                height=height,
            )
            session.add(image)
            session.flush()
            assert image.id is not None
            images[key] = image.id
            session.add(
                Caption(
                    image_id=image.id,
                    model_version_id=mv.id,
                    prompt_version="p",
                    render_version="r1-512",
                    text=f"A {modality} image of the chest.",
                )
            )
            if identities:
                session.add(
                    StudyIdentity(study_id=study.id, patient_name="Doe^Jane", patient_id="PID-7", accession_number="A1")
                )
        for study_key, qid, p, flagged in CLOSED:
            f = Finding(
                study_id=studies[study_key],
                image_id=images[study_key],
                model_version_id=mv.id,
                question_id=qid,
                bank_version="b1",
                prompt_version="p",
                render_version="r1-512",
                kind="closed",
                answer="yes" if p >= 0.5 else "no",
                probability=p,
                flagged=flagged,
                flag_reason=f"P(yes)={p:.3f} >= threshold" if flagged else None,
                created_at=utcnow(),
            )
            session.add(f)
            session.flush()
            assert f.id is not None
            findings[qid] = f.id
        open_finding = Finding(
            study_id=studies["cr"],
            image_id=images["cr"],
            model_version_id=mv.id,
            question_id="xr_impression",
            bank_version="b1",
            prompt_version="p",
            render_version="r1-512",
            kind="open",
            answer="no acute finding",
        )
        session.add(open_finding)
        session.flush()
        assert open_finding.id is not None
        findings["xr_impression"] = open_finding.id
        for name, role in (("rita", "reviewer"), ("vic", "viewer"), ("ada", "admin")):
            reviews.add_user(session=session, name=name, role=role, password_hash=hash_password(PASSWORD))
        return Seeded(study_ids=studies, finding_ids=findings, image_ids=images, model_version_id=mv.id)


def seeded_database(folder: Any, url: str | None = None) -> tuple[Engine, Any, Seeded]:
    """A migrated database (`url`, default a SQLite file under `folder`) and a local object store under
    `folder`, seeded; (engine, store, seeded)."""
    from db.migrate import upgrade
    from db.session import make_engine
    from integrations.storage import LocalObjectStore

    url = url or f"sqlite:///{folder / 'seeded.db'}"
    upgrade(url)
    engine = make_engine(url)
    store = LocalObjectStore(folder / "objects")
    return engine, store, seed(engine, store)
