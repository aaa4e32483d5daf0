"""The question bank: YAML validated by pydantic; its sha256 is its version.

Every question carries a coded concept (`code`) and, where they apply, the finding type and the
finding site it is about: the DICOM SR (integrations/sr.py) and the FHIR output put these codes in
front of PACS, viewers and EHRs. SNOMED CT where a concept exists; nightread's own documented scheme
`99NIGHTREAD` (docs/results.md) otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flows.rules.yamlfile import load_yaml_model
from integrations.imaging import check_ct_windows, window_key
from integrations.ports import Question

DEFAULT_BANK = "chest_ct_mr.yaml"
CODING_SCHEMES = ("SCT", "RADLEX", "99NIGHTREAD")


class Coding(BaseModel):
    """A coded concept: DICOM coding scheme designator, code value, code meaning."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    scheme: str = Field(
        description='"SCT" (SNOMED CT), "RADLEX", or "99NIGHTREAD" (nightread\'s own documented scheme)'
    )
    value: str = Field(min_length=1, max_length=16, pattern=r"^[A-Za-z0-9_.\-]+$")
    meaning: str = Field(min_length=1, max_length=64)

    @field_validator("scheme")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if v not in CODING_SCHEMES:
            raise ValueError(f"coding scheme {v!r}: use one of {', '.join(CODING_SCHEMES)}")
        return v

    @model_validator(mode="after")
    def _snomed_ids_are_numbers(self) -> Coding:
        if self.scheme == "SCT" and not self.value.isdigit():
            raise ValueError(f"SNOMED CT code {self.value!r} is not a concept id (digits only)")
        return self


class QuestionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    text: str = Field(min_length=3, max_length=500)
    code: Coding = Field(description="the question's concept (for closed questions: the finding asked about)")
    finding_type: Coding | None = Field(default=None, description="the kind of finding, e.g. SCT pleural effusion")
    finding_site: Coding | None = Field(default=None, description="where it is, e.g. SCT pleura / lung / heart")
    kind: Literal["closed", "open"] = "closed"
    modalities: list[str] = Field(min_length=1)
    body_parts: list[str] | None = None
    flag_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    critical: bool = False
    max_new_tokens: int = Field(default=24, ge=1, le=512)
    prompt: str | None = Field(
        default=None, min_length=3, max_length=1000, description="how to put the question to the model, if not `text`"
    )
    ct_windows: list[tuple[float, float]] | None = Field(
        default=None,
        description="CT only: the window(s) to ask this question on (one pair, or three stacked as RGB); "
        "None = the render setting",
    )

    @model_validator(mode="before")
    @classmethod
    def _code_is_required(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("code") is None:
            raise ValueError(
                f'question "{data.get("id", "?")}": `code` is required '
                "(a coded concept: {scheme: SCT|RADLEX|99NIGHTREAD, value: ..., meaning: ...})"
            )
        return data

    @field_validator("ct_windows")
    @classmethod
    def _windows(cls, v: list[tuple[float, float]] | None) -> list[tuple[float, float]] | None:
        return None if v is None else check_ct_windows(v)

    @field_validator("modalities", "body_parts")
    @classmethod
    def _upper(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [s.upper() for s in v]

    @model_validator(mode="after")
    def _threshold_only_for_closed(self) -> QuestionSpec:
        if self.kind == "open" and self.flag_threshold is not None:
            raise ValueError(f'question "{self.id}": flag_threshold applies to closed questions only')
        return self

    def applies_to(self, modality: str, body_part: str) -> bool:
        if modality.upper() not in self.modalities:
            return False
        return self.body_parts is None or body_part.upper() in self.body_parts

    def window_key(self, default_windows: str) -> str:
        return window_key(self.ct_windows) if self.ct_windows is not None else default_windows

    def as_question(self) -> Question:
        return Question(
            id=self.id,
            text=self.text,
            kind=self.kind,
            flag_threshold=self.flag_threshold,
            critical=self.critical,
            max_new_tokens=self.max_new_tokens,
            prompt=self.prompt,
        )


class QuestionBank(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    questions: list[QuestionSpec] = Field(min_length=1)
    version: str = ""

    @model_validator(mode="after")
    def _unique_ids(self) -> QuestionBank:
        seen: set[str] = set()
        for q in self.questions:
            if q.id in seen:
                raise ValueError(f'question id "{q.id}" appears twice')
            seen.add(q.id)
        return self

    def for_image(
        self, *, modality: str, body_part: str, ct_window: str | None = None, default_windows: str = ""
    ) -> tuple[Question, ...]:
        """The questions to ask of one image. A CT image rendered with window key `ct_window` gets the
        questions whose own windows (or, without any, `default_windows`) have that key."""
        return tuple(
            q.as_question()
            for q in self.questions
            if q.applies_to(modality, body_part)
            and (ct_window is None or modality.upper() != "CT" or q.window_key(default_windows) == ct_window)
        )

    def ct_window_sets(
        self, *, body_part: str, default_windows: list[tuple[float, float]]
    ) -> list[list[tuple[float, float]]]:
        """Every CT window setting a CT image of this body part is needed in: the default first (for the
        caption and the questions naming none), then each other one a question names."""
        out = [list(default_windows)]
        keys = {window_key(default_windows)}
        for q in self.questions:
            if q.ct_windows is not None and q.applies_to("CT", body_part) and window_key(q.ct_windows) not in keys:
                keys.add(window_key(q.ct_windows))
                out.append(list(q.ct_windows))
        return out

    def by_id(self, question_id: str) -> QuestionSpec:
        for q in self.questions:
            if q.id == question_id:
                return q
        raise KeyError(question_id)


def load_bank(path: Path | None = None) -> QuestionBank:
    """Load and validate a question bank (default: the bundled one); its version is the file's sha256."""
    bank, sha = load_yaml_model(
        QuestionBank, path, bundled=("flows.rules.questions", DEFAULT_BANK), what="question bank"
    )
    bank.version = sha
    return bank
