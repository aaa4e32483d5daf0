"""Cohort queries: a small expression language over findings and study metadata, parsed into
SQLAlchemy expressions (bound parameters only; no user text is ever pasted into SQL).

    pleural_effusion >= 0.8 and not pneumothorax
    (ct_lung_nodule > 0.7 or lung_nodule_xr > 0.7) and modality in (CT, CR) and study_date >= 2024-01-01
    pneumothorax = yes and review(pneumothorax) = confirmed and model_version = 3

Terms (combined with `and`, `or`, `not` and parentheses; `and` binds tighter than `or`):

- `QUESTION OP NUMBER`: the model's P(yes) of that question (OP: >= > <= < = !=), e.g. `pneumothorax >= 0.8`
- `QUESTION`: the model answered yes (P(yes) >= 0.5), e.g. `not pneumothorax`
- `QUESTION = yes|no`: the answer as it stands after review (a correction or rejection replaces
  the model's answer)
- `review(QUESTION) = pending|confirmed|rejected|corrected|reviewed`: that finding's review state
- `modality = CT`, `modality in (CT, MR)`, `body_part = CHEST`, `view = PA`
- `study_date OP YYYY-MM-DD`, `model_version = N`, `flagged` (any flagged finding)

A question term is true for a study (or image) when any of its findings satisfies it; `not` negates
that. Question ids are checked against the known ones (the question bank and the findings stored)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import ColumnElement, and_, case, exists, false, not_, or_, select
from sqlmodel import col

from db.models import Decision, Finding, Image, Study
from db.reviews import latest_review

Unit = Literal["study", "image"]
OPS = (">=", "<=", "!=", ">", "<", "=")
STATES = ("pending", "confirmed", "rejected", "corrected", "reviewed")
FIELDS = ("modality", "body_part", "view", "study_date", "model_version", "flagged", "review")
KEYWORDS = frozenset({"and", "or", "not", "in", "yes", "no"})
MAX_LENGTH = 2000  # characters of an expression
MAX_DEPTH = 20  # parentheses and `not`s nested in one another
MAX_TERMS = 50  # terms (each one a subquery)
MAX_ID = 2**63 - 1  # a database id (64-bit); larger numbers overflow the database driver
_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+\.\d*|\.\d+|\d{4}-\d{2}-\d{2}|\d+)|(?P<op>>=|<=|!=|=|>|<)|(?P<punct>[(),])"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_]*)|(?P<str>'[^']*'|\"[^\"]*\"))"
)


class CohortSyntaxError(ValueError):
    """A cohort expression that cannot be parsed; the message names the place and what was expected."""


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    pos: int


def tokenize(text: str) -> list[Token]:
    out: list[Token] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise CohortSyntaxError(f"unexpected character {text[pos]!r} at position {pos + 1}")
        kind = m.lastgroup or ""
        value = m.group(kind)
        if kind == "str":
            value = value[1:-1]
            kind = "word"
        out.append(Token(kind, value, m.start(kind) + 1))
        pos = m.end()
    return out


@dataclass(frozen=True)
class Context:
    """What the terms are evaluated against: the unit row's id column and the finding scope."""

    unit: Unit
    model_version_id: int | None
    known_questions: frozenset[str]


