"""dspex_nb: run DSPy programs on a pool of gRPC worker processes from Jupyter.

``from dspex_nb import Pool`` is the Python API; ``%load_ext dspex_nb`` adds the magics.
Names are imported lazily so that ``python -m dspex_nb.worker`` and ``doctor`` can
report a missing dependency instead of failing on import.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Pool": "dspex_nb.api",
    "Run": "dspex_nb.api",
    "Chunk": "dspex_nb.api",
    "Session": "dspex_nb.api",
    "ToolError": "dspex_nb.errors",
    "WorkerDied": "dspex_nb.errors",
    "WorkerStartError": "dspex_nb.errors",
    "MessageTooLarge": "dspex_nb.errors",
    "MissingDependency": "dspex_nb.deps",
    "doctor": "dspex_nb.doctor",
    "demo_lm": "dspex_nb.worker.demo_lm",
    "notebook_pool": "dspex_nb.magics",
    "NotPortable": "dspex_nb.typed",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dspex_nb' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def load_ipython_extension(shell: Any) -> None:
    """``%load_ext dspex_nb``: register %dspex / %%dspex (the pool starts on first use)."""
    from dspex_nb.magics import load

    load(shell)


def unload_ipython_extension(shell: Any) -> None:
    """``%unload_ext dspex_nb``: stop the pool and remove the magics."""
    from dspex_nb.magics import unload

    unload(shell)
