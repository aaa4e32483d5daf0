"""db/reviews.py and the states of db/models.py it uses: refusals are typed (a small tree of their own,
not ValueError or PermissionError), the count of a study's undecided flags, and the StrEnum states,
equal to the strings stored in the database."""

from __future__ import annotations

import pytest

from db import reviews
from db.models import AppUser, AuditAction, Decision, Role, StudyStatus
from db.session import session_scope
from review.auth import hash_password
from tests.review_seed import PASSWORD


def test_refusals_are_typed_by_kind_and_not_builtin_errors(env):
    engine, seeded, _ = env
    for kind in (
        reviews.NotAllowed,
        reviews.NotFound,
        reviews.InvalidDecision,
        reviews.InvalidUserChange,
        reviews.UserExists,
    ):
        assert issubclass(kind, reviews.ReviewError)
        assert not issubclass(kind, (ValueError, PermissionError, LookupError))
    finding = seeded.finding_ids["pneumothorax"]
    with session_scope(engine) as session:
        rita, vic = reviews.get_user(session=session, name="rita"), reviews.get_user(session=session, name="vic")
        assert rita is not None
        assert vic is not None
        refused = [
            (reviews.NotAllowed, "may not decide", dict(user=vic, finding_id=finding, decision="confirm")),
            (reviews.NotFound, "no finding 987654", dict(user=rita, finding_id=987654, decision="confirm")),
            (reviews.InvalidDecision, "unknown decision", dict(user=rita, finding_id=finding, decision="agree")),
            (
                reviews.InvalidDecision,
                "yes or no",
                dict(user=rita, finding_id=finding, decision="correct", to_answer="x"),
            ),
        ]
        for kind, reason, kwargs in refused:
            with pytest.raises(kind, match=reason):
                reviews.decide(session=session, **kwargs)
        with pytest.raises(reviews.UserExists, match="exists"):
            reviews.add_user(session=session, name="rita", role="viewer", password_hash=hash_password(PASSWORD))
        with pytest.raises(reviews.InvalidUserChange, match="unknown role 'boss'"):
            reviews.add_user(session=session, name="bob", role="boss", password_hash=hash_password(PASSWORD))
        with pytest.raises(reviews.NotFound, match="no user 'nobody'"):
            reviews.set_role(session=session, name="nobody", role="viewer", actor="test")
    disabled = AppUser(name="ex", role=Role.REVIEWER, password_hash="-", disabled=True)
    with pytest.raises(reviews.NotAllowed, match="may not decide"):
        reviews.check_may_decide(disabled)


def test_undecided_flagged_counts_flags_without_a_verdict(env):
    """A study's flagged findings without confirm / reject / correct; comments and unflagged findings do
    not count."""
    engine, seeded, _ = env
    cr, ct, f = seeded.study_ids["cr"], seeded.study_ids["ct"], seeded.finding_ids
    with session_scope(engine) as session:
        rita = reviews.get_user(session=session, name="rita")
        assert rita is not None

        def decide(question: str, decision: str, **kwargs: str) -> tuple[int, int]:
            reviews.decide(session=session, user=rita, finding_id=f[question], decision=decision, **kwargs)
            return (
                reviews.undecided_flagged(session=session, study_id=cr),
                reviews.undecided_flagged(session=session, study_id=ct),
            )

        assert reviews.undecided_flagged(session=session, study_id=cr) == 3
        assert decide("consolidation", "confirm") == (3, 1), "not flagged"
        assert decide("pleural_effusion", "comment", comment="look again") == (3, 1), "a comment is no verdict"
        assert decide("pleural_effusion", "confirm") == (2, 1)
        assert decide("pneumothorax", "correct", to_answer="no") == (1, 1)
        assert decide("cardiomegaly", "reject") == (0, 1)
        assert decide("ct_lung_nodule", "confirm") == (0, 0)
        assert reviews.undecided_flagged(session=session, study_id=987654) == 0


def test_states_are_str_enums_equal_to_their_stored_strings():
    assert [s.value for s in StudyStatus] == ["receiving", "new", "retrieving", "incomplete", "done", "failed"]
    assert StudyStatus.PENDING == ("new", "incomplete")
    assert [r.value for r in Role] == ["viewer", "reviewer", "admin"]
    assert (Role.ALL, Role.DECIDE) == (("viewer", "reviewer", "admin"), ("reviewer", "admin"))
    assert [d.value for d in Decision] == ["confirm", "reject", "correct", "comment"]
    assert Decision.ALL == ("confirm", "reject", "correct", "comment")
    assert {"login_ok", "logout", "cohort_exported", "model_promoted"} <= {a.value for a in AuditAction}
    assert all(len(a.value) <= 32 for a in AuditAction), "audit_event.action is 32 characters"
    for member in (StudyStatus.NEW, Role.ADMIN, Decision.CORRECT, AuditAction.LOGIN_OK):
        assert member == member.value
        assert f"{member}" == str(member) == member.value
        assert hash(member) == hash(member.value), "a dictionary keyed by the strings finds the members"
    assert "reviewer" in Role.DECIDE
    assert "viewer" not in Role.DECIDE
