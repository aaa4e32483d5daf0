"""The review page in Chromium: login refused and locked, the queue in the chosen order, confirm and
correct with the keyboard (the next item loads without a page reload), a viewer cannot decide, logout
(a copied cookie stops working), all under a Content-Security-Policy without inline script that the
browser enforces (no violations by the page itself; injected handlers and framing are refused)."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect
from sqlmodel import Session

from db import reviews
from db.session import make_engine
from tests.browser.conftest import screenshot
from tests.review_seed import ORDER_CRITICAL, ORDER_UNCERTAIN, PASSWORD, TEXTS

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def log_in(page, name: str, password: str = PASSWORD) -> None:  # type: ignore[no-untyped-def]
    page.goto("/login")
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def queue_questions(page) -> list[str]:  # type: ignore[no-untyped-def]
    return [t.strip() for t in page.locator("table.queue tbody td.question").all_inner_texts()]


def states(database_url: str, finding_ids: list[int]) -> dict[int, tuple[str, str | None]]:
    engine = make_engine(database_url)
    with Session(engine) as session:
        out = reviews.finding_states(session=session, finding_ids=finding_ids)
    engine.dispose()
    return out


def test_login_is_refused_with_a_wrong_password(page):
    log_in(page, "rita", "not the password")
    expect(page.get_by_role("alert")).to_have_text("Wrong user name or password.")
    expect(page).to_have_url(re.compile(r"/login$"))
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login$"))


def test_queue_shows_the_flags_in_the_chosen_order(page):
    log_in(page, "vic")
    expect(page.get_by_test_id("who")).to_have_text("vic (viewer)")
    page.set_viewport_size({"width": 1280, "height": 700})
    expect(page.locator("table.queue tbody tr")).to_have_count(6)
    assert queue_questions(page) == [TEXTS[q] for q in ORDER_CRITICAL]
    assert page.locator("table.queue tbody tr.flagged").count() == 4
    screenshot(page, "review-queue")
    page.get_by_label("Priority").select_option("uncertain")
    page.get_by_role("button", name="Apply").click()
    expect(page).to_have_url(re.compile(r"order=uncertain"))
    assert queue_questions(page) == [TEXTS[q] for q in ORDER_UNCERTAIN]


def test_a_viewer_cannot_decide(page, review_server):
    log_in(page, "vic")
    page.locator("a.open").first.click()
    expect(page.get_by_test_id("study")).to_be_visible()
    expect(page.locator("form.decision")).to_have_count(0)
    page.keyboard.press("c")  # the shortcut has no form to act on
    seeded = review_server.seeded
    status = page.evaluate(
        """async (id) => (await fetch(`/api/findings/${id}/decision`, {method: 'POST',
             headers: {'Content-Type': 'application/json'}, body: JSON.stringify({decision: 'confirm'})})).status""",
        seeded.finding_ids["pleural_effusion"],
    )
    assert status == 403
    assert states(review_server.database_url, [seeded.finding_ids["pleural_effusion"]]) == {
        seeded.finding_ids["pleural_effusion"]: ("pending", None)
    }
    page.keyboard.press("n")  # next in the queue without deciding
    nodule = seeded.finding_ids[ORDER_CRITICAL[1]]
    expect(page.get_by_test_id("study")).to_have_attribute("data-current", str(nodule))


def test_confirm_and_correct_with_the_keyboard_then_log_out(page, review_server):
    seeded = review_server.seeded
    effusion, nodule = seeded.finding_ids["pleural_effusion"], seeded.finding_ids["ct_lung_nodule"]
    log_in(page, "rita")
    page.locator("a.open").first.click()
    expect(page.get_by_test_id("study")).to_have_attribute("data-current", str(effusion))
    expect(page.get_by_test_id("caption")).to_have_text("A CR image of the chest.")
    bar = page.locator(f'li.finding[data-finding="{effusion}"] .bar span')
    expect(bar).to_have_attribute("style", re.compile(r"width: 95(\.0)?%"))  # drawn by review.js
    screenshot(page, "review-study")
    page.evaluate("window.__nightreadNoReload = true")
    page.keyboard.press("c")  # confirm the current finding; the next one in the queue loads in place
    expect(page.get_by_test_id("study")).to_have_attribute("data-current", str(nodule))
    expect(page).to_have_url(re.compile(rf"/studies/{seeded.study_ids['ct']}\?finding={nodule}"))
    assert page.evaluate("window.__nightreadNoReload") is True, "no full page reload"
    # correct the CT nodule to "no": x focuses the corrected answer, Enter submits the correction
    page.keyboard.press("x")
    current = page.locator("form.decision.current")
    expect(current.locator("select[name=to_answer]")).to_be_focused()
    current.locator("select[name=to_answer]").select_option("no")
    current.get_by_role("button", name="Correct").click()
    expect(page.get_by_test_id("study")).to_have_attribute("data-current", str(seeded.finding_ids["pneumothorax"]))
    assert page.evaluate("window.__nightreadNoReload") is True
    assert states(review_server.database_url, [effusion, nodule]) == {
        effusion: ("confirmed", None),
        nodule: ("corrected", "no"),
    }
    # m: a comment on the current finding (Enter sends it); the item stays, its state does not change
    page.keyboard.press("m")
    page.keyboard.type("skin fold, not a pleural line")
    page.keyboard.press("Enter")
    expect(page.locator("details.history")).to_contain_text("skin fold, not a pleural line")
    pneumothorax = seeded.finding_ids["pneumothorax"]
    expect(page.get_by_test_id("study")).to_have_attribute("data-current", str(pneumothorax))
    assert states(review_server.database_url, [pneumothorax]) == {pneumothorax: ("pending", None)}
    page.goto(f"/studies/{seeded.study_ids['ct']}")
    expect(page.locator(f'li.finding[data-finding="{nodule}"] [data-testid=state]')).to_have_text("corrected: no")
    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(r"/login$"))
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login$"))
    assert page.csp_errors == [], "the page itself never trips its Content-Security-Policy"


def test_five_wrong_passwords_lock_the_login(page):
    for _ in range(4):
        log_in(page, "rita", "not the password")
        expect(page.get_by_role("alert")).to_have_text("Wrong user name or password.")
    log_in(page, "rita", "not the password")
    expect(page.get_by_role("alert")).to_contain_text("Too many failed logins")
    log_in(page, "rita")  # the right password, while locked
    expect(page.get_by_role("alert")).to_contain_text("Too many failed logins")
    expect(page).to_have_url(re.compile(r"/login$"))


def test_a_copied_cookie_stops_working_after_logout(new_page, review_server):
    owner, thief = new_page(), new_page()
    log_in(owner, "rita")
    expect(owner.get_by_test_id("who")).to_have_text("rita (reviewer)")
    thief.context.add_cookies(owner.context.cookies())
    seeded = review_server.seeded
    effusion = seeded.finding_ids["pleural_effusion"]
    thief.goto(f"/studies/{seeded.study_ids['cr']}?finding={effusion}")
    expect(thief.get_by_test_id("who")).to_have_text("rita (reviewer)")  # the copy works while the session lives
    owner.get_by_role("button", name="Log out").click()
    expect(owner).to_have_url(re.compile(r"/login$"))
    thief.keyboard.press("c")  # an HTMX decision with the copied cookie: sent to the login page instead
    expect(thief).to_have_url(re.compile(r"/login$"))
    assert states(review_server.database_url, [effusion]) == {effusion: ("pending", None)}
    status = thief.evaluate("async () => (await fetch('/api/queue')).status")
    assert status == 401


def test_the_csp_refuses_injected_script_and_framing(page, review_server):
    log_in(page, "vic")
    expect(page.get_by_test_id("who")).to_have_text("vic (viewer)")
    with page.expect_console_message(lambda m: "Content Security Policy" in m.text):
        page.evaluate(
            """() => { const d = document.createElement('div');
                 d.innerHTML = '<img src="/static/none.png" onerror="window.__injected = 1">';
                 document.body.append(d); }"""
        )
    assert page.evaluate("window.__injected") is None, "an injected inline handler does not run"
    page.goto("about:blank")  # another origin frames the login page: Chromium refuses to show it
    with page.expect_event("framenavigated", predicate=lambda f: f != page.main_frame) as navigated:
        page.set_content(f'<iframe src="{review_server.url}/login"></iframe>')
    assert navigated.value.url == "chrome-error://chromewebdata/", "frame-ancestors 'none' / X-Frame-Options: DENY"
    expect(page.frame_locator("iframe").get_by_label("User name")).to_have_count(0)
