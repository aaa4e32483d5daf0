"""A configured source's secrets (DICOMweb password, bearer token) reach its adapter, never the database."""

from __future__ import annotations

from sqlmodel import select

from db.migrate import upgrade
from db.models import PacsSource
from db.session import session_scope
from flows.wiring.runtime import Runtime


def test_dicomweb_credentials_reach_the_source_and_never_the_database(make_settings) -> None:
    settings = make_settings(
        sources=[
            {"name": "web", "kind": "dicomweb", "url": "https://pacs.example/dicom-web", "auth": "bearer",
             "token": "tok-123-secret"},
            {"name": "basic", "kind": "dicomweb", "url": "https://pacs.example/dw", "auth": "basic",
             "username": "qa", "password": "pw-456-secret"},
        ]
    )  # fmt: skip
    upgrade(settings.database_url)
    with Runtime.build(settings) as rt:
        ids = rt.register_sources()
        sources = {rt.source_settings(i).name: rt.source(i) for i in ids}
        assert sources["web"]._session.headers["Authorization"] == "Bearer tok-123-secret"
        assert sources["basic"]._session.auth == ("qa", "pw-456-secret")
        with session_scope(rt.engine) as session:
            stored = repr([row.config for row in session.exec(select(PacsSource)).all()])
    assert "tok-123-secret" not in stored
    assert "pw-456-secret" not in stored
    assert "qa" in stored, "the rest of the source's settings is kept"


def test_credentials_in_a_dicomweb_url_are_refused_with_where_they_go() -> None:
    import pytest
    from pydantic import ValidationError

    from flows.wiring.settings import PacsSettings

    with pytest.raises(ValidationError, match="not in the url") as info:
        PacsSettings(name="w", kind="dicomweb", url="https://qa:hunter2@pacs.example/dicom-web")
    assert "hunter2" not in str(info.value)