class _Parser:
    def __init__(self, text: str, ctx: Context) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0
        self.terms = 0
        self.ctx = ctx

    # --- token helpers -----------------------------------------------------------------------------
    def peek(self, offset: int = 0) -> Token | None:
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else None

    def take(self) -> Token:
        tok = self.peek()
        if tok is None:
            raise CohortSyntaxError("the expression ends too early")
        self.i += 1
        return tok

    def expect(self, kind: str, text: str | None = None, what: str = "") -> Token:
        tok = self.peek()
        if tok is None or tok.kind != kind or (text is not None and tok.text.lower() != text):
            where = f"at position {tok.pos} ({tok.text!r})" if tok else "at the end"
            raise CohortSyntaxError(f"expected {what or text or kind} {where}")
        self.i += 1
        return tok

    def keyword(self, word: str) -> bool:
        tok = self.peek()
        if tok is not None and tok.kind == "word" and tok.text.lower() == word:
            self.i += 1
            return True
        return False

    # --- grammar -------------------------------------------------------------------------------------
    def parse(self) -> ColumnElement[bool]:
        if not self.tokens:
            raise CohortSyntaxError("the expression is empty")
        expr = self.expr()
        tok = self.peek()
        if tok is not None:
            raise CohortSyntaxError(f"unexpected {tok.text!r} at position {tok.pos}: expected and, or or the end")
        return expr

    def expr(self) -> ColumnElement[bool]:
        parts = [self.term()]
        while self.keyword("or"):
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else or_(*parts)

    def term(self) -> ColumnElement[bool]:
        parts = [self.factor()]
        while self.keyword("and"):
            parts.append(self.factor())
        return parts[0] if len(parts) == 1 else and_(*parts)

    def factor(self) -> ColumnElement[bool]:
        tok = self.peek()
        if tok is not None and (
            (tok.kind == "word" and tok.text.lower() == "not") or (tok.kind == "punct" and tok.text == "(")
        ):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise CohortSyntaxError(
                    f"the expression nests parentheses and 'not' deeper than {MAX_DEPTH} levels (at position {tok.pos})"
                )
            self.take()
            if tok.kind == "word":
                inner = not_(self.factor())
            else:
                inner = self.expr()
                self.expect("punct", ")", "')'")
            self.depth -= 1
            return inner
        return self.atom()

    def op(self) -> str:
        return self.expect("op", what="a comparison (>= > <= < = !=)").text

    def atom(self) -> ColumnElement[bool]:
        tok = self.expect("word", what="a question id or a field")
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise CohortSyntaxError(f"the expression has more than {MAX_TERMS} terms (at position {tok.pos})")
        name = tok.text.lower()
        if name == "review":
            return self.review_term(tok)
        if name in ("modality", "body_part", "view"):
            return self.attribute(name, tok)
        if name == "study_date":
            op = self.op()
            date = self.expect("num", what="a date YYYY-MM-DD").text
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
                raise CohortSyntaxError(f"study_date takes a date YYYY-MM-DD, not {date!r}")
            return _compare(col(Study.study_date), op, date.replace("-", ""))
        if name == "model_version":
            self.expect("op", "=", "'='")
            number = self.expect("num", what="a model version id").text
            if not number.isdigit() or int(number) > MAX_ID:
                raise CohortSyntaxError(f"model_version takes a whole number up to {MAX_ID}, not {number!r}")
            return self.findings_exist(col(Finding.model_version_id) == int(number))
        if name == "flagged":
            return self.findings_exist(col(Finding.flagged).is_(True))
        if name in ("and", "or", "not", "in"):
            raise CohortSyntaxError(f"unexpected {tok.text!r} at position {tok.pos}")
        return self.question_term(name, tok)

    def check_question(self, name: str, tok: Token) -> None:
        if name not in self.ctx.known_questions:
            known = ", ".join(sorted(self.ctx.known_questions)) or "none"
            raise CohortSyntaxError(
                f"unknown question or field {tok.text!r} at position {tok.pos} (fields: {', '.join(FIELDS)}; "
                f"questions: {known})"
            )

    def question_term(self, name: str, tok: Token) -> ColumnElement[bool]:
        self.check_question(name, tok)
        nxt = self.peek()
        if nxt is None or nxt.kind != "op":
            return self.findings_exist(col(Finding.question_id) == name, col(Finding.probability) >= 0.5)
        op = self.op()
        value = self.take()
        if value.kind == "num":
            try:
                threshold = float(value.text)
            except ValueError:
                raise CohortSyntaxError(f"expected a probability at position {value.pos}") from None
            if not 0.0 <= threshold <= 1.0:
                raise CohortSyntaxError(f"a probability is between 0 and 1, not {value.text} (position {value.pos})")
            return self.findings_exist(
                col(Finding.question_id) == name, _compare(col(Finding.probability), op, threshold)
            )
        if value.kind == "word" and value.text.lower() in ("yes", "no") and op in ("=", "!="):
            answer = value.text.lower()
            current = current_answer()
            cond = current == answer if op == "=" else current != answer
            return self.findings_exist(col(Finding.question_id) == name, cond)
        raise CohortSyntaxError(
            f"{tok.text} {op} takes a probability (0-1) or, with = / !=, yes or no (position {value.pos})"
        )

    def review_term(self, tok: Token) -> ColumnElement[bool]:
        question: str | None = None
        nxt = self.peek()
        if nxt is not None and nxt.kind == "punct" and nxt.text == "(":
            self.take()
            qtok = self.expect("word", what="a question id")
            question = qtok.text.lower()
            self.check_question(question, qtok)
            self.expect("punct", ")", "')'")
        self.expect("op", "=", "'='")
        state_tok = self.expect("word", what=f"a review state ({', '.join(STATES)})")
        state = state_tok.text.lower()
        if state not in STATES:
            raise CohortSyntaxError(f"unknown review state {state_tok.text!r}: use one of {', '.join(STATES)}")
        decision = latest_review()  # each finding's latest confirm/reject/correct (db.reviews)
        if state == "pending":
            cond: ColumnElement[bool] = decision.is_(None)
        elif state == "reviewed":
            cond = decision.is_not(None)
        else:
            cond = decision == {"confirmed": "confirm", "rejected": "reject", "corrected": "correct"}[state]
        extra = [col(Finding.question_id) == question] if question else []
        return self.findings_exist(*extra, cond)

    def attribute(self, name: str, tok: Token) -> ColumnElement[bool]:
        column = {"modality": col(Image.modality), "body_part": col(Image.body_part), "view": col(Image.view)}[name]
        if self.keyword("in"):
            self.expect("punct", "(", "'('")
            values = [self.expect("word", what=f"a {name}").text.upper()]
            while self.peek() is not None and self.peek().text == ",":  # type: ignore[union-attr]
                self.take()
                values.append(self.expect("word", what=f"a {name}").text.upper())
            self.expect("punct", ")", "')'")
            cond: ColumnElement[bool] = column.in_(values)
        else:
            op = self.expect("op", what="= or !=").text
            if op not in ("=", "!="):
                raise CohortSyntaxError(f"{name} takes = or != (position {tok.pos})")
            value = self.expect("word", what=f"a {name}").text.upper()
            cond = column == value if op == "=" else column != value
        return self.images_exist(cond)

    # --- correlated subqueries -----------------------------------------------------------------------
    def findings_exist(self, *conds: ColumnElement[bool]) -> ColumnElement[bool]:
        scope = [*conds]
        if self.ctx.model_version_id is not None:
            scope.append(col(Finding.model_version_id) == self.ctx.model_version_id)
        if self.ctx.unit == "study":
            scope.append(col(Finding.study_id) == Study.id)
        else:
            scope.append(col(Finding.image_id) == Image.id)
        return exists(select(col(Finding.id)).where(and_(*scope)))

    def images_exist(self, cond: ColumnElement[bool]) -> ColumnElement[bool]:
        if self.ctx.unit == "image":
            return cond
        return exists(select(col(Image.id)).where(col(Image.study_id) == Study.id, cond))


