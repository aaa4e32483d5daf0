"""The part of requirements.lock an image needs: pyproject.toml's dependencies and the extras asked for,
with everything they pull in, pins and hashes as locked.

`make lock` resolves one environment for development (the extras inference, triton and dev); an
image has no use for the dev tools (pytest, playwright, mypy, moto …). The lock says why each
package is there (uv's `# via` lines), so the subset is the closure of the roots over those lines,
and every pin and hash is the lock's own: an image installs nothing the tests did not pass with.

    python3 lock_subset.py --extras inference,triton > image.lock   # pyproject's dependencies + 2 extras
    python3 lock_subset.py --roots moto[s3] flask-cors > s3.lock     # given packages only
    python3 lock_subset.py --extras inference,triton --check         # the environment equals that subset

Standard library only: it runs in a fresh image before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
# installed from the working tree after the lock, never from it
PROJECT = "nightread"
# what `make lock` adds beside pyproject.toml (requirements-lock.in): the installer and the build backend,
# so the project installs with --no-build-isolation from the lock alone; torch and torchvision come with
# the inference extra that needs them
ALWAYS = ("pip", "setuptools", "wheel")

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """'psycopg[binary]>=3.2; python_version>"3"' -> 'psycopg'."""
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return canonical(match.group(1))


@dataclass
class Pin:
    name: str
    version: str
    lines: list[str] = field(default_factory=list)  # the pin, its hashes and its comments, as in the lock
    via: set[str] = field(default_factory=set)  # who asked for it (canonical names; "-r …" and "nightread …")


def read_lock(text: str) -> dict[str, Pin]:
    """Every pin of a uv-compiled lock with its lines and its `# via` parents."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    in_via = False
    for line in text.splitlines():
        stripped = line.strip()
        match = _PIN.match(line)
        if match is not None:
            current = Pin(canonical(match.group(1)), match.group(2).rstrip("\\").strip(), [line])
            if current.name in pins:
                raise ValueError(f"the lock pins {current.name} twice")
            pins[current.name] = current
            in_via = False
            continue
        if current is None or not stripped:
            continue
        if stripped.startswith("--hash"):
            current.lines.append(line)
        elif stripped.startswith("# via"):
            rest = stripped.removeprefix("# via").strip()
            in_via = not rest
            if rest:
                current.via.add(_parent(rest))
        elif in_via and stripped.startswith("#   "):
            current.via.add(_parent(stripped.removeprefix("#").strip()))
        else:
            in_via = False
    return pins


def _parent(text: str) -> str:
    if text.startswith("-r ") or text.startswith(f"{PROJECT} "):
        return text  # a root: pyproject.toml or requirements-lock.in
    return canonical(text)


def pyproject_roots(pyproject: Path, extras: list[str]) -> set[str]:
    """The names of pyproject.toml's dependencies and of the named extras (an unknown extra is an error)."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise ValueError(f"pyproject.toml has no extra {', '.join(unknown)} (it has {', '.join(sorted(optional))})")
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        requirements += optional[extra]
    return {requirement_name(r) for r in requirements}


def closure(pins: dict[str, Pin], roots: set[str]) -> dict[str, Pin]:
    """The roots and everything the lock says they pull in (a root the lock lacks is an error)."""
    missing = sorted(r for r in roots if r not in pins and r != PROJECT)
    if missing:
        raise ValueError(f"not in the lock: {', '.join(missing)}")
    children: dict[str, set[str]] = {}
    for pin in pins.values():
        for parent in pin.via:
            children.setdefault(parent, set()).add(pin.name)
    wanted: set[str] = set()
    todo = [r for r in roots if r in pins]
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(children.get(name, ()))
    return {name: pins[name] for name in sorted(wanted)}


def subset_text(subset: dict[str, Pin], header: str) -> str:
    lines = [f"# {header}"]
    for pin in subset.values():
        lines += pin.lines
    return "\n".join(lines) + "\n"


def installed() -> dict[str, str]:
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[canonical(name)] = dist.version
    return found


def differences(subset: dict[str, Pin], have: dict[str, str]) -> list[str]:
    """What differs between the subset and an installed environment (nightread itself is not locked)."""
    lines = []
    for name, pin in subset.items():
        if name not in have:
            lines.append(f"missing: {name}=={pin.version}")
        elif have[name] != pin.version:
            lines.append(f"wrong version: {name}: locked {pin.version}, installed {have[name]}")
    lines += [f"not in the subset: {n}=={v}" for n, v in sorted(have.items()) if n not in subset and n != PROJECT]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lock_subset.py", description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, default=HERE.parent / "requirements.lock")
    parser.add_argument("--pyproject", type=Path, default=HERE.parent / "pyproject.toml")
    roots = parser.add_mutually_exclusive_group(required=True)
    roots.add_argument("--extras", help="pyproject.toml's dependencies and these extras (comma or space separated)")
    roots.add_argument("--roots", nargs="+", help="these packages (requirement strings) instead of pyproject.toml")
    parser.add_argument("--check", action="store_true", help="fail unless the environment equals the subset")
    args = parser.parse_args(argv)
    pins = read_lock(args.lock.read_text(encoding="utf-8"))
    if args.roots is not None:
        wanted = {requirement_name(r) for r in args.roots} | set(ALWAYS)
        header = f"requirements.lock for {' '.join(args.roots)}"
    else:
        extras = [e for e in re.split(r"[,\s]+", args.extras) if e]
        wanted = pyproject_roots(args.pyproject, extras) | set(ALWAYS)
        header = f"requirements.lock for nightread with extras {', '.join(extras) or '(none)'}"
    try:
        subset = closure(pins, wanted)
    except ValueError as exc:
        sys.stderr.write(f"lock_subset.py: {exc}\n")
        return 2
    if not args.check:
        sys.stdout.write(subset_text(subset, f"{header}: {len(subset)} of {len(pins)} pins"))
        return 0
    diff = differences(subset, installed())
    if not diff:
        sys.stdout.write(f"the environment equals the lock's subset: {len(subset)} of {len(pins)} packages\n")
        return 0
    sys.stderr.write("the environment differs from the lock's subset:\n" + "".join(f"  {d}\n" for d in diff))
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
