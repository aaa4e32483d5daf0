"""requirements.lock against pyproject.toml, and against the environment installed from it.

`make venv` runs `python -m tests.lockfile --extraneous` (what to uninstall before installing the
lock) and `--check` (the installed environment equals the lock: every locked package at its
version and nothing else but nightread itself); `tests/unit/test_lockfile.py` checks that the lock
satisfies every requirement of pyproject.toml. Only the standard library is used for the
environment check, so it runs in a fresh virtual environment before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
LOCK_INPUT = ROOT / "requirements-lock.in"
PYPROJECT = ROOT / "pyproject.toml"
# the extras `make venv` installs, and so the ones the lock resolves
LOCKED_EXTRAS = ("inference", "triton", "dev")
# installed from the working tree, never from the lock
PROJECT = "nightread"

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares it (case, '-', '_' and '.' fold together)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(text: str) -> dict[str, str]:
    """Every `name==version` pin of a requirements lock; a line of another form is an error."""
    pins: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "--hash")):
            continue
        match = _PIN.match(stripped)
        if match is None:
            raise ValueError(f"requirements.lock line {number} is not an exact pin: {stripped!r}")
        name = canonical(match.group(1))
        if name in pins:
            raise ValueError(f"requirements.lock pins {name} twice (line {number})")
        pins[name] = match.group(2)
    return pins


def installed_distributions() -> dict[str, str]:
    """Name → version of every distribution the running interpreter sees."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[canonical(name)] = dist.version
    return found


@dataclass
class EnvironmentDiff:
    missing: list[str] = field(default_factory=list)
    wrong_version: list[str] = field(default_factory=list)
    extraneous: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not (self.missing or self.wrong_version or self.extraneous)

    def lines(self) -> list[str]:
        return (
            [f"missing: {item}" for item in self.missing]
            + [f"wrong version: {item}" for item in self.wrong_version]
            + [f"not in the lock: {item}" for item in self.extraneous]
        )


def compare(locked: dict[str, str], installed: dict[str, str]) -> EnvironmentDiff:
    """What differs between a lock and an installed environment (nightread itself is not locked)."""
    diff = EnvironmentDiff()
    for name, version in sorted(locked.items()):
        have = installed.get(name)
        if have is None:
            diff.missing.append(f"{name}=={version}")
        elif have != version:
            diff.wrong_version.append(f"{name}: locked {version}, installed {have}")
    for name, version in sorted(installed.items()):
        if name not in locked and name != PROJECT:
            diff.extraneous.append(f"{name}=={version}")
    return diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lockfile", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", action="store_true", help="fail unless the environment equals the lock")
    action.add_argument("--extraneous", action="store_true", help="print the installed names the lock lacks")
    args = parser.parse_args(argv)
    locked = read_lock(LOCK.read_text(encoding="utf-8"))
    diff = compare(locked, installed_distributions())
    if args.extraneous:
        for item in diff.extraneous:
            sys.stdout.write(item.split("==")[0] + "\n")
        return 0
    if diff.equal:
        sys.stdout.write(f"the environment equals requirements.lock ({len(locked)} packages)\n")
        return 0
    sys.stderr.write("the environment differs from requirements.lock (run `make venv`):\n")
    for line in diff.lines():
        sys.stderr.write(f"  {line}\n")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