def _compare(column: Any, op: str, value: Any) -> ColumnElement[bool]:
    ops: dict[str, Callable[[Any, Any], ColumnElement[bool]]] = {
        ">=": lambda c, v: c >= v,
        ">": lambda c, v: c > v,
        "<=": lambda c, v: c <= v,
        "<": lambda c, v: c < v,
        "=": lambda c, v: c == v,
        "!=": lambda c, v: c != v,
    }
    return ops[op](column, value)


def current_answer() -> Any:
    """The answer of a finding (correlated with `Finding`) after review: corrected → the correction;
    rejected → the other one; else the model's."""
    decision = latest_review()
    return case(
        (decision == Decision.CORRECT, latest_review("to_answer")),
        (decision == Decision.REJECT, case((col(Finding.answer) == "yes", "no"), else_="yes")),
        else_=col(Finding.answer),
    )


def stored_questions(session: Any, names: Iterable[str]) -> set[str]:
    """Those of `names` that some finding answers (one index lookup each, never a scan of the findings)."""
    return {
        name
        for name in names
        if session.execute(select(col(Finding.id)).where(col(Finding.question_id) == name).limit(1)).first()
    }


def parse_where(
    text: str, *, unit: Unit = "study", model_version_id: int | None = None, known_questions: Sequence[str] = ()
) -> ColumnElement[bool]:
    """The SQL condition of a cohort expression over `Study` (unit study) or `Image` (unit image)."""
    if len(text) > MAX_LENGTH:
        raise CohortSyntaxError(f"the expression is {len(text)} characters long: at most {MAX_LENGTH} are allowed")
    ctx = Context(unit=unit, model_version_id=model_version_id, known_questions=frozenset(known_questions))
    if not text.strip():
        return ~false()
    return _Parser(text, ctx).parse()


