"""Embedded, offline, deterministic demo LM for DSPy.

``DemoEngine`` is a custom dspy 3.4 engine (``dspy.LM("demo/demo", engine=DemoEngine(), cache=False)``)
that answers any DSPy signature in ChatAdapter format (in JSONAdapter's or XMLAdapter's where the prompt asks
for it) without network access. It reads the output fields and their types from the system prompt and the
input values from the last user message, and derives every answer from a SHA-256 hash of those and of the
whole prompt (so a program's demos and instructions show in its answers), so equal requests give equal text
in any process.
``stream()`` emits the full formatted text word by word, so DSPy's real streaming path and
``StreamListener`` work; ``AsyncDemoEngine`` gives the same answers to DSPy's async calls (``acall``,
``aforward``). Knobs simulate latency, long answers and HTTP 429 rate limiting.
"""

from __future__ import annotations

import ast
import asyncio
import datetime as dt
import hashlib
import inspect
import json
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import dspy
from dspy.lm15 import (
    Message,
    RateLimitError,
    Request,
    Response,
    StreamDeltaEvent,
    StreamEndEvent,
    StreamStartEvent,
    TextDelta,
    TextPart,
    Usage,
)

__all__ = ["AsyncDemoEngine", "DemoEngine", "demo_lm", "make_demo_lm"]

_OUTPUT_FIELD = re.compile(r"^\d+\. `(\w+)` \((.*?)\):", re.MULTILINE)
_NOTE = re.compile(r"^\{(\w+)\} +# note: the value you produce (.*)$", re.MULTILINE)
_JSON_NOTE = re.compile(r'^\s*"(\w+)": "\{\w+\} +# note: the value you produce (.*?)",?$', re.MULTILINE)
_JSON_MODE = "Outputs will be a JSON object"  # JSONAdapter (DSPy falls back to it when ChatAdapter fails)
_XML_MODE = "output fields wrapped in XML tags"  # XMLAdapter's request, at the end of the user message
_XML_INPUT = re.compile(r"^<(\w+)>\n(.*?)\n</\1>$", re.MULTILINE | re.DOTALL)
_SCHEMA_NOTE = "must adhere to the JSON schema: "
_ONE_OF_NOTE = "must be one of: "
_EPOCH = 1_700_000_000  # demo datetimes lie within a year of 2023-11-14
_SECTION = re.compile(r"\[\[ ## (\w+) ## \]\]\n")
_TOKEN = re.compile(r"\S+\s*|\s+")
_RESPOND = "\n\nRespond with"  # ChatAdapter: "... the corresponding output fields"; JSONAdapter: "... a JSON object"
_WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "sigma", "omega", "river",
          "stone", "cloud", "ember", "lantern", "meadow", "harbor", "signal", "orbit", "quartz", "willow")


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


