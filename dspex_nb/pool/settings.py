"""Checks for settings, made when they are given, with a message that names the setting and its range."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any

from dspex_nb import redact

MAX_CONCURRENCY = 1024  # items (threads) at a time on one worker: concurrency=10**6 started a thread per item of a
# shard until the worker ran out of threads or memory


DEMO_DELAYS = ("ttft", "per_token", "retry_after")  # the demo LM's knobs that are seconds (see worker.demo_lm)
DEMO_SETS = frozenset({"model", "engine", "async_engine", "cache"})  # what worker.demo_lm gives dspy.LM itself
# The connection settings that dspy.LM refuses for an LM with an engine of its own, as the demo's (DSPy's
# dspy.clients.backend_selection.CLIENT_KEYS; a test checks this holds them all)
CONNECTION_SETTINGS = frozenset({"api_key", "api_base", "base_url", "headers", "extra_headers", "timeout",
                                 "api_version", "azure_ad_token_provider", "organization", "project", "extra_query",
                                 "custom_llm_provider"})


class SettingError(ValueError):
    """A setting out of its range or of the wrong type; the message names it."""


class Checker:
    def __init__(self, owner: str) -> None:
        self.owner = owner

    def _fail(self, name: str, expected: str, value: Any) -> None:
        """Refuse ``value``, quoted with its secrets masked (``env`` or ``lm_kwargs`` with one wrong entry hold
        API keys, and the error is shown, and saved, in the notebook)."""
        raise SettingError(f"{self.owner}({name}=...) must be {expected}, got {redact.shown(value)}")

    def integer(self, name: str, value: Any, low: int, high: int | None = None, optional: bool = False) -> None:
        if optional and value is None:
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
            self._fail(name, f"an int from {low} to {high}" if high is not None else f"an int >= {low}", value)

    def seconds(self, name: str, value: Any, optional: bool = False, minimum: float = 0.0) -> None:
        """A finite number of seconds > 0 (and at least ``minimum``, where a smaller one would make the pool
        spin or take every worker for a hung one)."""
        self.positive(name, value, "seconds", optional, minimum)

    def positive(self, name: str, value: Any, unit: str, optional: bool = True, minimum: float = 0.0) -> None:
        if optional and value is None:
            return
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or value <= 0 or value < minimum):
            low = f">= {minimum:g}" if minimum else "> 0"
            self._fail(name, f"a finite number {low} ({unit})" + (" or None" if optional else ""), value)

    def lm_kwargs(self, value: Any, name: str = "", model: str = "") -> dict[str, Any]:
        """A dict of dspy.LM settings from None or a dict (``name``: the argument that holds them; none where they
        are the call's own keywords), its numbers as Python's own: a numpy scalar (``np.float32(0.7)``, ``np.int64``)
        or another ``numbers.Real``, which dspy.LM takes, is its ``int`` or ``float`` value, as the workers get
        them in JSON. Every number must be finite (a NaN or infinity would reach the provider as invalid JSON),
        and the two settings every LM reads are checked: a negative temperature, a max_tokens of 0 (a request
        that cannot be answered). For the demo LM (``model="demo"``), its knobs too: a per_token of -1 failed
        each call with "sleep length must be non-negative", which named no setting."""
        if name:
            self.mapping(name, value)
        key = (lambda k: f"{name}[{k!r}]") if name else str
        kwargs = {k: _python_number(v) for k, v in (value or {}).items()}
        self.non_negative(key("temperature"), kwargs.get("temperature"))
        if kwargs.get("max_tokens") is not None:
            self.integer(key("max_tokens"), kwargs["max_tokens"], 1)
        if model == "demo":
            self._demo_takes(kwargs, key)
            for delay in DEMO_DELAYS:
                self.non_negative(key(delay), kwargs.get(delay), "seconds")
            self.integer(key("answer_tokens"), kwargs.get("answer_tokens"), 1, optional=True)
            self.integer(key("rate_limit_first"), kwargs.get("rate_limit_first", 0), 0)
            self.instance(key("kill_on"), kwargs.get("kill_on"), (str, type(None)), "None or a text to die on")
        for k, v in kwargs.items():
            if isinstance(v, float) and not math.isfinite(v):
                self._fail(key(k), "a finite number", value[k])
        return kwargs

    def _demo_takes(self, kwargs: dict[str, Any], key: Callable[[str], str]) -> None:
        """Refuse a setting the demo LM cannot take: a connection's (``api_key``, ``base_url``...; its value is not
        shown), which dspy.LM refused as the worker started, with a traceback that named no argument of ours; one
        it sets itself (``cache``...), which failed with "got multiple values"."""
        for k, v in kwargs.items():
            if k in DEMO_SETS or (k in CONNECTION_SETTINGS and v is not None):
                what = "a connection's" if k in CONNECTION_SETTINGS else "one the demo LM sets itself"
                raise SettingError(f"{self.owner}({key(k)}=...) is {what}: the demo LM answers offline on each "
                                   "worker and takes its own knobs (ttft, per_token, answer_tokens...) and dspy.LM's "
                                   "generation settings (temperature, max_tokens...); drop it, or name a hosted model "
                                   '(lm="openai/gpt-4o-mini") for it to apply')

    def non_negative(self, name: str, value: Any, unit: str = "") -> None:
        """None or a finite number >= 0."""
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not 0 <= value < math.inf):  # NaN fails the comparison
            self._fail(name, "a finite number >= 0" + (f" ({unit})" if unit else ""), value)

    def instance(self, name: str, value: Any, kinds: type | tuple[type, ...], expected: str) -> None:
        if not isinstance(value, kinds):
            self._fail(name, expected, value)

    def path(self, name: str, value: Any) -> None:
        """Where ``value`` is a path: not empty and without a NUL (no file has such a path; it failed later, with
        "embedded null byte", naming no setting)."""
        if isinstance(value, (str, os.PathLike)) and (not os.fspath(value) or "\0" in os.fspath(value)):
            self._fail(name, "a file's path, not empty and without a NUL character", value)

    def choice(self, name: str, value: Any, choices: Sequence[str]) -> None:
        if value not in choices:
            self._fail(name, f"one of {tuple(choices)}", value)

    def mapping(self, name: str, value: Any, values: type | None = None) -> None:
        """None or a dict with str keys (and, with ``values``, values of that type)."""
        if value is None:
            return
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value) or (
                values is not None and not all(isinstance(v, values) for v in value.values())):
            kind = f"a dict[str, {values.__name__}]" if values else "a dict with str keys"
            self._fail(name, f"None or {kind}", value)


def _python_number(value: Any) -> Any:
    """A number of another type than bool, int or float (a numpy scalar, a ``Fraction``) as its int or float value;
    anything else as it is."""
    if type(value) in (bool, int, float) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def check_stream_options(tool: str, on_chunk: Any, keep_chunks: Any) -> None:
    """A stream's options, checked before it is sent: an ``on_chunk`` that cannot be called, or a ``keep_chunks``
    that keeps no final chunk, failed only once the program had run (its result lost), with a TypeError or an
    IndexError that named neither."""
    check = Checker(tool)
    if on_chunk is not None and not callable(on_chunk):
        check.instance("on_chunk", on_chunk, (), "None or a function of a chunk")
    check.integer("keep_chunks", keep_chunks, 1, optional=True)
