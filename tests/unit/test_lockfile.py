"""requirements.lock agrees with pyproject.toml: every requirement is locked, at a version in its range."""

from __future__ import annotations

import tomllib

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

from tests import lockfile

# what the lock is resolved for (`make lock`): CPython 3.11 on Linux x86-64
LOCK_ENVIRONMENT = {
    "python_version": "3.11",
    "python_full_version": "3.11.7",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def locked_requirements(pyproject: dict[str, object], lock_input: str) -> list[Requirement]:
    """Every requirement `make lock` resolves: the project's dependencies, the locked extras, the build
    system's requirements and requirements-lock.in."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    texts = list(project["dependencies"])
    for extra in lockfile.LOCKED_EXTRAS:
        texts += project["optional-dependencies"][extra]
    build = pyproject["build-system"]
    assert isinstance(build, dict)
    texts += build["requires"]
    texts += [line.split("#")[0].strip() for line in lock_input.splitlines() if line.split("#")[0].strip()]
    return [Requirement(text) for text in texts]


def disagreements(requirements: list[Requirement], pins: dict[str, str]) -> list[str]:
    problems = []
    for req in requirements:
        if req.marker is not None and not req.marker.evaluate(LOCK_ENVIRONMENT):
            continue
        name = lockfile.canonical(req.name)
        version = pins.get(name)
        if version is None:
            problems.append(f"{req} is not in requirements.lock")
        elif not req.specifier.contains(Version(version), prereleases=True):
            problems.append(f"{req}: requirements.lock has {name}=={version}, outside the range")
    return problems


def test_the_lock_satisfies_every_requirement_of_pyproject() -> None:
    pyproject = tomllib.loads(lockfile.PYPROJECT.read_text(encoding="utf-8"))
    pins = lockfile.read_lock(lockfile.LOCK.read_text(encoding="utf-8"))
    requirements = locked_requirements(pyproject, lockfile.LOCK_INPUT.read_text(encoding="utf-8"))
    assert len(requirements) > 40
    assert disagreements(requirements, pins) == []


def test_the_lock_pins_torch_as_tested_and_carries_hashes() -> None:
    text = lockfile.LOCK.read_text(encoding="utf-8")
    pins = lockfile.read_lock(text)
    assert pins["torch"] == "2.14.1"
    assert pins["torchvision"] == "0.29.1"
    # every pin is followed by at least one hash (pip installs it with --require-hashes)
    blocks = [b for b in text.split("\n") if lockfile._PIN.match(b.strip())]
    assert len(blocks) == len(pins)
    assert text.count("--hash=sha256:") >= len(pins)


def test_a_missing_or_out_of_range_dependency_is_reported() -> None:
    pyproject = {
        "project": {
            "dependencies": ["numpy>=1.26,<2", "pydicom==3.0.2", "colorama; sys_platform == 'win32'"],
            "optional-dependencies": {extra: [] for extra in lockfile.LOCKED_EXTRAS},
        },
        "build-system": {"requires": ["setuptools>=68"]},
    }
    requirements = locked_requirements(pyproject, "torch==2.14.1  # as tested\n")
    pins = {"numpy": "2.1.0", "setuptools": "80.0", "torch": "2.14.1"}
    assert disagreements(requirements, pins) == [
        "numpy<2,>=1.26: requirements.lock has numpy==2.1.0, outside the range",
        "pydicom==3.0.2 is not in requirements.lock",
    ]
    # a requirement for another platform is not expected in a Linux lock
    assert Marker("sys_platform == 'win32'").evaluate(LOCK_ENVIRONMENT) is False


def test_reading_a_lock_refuses_what_is_not_an_exact_pin() -> None:
    assert lockfile.read_lock("# header\nTyping_Extensions==4.12.2 \\\n    --hash=sha256:ab\n") == {
        "typing-extensions": "4.12.2"
    }
    with pytest.raises(ValueError, match="line 2 is not an exact pin"):
        lockfile.read_lock("a==1\nb>=2\n")
    with pytest.raises(ValueError, match="pins a twice"):
        lockfile.read_lock("a==1\nA==2\n")


def test_the_environment_check_names_missing_wrong_and_extra_packages() -> None:
    diff = lockfile.compare(
        {"numpy": "1.26.4", "torch": "2.14.1", "pip": "26.3"},
        {"numpy": "1.26.4", "torch": "2.15.0", "requests": "2.32.0", "nightread": "0.1.0"},
    )
    assert not diff.equal
    assert diff.lines() == [
        "missing: pip==26.3",
        "wrong version: torch: locked 2.14.1, installed 2.15.0",
        "not in the lock: requests==2.32.0",
    ]
    assert lockfile.compare({"numpy": "1.26.4"}, {"numpy": "1.26.4", "nightread": "0.1.0"}).equal