def _words(seed: int, n: int) -> str:
    return " ".join(_WORDS[_digest(str(seed), str(i)) % len(_WORDS)] for i in range(n))


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split()).replace("[[", "[ [")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _split_args(inner: str) -> list[str]:
    """Split ``"str, list[int]"`` at top-level commas."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(inner[start:i].strip())
            start = i + 1
    return [*parts, inner[start:].strip()]


class DemoEngine:
    """Deterministic offline engine; thread-safe ``calls`` and ``tokens_streamed`` counters."""

    def __init__(
        self,
        *,
        ttft: float = 0.0,
        per_token: float = 0.0,
        answer_tokens: int | None = None,
        rate_limit_first: int = 0,
        retry_after: float = 0.05,
        kill_on: str | None = None,
    ) -> None:
        self.ttft = ttft
        self.per_token = per_token
        self.answer_tokens = answer_tokens
        self.rate_limit_first = rate_limit_first
        self.retry_after = retry_after
        self.kill_on = kill_on
        self._lock = threading.Lock()
        self._calls = 0
        self._tokens_streamed = 0
        self._streaming = 0

    @property
    def calls(self) -> int:
        with self._lock:
            return self._calls

    @property
    def rate_limited(self) -> int:
        """Calls answered with a (simulated) HTTP 429."""
        with self._lock:
            return min(self._calls, self.rate_limit_first)

    @property
    def tokens_streamed(self) -> int:
        with self._lock:
            return self._tokens_streamed

    @property
    def streaming(self) -> int:
        """Streams in progress: one that was abandoned but not stopped would stay here."""
        with self._lock:
            return self._streaming

    # -- engine contract -------------------------------------------------------------------------
    def dump_state(self) -> dict[str, Any]:
        """The knobs, as DSPy saves a custom engine with a program whose predictor has this LM (``set_lm``)."""
        return {knob: getattr(self, knob) for knob in _KNOBS}

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> DemoEngine:
        """An engine with the saved knobs (DSPy loads it where the program is loaded with
        ``allow_unsafe_lm_state=True``, as any custom engine)."""
        return cls(**{knob: value for knob, value in state.items() if knob in _KNOBS})

    def complete(self, request: Request) -> Response:
        text, tokens = self._begin(request)
        time.sleep(self.ttft + self.per_token * len(tokens))
        return self._response(request, text, tokens)

    def stream(self, request: Request) -> Iterator[Any]:
        for delay, event in self._events(request):
            if delay:
                time.sleep(delay)
            yield event  # GeneratorExit stops here

    def close(self) -> None:
        pass

    def _begin(self, request: Request) -> tuple[str, list[str]]:
        """A call starts: its answer and the answer's tokens."""
        self._start_call(request)
        text = self.answer(request)
        return text, _TOKEN.findall(text)

    def _response(self, request: Request, text: str, tokens: list[str]) -> Response:
        message = Message.assistant([TextPart(text=text)])
        return Response(id=None, model="demo", message=message, finish_reason="stop",
                        usage=self._usage(request, len(tokens)))

    def _events(self, request: Request) -> Iterator[tuple[float, Any]]:
        """A streamed answer: (seconds to wait first, event) pairs, the tokens counted as they go."""
        tokens = self._begin(request)[1]
        with self._lock:
            self._streaming += 1
        try:
            yield 0.0, StreamStartEvent(id=None, model="demo")
            for i, token in enumerate(tokens):
                with self._lock:
                    self._tokens_streamed += 1
                yield self.ttft if i == 0 else self.per_token, StreamDeltaEvent(delta=TextDelta(text=token,
                                                                                               part_index=0))
            yield self.ttft if not tokens else 0.0, StreamEndEvent(finish_reason="stop",
                                                                    usage=self._usage(request, len(tokens)))
        finally:
            with self._lock:
                self._streaming -= 1

    # -- answer construction ---------------------------------------------------------------------
    def answer(self, request: Request) -> str:
        """The full ChatAdapter-formatted answer text for ``request``."""
        system = request.system if isinstance(request.system, str) else "".join(
            p.text for p in request.system or ())
        user = next((m.text for m in reversed(request.messages) if m.role == "user"), "") or ""
        block = system.split("Your output fields are:", 1)[-1].split("All interactions will be", 1)[0]
        outputs = _OUTPUT_FIELD.findall(block) if "Your output fields are:" in system else []
        xml = _XML_MODE in user
        request_part = user.split(_RESPOND, 1)[0]
        chunks = _SECTION.split(request_part)
        found = _XML_INPUT.findall(request_part) if xml else zip(chunks[1::2], chunks[2::2], strict=False)
        inputs = {k: v.strip() for k, v in found} or {"prompt": user.strip()}
        prompt = _digest(system, *(m.text or "" for m in request.messages))  # demos, instructions: all of it
        key = json.dumps([sorted(inputs.items()), outputs, prompt])
        topic = _short(next(iter(inputs.values()), ""))
        if not outputs:
            return self._text("answer", topic, _digest(key, "answer"))
        notes = dict(_NOTE.findall(system))
        if _JSON_MODE in system:
            notes = {k: v.replace('\\"', '"') for k, v in _JSON_NOTE.findall(system)}
            return json.dumps({name: self._json_value(type_, notes.get(name, ""), name, topic, _digest(key, name))
                               for name, type_ in outputs})
        if xml:
            return "\n\n".join(self._xml(type_, notes.get(name, ""), name, topic, _digest(key, name))
                               for name, type_ in outputs)
        sections = [f"[[ ## {name} ## ]]\n{self._format(type_, notes.get(name, ''), name, topic, _digest(key, name))}"
                    for name, type_ in outputs]
        return "\n\n".join([*sections, "[[ ## completed ## ]]"])

    def _format(self, type_: str, note: str, name: str, topic: str, seed: int) -> str:
        """The text of one output field, following the adapter's note on its type where there is one."""
        if note.startswith(_ONE_OF_NOTE):  # an Enum: the adapter lists its values
            options = note[len(_ONE_OF_NOTE):].split("; ")
            return options[seed % len(options)]
        if note.startswith(_SCHEMA_NOTE):  # JSON, as the adapter asks
            schema = json.loads(note[len(_SCHEMA_NOTE):])
            return json.dumps(self._from_schema(schema, schema.get("$defs", {}), name, topic, seed, type_.strip()))
        value = self._value(type_.strip(), name, topic, seed)
        return value if isinstance(value, str) else json.dumps(value)

    def _xml(self, type_: str, note: str, name: str, topic: str, seed: int) -> str:
        """One output field as XMLAdapter asks for it: a list or dict as nested XML elements (DSPy's own
        ``XMLAdapter._value_to_xml``), anything else as the element's text."""
        value = self._json_value(type_, note, name, topic, seed)
        if isinstance(value, (list, dict)):
            return dspy.XMLAdapter._value_to_xml(value, name)
        text = value if isinstance(value, str) else json.dumps(value)
        return f"<{name}>\n{text.replace('&', '&amp;').replace('<', '&lt;')}\n</{name}>"

    def _json_value(self, type_: str, note: str, name: str, topic: str, seed: int) -> Any:
        """One output field as a JSON value (JSONAdapter); an enum of int values as an int."""
        if note.startswith(_ONE_OF_NOTE):
            option = note[len(_ONE_OF_NOTE):].split("; ")[seed % len(note[len(_ONE_OF_NOTE):].split("; "))]
            return int(option) if option.lstrip("-").isdigit() else option
        if note.startswith(_SCHEMA_NOTE):
            schema = json.loads(note[len(_SCHEMA_NOTE):])
            return self._from_schema(schema, schema.get("$defs", {}), name, topic, seed, type_.strip())
        return self._value(type_.strip(), name, topic, seed)

    def _from_schema(self, schema: dict[str, Any], defs: dict[str, Any], name: str, topic: str, seed: int,
                     type_: str = "") -> Any:
        """A value that satisfies a (pydantic-made) JSON schema, derived from ``seed``."""
        if "$ref" in schema:
            schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = [o for o in schema[key] if o.get("type") != "null"] or schema[key]
                return self._from_schema(options[0], defs, name, topic, seed)
        if "enum" in schema:
            return schema["enum"][seed % len(schema["enum"])]
        if "const" in schema:
            return schema["const"]
        kind = schema.get("type", "string")
        kind = next((k for k in kind if k != "null"), "string") if isinstance(kind, list) else kind
        child = lambda sub, i, label="item": self._from_schema(sub, defs, label, topic, _digest(str(seed), str(i)))  # noqa: E731
        if kind == "object":
            properties = schema.get("properties", {})
            if properties:
                return {prop: child(sub, prop, prop) for prop, sub in properties.items()}
            extra = schema.get("additionalProperties")
            if not isinstance(extra, dict):  # an open object (dict[str, Any], e.g. ReAct's tool args): none needed
                return {}
            # keys that parse as int or str: a nested dict's schema does not say which (a top-level one's type does)
            int_keys = not type_ or type_.replace(" ", "").startswith(("dict[int,", "Dict[int,"))
            return {(str(i) if int_keys else f"key_{i}"): child(extra, i)
                    for i in range(2)}
        if kind == "array":
            if "prefixItems" in schema:
                return [child(sub, i) for i, sub in enumerate(schema["prefixItems"])]
            count = max(schema.get("minItems", 0), min(3, schema.get("maxItems", 3)))
            items = [child(schema.get("items", {}), i) for i in range(count)]
            if schema.get("uniqueItems"):
                items = [f"{v} {i}" if isinstance(v, str) else v for i, v in enumerate(items)]
            return items
        if kind == "integer":
            low = schema.get("minimum", 0)
            return low + seed % max(1, schema.get("maximum", low + 99) - low + 1)
        if kind == "number":
            return round(seed % 10_000 / 100, 2)
        if kind == "boolean":
            return bool(seed & 1)
        if kind == "null":
            return None
        stamp = dt.datetime.fromtimestamp(_EPOCH + seed % 31_536_000, dt.timezone.utc).replace(tzinfo=None)
        formats = {"date-time": stamp.isoformat(), "date": stamp.date().isoformat(),
                   "time": stamp.time().isoformat(), "duration": f"PT{seed % 3600}S",
                   "uuid": str(uuid.UUID(int=seed << 64 | seed))}
        if schema.get("format") in formats:
            return formats[schema["format"]]
        return self._text(name, topic, seed) if name != "item" else _words(seed, 1)

    def _text(self, name: str, topic: str, seed: int) -> str:
        if name == "reasoning":
            return f"Demo LM reasoning about '{topic}': {_words(seed, 12)}."
        head = f"Demo LM answer to '{topic}':"
        n = 8 if self.answer_tokens is None else max(1, self.answer_tokens - len(head.split()))
        return f"{head} {_words(seed, n)}."

    def _value(self, type_: str, name: str, topic: str, seed: int) -> Any:
        base, _, inner = type_.partition("[")
        inner = inner[:-1]
        if base in ("Optional", "Union") or " | " in type_:
            alts = _split_args(inner) if base in ("Optional", "Union") else type_.split(" | ")
            item = next((a for a in alts if a not in ("None", "NoneType")), "str")
            return self._value(item, name, topic, seed)
        if base == "bool":
            return bool(seed & 1)
        if base == "int":
            return seed % 100
        if base == "float":
            return round(seed % 10_000 / 100, 2)
        if base in ("list", "tuple", "set", "List", "Tuple", "Set"):
            item = _split_args(inner)[0] if inner else "str"
            return [self._value(item, "item", topic, _digest(str(seed), str(i))) for i in range(3)]
        if base in ("dict", "Dict"):
            value_type = _split_args(inner)[-1] if inner else "str"
            value_type = "str" if value_type == "Any" else value_type
            return {f"key_{i}": self._value(value_type, "item", topic, _digest(str(seed), str(i)))
                    for i in range(2)}
        if base == "Literal":
            options = ast.literal_eval(f"[{inner}]")
            return str(options[seed % len(options)])
        if name == "item":
            return _words(seed, 1)
        return self._text(name, topic, seed)

    def _start_call(self, request: Request) -> None:
        if self.kill_on and any(self.kill_on in (m.text or "") for m in request.messages):
            os.kill(os.getpid(), signal.SIGKILL)  # a "poison" input: fault tests
        with self._lock:
            self._calls += 1
            limited = self._calls <= self.rate_limit_first
        if limited:
            raise RateLimitError("Demo LM rate limit (simulated HTTP 429)", provider="demo", status=429,
                                 retry_after=self.retry_after)

    @staticmethod
    def _usage(request: Request, output_tokens: int) -> Usage:
        system = request.system if isinstance(request.system, str) else ""
        input_tokens = len(system.split()) + sum(len((m.text or "").split()) for m in request.messages)
        return Usage(input_tokens=input_tokens, output_tokens=output_tokens,
                     total_tokens=input_tokens + output_tokens)


