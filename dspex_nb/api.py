"""The public Python API: ``Pool``, ``Session``, ``Run``, ``Chunk``.

``from dspex_nb import Pool`` checks first that grpcio and protobuf are usable in this
interpreter and says clearly which are not (dspy is checked in the workers' Python, where it runs).
"""

from __future__ import annotations

import sys

from dspex_nb import deps

deps.require("grpcio", "protobuf", where=f"this kernel's Python ({sys.executable})")

from dspex_nb.client import Pool  # noqa: E402
from dspex_nb.pool.calls import Chunk, Run  # noqa: E402
from dspex_nb.pool.session import Session  # noqa: E402

__all__ = ["Chunk", "Pool", "Run", "Session"]
