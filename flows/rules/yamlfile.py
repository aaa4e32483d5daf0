"""Validated YAML files (question bank, selection rules): read, parse, validate, and version by sha256."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from integrations.errors import ConfigurationError

M = TypeVar("M", bound=BaseModel)


def load_yaml_model(model: type[M], path: Path | None, *, bundled: tuple[str, str], what: str) -> tuple[M, str]:
    """(validated model, sha256 of the file's bytes, 12 hex digits). `bundled` = (package, file name), used
    when `path` is None. Every error is a ConfigurationError naming the file and, for validation, the field."""
    if path is None:
        raw = resources.files(bundled[0]).joinpath(bundled[1]).read_bytes()
        where = f"bundled {bundled[1]}"
    else:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"{what} {path}: cannot be read ({exc.strerror})") from exc
        where = str(path)
    try:
        value = model.model_validate(yaml.safe_load(raw))
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{what} {where}: not valid YAML: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigurationError(f"{what} {where}: {loc}: {first['msg']}") from exc
    return value, hashlib.sha256(raw).hexdigest()[:12]
