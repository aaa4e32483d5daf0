"""The documentation keeps up with the code: the generated pages (docs/cli.md, docs/configuration.md) equal
what flows/docs.py generates now, the README stays short and keeps the two commands, and every relative
link in README.md and docs/*.md points to a file (and heading) that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from flows import docs
from flows.wiring.settings import NightreadSettings

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`+[^`\n]*`+")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def _prose(text: str) -> str:
    """Markdown without fenced blocks and code spans (a link inside them is not a link)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens,
    repeats numbered."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(FENCE.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _relative_links(page: Path) -> list[str]:
    targets = LINK.findall(_prose(page.read_text(encoding="utf-8")))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, mailto:, …


@pytest.mark.parametrize("rel", sorted(docs.pages()))
def test_generated_page_is_up_to_date(rel: str) -> None:
    generated = docs.pages()[rel]
    on_disk = (ROOT / rel).read_text(encoding="utf-8") if (ROOT / rel).is_file() else ""
    assert on_disk == generated, f"{rel} is out of date: run `python -m flows.docs` and commit it"


def test_generation_is_deterministic_and_machine_free() -> None:
    first, second = docs.pages(), docs.pages()
    assert first == second
    for rel, text in first.items():
        assert str(ROOT) not in text, f"{rel} names this checkout's path"
        assert str(Path.home()) not in text, f"{rel} names this machine's home"


def test_check_mode_reports_a_stale_page(tmp_path: Path) -> None:
    for rel, text in docs.pages().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    assert docs.stale(tmp_path) == []
    (tmp_path / docs.CONFIGURATION_PAGE).write_text("# Configuration\n", encoding="utf-8")
    assert docs.stale(tmp_path) == [docs.CONFIGURATION_PAGE]


def test_configuration_lists_every_setting_with_its_variable() -> None:
    variables = [row.variable for row in docs.configuration_rows()]
    assert len(variables) == len(set(variables))
    for expected in (
        "NIGHTREAD_DATA_DIR",
        "NIGHTREAD_SOURCES",
        "NIGHTREAD_PACS__TLS__ENABLED",
        "NIGHTREAD_FLOW__RETRIES",
    ):
        assert expected in variables
    for name in NightreadSettings.model_fields:
        assert any(v == docs.env_name(name) or v.startswith(docs.env_name(name) + "__") for v in variables), name


def test_secret_defaults_are_never_shown() -> None:
    rows = {row.variable: row for row in docs.configuration_rows()}
    for variable in ("NIGHTREAD_DEID_SECRET_KEY", "NIGHTREAD_REVIEW__SECRET_KEY", "NIGHTREAD_PACS__PASSWORD"):
        assert rows[variable].type == "secret"
        assert rows[variable].default in ('`""`', "`**********`")


def test_notes_name_real_fields() -> None:
    """A note for a field that was renamed or removed would silently never show."""
    models = {cls.__name__: cls for cls in _models(NightreadSettings)}
    for key in docs.NOTES:
        model, _, field = key.partition(".")
        assert model in models, key
        assert field in models[model].model_fields, key


def _models(model: type[BaseModel]) -> set[type[BaseModel]]:
    """A settings model and every model nested in it."""
    found = {model}
    for field in model.model_fields.values():
        annotation = field.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel) and candidate not in found:
                found |= _models(candidate)
    return found


def test_readme_is_short_and_shows_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    assert "make demo" in text
    assert "make test" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_existing_files(page: Path) -> None:
    broken = []
    for target in _relative_links(page):
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        missing_anchor = (
            linked.is_file()
            and linked.suffix == ".md"
            and bool(anchor)
            and anchor not in _anchors(linked.read_text(encoding="utf-8"))
        )
        if not linked.exists() or missing_anchor:
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_link_finder_sees_links_and_skips_code() -> None:
    text = "[a](x.md) ![b](img/y.png#z) [web](https://e.org) `[c](no.md)`\n```\n[d](no2.md)\n```\n"
    assert LINK.findall(_prose(text)) == ["x.md", "img/y.png#z", "https://e.org"]
    assert _anchors("# Model: `NIGHTREAD_INFERENCE__*`\n## A b\n## A b\n") == {
        "model-nightread_inference__",
        "a-b",
        "a-b-1",
    }
