"""Which of the packages dspex_nb needs are importable, and at which version.

This module imports nothing outside the standard library, so it runs (and reports)
in any interpreter, including a worker Python that lacks grpcio or dspy.
``python -m dspex_nb.deps`` prints the report of the running interpreter as JSON.
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import asdict, dataclass
from importlib import metadata

# (distribution name, import name, minimum version)
REQUIRED: tuple[tuple[str, str, str], ...] = (
    ("grpcio", "grpc", "1.85.1"),
    ("protobuf", "google.protobuf", "7.35.1"),
    ("dspy", "dspy", "3.4.1"),
)
MISSING_MARKER = "DSPEX_MISSING_DEPENDENCIES "


@dataclass(frozen=True)
class DepStatus:
    name: str
    required: str
    version: str | None
    ok: bool
    problem: str = ""


class MissingDependency(ImportError):
    """A package dspex_nb needs cannot be imported (or is too old) in some interpreter."""

    def __init__(self, where: str, statuses: list[DepStatus], worker_python: str | None = None) -> None:
        """``where`` names the interpreter in prose; ``worker_python``, where it is a pool's worker Python, is its
        path, so that the commands the message gives run as they are written."""
        self.where = where
        self.statuses = statuses
        bad = [s for s in statuses if not s.ok]
        python = worker_python or sys.executable
        lines = [f"dspex_nb cannot run in {where}: missing or unusable dependencies:"]
        lines += [f"  - {s.name}>={s.required}: {s.problem}" for s in bad]
        names = " ".join(f"'{s.name}>={s.required}'" for s in bad)
        lines.append(f"Install them into that interpreter: {python} -m pip install {names}")
        doctor = f"python -m dspex_nb doctor --python {worker_python}" if worker_python else "python -m dspex_nb doctor"
        lines.append(f"Run `{doctor}` for the full report.")
        super().__init__("\n".join(lines))


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def installed(name: str, minimum: str) -> DepStatus:
    """Whether distribution ``name`` is installed at ``minimum`` or newer, without importing it."""
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        return DepStatus(name, minimum, None, False, "not installed")
    if _version_tuple(version) < _version_tuple(minimum):
        return DepStatus(name, minimum, version, False, f"version {version} is older than {minimum}")
    return DepStatus(name, minimum, version, True)


def check(name: str, module: str, minimum: str) -> DepStatus:
    """``installed``, and ``module`` imports: an installed but broken package is as unusable as a missing one."""
    status = installed(name, minimum)
    if status.version is None:
        return status
    try:
        importlib.import_module(module)
    except Exception as exc:
        return DepStatus(name, minimum, status.version, False, f"import {module} failed: {exc!r}")
    return status


def report(names: tuple[str, ...] | None = None, *, import_: bool = True) -> list[DepStatus]:
    """Status of every required package (or of ``names`` only) in this interpreter; with
    ``import_=False`` from installed versions alone."""
    return [check(*dep) if import_ else installed(dep[0], dep[2]) for dep in REQUIRED
            if names is None or dep[0] in names]


def require(*names: str, where: str | None = None) -> None:
    """Raise MissingDependency unless every named package (default: all) is usable here."""
    statuses = report(names or None)
    if not all(s.ok for s in statuses):
        raise MissingDependency(where or sys.executable, statuses)


def as_json(statuses: list[DepStatus]) -> str:
    return json.dumps({"python": sys.executable, "python_version": sys.version.split()[0],
                       "dependencies": [asdict(s) for s in statuses]})


def from_json(text: str) -> tuple[str, list[DepStatus]]:
    data = json.loads(text)
    return data["python"], [DepStatus(**d) for d in data["dependencies"]]


if __name__ == "__main__":
    print(as_json(report()))
