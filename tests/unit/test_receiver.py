"""The C-STORE receiver: allow-listed senders only, files in the inbox, studies queued for the next run."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from sqlmodel import Session, select

from db.migrate import upgrade
from db.models import Image, Study
from db.session import make_engine
from flows.nightly import run_nightly
from flows.wiring.arrivals import make_arrival_recorder
from integrations.errors import ConfigurationError
from integrations.pacs import RETRIEVE_STORAGE_CLASSES
from integrations.receiver import StoreReceiver, study_folder
from integrations.sample_pacs import generate_studies


def push(port: int, datasets: list[Dataset], *, ae_title: str) -> list[int]:
    ae = AE(ae_title=ae_title)
    for sop_class in RETRIEVE_STORAGE_CLASSES[:10]:
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title="NIGHTREAD")
    if not assoc.is_established:
        return []
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def studies():
    return generate_studies(seed=5, xr_size=128, ct_size=64, ct_slices=31)


@pytest.mark.parametrize("receiver", ["direct", "pynetdicom"])
def test_only_allow_listed_senders_get_in(tmp_path, studies, receiver):
    arrivals = []
    with StoreReceiver(
        inbox=tmp_path, allowed_aes=["MODALITY1"], on_arrival=arrivals.append, dimse_receiver=receiver
    ) as r:
        assert push(r.port, studies[0].instances, ae_title="INTRUDER") == []
        assert push(r.port, studies[0].instances, ae_title="MODALITY1") == [0, 0]
    folder = study_folder(tmp_path, studies[0].study_instance_uid)
    assert len(list(folder.glob("*.dcm"))) == 2
    assert [a.received for a in arrivals] == [1, 2]
    assert arrivals[0].sender_ae == "MODALITY1"
    assert arrivals[0].modality == studies[0].header.Modality
    assert studies[0].study_instance_uid not in str(folder)
    assert not list(tmp_path.rglob("*.part")), "nothing half-written stays behind"


def test_an_empty_allow_list_is_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="allowed calling AE"):
        StoreReceiver(inbox=tmp_path, allowed_aes=[])


@pytest.mark.slow
def test_pushed_studies_are_read_by_the_next_run(prefect_harness, make_settings, studies):
    settings = make_settings(
        sources=[{"name": "push", "kind": "push", "quiet_period_s": 0}], listen={"quiet_period_s": 0}
    )
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    record = make_arrival_recorder(settings, engine)
    ct = studies[3]
    with StoreReceiver(inbox=settings.inbox, allowed_aes=["CT01"], on_arrival=record) as r:
        assert set(push(r.port, ct.instances, ae_title="CT01")) == {0}
    with Session(engine) as s:
        (study,) = s.exec(select(Study)).all()
    assert (study.status, study.received_instances, study.modalities) == ("receiving", len(ct.instances), "CT")
    result = run_nightly(settings)
    assert (result["new"], result["studies_done"], result["rendered"]) == (1, 1, 3)
    with Session(engine) as s:
        assert s.exec(select(Study)).one().status == "done"
        assert len(s.exec(select(Image)).all()) == 3 * 3  # 3 slices, each in the 3 windows its questions need
    assert not study_folder(settings.inbox, ct.study_instance_uid).exists(), "the inbox is emptied once recorded"
    assert run_nightly(settings)["new"] == 0
    engine.dispose()


def test_quiet_period_holds_a_study_back(prefect_harness, make_settings, studies):
    settings = make_settings(
        sources=[{"name": "push", "kind": "push", "quiet_period_s": 3600}], listen={"quiet_period_s": 3600}
    )
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    record = make_arrival_recorder(settings, engine)
    with StoreReceiver(inbox=settings.inbox, allowed_aes=["CR01"], on_arrival=record) as r:
        push(r.port, studies[0].instances, ae_title="CR01")
    result = run_nightly(settings)
    assert result["new"] == 0
    assert result.get("studies_done", 0) == 0
    with Session(engine) as s:
        assert s.exec(select(Study)).one().status == "receiving"
    engine.dispose()
