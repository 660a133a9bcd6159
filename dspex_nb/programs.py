"""DSPy programs from the kernel to the pool and their results back, the same as in the kernel.

How code travels: **by value with cloudpickle**, as Ray, Dask and ipyparallel ship notebook code,
and as DSPy itself saves a whole program (``save_program=True``). A module instance arrives with its
state (a compiled program's demos and instructions, its signatures and their types), classes and
functions defined in the notebook arrive by value with the names they use from earlier cells, and
the cells' source goes along so ``inspect.getsource`` works on the workers. Source plus
``dump_state()`` would lose notebook-defined types and helper functions. Pickles only go from the
kernel (which owns the pool) to its workers; nothing from a worker is unpickled or executed here:
results come back as typed JSON (``dspex_nb.typed``) and are rebuilt with the classes the program
was shipped with.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib
import inspect
import io
import json
import linecache
import os
import pickle
import re
import sys
import threading
import types
import typing
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import cloudpickle

from dspex_nb import code_digest, typed
from dspex_nb.errors import (
    LM_STATE,
    ArgumentError,
    CallbacksNotRun,
    LMStateNotKept,
    NotSent,
    StateNotKept,
    TraceIncomplete,
    remote_error,
    warn_kept,
)
from dspex_nb.wire import CACHE, ENV, LM_STALE, LM_VERSION


class KernelOnly(TypeError):
    """Raised by an object that cannot leave the kernel (a ``Pool``) when a program to ship reaches it; its
    message says what to do instead, so no pickling hint is added."""


@dataclasses.dataclass
class Shipped:
    """A program ready for ``define_object``: the payload, the classes that travel in it, and its key (the
    digest of the payload: equal keys are the same program, with the same code, state and types).

    The key also names the program's batches in the journal. Pickles of the same notebook code differ
    between Python processes (hash randomisation reorders sets inside classes), so a batch of a shipped
    program resumes from the journal within a kernel session, while one of source defined with
    ``pool.define(name, source)`` resumes in a later session too."""

    key: str
    program: Any
    pickled: _Pickler
    modules: dict[str, str]  # the digests of the user's modules it names (``code_digest``), in its key and payload
    collected: list[type]  # the classes the pickle holds by value

    @functools.cached_property
    def payload(self) -> str:
        """Made only where the program is installed: a call of one the workers have needs only its key."""
        return _payload(self.pickled, self.modules)

    @functools.cached_property
    def types(self) -> list[type]:
        """Where two share a path (``dspy.Code["python"]`` makes a class per use, a class defined again in a later
        cell), a value's class is found by its token (``typed.token``), else the last wins."""
        return [*self.collected, *_referenced_types(self.program, self.pickled.modules)]


