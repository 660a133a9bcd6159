"""Typed JSON: Python values on the wire as JSON that says what they were, so they come back the same.

Both sides use it: a worker encodes a program's outputs, the kernel decodes them (and the other way
round for inputs). Plain JSON values (str, int, float, bool, None, lists, dicts with str keys) are
sent as they are; every other value is a small tagged object ``{"__dspex__": kind, ...}``:

- ``tuple``, ``set``, ``frozenset``, a dict with non-str keys, ``datetime``/``date``/``time``/
  ``timedelta``, ``Decimal``, ``UUID``, ``bytes``: rebuilt exactly, with no code of anyone's run;
- an ``Enum`` member, a pydantic model (DSPy's own types included), a dataclass: sent with the class's
  path (``module:qualname``) and rebuilt with the class that a *resolver* finds for that path on the
  receiving side. Nothing is imported or unpickled to find it: see ``Resolver``.
- ``dspy.Prediction`` / ``dspy.Example``: their fields (and the Example's input keys).

A value with no faithful JSON form is encoded as ``opaque`` (its type and repr); decoding it raises
``NotPortable``, which keeps the raw JSON, so nothing arrives silently changed.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import sys
import uuid
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

from dspex_nb.errors import DspexError

TAG = "__dspex__"
USAGE = "__dspex_usage__"  # beside a program's output: its LM usage per model, as dspy.track_usage counts it
COMPLETIONS = "__dspex_completions__"  # beside a Prediction's fields: all its completions, when it has several
COST = "__dspex_cost__"  # beside a program's output: the USD cost of its LM calls, where an LM reported one
RESERVED = (USAGE, COMPLETIONS, COST)
_OPAQUE_REPR = 2000  # characters of an opaque value's repr kept for the error message


class NotPortable(DspexError):
    """A value that cannot travel as itself; ``raw`` keeps what arrived."""

    def __init__(self, message: str, raw: Any = None) -> None:
        super().__init__(message)
        self.raw = raw


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


# -- encoding --------------------------------------------------------------------------------------
def encode(value: Any) -> Any:
    """``value`` as typed JSON (see the module's docstring)."""
    if value is None or isinstance(value, (bool, int, float, str)) and not isinstance(value, enum.Enum):
        return value
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and TAG not in value:
            return {k: encode(v) for k, v in value.items()}
        return {TAG: "dict", "items": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, enum.Enum):
        return {TAG: "enum", "class": class_path(type(value)), "value": encode(value.value)}
    if isinstance(value, (tuple, set, frozenset)) and not hasattr(value, "_fields"):
        kind = "tuple" if isinstance(value, tuple) else type(value).__name__ if type(value) in (set, frozenset) \
            else None
        if kind is not None:
            return {TAG: kind, "items": [encode(v) for v in _ordered(value, kind)]}
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return {TAG: type(value).__name__, "iso": value.isoformat()} if type(value) in _TIMES else _opaque(value)
    if isinstance(value, dt.timedelta):
        return {TAG: "timedelta", "days": value.days, "seconds": value.seconds, "microseconds": value.microseconds}
    if isinstance(value, Decimal):
        return {TAG: "decimal", "text": str(value)}
    if isinstance(value, uuid.UUID):
        return {TAG: "uuid", "text": str(value)}
    if isinstance(value, bytes):
        return {TAG: "bytes", "b64": base64.b64encode(value).decode()}
    dspy = sys.modules.get("dspy")
    if dspy is not None and isinstance(value, dspy.Example):  # Prediction is an Example
        kind = "prediction" if isinstance(value, dspy.Prediction) else "example"
        out = {TAG: kind, "fields": {k: encode(v) for k, v in value.items()}}
        if kind == "example" and value._input_keys is not None:
            out["inputs"] = sorted(value._input_keys)
        if kind == "prediction" and (completions := _completions_of(value)) is not None:
            out["completions"] = completions
        return out
    if _is_pydantic(value):  # pydantic's own round trip: aliases, extra fields, its own types (URLs...)
        return {TAG: "model", "class": class_path(type(value)),
                "json": value.model_dump_json(by_alias=True, round_trip=True)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {TAG: "dataclass", "class": class_path(type(value)), "fields": encode(data)}
    return _opaque(value)


_TIMES = {dt.datetime, dt.date, dt.time}


def _ordered(items: Iterable[Any], kind: str) -> list[Any]:
    if kind == "tuple":
        return list(items)
    try:
        return sorted(items)  # a set's order does not matter; sorted makes the JSON stable (journal keys)
    except TypeError:
        return list(items)


def _is_pydantic(value: Any) -> bool:
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(value, pydantic.BaseModel)


def _completions_of(prediction: Any) -> list[dict[str, Any]] | None:
    """A Prediction's several completions (``n`` > 1) as typed JSON field dicts, or None when it has one."""
    completions = getattr(prediction, "_completions", None)
    if completions is None or len(completions) < 2:
        return None
    return [{k: encode(v) for k, v in completions[i].items()} for i in range(len(completions))]


def _opaque(value: Any) -> dict[str, Any]:
    text = repr(value)
    return {TAG: "opaque", "class": class_path(type(value)), "repr": text[:_OPAQUE_REPR]}


# -- decoding --------------------------------------------------------------------------------------
class Resolver:
    """Finds the class for a path on the receiving side, without importing or executing anything.

    Only classes the receiver trusts qualify: the ``known`` ones (those shipped with the program being
    run: its signatures' types, the classes in its pickle) and DSPy's own types (``dspy.*``, already
    imported). Data naming any other class (``subprocess:Popen``) is refused, so a value from a worker
    or the journal can never make the kernel call arbitrary code.
    """

    def __init__(self, known: Iterable[type] = ()) -> None:
        self.known = {class_path(cls): cls for cls in known}

    def __call__(self, path: str) -> type | None:
        if path in self.known:
            return self.known[path]
        module_name, _, qualname = path.partition(":")
        if module_name != "dspy" and not module_name.startswith("dspy."):
            return None
        obj: Any = sys.modules.get(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part, None) if obj is not None and part != "<locals>" else None
        return obj if isinstance(obj, type) else None


def decode(value: Any, resolve: Callable[[str], type | None] | None = None, where: str = "value") -> Any:
    """The Python value of typed JSON; ``NotPortable`` (holding the raw JSON) where it cannot be rebuilt."""
    resolve = resolve or Resolver()
    if isinstance(value, list):
        return [decode(v, resolve, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    kind = value.get(TAG)
    if kind is None:
        return {k: decode(v, resolve, f"{where}[{k!r}]") for k, v in value.items()}
    try:
        return _DECODERS[kind](value, resolve, where)
    except NotPortable:
        raise
    except KeyError:
        raise NotPortable(f"{where}: unknown typed value {kind!r} (a newer dspex_nb on the other side?)",
                          value) from None
    except Exception as exc:
        raise NotPortable(f"{where}: could not rebuild the {kind} value: {type(exc).__name__}: {exc}",
                          value) from None


def _items(value: dict[str, Any], resolve: Callable[[str], type | None], where: str) -> list[Any]:
    return [decode(v, resolve, f"{where}[{i}]") for i, v in enumerate(value["items"])]


def portable_kind(cls: type) -> str | None:
    """How a class's instances travel by class path: "enum", "model" (pydantic) or "dataclass"; else None."""
    if issubclass(cls, enum.Enum):
        return "enum"
    if hasattr(cls, "model_validate_json") and hasattr(cls, "model_fields"):
        return "model"
    return "dataclass" if dataclasses.is_dataclass(cls) else None


def _cls(value: dict[str, Any], resolve: Callable[[str], type | None], where: str) -> type:
    cls = resolve(value["class"])
    if cls is not None and portable_kind(cls) != value[TAG]:
        raise NotPortable(f"{where}: {value['class']} is not a{'n' * (value[TAG] == 'enum')} {value[TAG]} class", value)
    if cls is None:
        raise NotPortable(
            f"{where} is a {value['class']}, a class that did not travel with the program: define the program "
            "(and its types) in the kernel and pass the object, e.g. pool.run(program, ...), so they travel together",
            value)
    return cls


def _fields(value: dict[str, Any], resolve: Callable[[str], type | None], where: str) -> dict[str, Any]:
    return {k: decode(v, resolve, f"{where}.{k}") for k, v in value["fields"].items()}


def _example(value: dict[str, Any], resolve: Callable[[str], type | None], where: str) -> Any:
    import dspy

    if value[TAG] == "prediction":
        if "completions" in value:
            completions = [{k: decode(v, resolve, f"{where}.completions[{i}].{k}") for k, v in c.items()}
                           for i, c in enumerate(value["completions"])]
            return dspy.Prediction.from_completions(completions)
        return dspy.Prediction(**_fields(value, resolve, where))
    example = dspy.Example(**_fields(value, resolve, where))
    return example.with_inputs(*value["inputs"]) if "inputs" in value else example


def _dataclass(cls: type, fields: dict[str, Any]) -> Any:
    """The instance with exactly these field values, as it was (neither ``__init__`` nor ``__post_init__``
    runs again: a field with ``init=False`` or a derived value comes back as it was)."""
    obj = cls.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(obj, name, value)
    return obj


def _opaque_error(value: dict[str, Any], resolve: Callable[[str], type | None], where: str) -> Any:
    raise NotPortable(f"{where} is a {value['class']}, which has no JSON form, so it cannot come back as "
                      f"itself (its repr: {value['repr'][:200]}); return JSON-able values, pydantic models, "
                      "enums or dataclasses from the program", value)


_DECODERS: dict[str, Callable[[dict[str, Any], Callable[[str], type | None], str], Any]] = {
    "dict": lambda v, r, w: {decode(k, r, w): decode(x, r, f"{w}[{k!r}]") for k, x in v["items"]},
    "tuple": lambda v, r, w: tuple(_items(v, r, w)),
    "set": lambda v, r, w: set(_items(v, r, w)),
    "frozenset": lambda v, r, w: frozenset(_items(v, r, w)),
    "datetime": lambda v, r, w: dt.datetime.fromisoformat(v["iso"]),
    "date": lambda v, r, w: dt.date.fromisoformat(v["iso"]),
    "time": lambda v, r, w: dt.time.fromisoformat(v["iso"]),
    "timedelta": lambda v, r, w: dt.timedelta(days=v["days"], seconds=v["seconds"], microseconds=v["microseconds"]),
    "decimal": lambda v, r, w: Decimal(v["text"]),
    "uuid": lambda v, r, w: uuid.UUID(v["text"]),
    "bytes": lambda v, r, w: base64.b64decode(v["b64"]),
    "enum": lambda v, r, w: _cls(v, r, w)(decode(v["value"], r, w)),
    "model": lambda v, r, w: _cls(v, r, w).model_validate_json(v["json"]),
    "dataclass": lambda v, r, w: _dataclass(_cls(v, r, w), _fields(v, r, w)),
    "prediction": _example,
    "example": _example,
    "opaque": _opaque_error,
}


def types_in(annotation: Any) -> set[type]:
    """The Enum, pydantic and dataclass classes an annotation names (inside list[...], Optional[...], fields)."""
    import typing

    found: set[type] = set()
    stack, seen = [annotation], set()
    while stack:
        ann = stack.pop()
        if id(ann) in seen:
            continue
        seen.add(id(ann))
        stack.extend(typing.get_args(ann))
        kind = portable_kind(ann) if isinstance(ann, type) else None
        if kind is None:
            continue
        found.add(ann)
        if kind == "dataclass":
            stack.extend(f.type for f in dataclasses.fields(ann) if not isinstance(f.type, str))
        elif kind == "model":
            stack.extend(f.annotation for f in ann.model_fields.values())
    return found


def tokens(result: Any) -> tuple[int, int]:
    """(prompt, completion) tokens of a DSPy tool's result, from the usage beside its output (0, 0 if none)."""
    usage = result.get(USAGE) if isinstance(result, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    models = [u for u in usage.values() if isinstance(u, dict)]
    return (sum(int(u.get("prompt_tokens") or 0) for u in models),
            sum(int(u.get("completion_tokens") or 0) for u in models))


def cost(result: Any) -> float | None:
    """The USD cost of a DSPy tool's LM calls, from beside its output; None where no LM reported one."""
    value = result.get(COST) if isinstance(result, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def add_cost(total: float | None, cost: float | None) -> float | None:
    """``total`` plus ``cost``, where None is "no cost reported" (not zero): None only when both are."""
    return total if cost is None else (total or 0.0) + cost


def add_usage(total: dict[str, Any], usage: dict[str, Any]) -> None:
    """Add one call's usage (per model: prompt_tokens, completion_tokens, total_tokens) into ``total``."""
    for model, counts in usage.items():
        mine = total.setdefault(model, {})
        for key, value in counts.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                mine[key] = mine.get(key, 0) + value
