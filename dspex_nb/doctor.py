"""``doctor()``: are grpcio, protobuf and dspy usable in the kernel's Python and the workers'?"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dspex_nb import deps
from dspex_nb.pool.process import PACKAGE_PARENT, module_argv

TITLE = "dspex_nb doctor"


def worker_report(python: str) -> tuple[str, list[deps.DepStatus]] | str:
    """The dependency report of another interpreter, or why it could not be had."""
    if not Path(python).exists():
        return f"{python} does not exist"
    try:
        out = subprocess.run(module_argv(python, "dspex_nb.deps"), capture_output=True, text=True, timeout=120,
                             env={"PYTHONPATH": PACKAGE_PARENT, "PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} could not be run: {exc}"
    if out.returncode != 0:
        return f"{python} failed (exit {out.returncode}): {out.stderr.strip()[-500:]}"
    return deps.from_json(out.stdout)


def _lines(where: str, statuses: list[deps.DepStatus]) -> list[str]:
    lines = [f"{where}:"]
    for s in statuses:
        mark = "ok " if s.ok else "BAD"
        detail = s.version if s.ok else s.problem
        lines.append(f"  [{mark}] {s.name:<9} {detail}  (needs >= {s.required})")
    return lines


def doctor(python: str | None = None, *, show: bool = True) -> bool:
    """Print the report for the kernel's Python and the worker Python (default: the same); True if all ok."""
    kernel = deps.report()
    lines = [TITLE, *_lines(f"kernel Python {sys.executable}", kernel)]
    ok = all(s.ok for s in kernel)
    if python is not None and python != sys.executable:
        report = worker_report(python)
        if isinstance(report, str):
            lines.append(f"worker Python: {report}")
            ok = False
        else:
            lines += _lines(f"worker Python {report[0]}", report[1])
            ok = ok and all(s.ok for s in report[1])
    else:
        lines.append("worker Python: the same interpreter (Pool(python=...) to use another)")
    lines.append("all dependencies are usable" if ok else "some dependencies are missing: see above")
    if show:
        print("\n".join(lines))
    return ok
