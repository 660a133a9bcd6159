"""Views of runs, batches and pools: ipywidgets in a live notebook, plain text elsewhere.

The models are the API's own objects (``Run``, ``BatchRun``, ``Pool``); ``progress`` turns them
into numbers and lines that both renderers use, and one ``pump`` thread refreshes live views.
"""

from __future__ import annotations

import importlib.util
import os

MODES = ("auto", "widgets", "text")
default_mode = "auto"  # the views' mode where a caller names none (the Python API's): %config Dspex.display sets it
WIDGETS_MISSING = ("display mode 'widgets' needs ipywidgets, anywidget and markdown-it-py: "
                   "pip install 'ipywidgets>=8.1' 'anywidget>=0.9' 'markdown-it-py>=3'")


def noninteractive() -> bool:
    """Whether DSPEX_NONINTERACTIVE asks for plain final output (1, true, yes, on; not 0, false, no, off, or unset)."""
    return os.environ.get("DSPEX_NONINTERACTIVE", "").strip().lower() not in ("", "0", "false", "no", "off")


def live_frontend(mode: str | None = None) -> bool:
    """Whether to render widgets: in an IPython kernel, unless DSPEX_NONINTERACTIVE=1 or mode (by default
    ``default_mode``) says."""
    mode = default_mode if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"display mode must be one of {MODES}, got {mode!r}")
    if mode == "widgets" and not have_widgets():
        raise ImportError(WIDGETS_MISSING)
    if mode != "auto":
        return mode == "widgets"
    if noninteractive():
        return False
    if not have_widgets():  # the text views (WIDGETS_MISSING says what live ones need)
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def have_widgets() -> bool:
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("ipywidgets", "anywidget", "markdown_it"))
    except (ImportError, ValueError):  # ValueError: sys.modules["ipywidgets"] is None (blocked)
        return False
