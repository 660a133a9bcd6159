"""The kernel's environment variables changed since a pool started, which each call brings to its worker.

A worker gets the kernel's environment when it starts (a Ray actor: its secret-named variables). A notebook
that sets ``os.environ["OPENAI_API_KEY"]`` after ``%dspex start`` (as DSPy's tutorials set keys in a cell),
then switches the pool's LM or runs a tool that reads a key when it runs, must find the key on the workers as
in the kernel: a call carries the variables set, changed or deleted since the start, and the worker sets them
before the program runs (``dspex_nb.worker.programs.use_environment``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable


class Changes:
    """The variables changed since this was made, among those ``follows(name, value)`` accepts (a backend's
    rule: those its workers take from the kernel) and not ``pinned`` (set by ``Pool(env=...)``, which wins)."""

    def __init__(self, follows: Callable[[str, str], bool], pinned: Iterable[str] = ()) -> None:
        self._follows = follows
        self._pinned = frozenset(pinned)
        self._start = dict(os.environ)
        self._changed: set[str] = set()
        self._last: tuple[dict[object, object], dict[str, str | None]] = (dict(_raw()), {})

    def now(self) -> dict[str, str | None]:
        """``{name: value}`` set or changed, ``{name: None}`` deleted; a variable once changed stays in, with its
        value now (back to its first value, or deleted: a worker must undo what it was sent). A dict compare
        while nothing changed."""
        raw = _raw()
        if raw == self._last[0]:
            return self._last[1]
        now = dict(os.environ)
        self._changed |= {name for name in self._start.keys() | now.keys() if self._start.get(name) != now.get(name)
                          and self._kept(name, now.get(name, self._start.get(name, "")))}
        self._last = (dict(raw), {name: now.get(name) for name in sorted(self._changed)})
        return self._last[1]

    def _kept(self, name: str, value: str) -> bool:
        return name not in self._pinned and self._follows(name, value)


def _raw() -> dict[object, object]:
    """The environment as ``os.environ`` keeps it (encoded), compared without decoding each variable."""
    return getattr(os.environ, "_data", None) or dict(os.environ)