class AsyncDemoEngine:
    """``engine``'s async counterpart, for DSPy's async calls (``acall``, a module's ``aforward``): the same
    answers, knobs and counters, waiting with asyncio."""

    def __init__(self, engine: DemoEngine) -> None:
        self.engine = engine

    def dump_state(self) -> dict[str, Any]:
        return self.engine.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncDemoEngine:
        return cls(DemoEngine.load_state(state))

    async def complete(self, request: Request) -> Response:
        text, tokens = self.engine._begin(request)
        await asyncio.sleep(self.engine.ttft + self.engine.per_token * len(tokens))
        return self.engine._response(request, text, tokens)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        events = self.engine._events(request)
        try:
            for delay, event in events:
                if delay:
                    await asyncio.sleep(delay)
                yield event
        finally:
            events.close()  # a stream stopped early is no longer counted as streaming

    async def aclose(self) -> None:
        pass


_KNOBS = frozenset(inspect.signature(DemoEngine.__init__).parameters) - {"self"}


def make_demo_lm(*, num_retries: int = 0, **knobs: Any) -> tuple[dspy.LM, DemoEngine]:
    """Return ``(dspy.LM("demo/demo", engine=engine, cache=False), engine)``; the demo's knobs (``ttft``,
    ``answer_tokens``...) go to DemoEngine, any other setting (``temperature``, ``max_tokens``...) to
    dspy.LM as for a real model (the demo's answers do not depend on them)."""
    engine = DemoEngine(**{k: v for k, v in knobs.items() if k in _KNOBS})
    settings = {k: v for k, v in knobs.items() if k not in _KNOBS}
    return dspy.LM("demo/demo", engine=engine, async_engine=AsyncDemoEngine(engine), cache=False,
                   num_retries=num_retries, **settings), engine


def demo_lm(**knobs: Any) -> dspy.LM:
    """The demo LM for the kernel (``dspy.configure(lm=demo_lm())``): the same answers as a pool's workers give
    with ``lm="demo"``, so a program can be compared in both places."""
    return make_demo_lm(**knobs)[0]
