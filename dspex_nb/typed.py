"""Typed JSON: Python values on the wire as JSON that says what they were, so they come back the same.

Both sides use it: a worker encodes a program's outputs, the kernel decodes them (and the other way
round for inputs). Plain JSON values (str, int, float, bool, None, lists, dicts with str keys) are
sent as they are; every other value is a small tagged object ``{"__dspex__": kind, ...}``:

- ``tuple``, ``set``, ``frozenset``, a dict with non-str keys, ``datetime``/``date``/``time``/
  ``timedelta``, ``Decimal``, ``UUID``, ``bytes``: rebuilt exactly, with no code of anyone's run; an iterator over
  a list (``iter(answers)``, as DSPy's ``DummyLM`` keeps its answers) as one over the items it has left;
- a numpy array or scalar (``np.float64``, ``np.int64``, ``np.ndarray``...): its dtype, shape and raw bytes,
  rebuilt as the same numpy type with the same values, bit for bit (an array of Python objects, or of a
  structured dtype, has no such form: ``NotPortable`` says so);
- a value of one of pydantic's own types (``HttpUrl``...): pydantic's JSON of it, where that validates
  back to an equal value;
- a subclass of ``list``, ``dict``, ``tuple``, ``str``, ``int`` or ``float`` (DSPy's ``dotdict``, ``Counter``,
  ``OrderedDict``, a ``NamedTuple``, bs4's ``NavigableString``, the notebook's own): its items or value with its class's
  path, rebuilt as that class
  (found as below) with its base class's own methods, and a ``defaultdict`` with its factory where that is a plain
  type (``defaultdict(list)``); one that holds more than its items or value (attributes, slots, a factory that is
  code) has no faithful form (see ``opaque``): it would come back as the plain value;
- an ``Enum`` member, a pydantic model (DSPy's own types included), a dataclass: sent with the class's
  path (``module:qualname``), and its token where it travelled from the kernel (``token``: two classes may share
  a path), and rebuilt with the class that a *resolver* finds for them on the receiving side. Nothing is imported
  or unpickled to find it: see ``Resolver``. A pydantic model travels as its state (what pydantic's own
  ``__getstate__`` holds: field values, fields set, extra and private attributes) and is rebuilt as
  ``__setstate__`` does, without validating again, so it is the same model;
- ``dspy.Prediction`` / ``dspy.Example`` (and their subclasses, by class path): their fields, the
  Example's input keys, the Prediction's completions and LM usage (``get_lm_usage()``);
- in the kernel only, code (a function, a class, a ``dspy.Tool``'s function...) is put in a ``Shipment``
  that travels by value with cloudpickle, as programs do, and is referred to by its index.

A value with no faithful JSON form is encoded as ``opaque`` (its type and repr); decoding it raises
``NotPortable``, which keeps the raw JSON, so nothing arrives silently changed.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import datetime as dt
import enum
import functools
import hashlib
import inspect
import os
import sys
import time
import types
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any

from dspex_nb import redact
from dspex_nb.errors import DspexError

TAG = "__dspex__"
FORMAT = 5  # this encoding's version, in the journal's batch keys: results kept in an older one are not read
# (5: subclasses of tuple, a NamedTuple, travel as their class, where 4 had no form for them; 4: subclasses of list,
# dict, str, int and float travel as their class; in 3 they came as the plain value)
USAGE = "__dspex_usage__"  # beside a program's output: its LM usage per model, as dspy.track_usage counts it
COMPLETIONS = "__dspex_completions__"  # beside a Prediction's fields: its completions (field -> values)
ONE_COMPLETION = "fields"  # as the completions: one, that is the fields themselves (n=1)
SIGNATURE = "__dspex_signature__"  # beside a Prediction's fields: the signature its completions were made under
LM_USAGE = "__dspex_lm_usage__"  # beside a Prediction's fields: its own get_lm_usage(), where DSPy set one
COST = "__dspex_cost__"  # beside a program's output: the USD cost of its LM calls, where an LM reported one
TRACE = "__dspex_trace__"  # beside a program's output, where the kernel asked: its predictor calls (DSPy's trace)
HISTORY = "__dspex_history__"  # beside a program's output, where the kernel asked: its LM calls' history entries
HISTORY_MODULES = "__dspex_modules__"  # in such an entry: the names of the program's modules that made it
HISTORY_LM = "__dspex_lm__"  # and the program's LM that made it: [its module's name, the attribute holding it]
LM_STATE = "__dspex_lm_state__"  # beside a program's output: the attributes its LMs changed as they answered
CACHED = "__dspex_cached__"  # beside a program's output: [LM calls DSPy answered from its cache, all its LM calls]
STATE_CHANGED = "__dspex_state_changed__"  # beside a program's output: [its name, its label], where the call changed
# its state
RESERVED = (USAGE, COMPLETIONS, SIGNATURE, LM_USAGE, COST, TRACE, HISTORY, LM_STATE, CACHED, STATE_CHANGED)
_OPAQUE_REPR = 2000  # characters of an opaque value's repr kept for the error message


class NotPortable(DspexError):
    """A value that cannot travel as itself; ``raw`` keeps what arrived."""

    def __init__(self, message: str, raw: Any = None) -> None:
        super().__init__(message)
        self.raw = raw


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


ID = "id"  # beside a value's class path: its class's token, where it has one
_TOKENS: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()


def token(cls: type) -> str:
    """The kernel's token of ``cls``: the class's identity, which its path is not (a class defined again in a later
    cell has the path of the one a program's signature still names, and ``dspy.Code["python"]`` makes a class per
    use). A class travels with its token (``with_tokens``), the worker ``remember``s it for the class it rebuilt, and a
    value names its class by both, so that each side rebuilds it as the very class the other meant."""
    return _TOKENS.setdefault(cls, uuid.uuid4().hex)


def with_tokens(classes: Iterable[type]) -> list[tuple[type, str]]:
    """Those of ``classes`` that travel by value, with their tokens, to travel with them (each gets one that has none
    yet)."""
    return [(cls, token(cls)) for cls in classes if _by_value(cls)]


def _by_value(cls: type) -> bool:
    """Whether ``cls`` travels by value: not its module's class at its path, which travels by reference and is the
    same class on both sides (and needs no token, so its values' JSON is the same in a later session)."""
    return cls.__module__ == "__main__" or class_at(class_path(cls)) is not cls


def remember(pairs: Iterable[tuple[type, str]]) -> None:
    """On a worker: the tokens of the classes that came from the kernel (``with_tokens``)."""
    for cls, mark in pairs:
        _TOKENS[cls] = mark


@dataclasses.dataclass
class Shipment:
    """What a kernel's inputs send beside their typed JSON, by value: the classes of their values (so that the
    worker rebuilds a value whose class the program does not name) and their code (``objects``)."""

    types: set[type] = dataclasses.field(default_factory=set)
    objects: list[Any] = dataclasses.field(default_factory=list)
    tokens: list[tuple[type, str]] = dataclasses.field(default_factory=list)  # of ``types`` (``with_tokens``)


# -- encoding --------------------------------------------------------------------------------------
def encode(value: Any, ship: Shipment | None = None) -> Any:
    """``value`` as typed JSON (see the module's docstring); in the kernel, ``ship`` collects what travels by
    value beside it (without it, code has no JSON form)."""
    if value is None or type(value) in _JSON_SCALARS:
        return value if type(value) is not int or value.bit_length() <= JSON_INT_BITS else \
            {TAG: "bigint", "hex": format(value, "x")}
    numpy = sys.modules.get("numpy")  # before the plain values: np.float64 is a float, np.str_ a str
    if numpy is not None and isinstance(value, (numpy.ndarray, numpy.generic)):
        return _numpy_json(value, numpy)
    if isinstance(value, (int, float, str)) and not isinstance(value, enum.Enum):  # a subclass (bool has none)
        return _scalar_json(value, ship)
    if type(value) is list:
        return [encode(v, ship) for v in value]
    if type(value) is dict:
        if all(isinstance(k, str) for k in value) and TAG not in value:
            return {k: encode(v, ship) for k, v in value.items()}
        return {TAG: "dict", "items": [[encode(k, ship), encode(v, ship)] for k, v in value.items()]}
    if isinstance(value, (list, dict, tuple)) and type(value) is not tuple:
        return _collection_json(value, ship)
    if isinstance(value, enum.Enum):
        return {TAG: "enum", **_class(type(value), ship), "value": encode(value.value, ship)}
    if type(value) in (tuple, set, frozenset):
        kind = type(value).__name__
        return {TAG: kind, "items": [encode(v, ship) for v in _ordered(value, kind)]}
    if type(value) is _LIST_ITERATOR:  # iter(items) pickles as (iter, (items,), next index), once at the end as []
        reduced = value.__reduce__()
        left = reduced[1][0][reduced[2]:] if len(reduced) > 2 else []
        return {TAG: "list_iterator", "items": [encode(v, ship) for v in left]}
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
        return _example_json(value, dspy, ship)
    if dspy is not None and type(value) is dspy.Completions:  # a Prediction's completions (pred.completions)
        return {TAG: "completions", "fields": encode({k: list(v) for k, v in value.items()}, ship),
                **_signature_json(value)}
    if _is_pydantic(value):  # its state, as pydantic pickles it (see the module's docstring)
        state = value.__getstate__()  # a RootModel's has no extra or private values: it has none
        return {TAG: "model", **_class(type(value), ship), "fields": encode(state["__dict__"], ship),
                "set": sorted(state["__pydantic_fields_set__"]),
                "extra": encode(state.get("__pydantic_extra__"), ship),
                "private": encode(state.get("__pydantic_private__"), ship)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {TAG: "dataclass", **_class(type(value), ship), "fields": encode(data, ship)}
    if isinstance(value, _pydantic_values()) and (text := _pydantic_json(value)) is not None:
        return {TAG: "pydantic", "class": class_path(type(value)), "json": text}  # HttpUrl...
    if ship is not None and callable(value):  # code: by value, as programs travel
        ship.objects.append(value)
        return {TAG: "code", "index": len(ship.objects) - 1, "class": class_path(type(value))}
    return _opaque(value, _what_instead(value))


_JSON_SCALARS = {bool, int, float, str}
_SEND = ("pass str, numbers, lists, dicts, datetimes, pydantic models, enums or dataclasses (a DataFrame's column of "
         "another type converted first, e.g. with .astype(str))")
_LIST_ITERATOR = type(iter([]))
JSON_INT_BITS = 13_000  # an int longer (3,900 digits) goes as its hex digits: Python refuses to write or read one of
# more than 4,300 decimal digits (sys.get_int_max_str_digits), as the program's own value 10**5000 is in the kernel
_NOT_ITSELF = ("a {0}, a subclass of {1} that holds more than its {2}, which would come back as a plain {1}: "
               "use {1}(value)")


_SCALARS = {"str": str, "int": int, "float": float}
_AS_BASE = {str: str.__str__, int: int.__int__, float: float.__float__}  # the value itself: not the subclass's own
# __str__ / __int__ / __float__, whose result need not be its value


def _scalar_json(value: str | int | float, ship: Shipment | None) -> dict[str, Any]:
    """A subclass of str, int or float (bs4's ``NavigableString``, a notebook's own) as its class and value, so that
    it comes back as that class (with its value only: one with state of its own, attributes or slots, has no such
    form)."""
    base = next(cls for cls in (str, int, float) if isinstance(value, cls))
    if _own_state(value):
        return _opaque(value, _NOT_ITSELF.format(type(value).__name__, base.__name__, "value"))
    return {TAG: base.__name__, **_class(type(value), ship), "value": _AS_BASE[base](value)}


def _what_instead(value: Any) -> str:
    """For a value with no JSON form that a program may well return, what it has no form as and what to return
    instead (a DSPy module compiled on the pool; the exceptions of ``return_failed_examples``); else ""."""
    dspy = sys.modules.get("dspy")
    if dspy is not None and isinstance(value, dspy.BaseModule):
        return (f"a {class_path(type(value))}, a DSPy module, which does not come back from a worker as an object: "
                "return its state, module.dump_state(), and load it into one made in the kernel with load_state()")
    if isinstance(value, BaseException):
        return (f"a {class_path(type(value))}, an exception, which comes back as itself only when it is raised: "
                "raise it, or return what the kernel needs of it, str(exc) (e.g. of the exceptions that "
                "dspy.Parallel's or Module.batch's return_failed_examples=True give)")
    return ""


def _own_state(value: Any) -> bool:
    """Whether ``value`` holds attributes of its own (in its ``__dict__`` or its class's ``__slots__``)."""
    if getattr(value, "__dict__", None):
        return True
    slots = (slot for cls in type(value).__mro__ for slot in
             ((lambda names: [names] if isinstance(names, str) else names)(vars(cls).get("__slots__", ()))))
    return any(slot not in ("__dict__", "__weakref__") and hasattr(value, slot) for slot in slots)


def _collection_json(value: list[Any] | dict[Any, Any] | tuple[Any, ...], ship: Shipment | None) -> dict[str, Any]:
    """A subclass of list, dict or tuple (DSPy's ``dotdict`` of a retriever's passages, a ``Counter``, a
    ``NamedTuple``) as its class and items, so that it comes back as that class (with its items only: one with state
    of its own, attributes or a ``defaultdict``'s factory, has no such form)."""
    base = "dict" if isinstance(value, dict) else "list" if isinstance(value, list) else "tuple"
    factory = value.default_factory if isinstance(value, collections.defaultdict) else None
    if _own_state(value) or (factory is not None and class_path(factory) not in _FACTORIES):
        return _opaque(value, _NOT_ITSELF.format(type(value).__name__, base, "items"))
    items = [encode(v, ship) for v in value] if base != "dict" else \
        [[encode(k, ship), encode(v, ship)] for k, v in value.items()]  # type: ignore[union-attr]
    made = {TAG: base, **_class(type(value), ship), "items": items}
    if _struct_sequence(type(value)):
        return _struct_json(value, made, ship)
    return made if factory is None else {**made, "factory": class_path(factory)}


def _struct_sequence(cls: type) -> bool:
    """Whether ``cls`` is a struct sequence (``time.struct_time``, ``os.stat_result``): a tuple subclass of C code,
    which ``tuple.__new__`` cannot make, with fields beside its items (a struct_time's ``tm_zone``)."""
    return issubclass(cls, tuple) and hasattr(cls, "n_sequence_fields") and isinstance(cls.__new__,
                                                                                       types.BuiltinFunctionType)


def _struct_json(value: tuple[Any, ...], made: dict[str, Any], ship: Shipment | None) -> dict[str, Any]:
    """A struct sequence as its items and its other ``fields``, as its constructor takes them; one that Python cannot
    make again (``sys.version_info``) has no faithful form."""
    try:
        fields = value.__reduce__()[1][1]  # type: ignore[index]
        type(value)(tuple(value), fields)
    except Exception:
        return _opaque(value, f"a {type(value).__name__}, which Python cannot make again: use tuple(value)")
    return {**made, "fields": {name: encode(field, ship) for name, field in fields.items()}}


def plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is JSON as it is and comes back from JSON as itself (``encode`` leaves it so): str, int,
    float, bool, None, and lists and str-keyed dicts of those, not too deep; not their subclasses (an IntEnum, a
    tuple would come back changed), nor a numpy array (whose ``==`` is not a plain bool), nor a dict holding
    ``TAG`` (it would be read as typed JSON)."""
    if value is None or type(value) in _JSON_SCALARS:
        return type(value) is not int or value.bit_length() <= JSON_INT_BITS
    if depth > 20:
        return False
    if type(value) is list:
        return all(plain(v, depth + 1) for v in value)
    if type(value) is dict:
        return TAG not in value and all(type(k) is str and plain(v, depth + 1) for k, v in value.items())
    return False


def _numpy_json(value: Any, numpy: Any) -> dict[str, Any]:
    """A numpy array or scalar as its dtype (with its byte order), shape and bytes (C order), where its values
    are plain data: not an array of objects, nor of a structured dtype, nor a subclass (a masked array)."""
    array = numpy.asarray(value)
    scalar = isinstance(value, numpy.generic)
    if array.dtype.hasobject or array.dtype.fields is not None:
        return _opaque(value, f"an array of dtype {array.dtype}, whose items are Python objects or records, not "
                              "plain numbers: return a plain dtype's array, or its items as a list")
    if not scalar and type(value) is not numpy.ndarray:
        return _opaque(value, f"a subclass of numpy's ndarray ({type(value).__name__}), which would come back "
                              "as a plain ndarray: return a plain array")
    return {TAG: "numpy", "dtype": array.dtype.str, "shape": list(array.shape), "scalar": scalar,
            "b64": base64.b64encode(numpy.ascontiguousarray(array).tobytes()).decode()}


_PYDANTIC = ("pydantic", "pydantic_core")


def _pydantic_values() -> tuple[type, ...]:
    """pydantic's own value types that travel as their JSON: its URLs (``HttpUrl``...), and only these. A class
    that data names is never just any class of pydantic's: ``ImportString`` imports whatever it is given."""
    found: list[type] = []
    for module, names in (("pydantic_core", ("Url", "MultiHostUrl")),
                          ("pydantic.networks", ("_BaseUrl", "_BaseMultiHostUrl"))):
        found += [cls for name in names if isinstance(cls := getattr(sys.modules.get(module), name, None), type)]
    return tuple(found)


@functools.lru_cache(maxsize=64)
def _adapter(cls: type) -> Any:
    import pydantic

    return pydantic.TypeAdapter(cls)


def _pydantic_json(value: Any) -> str | None:
    """A pydantic type's value (``HttpUrl``...) as pydantic's JSON, where that gives the same value back."""
    try:
        adapter = _adapter(type(value))
        text = adapter.dump_json(value).decode()
        return text if adapter.validate_json(text) == value else None  # not a SecretStr's "**********"
    except Exception:
        return None


def _class(cls: type, ship: Shipment | None) -> dict[str, str]:
    """How a value names its class: by its path and, where it has one, its token (``token``); in the kernel
    (``ship``), ``cls`` is noted there so that it travels too, with a token of its own."""
    path = class_path(cls)
    if ship is not None:
        ship.types.add(cls)
        if _by_value(cls):
            token(cls)
    mark = _TOKENS.get(cls)
    return {"class": path, **({ID: mark} if mark else {})}


_EXAMPLE_STATE = {"_store", "_demos", "_input_keys", "_completions", "_lm_usage"}


def _example_json(value: Any, dspy: Any, ship: Shipment | None) -> dict[str, Any]:
    """A dspy.Example or Prediction: its fields, input keys or completions, a subclass's class and attributes."""
    kind = "prediction" if isinstance(value, dspy.Prediction) else "example"
    out: dict[str, Any] = {TAG: kind, "fields": {k: encode(v, ship) for k, v in value.items()}}
    if type(value) not in (dspy.Prediction, dspy.Example):
        out.update(_class(type(value), ship))
        if attrs := {k: v for k, v in vars(value).items() if k not in _EXAMPLE_STATE}:
            out["attrs"] = encode(attrs, ship)
    if kind == "example" and value._input_keys is not None:
        out["inputs"] = sorted(value._input_keys)
    if kind == "prediction" and value._completions is not None:
        completions = {k: list(v) for k, v in value._completions.items()}
        one = _only_the_fields(completions, value._store)
        out["completions"] = ONE_COMPLETION if one else encode(completions, ship)
        out.update(_signature_json(value._completions))
    if kind == "prediction" and value._lm_usage is not None:  # set by DSPy with track_usage on
        out["usage"] = encode(value._lm_usage, ship)
    return out


def signature_path(signature: type) -> str:
    """A signature class's path, with its fields and a digest of its instructions: ``dspy.Signature("question ->
    answer")`` makes a class of one path (``StringSignature``) per use, told apart by those."""
    instructions = hashlib.sha256(str(signature.instructions).encode()).hexdigest()[:16]
    return f"{class_path(signature)} {signature.signature} {instructions}"


def _signature_json(completions: Any) -> dict[str, str]:
    """The signature ``completions`` were made under (``dspy.majority`` reads it), by its ``signature_path``."""
    signature = getattr(completions, "signature", None)
    return {"signature": signature_path(signature)} if isinstance(signature, type) else {}


def _signature(value: dict[str, Any], resolve: Callable[[str], type | None]) -> type | None:
    """The signature class of ``value["signature"]`` where the receiver knows it as the one the sender used (a
    signature of the program, or DSPy's own), else None, as DSPy's completions made without one."""
    path = value.get("signature")
    if path is None:
        return None
    cls = resolve(path) or resolve(path.partition(" ")[0])
    dspy = sys.modules.get("dspy")
    known = dspy is not None and isinstance(cls, type) and issubclass(cls, dspy.Signature)
    return cls if known and signature_path(cls) == path else None


def _only_the_fields(completions: dict[str, list[Any]], store: dict[str, Any]) -> bool:
    """Whether the completions are one, made of the fields themselves (n=1): the same objects, not sent twice."""
    return list(completions) == list(store) and all(len(v) == 1 and v[0] is store[k] for k, v in completions.items())


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


def _opaque(value: Any, reason: str = "") -> dict[str, Any]:
    """``value`` as its class and its repr, and ``reason``: why it has no JSON form, where that is not plain. The
    repr has its secrets masked (a client holding its key, ``os.environ``) before it is shortened (so no part of
    one is left): it is shown in errors and dashboards, and kept in the journal."""
    try:
        shown = repr(value)[:_OPAQUE_REPR + redact.SECRET_ROOM]  # not all of a 26 MB repr
    except Exception as failure:  # the class's own __repr__ failed: the value still has no JSON form, and says so
        shown = f"<{type(value).__qualname__} object; its repr() failed: {type(failure).__name__}>"
    text = redact.text(shown, limit=None)
    send = _how_to_send(value)
    return {TAG: "opaque", "class": class_path(type(value)), "repr": text[:_OPAQUE_REPR],
            **({"reason": reason} if reason else {}), **({"send": send} if send else {})}


def _how_to_send(value: Any) -> str:
    """For an input with no JSON form that has a form a program reads as the kernel would mean it, what to pass
    instead; else "" (the general advice)."""
    pil = sys.modules.get("PIL.Image")
    if pil is not None and isinstance(value, pil.Image):
        return ("wrap it as dspy.Image(value), which DSPy reads as an image (in the kernel DSPy does not convert a raw "
                "PIL image either: it logs a type mismatch and sends the LM the image's repr as text)")
    return ""


def unsendable(value: Any, where: str) -> str | None:
    """Why encoded ``value`` (typed JSON, see ``encode``) cannot be sent to the workers as an input, naming the
    part that cannot (``items[3]['when']``, as ``decode`` names parts), or None when all of it can. A value with
    no JSON form (a ``complex``, a ``pandas.Timestamp``) is found here, in the kernel, before anything is sent:
    a worker would refuse it anyway, calling it by its place in its own message (a shard's ``batch_items[0]``)."""
    stack = [(value, where)]
    while stack:
        part, at = stack.pop()
        if isinstance(part, list):
            stack.extend((v, f"{at}[{i}]") for i, v in reversed(list(enumerate(part))))
        elif isinstance(part, dict):
            if part.get(TAG) == "opaque":
                return (f"{at} is a {part.get('class')}, which has no JSON form, so it cannot be sent to the workers "
                        f"as itself (its repr: {str(part.get('repr'))[:200]}); " + (part.get("send") or _SEND))
            stack.extend((v, f"{at}[{k!r}]") for k, v in reversed(list(part.items())))
    return None


# -- decoding --------------------------------------------------------------------------------------
class Resolver:
    """Finds the class for a path on the receiving side, without importing or executing anything.

    Only classes the receiver trusts qualify: the ``known`` ones (those shipped with the program being
    run: its signatures' types, the classes in its pickle) and DSPy's own types (``dspy.*``, already
    imported). Data naming any other class (``subprocess:Popen``) is refused, so a value from a worker
    or the journal can never make the kernel call arbitrary code. On a worker, ``objects`` are the code
    that came by value from the kernel with the inputs (a ``Shipment``'s); elsewhere code is refused.
    """

    def __init__(self, known: Iterable[type] = (), objects: Sequence[Any] = ()) -> None:
        dspy = sys.modules.get("dspy")
        self.classes = list(dict.fromkeys(known))  # all of them: two may share a path
        self.known = {path: cls for cls in self.classes for path in (
            (class_path(cls), signature_path(cls)) if dspy is not None and issubclass(cls, dspy.Signature)
            else (class_path(cls),))}
        self.tokens = {mark: cls for cls in self.classes if (mark := _TOKENS.get(cls))}
        self.objects = objects

    def __call__(self, path: str) -> type | None:
        if path in self.known:
            return self.known[path]
        return _STDLIB.get(path) or _imported(path, ("dspy",))

    def knows(self, cls: type) -> bool:
        """Whether ``cls`` itself is among the classes found here (not only another class of its path)."""
        return self(class_path(cls)) is cls or any(known is cls for known in self.classes)

    def by_token(self, value: dict[str, Any]) -> type | None:
        """The class a value names by its token (see ``token``), where it is one of these and has the value's path."""
        cls = self.tokens.get(value.get(ID))  # type: ignore[arg-type]
        return cls if cls is not None and class_path(cls) == value["class"] else None


_STRUCTS = (time.struct_time, os.stat_result, os.statvfs_result, os.terminal_size, os.times_result, os.uname_result)
_STDLIB = {class_path(cls): cls for cls in (collections.Counter, collections.OrderedDict, collections.defaultdict,
                                            *_STRUCTS)}
# rebuilt from items alone (a defaultdict with its factory, one of _FACTORIES; a struct sequence with its fields)
_FACTORIES = {class_path(cls): cls for cls in (list, dict, set, int, float, str, tuple, frozenset, bool,
                                              collections.Counter, collections.OrderedDict)}  # defaultdict(list)...:
# a factory is called on a missing key, so only these plain types come from data, never a class it names


def _imported(path: str, packages: tuple[str, ...]) -> type | None:
    """The class at ``path`` in a module of ``packages`` that is already imported (nothing is imported)."""
    return class_at(path) if path.partition(":")[0].partition(".")[0] in packages else None


def class_at(path: str) -> type | None:
    """The class at ``path`` in a module already imported (nothing is imported)."""
    module_name, _, qualname = path.partition(":")
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
    """How a class's instances travel by class path: "enum", "list", "dict" or "tuple" (a subclass of those),
    "model" (pydantic), "dataclass", "prediction" or "example" (dspy's and their subclasses); else None."""
    if issubclass(cls, enum.Enum):
        return "enum"
    if issubclass(cls, (list, dict, tuple)) and cls not in (list, dict, tuple):
        return "dict" if issubclass(cls, dict) else "list" if issubclass(cls, list) else "tuple"
    numpy = sys.modules.get("numpy")
    if issubclass(cls, (str, int, float)) and cls not in (str, int, float, bool) and not (
            numpy is not None and issubclass(cls, numpy.generic)):  # np.float64 travels as numpy
        return next(name for name, base in _SCALARS.items() if issubclass(cls, base))
    dspy = sys.modules.get("dspy")
    if dspy is not None and issubclass(cls, dspy.Example):
        return "prediction" if issubclass(cls, dspy.Prediction) else "example"
    if hasattr(cls, "model_validate_json") and hasattr(cls, "model_fields"):
        return "model"
    return "dataclass" if dataclasses.is_dataclass(cls) else None


def _cls(value: dict[str, Any], resolve: Callable[[str], type | None], where: str) -> type:
    by_token = getattr(resolve, "by_token", None)
    cls = (by_token(value) if by_token is not None else None) or resolve(value["class"])
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


def _completions(fields: dict[str, list[Any]], signature: type | None = None) -> Any:
    from dspy.primitives.prediction import Completions

    return Completions(fields, signature=signature)


def _example(value: dict[str, Any], resolve: Callable[[str], type | None], where: str) -> Any:
    """The Example or Prediction (or subclass) with exactly these fields, input keys, completions and LM usage
    (its class's ``__init__`` does not run again, as for a dataclass)."""
    import dspy

    base = dspy.Prediction if value[TAG] == "prediction" else dspy.Example
    cls = _cls(value, resolve, where) if "class" in value else base
    obj = cls.__new__(cls)
    base.__init__(obj)
    obj._store = _fields(value, resolve, where)
    if "inputs" in value:
        obj._input_keys = set(value["inputs"])
    if "completions" in value:
        completions = value["completions"]
        obj._completions = _completions({k: [v] for k, v in obj._store.items()} if completions == ONE_COMPLETION
                                        else decode(completions, resolve, f"{where}.completions"),
                                        _signature(value, resolve))
    if "usage" in value:
        obj.set_lm_usage(decode(value["usage"], resolve, f"{where}.usage"))
    attrs = decode(value["attrs"], resolve, f"{where}.attrs") if "class" in value and "attrs" in value else {}
    for name, attr in attrs.items():  # a subclass's own attributes: never its state, methods, properties, fields
        static = inspect.getattr_static(cls, name, None) if isinstance(name, str) else None
        if (not isinstance(name, str) or name in _EXAMPLE_STATE or name.startswith("__") or name in obj._store
                or callable(static) or hasattr(static, "__get__")):
            raise NotPortable(f"{where}: {name!r} is not an attribute a {cls.__name__} can get from data", value)
        object.__setattr__(obj, name, attr)
    return obj


def _model(value: dict[str, Any], resolve: Callable[[str], type | None], where: str) -> Any:
    """The pydantic model with exactly this state, set as pydantic's ``__setstate__`` does (no validation)."""
    cls = _cls(value, resolve, where)
    fields, extra = _fields(value, resolve, where), decode(value["extra"], resolve, f"{where}.extra")
    private = decode(value["private"], resolve, f"{where}.private")
    declared, privates = set(cls.model_fields), set(getattr(cls, "__private_attributes__", {}))
    if not (set(fields) <= declared and set(value["set"]) <= declared | set(extra or {})
            and isinstance(extra, dict | None) and isinstance(private, dict | None)
            and set(private or {}) <= privates and all(isinstance(k, str) for k in extra or {})):
        raise NotPortable(f"{where}: the state of a {cls.__name__} has names it does not declare", value)
    obj = cls.__new__(cls)
    obj.__setstate__({"__dict__": fields, "__pydantic_fields_set__": set(value["set"]),
                      "__pydantic_extra__": extra, "__pydantic_private__": private})
    return obj


def _pydantic_type(value: dict[str, Any], where: str) -> type:
    cls = _imported(value["class"], _PYDANTIC)
    if cls is None or not issubclass(cls, _pydantic_values()):
        raise NotPortable(f"{where}: {value['class']} is not one of pydantic's URL types", value)
    return cls


def _code(value: dict[str, Any], resolve: Callable[[str], type | None], where: str) -> Any:
    objects = getattr(resolve, "objects", ())
    if not 0 <= value["index"] < len(objects):
        raise NotPortable(f"{where} is code (a {value['class']}), which travels only from the kernel to the "
                          "workers, by value", value)
    return objects[value["index"]]


def _dataclass(cls: type, fields: dict[str, Any]) -> Any:
    """The instance with exactly these field values, as it was (neither ``__init__`` nor ``__post_init__``
    runs again: a field with ``init=False`` or a derived value comes back as it was)."""
    unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise NotPortable(f"a {cls.__name__} has no field(s) {sorted(unknown)}", fields)
    obj = cls.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(obj, name, value)
    return obj


class Readable:
    """The text a value's repr would read as, for a value that cannot be rebuilt here (its class is the program's
    only): shown where the value would be, never used as the value."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def readable(value: Any, resolve: Callable[[str], type | None] | None = None) -> Any:
    """Encoded ``value`` decoded as far as it can be: each part that cannot (a class the receiver lacks) as a
    ``Readable`` of its class name and parts, as its repr would read (``Point(x=1, y=2)``), the repr the sender made
    for a value without a JSON form."""
    try:
        return decode(value, resolve)
    except NotPortable:
        pass
    if isinstance(value, list):
        return [readable(v, resolve) for v in value]
    if not isinstance(value, dict):
        return value
    if TAG not in value:
        return {k: readable(v, resolve) for k, v in value.items()}
    if value[TAG] == "opaque":
        return Readable(value["repr"])
    name = str(value.get("class", value[TAG])).rpartition(":")[2]
    if isinstance(value.get("fields"), dict):
        return Readable(f"{name}({', '.join(f'{k}={readable(v, resolve)!r}' for k, v in value['fields'].items())})")
    parts = value.get("items", value.get("value", value.get("fields")))
    return Readable(f"{name}({readable(parts, resolve)!r})" if parts is not None else f"<{name}>")


def _opaque_error(value: dict[str, Any], resolve: Callable[[str], type | None], where: str) -> Any:
    if "reason" in value:
        raise NotPortable(f"{where} is {value['reason']} (its repr: {value['repr'][:200]})", value)
    raise NotPortable(f"{where} is a {value['class']}, which has no JSON form, so it cannot come back as "
                      f"itself (its repr: {value['repr'][:200]}); return JSON-able values, pydantic models, "
                      "enums or dataclasses from the program", value)


def _numpy(value: dict[str, Any], resolve: Callable[[str], type | None], where: str) -> Any:
    """The numpy array (or scalar) of these dtype, shape and bytes; a dtype of objects or records is refused."""
    try:
        import numpy
    except ImportError:
        raise NotPortable(f"{where} is a numpy value, and numpy is not installed here", value) from None
    dtype = numpy.dtype(value["dtype"])
    if dtype.hasobject or dtype.fields is not None:
        raise NotPortable(f"{where}: a numpy dtype of objects or records ({dtype}) does not come from data", value)
    array = numpy.frombuffer(base64.b64decode(value["b64"]), dtype=dtype).reshape(value["shape"]).copy()
    return array[()] if value["scalar"] else array


def _dict(items: list[list[Any]], resolve: Callable[[str], type | None], where: str) -> dict[Any, Any]:
    return {decode(k, resolve, where): decode(x, resolve, f"{where}[{k!r}]") for k, x in items}


def _collection(value: dict[str, Any], resolve: Callable[[str], type | None], where: str) -> Any:
    """The list, dict or tuple subclass's instance with these items, put in as its base class puts them (none of
    the subclass's code runs, as for a dataclass)."""
    cls = _cls(value, resolve, where)
    if value[TAG] == "tuple":  # as a namedtuple's own _make makes one, with as many items as it has fields
        items = _items(value, resolve, where)
        if cls in _STRUCTS:  # its own constructor (C code), which checks the items and fields
            fields = value.get("fields", {})
            return cls(items, {name: decode(field, resolve, f"{where}.{name}") for name, field in fields.items()})
        if len(items) != len(getattr(cls, "_fields", items)):
            raise NotPortable(f"{where}: a {cls.__name__} has {len(cls._fields)} fields, not {len(items)}", value)
        return tuple.__new__(cls, items)
    obj = cls.__new__(cls)
    if value[TAG] == "list":
        list.extend(obj, _items(value, resolve, where))
    else:  # an OrderedDict keeps its order apart from the dict's: filled through its own methods
        setitem = collections.OrderedDict.__setitem__ if isinstance(obj, collections.OrderedDict) else dict.__setitem__
        for key, item in _dict(value["items"], resolve, where).items():
            setitem(obj, key, item)
    if "factory" in value:
        if not isinstance(obj, collections.defaultdict) or value["factory"] not in _FACTORIES:
            raise NotPortable(f"{where}: {value['factory']!r} is not a factory a defaultdict gets from data", value)
        obj.default_factory = _FACTORIES[value["factory"]]
    return obj


_DECODERS: dict[str, Callable[[dict[str, Any], Callable[[str], type | None], str], Any]] = {
    "dict": lambda v, r, w: _collection(v, r, w) if "class" in v else _dict(v["items"], r, w),
    "list": lambda v, r, w: _collection(v, r, w),
    **dict.fromkeys(_SCALARS, lambda v, r, w: _SCALARS[v[TAG]].__new__(_cls(v, r, w), v["value"])),  # none of its code
    "tuple": lambda v, r, w: _collection(v, r, w) if "class" in v else tuple(_items(v, r, w)),
    "set": lambda v, r, w: set(_items(v, r, w)),
    "frozenset": lambda v, r, w: frozenset(_items(v, r, w)),
    "list_iterator": lambda v, r, w: iter(_items(v, r, w)),
    "datetime": lambda v, r, w: dt.datetime.fromisoformat(v["iso"]),
    "date": lambda v, r, w: dt.date.fromisoformat(v["iso"]),
    "time": lambda v, r, w: dt.time.fromisoformat(v["iso"]),
    "timedelta": lambda v, r, w: dt.timedelta(days=v["days"], seconds=v["seconds"], microseconds=v["microseconds"]),
    "decimal": lambda v, r, w: Decimal(v["text"]),
    "bigint": lambda v, r, w: int(v["hex"], 16),
    "uuid": lambda v, r, w: uuid.UUID(v["text"]),
    "bytes": lambda v, r, w: base64.b64decode(v["b64"]),
    "enum": lambda v, r, w: _cls(v, r, w)(decode(v["value"], r, w)),
    "model": _model,
    "dataclass": lambda v, r, w: _dataclass(_cls(v, r, w), _fields(v, r, w)),
    "prediction": _example,
    "example": _example,
    "completions": lambda v, r, w: _completions(decode(v["fields"], r, f"{w}.completions"), _signature(v, r)),
    "pydantic": lambda v, r, w: _adapter(_pydantic_type(v, w)).validate_json(v["json"]),
    "code": _code,
    "numpy": _numpy,
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
        elif kind == "tuple":  # a NamedTuple's fields
            stack.extend(t for t in getattr(ann, "__annotations__", {}).values() if not isinstance(t, str))
        elif kind == "model":
            stack.extend(f.annotation for f in ann.model_fields.values())
    return found


def tokens(result: Any) -> tuple[int, int]:
    """(prompt, completion) tokens of a DSPy tool's result, from the usage beside its output (0, 0 if none)."""
    usage = result.get(USAGE) if isinstance(result, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    models = [u for u in usage.values() if isinstance(u, dict)]
    return (sum(_count(u.get("prompt_tokens")) for u in models),
            sum(_count(u.get("completion_tokens")) for u in models))


def _count(value: Any) -> int:
    """A token count as an LM reported it (an int, a float, a str of digits); 0 for one that is no number (an LM of
    one's own may report anything, which DSPy keeps as it is: the call's answer must not fail on the pool's count)."""
    try:
        return int(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0


def cost(result: Any) -> float | None:
    """The USD cost of a DSPy tool's LM calls, from beside its output; None where no LM reported one."""
    value = result.get(COST) if isinstance(result, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def cached(result: Any) -> tuple[int, int]:
    """(LM calls answered from DSPy's cache, all LM calls) of a DSPy tool's result; (0, 0) where none was a hit."""
    value = result.get(CACHED) if isinstance(result, dict) else None
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
        return value[0], value[1]
    return 0, 0


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