@dataclass(frozen=True)
class CohortResult:
    unit: Unit
    where: str
    rows: list[dict[str, Any]]
    questions: list[str]
    model_version_ids: list[int]
    bank_versions: list[str]
    render_versions: list[str]


def run_cohort(
    *,
    session: Any,
    where: str,
    unit: Unit = "study",
    model_version_id: int | None = None,
    known_questions: Sequence[str] = (),
    limit: int | None = None,
) -> CohortResult:
    """The studies (or images) matching `where`, one row each, with each question's P(yes) (the
    highest over the unit's images) and answer after review, for the chosen model version (or all)."""
    # questions stored but not in the bank count too: looked up for the words of the expression only
    words = {t.text.lower() for t in tokenize(where) if t.kind == "word"} if len(where) <= MAX_LENGTH else set()
    known = set(known_questions)
    known |= stored_questions(session, sorted(words - known - set(FIELDS) - set(STATES) - KEYWORDS))
    cond = parse_where(where, unit=unit, model_version_id=model_version_id, known_questions=sorted(known))
    query: Any
    if unit == "study":
        query = select(Study).where(cond).order_by(col(Study.id))
    else:
        query = select(Image, Study).join(Study, col(Study.id) == Image.study_id).where(cond).order_by(col(Image.id))
    if limit is not None:
        query = query.limit(limit)
    found = session.execute(query).all()
    ids = [r[0].id for r in found]
    key = col(Finding.study_id) if unit == "study" else col(Finding.image_id)
    fscope: list[ColumnElement[bool]] = [key.in_(ids) if ids else false()]
    if model_version_id is not None:
        fscope.append(col(Finding.model_version_id) == model_version_id)
    frows = session.execute(
        select(Finding, current_answer().label("current")).where(and_(*fscope)).order_by(col(Finding.id))
    ).all()
    per: dict[int, dict[str, Any]] = {i: {} for i in ids}
    questions: set[str] = set()
    mvs: set[int] = set()
    banks: set[str] = set()
    renders: set[str] = set()
    for f, current in frows:
        owner = f.study_id if unit == "study" else f.image_id
        questions.add(f.question_id)
        mvs.add(f.model_version_id)
        banks.add(f.bank_version)
        renders.add(f.render_version)
        slot = per[owner]
        if f.kind == "closed" and f.probability is not None:
            best = slot.get(f"p_{f.question_id}")
            slot[f"p_{f.question_id}"] = f.probability if best is None else max(best, f.probability)
            if current == "yes" or f"answer_{f.question_id}" not in slot:
                slot[f"answer_{f.question_id}"] = current
        else:
            slot.setdefault(f"answer_{f.question_id}", current)
    rows: list[dict[str, Any]] = []
    for r in found:
        if unit == "study":
            study: Study = r[0]
            base: dict[str, Any] = {
                "study_id": study.id,
                "study_date": study.study_date,
                "modalities": study.modalities,
                "body_part": study.body_part,
                "accession_hash": study.accession_hash,
            }
        else:
            image: Image = r[0]
            study = r[1]
            base = {
                "image_id": image.id,
                "study_id": study.id,
                "study_date": study.study_date,
                "modality": image.modality,
                "body_part": image.body_part,
                "view": image.view,
                "ct_window": image.ct_window,
                "frame": image.frame,
                "render_version": image.render_version,
                "object_key": image.object_key,
            }
        rows.append(base | per[r[0].id])
    return CohortResult(
        unit=unit,
        where=where,
        rows=rows,
        questions=sorted(questions),
        model_version_ids=sorted(mvs),
        bank_versions=sorted(banks),
        render_versions=sorted(renders),
    )
