"""Series and view selection as data: rules in YAML (validated by pydantic), applied purely."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flows.rules.yamlfile import load_yaml_model
from integrations.imaging import InstanceInfo


class Match(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modalities: list[str] | None = None
    body_parts: list[str] | None = None
    view_positions: list[str] | None = None
    image_type_any: list[str] | None = None
    series_description_regex: str | None = None
    image_sop_class: bool | None = None
    # SliceThickness in mm: [min, max], either may be null (an instance without one does not fit)
    slice_thickness: tuple[float | None, float | None] | None = None
    # planes from ImageOrientationPatient: AXIAL, CORONAL, SAGITTAL, OBLIQUE
    orientations: list[Literal["AXIAL", "CORONAL", "SAGITTAL", "OBLIQUE"]] | None = None

    @field_validator("orientations", mode="before")
    @classmethod
    def _upper_orientations(cls, v: object) -> object:
        return [str(s).upper() for s in v] if isinstance(v, list) else v

    @field_validator("modalities", "body_parts", "view_positions", "image_type_any")
    @classmethod
    def _upper(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [s.upper() for s in v]

    @field_validator("series_description_regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return v

    def fits(self, info: InstanceInfo) -> bool:
        if self.image_sop_class is not None and info.is_image_sop_class != self.image_sop_class:
            return False
        if self.modalities is not None and info.modality not in self.modalities:
            return False
        if self.body_parts is not None and info.body_part not in self.body_parts:
            return False
        if self.view_positions is not None and info.view_position not in self.view_positions:
            return False
        if self.image_type_any is not None and not set(self.image_type_any) & set(info.image_type):
            return False
        if self.slice_thickness is not None:
            low, high = self.slice_thickness
            t = info.slice_thickness
            if t is None or (low is not None and t < low) or (high is not None and t > high):
                return False
        if self.orientations is not None and info.orientation not in self.orientations:
            return False
        return not (
            self.series_description_regex is not None
            and not re.search(self.series_description_regex, info.series_description, re.IGNORECASE)
        )


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    match: Match = Field(default_factory=Match)
    action: Literal["select", "representative", "skip"]
    count: int | None = Field(default=None, ge=1, le=256)
    reason: str | None = None
    # multi-frame objects (Enhanced CT/MR, US/XA cines): which frames to render
    frames: Literal["middle", "every", "all"] = "middle"
    frame_step: int = Field(default=1, ge=1, le=1000, description='"every": each n-th frame')
    max_frames: int = Field(default=16, ge=1, le=1000, description='"every"/"all": at most this many')
    # a view role recorded with the image ("frontal", "lateral"); roles named in the rule set's `pair`
    # are paired within a study and the pair recorded together
    role: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_]{0,15}$")

    def frame_indices(self, number_of_frames: int) -> tuple[int, ...]:
        if number_of_frames <= 1:
            return (0,)
        if self.frames == "middle":
            return (number_of_frames // 2,)
        step = self.frame_step if self.frames == "every" else 1
        picked = list(range(0, number_of_frames, step))
        if len(picked) > self.max_frames:  # spread the cap over the whole object, not its start
            picked = (
                [picked[round(i * (len(picked) - 1) / (self.max_frames - 1))] for i in range(self.max_frames)]
                if self.max_frames > 1
                else [picked[len(picked) // 2]]
            )
        return tuple(picked)

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if self.action == "representative" and self.count is None:
            raise ValueError(f'rule "{self.name}": action "representative" needs a count')
        if self.action == "skip" and not self.reason:
            raise ValueError(f'rule "{self.name}": action "skip" needs a reason')
        return self


class RuleSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = 1
    rules: list[Rule] = Field(min_length=1)
    # two roles whose selected images are paired within a study (e.g. [frontal, lateral])
    pair: tuple[str, str] | None = None
    sha: str = ""

    @model_validator(mode="after")
    def _pair_roles_exist(self) -> RuleSet:
        if self.pair is not None:
            if self.pair[0] == self.pair[1]:
                raise ValueError("pair names the same role twice")
            roles = {r.role for r in self.rules if r.action != "skip"}
            missing = [role for role in self.pair if role not in roles]
            if missing:
                raise ValueError(f"pair names role(s) no selecting rule has: {', '.join(missing)}")
        return self


@dataclass(frozen=True)
class Decision:
    info: InstanceInfo
    selected: bool
    rule: str
    reason: str
    frames: tuple[int, ...] = (0,)
    role: str | None = None
    # the SOP Instance UID of the image this one is paired with (frontal <-> lateral), if any
    paired_with: str | None = None


def load_rules(path: Path | None = None) -> RuleSet:
    """Load and validate a rules file (default: the bundled one); errors name the file and the field."""
    rules, sha = load_yaml_model(RuleSet, path, bundled=("flows.rules", "selection.yaml"), what="rules file")
    rules.sha = sha
    return rules


def _evenly_spaced(n: int, count: int) -> list[int]:
    if n <= count:
        return list(range(n))
    return sorted({round((i + 1) * (n - 1) / (count + 1)) for i in range(count)})


def select_images(instances: Sequence[InstanceInfo], rules: RuleSet) -> list[Decision]:
    """One decision per instance, in input order."""
    decided: dict[int, Decision] = {}
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    rule_of_group: dict[tuple[str, str], Rule] = {}
    for i, info in enumerate(instances):
        rule = next((r for r in rules.rules if r.match.fits(info)), None)
        if rule is None:
            decided[i] = Decision(info, False, "(none)", f"no rule selects modality {info.modality or '?'}")
        elif rule.action == "skip":
            decided[i] = Decision(info, False, rule.name, rule.reason or "skipped")
        elif rule.action == "select":
            decided[i] = Decision(
                info, True, rule.name, "selected", rule.frame_indices(info.number_of_frames), role=rule.role
            )
        else:
            key = (rule.name, info.series_instance_uid)
            groups[key].append(i)
            rule_of_group[key] = rule
    for key, members in groups.items():
        rule = rule_of_group[key]
        assert rule.count is not None
        ordered = sorted(
            members,
            key=lambda i: (
                instances[i].slice_position if instances[i].slice_position is not None else float("inf"),
                instances[i].instance_number or 0,
            ),
        )
        keep = {ordered[j] for j in _evenly_spaced(len(ordered), rule.count)}
        for i in members:
            if i in keep:
                decided[i] = Decision(
                    instances[i],
                    True,
                    rule.name,
                    f"representative slice ({rule.count} per series)",
                    rule.frame_indices(instances[i].number_of_frames),
                    role=rule.role,
                )
            else:
                decided[i] = Decision(instances[i], False, rule.name, "not a representative slice")
    ordered_decisions = [decided[i] for i in range(len(instances))]
    return _pair(ordered_decisions, rules.pair) if rules.pair else ordered_decisions


def _pair(decisions: list[Decision], roles: tuple[str, str]) -> list[Decision]:
    """Pair the selected images of two roles within each study, in acquisition order (series, instance
    number): the first frontal with the first lateral, and so on. Unpaired images stay selected alone."""
    by_study: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, d in enumerate(decisions):
        if d.selected and d.role in roles:
            by_study[d.info.study_instance_uid][d.role].append(i)

    def order(i: int) -> tuple[int, int, str]:
        info = decisions[i].info
        return (info.series_number or 0, info.instance_number or 0, info.sop_instance_uid)

    out = list(decisions)
    for groups in by_study.values():
        firsts, seconds = sorted(groups[roles[0]], key=order), sorted(groups[roles[1]], key=order)
        for a, b in zip(firsts, seconds, strict=False):
            out[a] = replace(out[a], paired_with=decisions[b].info.sop_instance_uid, reason="selected (paired)")
            out[b] = replace(out[b], paired_with=decisions[a].info.sop_instance_uid, reason="selected (paired)")
    return out