_LOCKS = {type(threading.Lock()): threading.Lock, type(threading.RLock()): threading.RLock}
_DYNAMIC_CODE = "<dynamic-code>"  # the file name cloudpickle gives all code it pickles by value


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, plus what DSPy programs hold that it cannot pickle: a lock (e.g. in a ``dspy.Parallel``
    made in ``__init__``) travels as a new one, as does DSPy's ``Unbatchify`` (``dspy.retrievers.Embeddings``'
    search, whose thread runs where it arrives), a lazily loaded module (``streamify``'s and ``asyncify``'s
    ``anyio``), loaded yet or not, by its name, ``dataclasses.MISSING`` (a dataclass field's default where it has
    none) as itself, which pydantic checks by identity to make a schema of the class, ``streamify``'s stream
    listeners keyed by their predictors' ids, keyed again by the ids those predictors have where they arrive, and
    code with the file name it has in the kernel (a cell's), which cloudpickle drops: ``inspect.getsource`` of a
    notebook function (``dspy.CodeAct`` sends its tools' source to its interpreter) finds the cell's source that
    travels with the program, and a traceback shows the cell's lines (``dspy.ReAct`` puts a failed tool's
    traceback in its trajectory), and a class with its qualified name (``Outer.Inner``, ``make.<locals>.Out``),
    which cloudpickle drops, so that its path, by which its values travel, is the kernel's; a notebook function
    that travels is bound under its name in the globals it arrives with, as in the notebook, so code that finds a
    function by its name finds it there too (``ToolCall.execute()`` looks the tool up in its caller's globals)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.buffer = file
        self.modules: set[str] = set()  # the user's modules from files whose code the pickle names

    def reducer_override(self, obj: Any) -> Any:
        if obj is dataclasses.MISSING:  # by reference: cloudpickle would make a new one, which is not MISSING there
            return getattr, (dataclasses, "MISSING")
        if type(obj) in _LOCKS:
            return _LOCKS[type(obj)], ()
        if type(obj) is getattr(sys.modules.get("dspy.utils.unbatchify"), "Unbatchify", None):
            return type(obj), (obj.batch_fn, obj.max_batch_size, obj.max_wait_time)
        if type(obj) is types.CodeType and obj.co_filename != _DYNAMIC_CODE:
            return _in_file, (obj.replace(co_filename=_DYNAMIC_CODE), obj.co_filename)
        if isinstance(obj, (type, types.FunctionType)) and code_digest.local_module(getattr(obj, "__module__", "")):
            self.modules.add(obj.__module__)
        if type(obj) is defaultdict and _keyed_by_predictor(obj):
            return _by_predictor, ([listener for listeners in obj.values() for listener in listeners],)
        if isinstance(obj, types.ModuleType) and type(obj) is not types.ModuleType and (
                obj.__name__ in sys.modules or obj.__spec__ is not None):
            return importlib.import_module, (obj.__name__,)
        reduced = super().reducer_override(obj)
        if isinstance(obj, type) and obj.__qualname__ != obj.__name__ and (
                state := _reduced_state(reduced, cloudpickle.cloudpickle._make_skeleton_class, 0)) is not None:
            state["__qualname__"] = obj.__qualname__  # which cloudpickle drops: the class's path is its key
        if isinstance(obj, types.FunctionType) and obj.__globals__.get(obj.__name__) is obj:
            slots = _reduced_state(reduced, cloudpickle.cloudpickle._make_function, 1) or {}
            if isinstance(names := slots.get("__globals__"), dict):  # the globals its code names, a copy
                names[obj.__name__] = obj
        return reduced


def _reduced_state(reduced: Any, maker: Any, part: int) -> dict[str, Any] | None:
    """Of cloudpickle's reduction of a class or function by value (made again by ``maker``), its state (``part``
    0) or slot state (1), the dicts it sets where it arrives; None for another reduction, or another layout than
    cloudpickle 3's (state, slotstate)."""
    if not (type(reduced) is tuple and len(reduced) == 6 and reduced[0] is maker):
        return None
    state = reduced[2]
    return state[part] if isinstance(state, tuple) and len(state) == 2 and isinstance(state[part], dict) else None


def _in_file(code: types.CodeType, filename: str) -> types.CodeType:
    """``code`` as cloudpickle rebuilt it, with its file name in the kernel again."""
    return code.replace(co_filename=filename)


def _keyed_by_predictor(mapping: defaultdict[Any, Any]) -> bool:
    """Whether ``mapping`` is ``dspy.streamify``'s stream listeners by the id of the predictor each listens to."""
    listener_class = getattr(sys.modules.get("dspy.streaming.streaming_listener"), "StreamListener", None)
    return bool(mapping) and listener_class is not None and all(
        isinstance(listeners, list) and all(isinstance(listener, listener_class) and id(listener.predict) == key
                                            for listener in listeners)
        for key, listeners in mapping.items())


def _by_predictor(listeners: list[Any]) -> defaultdict[int, list[Any]]:
    """Stream listeners by the id of their predictor in this process, as ``dspy.streamify`` keys them (each has
    its predictor already, so DSPy looks none up in the module it is given)."""
    import dspy
    from dspy.streaming.streaming_listener import find_predictor_for_stream_listeners

    return find_predictor_for_stream_listeners(dspy.Module(), listeners)


class _Collector(_Pickler):
    """A pickler that notes the classes, the code files, the signature names and the modules' callbacks it meets
    (a first pass)."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO())
        self.types: set[type] = set()
        self.files: set[str] = set()
        self.names: dict[types.FunctionType, dict[str, Any]] = {}
        self.callbacks: list[Any] = []  # DSPy pickles a module without its callbacks: they stay behind

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type) and typed.portable_kind(obj):
            self.types.add(obj)
        elif isinstance(obj, getattr(sys.modules.get("dspy"), "Module", ())) and obj.callbacks:
            self.callbacks += obj.callbacks
        elif isinstance(obj, types.FunctionType):
            self.files.add(obj.__code__.co_filename)
            if names := _signature_names(obj):
                self.names[obj] = names
        return super().reducer_override(obj)


def _signature_names(function: types.FunctionType) -> dict[str, Any]:
    """The types of notebook code's globals that its signature strings name (and modules, as in "np.ndarray").

    DSPy resolves a type named in a signature string ("question -> mood: Mood") from the globals of the
    code that makes the signature (the caller's frame), while cloudpickle ships only the globals the code
    names itself: these go along, so that ``__init__`` or a function re-run on a worker finds them too."""
    module = sys.modules.get(function.__module__ or "")
    if module is not None and function.__module__ != "__main__" and function.__globals__ is vars(module):
        return {}  # code of an imported module: it travels by reference, with its module's globals

    def strings(code: types.CodeType) -> Iterator[str]:
        for const in code.co_consts:
            if isinstance(const, str):
                yield const
            elif isinstance(const, types.CodeType):
                yield from strings(const)

    found: dict[str, Any] = {}
    for text in strings(function.__code__):
        found.update(signature_types(text, function.__globals__))
    return found


def signature_types(text: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """The types (and modules, as in "np.ndarray") of ``namespace`` that a signature string names: what DSPy
    finds in the caller's globals when a cell makes ``dspy.Signature(text)``."""
    found: dict[str, Any] = {}
    if "->" in text:
        for name, dot in re.findall(r"([A-Za-z_]\w*)(\.?)", text):
            value = namespace.get(name)
            if isinstance(value, type) or typing.get_origin(value) is not None or (
                    dot and isinstance(value, types.ModuleType)):
                found[name] = value
    return found


def ship(program: Any) -> Shipped:
    """Pickle ``program`` by value, with the classes it uses and the source of its notebook code.

    One pickler does it all: the program (and the names its signature strings use) first, noting what it meets,
    then the whole shipment, whose program and classes are only references to the first pickles in the
    pickler's memo; the worker loads them in order (``worker.programs.unpickled``)."""
    collector = _Collector()
    try:
        pending: list[Any] = [program]
        while pending:  # the program, then the names its signature strings use (and theirs)
            known = len(collector.names)
            collector.dump(pending)
            pending = list(collector.names.values())[known:]
    except Exception as exc:
        if isinstance(exc, KernelOnly):
            raise NotSent("define", type(exc).__name__, f"{type(program).__name__} cannot be sent to the workers: "
                          f"{type(exc).__name__}: {exc}") from None
        raise NotSent("define", type(exc).__name__, f"{type(program).__name__} cannot be sent to the workers: "
                      f"{_unpicklable_part(program, type(program).__name__, exc)} (a program "
                      "travels pickled; a client, a socket or a file open for writing cannot be: create that inside "
                      "the module's forward instead)") from None
    if collector.callbacks:
        _callbacks_not_run(collector.callbacks, "of the program's modules (callbacks=[...]), which DSPy does not "
                           "pickle,")
    sources = {name: linecache.cache[name][2] for name in collector.files
               if name in linecache.cache and len(linecache.cache[name]) == 4}
    collector.dump({"program": program, "types": collector.types, "tokens": typed.with_tokens(collector.types),
                    "sources": sources, "names": list(collector.names.items())})
    modules = code_digest.digests(collector.modules)
    return Shipped(_key(collector, modules), program, collector, modules, collector.types)


_PART_DEPTH = 12  # levels of attributes, items and closure variables searched for the part that cannot be pickled


def _unpicklable_part(value: Any, path: str, error: Exception) -> str:
    """Why ``value`` (named ``path``) failed to pickle with ``error``: "P (a T) cannot be pickled: E" of its
    innermost part P that fails itself, searching its attributes, items, class and its functions' variables; "E"
    where no part of it fails alone."""
    found = None
    for _ in range(_PART_DEPTH):
        failing = next(((name, part, failed) for name, part in _parts(value)
                        if (failed := _pickle_error(part)) is not None), None)
        if failing is None:
            break
        name, value, error = failing
        path, found = path + name, value
    shown = f"{type(error).__name__}: {error}"
    return shown if found is None else f"{path} (a {type(found).__name__}) cannot be pickled: {shown}"


def _parts(value: Any) -> list[tuple[str, Any]]:
    """The parts of ``value`` that pickling it pickles by value, each with how a path names it."""
    if isinstance(value, dict):
        return [(f"[{key!r}]", part) for key, part in value.items()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [(f"[{i}]", part) for i, part in enumerate(value)]
    if isinstance(value, types.FunctionType):
        cells = zip(value.__code__.co_freevars, value.__closure__ or (), strict=True)
        named = [(name, part) for name, cell in cells if (part := _cell_value(cell, value)) is not value]
        named += [(name, value.__globals__[name]) for name in value.__code__.co_names if name in value.__globals__]
        return [(f"'s variable {name!r}", part) for name, part in named]
    if isinstance(value, type):
        return [(f".{name}", part) for name, part in vars(value).items() if isinstance(part, types.FunctionType)]
    if isinstance(value, types.ModuleType) or not hasattr(value, "__dict__"):
        return []
    return [*((f".{name}", part) for name, part in vars(value).items()), (f"'s class {type(value).__name__}",
                                                                          type(value))]


def _cell_value(cell: types.CellType, unset: Any) -> Any:
    """What a closure's variable holds, ``unset`` where it was never set (or deleted)."""
    try:
        return cell.cell_contents
    except ValueError:
        return unset


def _pickle_error(value: Any) -> Exception | None:
    try:
        _Pickler(io.BytesIO()).dump(value)
    except Exception as exc:
        return exc
    return None


def _referenced_types(program: Any, modules: set[str]) -> list[type]:
    """The classes a program's results may hold that its pickle names only by reference, so that they are
    known when its results are read: the classes of the user's modules that it uses, and its predictors' field
    types (a signature class of an imported module travels by reference, its fields with it), output fields
    last: where an input and an output field have two classes of one path (``dspy.Code["python"]`` twice), a
    result's value is the output field's class, as DSPy parses it in the kernel."""
    found: list[type] = []
    for name in modules:
        found.extend(value for value in vars(sys.modules[name]).values()
                     if isinstance(value, type) and value.__module__ == name and typed.portable_kind(value))
    predictors = getattr(program, "predictors", None)
    for predictor in predictors() if callable(predictors) and not isinstance(program, type) else ():
        signature = predictor.signature
        found.append(signature)  # the signature its completions are made under (dspy.majority reads it)
        for fields in (signature.input_fields, signature.output_fields):
            for info in fields.values():
                found.extend(typed.types_in(info.annotation))
    return found


def _payload(pickler: _Pickler, modules: dict[str, str]) -> str:
    """What ``pickler`` pickled, for the workers (base64, as a call's argument).

    Beside the pickle go the kernel's import path, so that a module it names by reference is imported
    there from where the kernel imports it (such as a folder the notebook added to ``sys.path``, or the
    directory it ``%cd``-ed to), and the digests of the user's modules among those (``modules``: ``code_digest``),
    so that a worker runs their code as the kernel has it now; an edited module makes another key (``_key``)."""
    path = list(dict.fromkeys(os.path.abspath(entry or os.curdir) for entry in sys.path if isinstance(entry, str)))
    data = (path, modules, pickler.buffer.getvalue())
    return base64.b64encode(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)).decode()


def _key(pickler: _Pickler, modules: dict[str, str]) -> str:
    """The digest of what ``pickler`` pickled and of the digests of the user's modules it names (``_payload``)."""
    digest = hashlib.sha256(pickler.buffer.getbuffer())
    digest.update(json.dumps(modules).encode())
    return digest.hexdigest()


SHIPPED_SETTINGS = ("adapter", "allow_tool_async_sync_conversion", "max_errors", "num_threads", "rm",
                    "interpreter_factory", "track_usage")  # the kernel's DSPy settings that a call on the pool runs
# under where they are not DSPy's defaults (the LM is the pool's own, or one dspy.context sets: context_lm);
# small objects, sent with each call


def kernel_settings(lm: Any = None, env: dict[str, str | None] | None = None) -> str:
    """The kernel's DSPy settings of SHIPPED_SETTINGS that are set now to other than DSPy's defaults (by
    ``dspy.configure`` or inside ``dspy.context``), the tiers of its DSPy cache that are off
    (``dspy.configure_cache``), and ``lm`` where given (one ``dspy.context`` sets: ``context_lm``, sent without
    its history), pickled for the workers as a program is, with ``env`` (the kernel's environment variables
    changed since the pool started: ``environment.Changes``); "" when there are none."""
    dspy_settings = getattr(sys.modules.get("dspy"), "settings", None)  # None while DSPy is still importing
    if dspy_settings is None:
        return _by_value({ENV: env}, "the kernel's environment") if env else ""
    from dspy.dsp.utils.settings import DEFAULT_CONFIG

    if dspy_settings.callbacks:
        _callbacks_not_run(dspy_settings.callbacks, "of the kernel (dspy.configure or dspy.context)")
    values = {name: value for name in SHIPPED_SETTINGS
              if (value := getattr(dspy_settings, name, None)) != DEFAULT_CONFIG.get(name)}
    if cache := cache_settings():
        values[CACHE] = cache  # dspy.configure_cache(...): the pool's calls use a cache made the same way
    if lm is not None:
        if getattr(lm, "callbacks", None):
            _callbacks_not_run(lm.callbacks, f"of the LM {getattr(lm, 'model', '')!r} (dspy.context)")
        values["lm"] = copy.copy(lm)
        values["lm"].history, values["lm"].callbacks = [], []  # its calls there come back with the call
    if env:
        values[ENV] = env
    if not values:
        return ""
    try:
        return _by_value(values, f"the kernel's DSPy settings {sorted(set(values) - {ENV})}",
                         " (a call on the pool runs under them, as it would in the kernel: give them values that can "
                         "be pickled, or set them to None around the pool's calls with dspy.context)")
    except ArgumentError:
        if lm is not None:  # name the LM where it is the one that cannot be sent, not "the settings ['lm']"
            named = f"the LM {type(lm).__name__} {getattr(lm, 'model', '')!r} that dspy.context(lm=...) sets"
            _by_value(values["lm"], f"{named} around this call", " (it travels with the call, as DSPy runs the call "
                      "on it: give it attributes that can be pickled, or make this call in the kernel)")
        raise


def context_lm() -> Any:
    """The LM that ``dspy.context(lm=...)`` sets around a call made now (which DSPy runs the call on rather than
    the configured one), or None where none is set, or DSPy is not imported (or still importing: a first cell's
    thread may be importing it)."""
    overrides = getattr(sys.modules.get("dspy.dsp.utils.settings"), "thread_local_overrides", None)
    return None if overrides is None else overrides.get().get("lm")


def cache_settings() -> dict[str, Any]:
    """The arguments of ``dspy.configure_cache`` that made the kernel's DSPy cache, those that differ from DSPy's
    defaults: its tiers, disk folder and limits (diskcache keeps a folder's size limit in it, and whoever opens it
    last sets it), and the types it unpickles where it restricts them (``restrict_pickle=True``: a folder others
    may write to). Empty while DSPy has not made a cache yet (it makes its default one when first read)."""
    global _made
    import dspy

    cache = vars(dspy).get("cache")
    if cache is None:
        return {}
    if _made[0] is not cache:  # read once per cache (configure_cache makes a new one): every call sends them
        _made = (cache, _made_with(cache))
    return _made[1]


_made: tuple[Any, dict[str, Any]] = (None, {})  # the kernel's DSPy cache last seen, and its cache_settings


def _made_with(cache: Any) -> dict[str, Any]:
    import dspy

    made = {"enable_disk_cache": cache.enable_disk_cache, "enable_memory_cache": cache.enable_memory_cache,
            "disk_cache_dir": cache.disk_cache_dir,
            "memory_max_entries": getattr(cache.memory_cache, "maxsize", None)}
    disk = cache.disk_cache if cache.enable_disk_cache else None
    if disk is not None and hasattr(disk, "size_limit") and hasattr(disk, "_count"):  # diskcache's FanoutCache
        made["disk_size_limit_bytes"] = round(disk.size_limit * disk._count)  # its shards share the limit
    if (safe := _unpickled_only(cache)) is not None:
        made.update(restrict_pickle=True, safe_types=safe)
    defaults = {name: parameter.default
                for name, parameter in inspect.signature(dspy.configure_cache).parameters.items()}
    defaults["disk_cache_dir"] = os.fspath(defaults["disk_cache_dir"])
    return {name: value for name, value in made.items()
            if value is not None and name in defaults and value != defaults[name]}


def _unpickled_only(cache: Any) -> list[tuple[str, str]] | None:
    """The (module, qualname) pairs of the ``safe_types`` that ``cache``'s disk tier unpickles besides DSPy's own
    where it was made with ``restrict_pickle=True`` (it then refuses any other entry, as one planted in a shared
    folder), else None. DSPy keeps them only on the disk class it made for them."""
    from dspy.clients.disk_serialization import _RestrictedDisk

    disk = getattr(getattr(cache, "disk_cache", None), "_disk", None)
    return sorted(disk._allowed) if isinstance(disk, type) and issubclass(disk, _RestrictedDisk) else None


def _callbacks_not_run(callbacks: list[Any], which: str) -> None:
    """Say that these DSPy callbacks are not called for the pool's calls: once per set and line of the user's
    (the default warning filter)."""
    names = sorted({type(callback).__name__ for callback in callbacks})
    warnings.warn(f"the DSPy callbacks {names} {which} do not run on the pool: its calls run in the worker "
                  "processes, out of their sight; run the program in the kernel to have them called",
                  CallbacksNotRun, stacklevel=callers_level())


_LM_DEFAULTS = {"model_type": "chat", "cache": True, "num_retries": 3}  # dspy.LM's, left out of a pool's settings


def kernel_lm() -> tuple[str, dict[str, Any]] | None:
    """The kernel's DSPy LM now (``dspy.configure(lm=...)``, or inside ``dspy.context(lm=...)``) as a pool's
    LM: ``(model, settings)`` ("demo" with its knobs for the demo LM); None when none is set or DSPy is not
    imported. A ValueError for an LM that is not a ``dspy.LM``, which a pool cannot start from a model string."""
    dspy = sys.modules.get("dspy")
    lm = getattr(getattr(dspy, "settings", None), "lm", None)
    if lm is None:
        return None
    if not isinstance(lm, dspy.LM):  # type: ignore[union-attr]
        raise ValueError(f"the kernel's DSPy LM is a {type(lm).__name__}, not a dspy.LM, so a pool cannot start "
                         "it from a model string: give the pool 'demo' or a dspy.LM model string (Pool(lm=...), "
                         "%dspex lm ...), or set this one around the pool's calls with dspy.context(lm=...), with "
                         "which it travels")
    kwargs = {key: value for key, value in lm.kwargs.items() if value is not None}
    if lm.model == "demo/demo":
        from dspex_nb.worker.demo_lm import DemoEngine

        engine, default = lm._engine_spec, DemoEngine()
        knobs = {key: value for key, value in vars(engine).items() if not key.startswith("_")
                 and value != getattr(default, key)} if isinstance(engine, DemoEngine) else {}
        return "demo", {**knobs, **kwargs}
    engine = getattr(lm, "_engine_spec", "auto")  # dspy.LM(model, engine=...): DSPy's "auto", "litellm", "lm15"
    if not isinstance(engine, str):  # or an object of the user's, which a model string does not make again
        raise ValueError(f"the kernel's DSPy LM {lm.model!r} runs an engine of its own ({type(engine).__name__}), "
                         "so a pool cannot start it from its model string: give the pool another LM (Pool(lm=...), "
                         "%dspex lm ...), or set this one around the pool's calls with dspy.context(lm=...), "
                         "with which it travels")
    if engine != "auto":
        kwargs["engine"] = engine
    if "max_completion_tokens" in kwargs and "max_completion_tokens" not in lm.dump_state():
        kwargs["max_tokens"] = kwargs.pop("max_completion_tokens")  # a reasoning model's: dspy.LM takes max_tokens
    settings = {key: getattr(lm, key) for key, default in _LM_DEFAULTS.items() if getattr(lm, key) != default}
    return lm.model, {**settings, **kwargs}


def callers_level() -> int:
    """The ``stacklevel`` of a warning issued here that names the first caller outside dspex_nb (the user's line)."""
    level, frame = 2, sys._getframe(2)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "dspex_nb":
        level, frame = level + 1, frame.f_back
    return level


def _by_value(value: Any, what: str, hint: str = "") -> str:
    """``value`` pickled by value for the workers (base64, as a call's argument); an ArgumentError naming
    ``what`` if it cannot be."""
    pickler = _Pickler(io.BytesIO())
    try:
        pickler.dump(value)
    except Exception as exc:
        raise NotSent("run", type(exc).__name__,
                      f"{what} cannot be sent to the workers: {type(exc).__name__}: {exc}{hint}") from None
    return _payload(pickler, code_digest.digests(pickler.modules))


def shipment(ship: typed.Shipment, resolver: typed.Resolver) -> tuple[str, typed.Resolver]:
    """What inputs' encoding collected in ``ship`` that must travel by value beside them (their code, their
    classes that ``resolver``, the program's, does not know as themselves), as the ``shipped`` argument of
    ``run_module`` / ``batch_inference`` ("" when nothing must); and the resolver for the call's result,
    which knows those classes too (a program may return its inputs)."""
    types = {cls for cls in ship.types if not resolver.knows(cls)}
    if not types and not ship.objects:
        return "", resolver
    payload = _by_value(typed.Shipment(types, ship.objects, typed.with_tokens(types)), "the inputs",
                        " (code in them, e.g. a dspy.Tool's function, travels by value and must be picklable)")
    return payload, typed.Resolver([*resolver.classes, *types])


def as_program(obj: Any, cot: bool = False) -> Any:
    """A signature (class or string) as a dspy.Predict (dspy.ChainOfThought with ``cot``); else ``obj``."""
    import dspy

    if isinstance(obj, str) or (isinstance(obj, type) and issubclass(obj, dspy.Signature)):
        return (dspy.ChainOfThought if cot else dspy.Predict)(obj)
    return obj


def title(program: Any) -> str:
    """How a view names a program: a defined name or signature string as it is, a class (a module or signature
    class, a function) by its name, an instance by its class's ("Predict('question -> answer')" for a
    predictor of a signature)."""
    if isinstance(program, str):
        return repr(program) if is_signature(program) else program
    name = getattr(program, "__name__", None) if isinstance(program, type) or callable(program) else None
    if isinstance(name, str):
        return name
    signature = getattr(program, "signature", None)
    text = getattr(signature, "signature", None)  # a predictor's "question -> answer"
    kind = type(program).__name__
    return f"{kind}({text!r})" if isinstance(text, str) else kind


def input_names(program: Any) -> list[str] | None:
    """The input field names of a signature class or string, or of a module's signature; None if unknown."""
    import dspy

    if isinstance(program, str) or (isinstance(program, type) and issubclass(program, dspy.Signature)):
        return list(dspy.ensure_signature(program).input_fields)
    return None


def open_trace() -> list[Any] | None:
    """The DSPy trace opened around this call (``dspy.context(trace=[])``, where BootstrapFewShot, SIMBA, GEPA and
    ``dspy.Refine`` read the predictor calls of a program), which a call on the pool adds its program's predictor
    calls to, as DSPy adds them in the kernel; None where none is open (the kernel's global trace, which they do
    not read, is left out, so that a call need not bring its predictor calls back)."""
    dspy_settings = getattr(sys.modules.get("dspy"), "settings", None)
    trace = getattr(dspy_settings, "trace", None)
    if trace is None or dspy_settings.max_trace_size <= 0:  # type: ignore[union-attr]
        return None
    from dspy.dsp.utils.settings import main_thread_config

    return None if trace is main_thread_config.get("trace") else trace


def add_to_trace(trace: list[Any], program: Any, steps: list[Any], resolve: typed.Resolver) -> None:
    """A call's predictor calls on the pool (``typed.TRACE``: ``[name, inputs, prediction]``) added to ``trace``
    with the kernel's own predictors of ``program`` (by their names), as DSPy's ``Predict`` adds its calls; a
    ``TraceIncomplete`` warning for those whose predictor the kernel's program does not hold as its own."""
    import dspy

    predictors = dict(program.named_predictors()) if isinstance(program, dspy.Module) else {}
    if missing := [name for name, _, _ in steps if name not in predictors]:
        warn_kept(f"{len(missing)} predictor call(s) of the program on the pool are not in the kernel's DSPy trace "
                  "(dspy.settings.trace), which optimizers read: their predictors are not the program's own "
                  "(named_predictors), so the kernel has no object for them; run a dspy.Module instance that holds "
                  "them as attributes", TraceIncomplete, callers_level())
    for name, inputs, outputs in steps:
        if name in predictors:
            if len(trace) >= dspy.settings.max_trace_size:
                trace.pop(0)
            trace.append((predictors[name], typed.decode(inputs, resolve, "trace"),
                          typed.decode(outputs, resolve, "trace")))


def wants_history() -> bool:
    """Whether a call should bring its LM calls' DSPy history back (DSPy is imported here, history not off)."""
    dspy_settings = getattr(sys.modules.get("dspy"), "settings", None)
    return dspy_settings is not None and not dspy_settings.disable_history


class _History:
    """Stands for the LM in DSPy's ``record_history`` (which also keeps each entry in its client's history)
    where the pool's LM has no object here."""

    history: list[Any] = []


def history_recorder(program: Any) -> Callable[..., None] | None:
    """For a batch of ``program`` started now: ``record_history`` of each item's entries (with the resolver of the
    batch's classes, ``resolve=``, and the kernel's LM that stands for the one they ran on, ``lm=``) as it arrives,
    inside the kernel's modules around this call, wherever it runs; None where the kernel keeps no history
    (``wants_history``)."""
    import dspy

    if not wants_history():
        return None
    return partial(record_history, program=program, outer=list(dspy.settings.caller_modules or []),
                   held=lms_held(program))


def lms_held(program: Any) -> dict[tuple[Any, ...], Any]:
    """The LMs ``program``'s modules hold, by where (``[module name, attribute(, index or key)]``), as the worker
    names the one that made a call or changed as it answered: taken when the call is made, so that an LM set in
    their place while it runs (``set_lm``) gets neither the history nor the state of the one it ran on."""
    if not any(cls.__name__ == "BaseModule" and cls.__module__.startswith("dspy.") for cls in type(program).__mro__):
        return {}  # only a module holds one; known without importing DSPy, which a first cell imports in a thread
        # meanwhile (a signature string's call): the call must not wait for that import
    from dspex_nb.worker.programs import held_lms, sub_modules

    return held_lms(sub_modules(program))


def _held_lm(held: dict[tuple[Any, ...], Any], where: Any) -> Any:
    """The LM of ``held`` (``lms_held``) at ``where``, as the worker sent it, or None."""
    if not (isinstance(where, list) and all(type(part) in (str, int) for part in where)):
        return None
    return held.get(tuple(where))


def record_history(entries: list[dict[str, Any]], program: Any, lm: Any, resolve: typed.Resolver,
                   held: dict[tuple[Any, ...], Any], outer: list[Any] | None = None) -> None:
    """A call's LM history entries recorded as DSPy records them in the kernel: in DSPy's history
    (``dspy.inspect_history``), in that of each of ``program``'s modules that made the call (by the names
    ``typed.HISTORY_MODULES`` gives, with the kernel's modules around the call), and in the history of the kernel's
    LM that stands for the one that ran it: the program's LM of the name that made it (a predictor's ``set_lm`` one,
    or one a module holds and calls itself, ``self.untrusted_model``, also in a list or dict, ``self.lms[1]``), else
    the LM of the nearest module around the call that has one, else ``lm`` (the kernel's DSPy LM, where it is the
    pool's); of the same model only. An entry's ``response`` is the object DSPy's LM made (an lm15 ``Response``),
    rebuilt with ``resolve``; one of another class (litellm's ``ModelResponse``) is a dict of its fields. ``outer``:
    the kernel's modules around the call (None: those around this thread now); ``held``: ``lms_held`` of the
    program when the call was made."""
    import dspy
    from dspy.clients.base_lm import record_history as record

    from dspex_nb.worker.programs import sub_modules  # the names the worker gave, found as fast

    modules = dict(sub_modules(program))
    outer = list(dspy.settings.caller_modules or []) if outer is None else outer
    for entry in entries:
        if "response" in entry:
            try:
                entry["response"] = typed.decode(entry["response"], resolve, "response")
            except typed.NotPortable:  # a class this kernel's DSPy lacks: its typed JSON, readable as it is
                pass
        callers = [modules[name] for name in entry.pop(typed.HISTORY_MODULES, ()) if name in modules]
        ran = _held_lm(held, entry.pop(typed.HISTORY_LM, None))
        own = ran or next((module.lm for module in reversed(callers) if getattr(module, "lm", None) is not None), lm)
        client = own if isinstance(getattr(own, "history", None), list) and getattr(
            own, "model", None) == entry.get("model") else _History
        with dspy.context(caller_modules=[*outer, *callers]):
            record(client, entry)


def keep_lm_state(changes: list[dict[str, Any]], held: dict[tuple[Any, ...], Any], lm: Any, resolve: typed.Resolver,
                  batch: bool = False, answered: bool = True) -> None:
    """Set on the kernel's LMs the attributes that their copies changed on a worker as they answered (the
    worker's ``_LMStates``): the one ``dspy.context`` set around the call (``lm``), and those the program held when
    the call was made (``held``, ``lms_held``), by where the worker found them; so the next call starts where this
    one left, as in the kernel. In a ``batch`` each worker changed a copy of its own, and values that cannot travel
    cannot be set: an ``LMStateNotKept`` warning says so, and in the second case the LM is marked
    (``wire.LM_STALE``), which the pool then refuses to run, as it would not answer as in the kernel (this call's
    answer is kept, where it ``answered``: not where the call failed). A change made on a copy older than the
    kernel's LM (``wire.LM_VERSION``: another call on the pool, sent before this one came back, changed it since) is
    not kept either: both changed the state the kernel's LM had when they were sent, and the kernel would have made
    the second change on top of the first; the warning says so."""
    kept: dict[int, str] = {}  # id of a kernel LM this call's changes were set on -> the label of the copy it took
    for change in changes:
        named = f"the LM {change.get('name')} that {change.get('label')}"
        changed = sorted([*change.get("changed", []), *change.get("removed", [])])
        if batch:
            warn_kept(f"{named} changed its attribute(s) {changed} as it answered on the pool: in a batch, each "
                      "worker changes a copy of its own, and the kernel's LM is left as it was", LMStateNotKept,
                      callers_level())
            continue
        target = lm if change.get("lm") is None else _held_lm(held, change["lm"])
        if target is None:  # the kernel's program no longer holds it
            continue
        values = _new_values(change, resolve)
        with _LM_STATE_LOCK:  # two calls' results read at once (threads, views) must not both take the same version
            overtaken = _overtaken(target, change, kept)
            outcome = None if overtaken else _take_change(target, change, values, changed)
        if overtaken:
            warn_kept(f"{named} changed its attribute(s) {changed} as it answered on the pool, but {overtaken}: its "
                      "change is kept, not this one's (in the kernel, this one would have started where that one left)",
                      LMStateNotKept, callers_level())
        elif isinstance(values, typed.NotPortable):
            warn_kept(f"{named} {outcome}: {'this answer is kept, and ' if answered else ''}the pool refuses this LM's "
                      "next calls", LMStateNotKept, callers_level())
        elif outcome is not None:
            warn_kept(f"{named} changed its attribute(s) {changed} as it answered on the pool, but the kernel's LM "
                      f"refused to take them ({outcome}), so it does not start where the call left", LMStateNotKept,
                      callers_level())
        else:
            kept[id(target)] = change.get("label", "")


_LM_STATE_LOCK = threading.Lock()  # keep_lm_state's check of an LM's version and the change it then sets, one step


def _new_values(change: dict[str, Any], resolve: typed.Resolver) -> dict[str, Any] | typed.NotPortable:
    """The attributes a change (``keep_lm_state``) sets, decoded; the ``NotPortable`` that says why it cannot be."""
    try:
        if "unsent" in change:
            raise typed.NotPortable(change["unsent"])
        return {name: typed.decode(value, resolve, name) for name, value in change.get("attributes", {}).items()}
    except typed.NotPortable as exc:
        return exc


def _take_change(target: Any, change: dict[str, Any], values: dict[str, Any] | typed.NotPortable,
                 changed: list[str]) -> str | None:
    """Set a change's ``values`` on the kernel's LM ``target`` and count it (``wire.LM_VERSION``), or, where they
    cannot come back, mark it (``wire.LM_STALE``); None where set, else what the warning says: why it is marked,
    or what the LM's own code raised as it refused them (a property without a setter: the answer stays)."""
    if isinstance(values, typed.NotPortable):
        stale = (f"changed its attribute(s) {changed} on the pool as it answered, which cannot come back to the kernel "
                 f"({values}), so it would not answer as in the kernel; run calls on this LM in the kernel, or use a "
                 "new one")
        with contextlib.suppress(AttributeError, TypeError):  # an LM with __slots__ or a read-only attribute
            setattr(target, LM_STALE, stale)
        return stale
    try:
        for name, value in values.items():
            setattr(target, name, value)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    for name in change.get("removed", []):
        with contextlib.suppress(AttributeError):
            delattr(target, name)
    with contextlib.suppress(AttributeError, TypeError):  # an LM with __slots__ only: calls in flight go unchecked
        setattr(target, LM_VERSION, getattr(target, LM_VERSION, 0) + 1)
    return None


def _overtaken(target: Any, change: dict[str, Any], kept: dict[int, str]) -> str | None:
    """Why the kernel's LM ``target`` took another copy's change in place of ``change``'s, if it did: the same LM
    was two copies on the worker (the LM ``dspy.context`` set, which travels with the call, and one the program
    holds, which travels with the program), or another call on the pool, in flight meanwhile, changed it since
    this one was sent (``wire.LM_VERSION``)."""
    if id(target) in kept:
        return f"on the pool it was also the LM that {kept[id(target)]}, a copy of its own (they travel apart)"
    if getattr(target, LM_VERSION, 0) != change.get("version", 0):
        return "another call on the pool changed it since this one was sent"
    return None


def keep_failed_lm_state(error: BaseException, held: dict[tuple[Any, ...], Any], lm: Any,
                         resolve: typed.Resolver) -> None:
    """``keep_lm_state`` of the changes a failed call's LMs made before it failed (``error`` brings them,
    ``errors.LM_STATE``), once: a ``DummyLM`` given a list whose answer the program could not parse gives its next
    one at the next call, as in the kernel."""
    try:
        changes = vars(error).pop(LM_STATE, None)
    except Exception:  # a class of the program's whose __dict__ raises: remote_error could not set them either
        return
    if changes:
        keep_lm_state(changes, held, lm, resolve, answered=False)


def usage_tracked() -> bool:
    """Whether the kernel's DSPy tracks LM usage now (``dspy.configure(track_usage=True)``, or in a context)."""
    return bool(getattr(getattr(sys.modules.get("dspy"), "settings", None), "track_usage", False))


def open_usage_tracker() -> list[Any]:
    """The usage tracker that the kernel's DSPy has open around this call (``with dspy.track_usage()``, or the one
    a module opens with ``track_usage`` on), in a list that ``to_output`` empties when it adds the call's LM usage
    there, so that it is added once however often a stream's result is read; empty where none is open."""
    tracker = getattr(getattr(sys.modules.get("dspy"), "settings", None), "usage_tracker", None)
    return [] if tracker is None else [tracker]


def to_output(result: Any, resolve: typed.Resolver, trace: tuple[list[Any], Any] | None = None,
              program: Any = None, fill_usage: bool = True, lm: Any = None, tracker: list[Any] | None = None,
              batch: bool = False, held: dict[tuple[Any, ...], Any] | None = None,
              warned: set[str] | None = None) -> Any:
    """A DSPy tool's result as the program gave it: a dspy.Prediction of its fields, or its own value; with
    ``trace`` (``open_trace()`` and the kernel's program), its predictor calls are added there, and its LM
    calls' history entries go to DSPy's history (``dspy.inspect_history``, and ``program``'s own where it keeps
    one, ``lm``'s where it ran them: ``record_history``), as in the kernel; each once (a stream's ``result()`` may
    be read again). A Prediction has the LM
    usage DSPy set on it; with ``fill_usage`` (for a call made while the kernel did not track usage, in which
    DSPy sets none), the call's usage where it has none. With ``tracker`` (``open_usage_tracker()``), the call's
    usage joins that tracker, as its LM calls add theirs in the kernel (one entry per model, with their sums). The
    attributes its LMs changed as they answered are set on the kernel's (``keep_lm_state``; a ``batch`` item's are
    not, and a warning says so). ``held``: ``lms_held`` of ``program`` when the call was made (None: now).
    ``warned``: the programs whose ``StateNotKept`` was shown (a pool's), shown once each."""
    import dspy

    if tracker and isinstance(result, dict) and isinstance(result.get(typed.USAGE), dict):
        usage_tracker = tracker.pop()
        for model, counts in result[typed.USAGE].items():
            usage_tracker.add_usage(model, counts)
    steps = result.pop(typed.TRACE, None) if isinstance(result, dict) else None
    if isinstance(result, dict) and (changed := result.pop(typed.STATE_CHANGED, None)):
        _state_not_kept(*changed, warned)
    if trace is not None and steps is not None:
        add_to_trace(*trace, steps, resolve)
    if isinstance(result, dict) and (typed.HISTORY in result or typed.LM_STATE in result):
        held = ({} if batch else lms_held(program)) if held is None else held
        # each taken in one step: a batch item is decoded by the loop over the batch and by its view's pump at once
        if (history := result.pop(typed.HISTORY, None)) is not None:
            record_history(history, program, lm, resolve, held)
        if (changes := result.pop(typed.LM_STATE, None)) is not None:
            keep_lm_state(changes, held, lm, resolve, batch)

    if isinstance(result, dict) and result.get(typed.TAG) == "output":
        output = typed.decode(result["value"], resolve, "output")
    else:
        tagged = {typed.TAG: "prediction", "fields": {k: v for k, v in result.items() if k not in typed.RESERVED}}
        completions = result.get(typed.COMPLETIONS, typed.ONE_COMPLETION)  # no key: the fields are its one answer
        if completions is not None:
            tagged["completions"] = completions
        if typed.SIGNATURE in result:
            tagged["signature"] = result[typed.SIGNATURE]
        if typed.LM_USAGE in result:
            tagged["usage"] = result[typed.LM_USAGE]
        output = typed.decode(tagged, resolve, "output")
    if fill_usage and isinstance(output, dspy.Prediction) and output.get_lm_usage() is None and typed.USAGE in result:
        output.set_lm_usage(result[typed.USAGE])
    return output


STATE_NOT_KEPT = (
    "{0} changed its own state as it ran on the pool (an attribute of one of its modules, or a value of the notebook "
    "that its code changes, such as a dict or list it adds to): that change stays on the worker and does not come "
    "back, so the kernel's {0} is as it was and its next call on the pool starts from that state again, where in the "
    "kernel it would start from the changed one. Return what a call changes and update the notebook's state from the "
    "result, or run the program in the kernel")


def _state_not_kept(name: str, label: str, warned: set[str] | None) -> None:
    """The ``StateNotKept`` warning of the program ``name`` (``label`` to the user), once per name in ``warned``
    (a pool's: once per program and pool; a later call's change is the same story, and its answer is right)."""
    if warned is not None:
        if name in warned:
            return
        warned.add(name)
    warn_kept(STATE_NOT_KEPT.format(label), StateNotKept, callers_level())


def is_signature(value: Any) -> bool:
    """A one-line DSPy signature string ("question -> answer: float"), not Python source or a name."""
    return isinstance(value, str) and "->" in value and "\n" not in value.strip() and not value.strip().startswith(
        ("def ", "class ", "import ", "from "))


def item_inputs(items: Any, tool: str = "map", ship: typed.Shipment | None = None) -> list[Any]:
    """Batch items as typed JSON inputs: strings, dicts, dspy.Examples (their inputs()), or a DataFrame's rows
    (with ``ship``, their classes and code collected there, see ``typed.encode``)."""
    import dspy

    if type(items).__name__ == "DataFrame" and hasattr(items, "to_dict"):
        items = items.to_dict("records")
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        raise ArgumentError(tool, "ArgumentError", "items must be a list of strings, dicts or dspy.Examples, or a "
                            f"pandas DataFrame; got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dspy.Example):
            if item._input_keys is None:
                raise ArgumentError(tool, "ArgumentError", f"items[{i}] is a dspy.Example without input keys: "
                                    "mark them with .with_inputs('question', ...), as dspy.Evaluate needs too")
            item = dict(item.inputs())
        out.append(sendable(item, ship, tool, f"items[{i}]", f"items[{i}] is"))
    return out


def sendable(value: Any, ship: typed.Shipment | None, tool: str, where: str, subject: str) -> Any:
    """``value`` as typed JSON for the workers (an input, an item), or a NotSent naming the part of it that
    cannot go (``where``: ``items[3]['when']``), or saying that it is too deep (``subject``: "items[3] is")."""
    try:
        encoded = typed.encode(value, ship)
    except RecursionError:
        raise NotSent(tool, "ArgumentError", f"{subject} nested too deeply to be sent to the workers "
                      f"(over {sys.getrecursionlimit()} levels), or a value in it contains itself") from None
    if problem := typed.unsendable(encoded, where):
        raise NotSent(tool, "ArgumentError", problem)
    return encoded


class Replay:
    """A stand-in program for ``dspy.Evaluate``: it answers each devset example with what the pool's batch
    returned for it (raising that item's error where it failed), so DSPy scores the pool's outputs."""

    def __init__(self, devset: Sequence[Any], batch: Any) -> None:
        self._answers: dict[str, list[Any]] = {}
        for example, record in zip(devset, batch.records, strict=True):
            self._answers.setdefault(_inputs_key(dict(example.inputs())), []).append(record)
        self._decode = batch.decode

    def __call__(self, **inputs: Any) -> Any:
        queue = self._answers.get(_inputs_key(inputs))
        if not queue:
            raise RuntimeError(f"the pool returned nothing for {inputs!r}")
        record = queue.pop(0)
        if record is None:
            raise RuntimeError("the batch stopped before this example ran")
        if not record["ok"]:  # as the program's own error, which DSPy logs as str(exc)
            raise remote_error("batch_inference", record["error"], record.get("worker", ""))
        return self._decode(record["result"])


def _inputs_key(inputs: dict[str, Any]) -> str:
    return json.dumps(typed.encode(inputs), sort_keys=True)
