"""Programs a worker keeps by name: defined from Python source, or shipped from the kernel by value.

A program is a ``dspy.Module`` class (a new instance per call) or instance (that very object, e.g. a
compiled program with its demos), a signature class (run as ``dspy.Predict``), or a plain function.
Its input names come from what it really takes: ``forward``'s (or a ``__call__``-only module's)
named parameters, checked as Python checks them (not a positional-only one with a default, which no
input can name: ``dspy.CodeAct``'s ``interpreter``); where those are only ``**kwargs`` (and keyword-only
call options with defaults: ``dspy.RLM``'s ``interpreter_factory``), the inputs of the
module it wraps (``dspy.Refine``'s and ``dspy.BestOfN``'s ``module``), or else the input fields of its
signature (``dspy.Predict``, ``ChainOfThought``, any compiled module of those), none of them required:
DSPy runs a predictor with a field missing or extra (it logs a warning), and so does the pool. Defined
source is kept in ``linecache`` so ``inspect.getsource`` (``dspy.Refine``) finds it, as IPython does for cells.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import importlib
import inspect
import io
import linecache
import os
import pickle
import sys
import threading
import types
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import dspy

from dspex_nb import code_digest, redact, typed
from dspex_nb.errors import ArgumentError
from dspex_nb.programs import _Pickler, _reduced_state
from dspex_nb.wire import sole_input


@dataclass
class Program:
    name: str
    kind: str
    factory: Callable[[], Any]
    inputs: list[str]  # every named input, in order
    required: list[str]
    open_ended: bool  # takes **kwargs: other inputs are passed on
    types: set[type] = field(default_factory=set)  # Enum / pydantic / dataclass types it was shipped with
    label: str = ""  # what the user calls it (a program shipped from the kernel has a name of digests)
    optional: list[str] = field(default_factory=list)  # the inputs its own parameters give defaults, and those its
    # **kwargs pass on besides them (not a signature program's fields, which DSPy does not require either, but a
    # %%dspex run cell must give)
    version: str = ""  # wire.definition_version of what ``define`` / ``define_object`` got
    shipped: ShippedCopy | None = None  # a program shipped from the kernel: its state as it came (``from_pickle``)

    def check(self, tool_name: str, inputs: Any, where: str) -> dict[str, Any]:
        """``inputs`` as keyword arguments: a dict with every required input, or a bare value for one input."""
        label = self.label or self.name
        if not isinstance(inputs, dict):
            if (sole := sole_input(self.inputs, [n for n in self.inputs if n not in self.optional])) is not None:
                return {sole: inputs}
            raise ArgumentError(tool_name, "ArgumentError",
                                f"{where} must be a dict of {label}'s inputs {self.inputs}, "
                                f"got {type(inputs).__name__}")
        missing = [n for n in self.required if n not in inputs]
        unexpected = [] if self.open_ended else [n for n in inputs if n not in self.inputs]
        problems = ([f"lacks {label}'s input(s) {missing}"] if missing else []) + (
            [f"has input(s) {unexpected} that {label} does not take"] if unexpected else [])
        if problems:
            raise ArgumentError(tool_name, "ArgumentError",
                                f"{where} {' and '.join(problems)} (its inputs: {self.inputs})")
        return inputs

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "inputs": self.inputs, "required": self.required,
                "optional": self.optional, "open_ended": self.open_ended}


_cache_lock = threading.Lock()
_cache: dict[str, Any] = {}  # the dspy.configure_cache arguments this worker's DSPy cache was made with, as the
# kernel asked ({}: the cache DSPy made)


def use_cache(settings: dict[str, Any]) -> None:
    """Make this worker's DSPy cache as the kernel's was made: ``settings`` are the ``dspy.configure_cache``
    arguments that differ from DSPy's defaults (``programs.cache_settings`` in the kernel; ``safe_types`` as
    (module, qualname) pairs). One kernel owns the worker, so its latest call's cache holds for all (DSPy's cache is
    global); a worker whose kernel never changed it keeps the cache DSPy made."""
    global _cache
    with _cache_lock:
        if settings != _cache:
            made = {**settings, "safe_types": _types(settings["safe_types"])} if "safe_types" in settings else settings
            dspy.configure_cache(**made)
            _cache = settings


def use_environment(changes: dict[str, str | None]) -> None:
    """Set the kernel's environment variables changed since the pool started (``environment.Changes``; None:
    deleted) here, as the call's program would find them in the kernel. One kernel owns the worker, so its
    latest call's environment holds for all; a secret-named one is masked in what comes back (``redact``)."""
    for name, value in changes.items():
        if value is None:
            os.environ.pop(name, None)
        elif os.environ.get(name) != value:
            os.environ[name] = value


def _types(names: list[tuple[str, str]]) -> list[type]:
    """The classes of these (module, qualname) pairs that this worker can import; one it cannot (a notebook's
    class) is left out: an entry of it could not be unpickled here anyway."""
    found = []
    for module, qualname in names:
        try:
            value: Any = importlib.import_module(module)
            for part in qualname.split("."):
                value = getattr(value, part)
        except (ImportError, AttributeError):
            continue
        if isinstance(value, type):
            found.append(value)
    return found


_KEPT_SETTINGS = 16  # the kernel's settings without an LM kept loaded, the most recently used
_kept_settings: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
_kept_lock = threading.Lock()


def call_settings(payload: str) -> dict[str, Any]:
    """The kernel's DSPy settings a call came with (``dspex_nb.programs.kernel_settings``); not to be changed.
    An LM among them (one ``dspy.context`` set) or inside them (a ``TwoStepAdapter``'s extraction model) has its
    key masked, as the pool's LM has. Settings without an LM are loaded once and kept for the next calls that
    bring them; those with one are loaded for each call and not kept: the call may change its LM as it answers (a
    ``DummyLM`` given a list), and a later call that sent the same LM (a cell run again) would start where it had
    left; and an LM that changes as it answers comes in new settings each call, which kept, held 16 copies of a
    large LM (a 30 MB one: 2-3 GB). Not copied: an LM's engine may hold a lock."""
    if not payload:
        return {}
    with _kept_lock:
        if (kept := _kept_settings.get(payload)) is not None:
            _kept_settings.move_to_end(payload)
            return kept
    settings = _loaded("run", payload, "the kernel's DSPy settings (its adapter)")
    held = [attr for value in settings.values()
            for attr in [value, *(vars(value).values() if hasattr(value, "__dict__") else ())]
            if isinstance(attr, dspy.BaseLM)]
    for lm in held:
        register_key(lm)
    if not held:
        with _kept_lock:
            _kept_settings[payload] = settings
            while len(_kept_settings) > _KEPT_SETTINGS:
                _kept_settings.popitem(last=False)
    return settings


def register_key(lm: Any) -> None:
    """Mask ``lm``'s key in what comes back: a secret-named setting of its own attributes, dspy.LM's ``kwargs``
    (``api_key``) or a custom LM's (``self.api_key``), which a client's error may quote."""
    redact.register({name: value for name, value in vars(lm).items() if name != "history"})


def signature_of(program: Any) -> type[dspy.Signature] | None:
    """The signature whose input fields a ``**kwargs`` program takes: its own, or its first predictor's."""
    own = getattr(program, "signature", None)
    if isinstance(own, type) and issubclass(own, dspy.Signature):
        return own
    if isinstance(program, dspy.Module):
        predictors = program.predictors()
        if predictors:
            return predictors[0].signature
    return None


def _async_only(program: Any) -> bool:
    """A module with an ``aforward`` and no ``forward`` (DSPy's async module), which the kernel runs with
    ``await module.acall(...)``: calling it runs no ``forward``."""
    cls = type(program)  # not the instance: DSPy logs a warning whenever code other than __call__ reads its forward
    return isinstance(program, dspy.Module) and hasattr(cls, "aforward") and not hasattr(cls, "forward")


def invoke(program: Any, inputs: dict[str, Any]) -> Any:
    """Call ``program`` on ``inputs`` as the kernel runs it: an async-only module by ``acall`` (a coroutine, as
    an ``async def`` program's call gives), anything else by calling it."""
    return program.acall(**inputs) if _async_only(program) else program(**inputs)


def _entry_point(program: Any) -> Callable[..., Any]:
    """What a call runs: a module's ``forward`` (its ``aforward`` where it has only that, or its own ``__call__``
    where it has neither), the ``forward`` of another object whose ``__call__`` only passes its arguments on
    (``dspy.Retrieve``, a ``Parameter``), a function."""
    cls = type(program)
    if isinstance(program, dspy.Module):
        return cls.aforward if _async_only(program) else getattr(  # type: ignore[attr-defined]
            cls, "forward", cls.__call__)
    if callable(getattr(cls, "forward", None)) and _passes_on(cls.__call__):
        return cls.forward  # type: ignore[attr-defined]
    return program


def _passes_on(function: Any) -> bool:
    """Whether ``function`` takes nothing but ``self, *args, **kwargs``."""
    try:
        kinds = [p.kind for p in inspect.signature(function).parameters.values()]
    except (TypeError, ValueError):
        return False
    return kinds == [inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_POSITIONAL,
                     inspect.Parameter.VAR_KEYWORD]


def describe_inputs(program: Any) -> tuple[list[str], list[str], bool, list[str]]:
    """(inputs, required, open_ended, optional) of a program instance or function: ``optional`` are the named
    parameters with defaults and the signature's fields a ``**kwargs`` passes on besides them (none where the inputs
    are its signature's fields)."""
    if (streamified(program) or asyncified(program)) and (wrapped := streamified_program(program)) is not None:
        return describe_inputs(wrapped)  # its function takes (*args, **kwargs): the inputs are the program's
    try:
        params = list(inspect.signature(_entry_point(program)).parameters.values())
    except (TypeError, ValueError):
        params = []
    params = [p for p in params if p.name != "self" and p.kind is not p.VAR_POSITIONAL
              and not (p.kind is p.POSITIONAL_ONLY and p.default is not p.empty)]  # never given by name
    named = [p for p in params if p.kind is not p.VAR_KEYWORD]
    open_ended = len(named) < len(params)
    if open_ended and all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in named):
        # only call options besides **kwargs (dspy.RLM's interpreter_factory): the inputs are what kwargs take
        wrapped = getattr(program, "module", None)
        if isinstance(program, dspy.Module) and isinstance(wrapped, dspy.Module):  # dspy.Refine, dspy.BestOfN
            return describe_inputs(wrapped)
        sig = signature_of(program)
        if sig is not None or not named:
            return list(sig.input_fields) if sig is not None else [], [], True, []
    names = [p.name for p in named]
    passed_on = _passed_on(program, names) if open_ended else []
    return (names + passed_on, [p.name for p in named if p.default is p.empty], open_ended,
            [p.name for p in named if p.default is not p.empty] + passed_on)


def _passed_on(program: Any, named: list[str]) -> list[str]:
    """The input fields that a ``forward(self, question, **kwargs)`` passes on to its signature besides its named
    parameters (dspy.MultiChainComparison's ``question`` beside its ``completions``)."""
    sig = signature_of(program)
    return [n for n in sig.input_fields if n not in named] if sig is not None else []


def make(name: str, obj: Any, types: set[type] | None = None) -> Program:
    """A Program of ``obj``; an ArgumentError says what ``obj`` must be."""
    kind = ""
    if isinstance(obj, type) and issubclass(obj, dspy.Signature):
        obj, kind = dspy.Predict(obj), "signature (dspy.Predict)"
    if isinstance(obj, type) and issubclass(obj, dspy.Module):
        try:
            sample = obj()
        except TypeError as exc:
            raise ArgumentError("define", "ArgumentError",
                                f"{name!r} is a module class whose constructor needs arguments ({exc}); "
                                "define an instance instead, e.g. qa = MyModule(...)") from None
        factory, kind = obj, "module class"
    elif isinstance(obj, dspy.Module):
        sample, factory, kind = obj, (lambda: obj), kind or "module instance"
    elif callable(obj):
        sample, factory, kind = obj, (lambda: obj), "function"
    else:
        raise ArgumentError("define", "ArgumentError",
                            f"{name!r} must be a dspy.Module subclass or instance, a dspy.Signature class, or a "
                            f"function; got {type(obj).__name__}")
    inputs, required, open_ended, optional = describe_inputs(sample)
    label = (getattr(sample, "__name__", None) or type(sample).__name__) if name.startswith("_") else name
    all_types = set(types or ())
    if isinstance(sample, dspy.Module):
        for predictor in sample.predictors():
            for info in predictor.signature.model_fields.values():
                all_types |= typed.types_in(info.annotation)
    return Program(name, kind, factory, inputs, required, open_ended, all_types, label, optional)


def from_source(name: str, source: str) -> Program:
    """Run ``source`` (``dspy`` is imported; no future imports of ours leak in) and keep its ``name``."""
    filename = f"<dspex define {name}>"
    try:
        code = compile(source, filename, "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise ArgumentError("define", "ArgumentError", f"the source of {name!r} has a syntax error: {exc}") from None
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {"dspy": dspy, "__name__": f"dspex_defined_{name}"}
    exec(code, namespace)
    if name not in namespace:
        defined = sorted(k for k in namespace if not k.startswith("__") and k != "dspy")
        raise ArgumentError("define", "ArgumentError", f"the source defines no {name!r} (it defines {defined})")
    return make(name, namespace[name])


def from_pickle(name: str, payload: str) -> Program:
    """A program shipped by value from the kernel (cloudpickle of {"program", "types", "sources"})."""
    try:
        shipped = unpickled(payload)
    except Exception as exc:
        raise ArgumentError("define", type(exc).__name__,
                            f"{name!r} could not be loaded on the worker: {type(exc).__name__}: {exc} (the worker's "
                            "Python must be able to import every module the program uses by reference)") from None
    for filename, lines in shipped.get("sources", {}).items():  # so inspect.getsource finds notebook code
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
    program = _program_of(shipped)
    if isinstance(program, dspy.Module):  # a predictor's own LM came along (set_lm): its key is masked too
        for _, predictor in program.named_predictors():
            if isinstance(lm := getattr(predictor, "lm", None), dspy.BaseLM):
                register_key(lm)
    typed.remember(shipped.get("tokens", ()))  # before its types are found: a Resolver finds them by their tokens
    made = make(name, program, set(shipped.get("types", ())))
    if streamified(program):
        # a dspy.streamify'd program: its listeners keep each stream's state (one without allow_reuse streams once),
        # which the kernel's object, run here, never has: each call runs a copy as it was shipped
        made.factory = lambda: _program_of(unpickled(payload))
    elif made.factory() is program:
        made.shipped = ShippedCopy(payload, program)
        made.factory = made.shipped.current
    return made


class ShippedCopy:
    """A program shipped from the kernel, run call after call while its calls leave its state as it came: one that
    changed its own state (an attribute of its modules, a dict or list of the notebook its code adds to) is made
    again from the payload for the next call, which starts from the state the kernel's program has, as it would in
    the kernel, where that change does not reach either (``changed`` says so, and the kernel warns). That holds for
    what a call makes too (a lock or a cache made on the first call is made again on the next: a counter or a memory
    made so is state all the same, and telling them apart would need the calls to come)."""

    def __init__(self, payload: str, program: Any) -> None:
        self.payload, self.program = payload, program
        self.digest = state_digest(program)
        self.lock = threading.Lock()

    def current(self) -> Any:
        return self.program

    def fresh(self) -> Any:
        """A copy of its own as it came (a session's instance, ``load_module``), whose calls change it alone."""
        return _program_of(unpickled(self.payload))

    def fresh_copy(self) -> tuple[Any, bytes | None]:
        """``fresh()``, for a batch shard's items, with the digest of its state as it came (``copy_changed``)."""
        copy = self.fresh()
        return copy, state_digest(copy)

    @staticmethod
    def copy_changed(copy: Any, digest: bytes | None) -> bool:
        """Whether the calls that ran ``copy`` (from ``fresh_copy``, of state ``digest``) changed its state; not
        compared against the program's: a copy's large arrays are its own (``_LARGE``)."""
        return digest is not None and state_digest(copy) != digest

    def changed(self, program: Any) -> bool:
        """Whether the call that ran ``program`` (from ``current``) changed its state; if so, the next call gets
        a fresh copy."""
        if self.digest is None or program is not self.program or state_digest(program) == self.digest:
            return False  # the digest outside the lock: other calls' checks do not wait for this one's
        with self.lock:
            if program is self.program:  # the first to see the change makes the fresh copy
                fresh = self.fresh()
                self.program, self.digest = fresh, state_digest(fresh)
        return True


def state_digest(program: Any) -> bytes | None:
    """A digest of ``program``'s state, by value as it travels, without what DSPy changes as it runs it (each
    module's history and callbacks, its LMs, whose changes the kernel keeps apart), without its classes (by name)
    and large numpy arrays (by identity, ``_LARGE``); None where it cannot be pickled, which is then not compared."""
    modules = [module for _, module in sub_modules(program)] if isinstance(program, dspy.Module) else []
    skipped = {id(value) for module in modules for name in ("history", "callbacks")
               if (value := vars(module).get(name)) is not None}
    buffer = io.BytesIO()
    try:
        _StatePickler(buffer, skipped).dump(program)
    except Exception:
        return None
    return hashlib.sha256(buffer.getvalue()).digest()


_LARGE = 2**20  # bytes of a numpy array that state_digest takes by identity: a call that replaces it is seen, one
# that changes its values in place is not


class _StatePickler(_Pickler):
    def __init__(self, file: io.BytesIO, skipped: set[int]) -> None:
        super().__init__(file)
        self.skipped = skipped

    def reducer_override(self, obj: Any) -> Any:
        reduced = super().reducer_override(obj)
        if isinstance(obj, types.FunctionType) and (
                slots := _reduced_state(reduced, cloudpickle.cloudpickle._make_function, 1)) is not None:
            slots.pop("_cloudpickle_submodules", None)  # those imported by now, which a call may add to (np.ma)
        return reduced

    def persistent_id(self, obj: Any) -> str | None:
        if isinstance(obj, type):  # by its name: pydantic and typing fill caches of a class as it is used
            return f"{obj.__module__}.{obj.__qualname__}"
        if getattr(obj, "nbytes", 0) > _LARGE and type(obj).__module__ == "numpy":  # an index: by identity, not
            return f"array {id(obj)} {obj.dtype} {obj.shape}"  # copied each call (30 MB cost 0.18 s; 0.1 ms now)
        return "skipped" if id(obj) in self.skipped or isinstance(obj, dspy.BaseLM) else None


def sub_modules(program: Any) -> list[tuple[str, Any]]:
    """``program.named_sub_modules()``, by the same names, without going through a module's ``history``: DSPy
    appends each LM call's entry there (up to ``max_history_size``, 10,000, on a module instance that runs every
    call of it), and DSPy's walk read every value of every entry: a batch item of a ChainOfThought took 15 ms to
    find the LMs it holds, the LM call itself 2."""
    if not isinstance(program, dspy.Module):
        return []
    found: list[tuple[str, Any]] = []
    queue, seen = deque([("self", program)]), {id(program)}
    walked = (dspy.BaseModule, list, tuple, dict)  # what may hold a module: only those are named and queued (a
    # retriever's 20,000 passages took 67 ms a call to name and queue one by one, 7 now)
    while queue:
        name, item = queue.popleft()
        if isinstance(item, dspy.BaseModule):
            found.append((name, item))
            parts = [(f"{name}.{key}", value) for key, value in vars(item).items()
                     if key != "history" and isinstance(value, walked)]
        elif isinstance(item, (list, tuple)):
            parts = [(f"{name}[{index}]", value) for index, value in enumerate(item)
                     if isinstance(value, walked)] if _any_of(item, walked) else []
        else:
            parts = [(f"{name}[{key}]", value) for key, value in item.items()
                     if isinstance(value, walked)] if _any_of(item.values(), walked) else []
        for part in parts:
            if id(part[1]) not in seen:
                seen.add(id(part[1]))
                queue.append(part)
    return found


def held_lms(modules: list[tuple[str, Any]]) -> dict[tuple[Any, ...], Any]:
    """The LMs that ``modules`` (a program's ``sub_modules``) hold in their own attributes, by module name and
    attribute: a predictor's ``lm`` (``set_lm``), or one a module keeps to call itself (``self.untrusted_model``);
    and those in a list, tuple or dict there (``self.lms = [lm1, lm2]``), by its index or key too. Not in the module's
    ``history``, which DSPy fills with each call's entry (up to 10,000 on a module instance that runs every item of
    every batch): walking it made each item slower the longer the worker had run."""
    return {(name, attribute, *key): lm for name, module in modules for attribute, value in vars(module).items()
            if attribute != "history" for key, lm in _members(value) if isinstance(lm, dspy.BaseLM)}


def _members(value: Any) -> list[tuple[tuple[Any, ...], Any]]:
    """``value`` itself (key ``()``), and the items of a list or tuple (key ``(index,)``) or of a dict (``(key,)``,
    its str keys)."""
    if isinstance(value, (list, tuple)) and _any_of(value, dspy.BaseLM):
        return [((), value), *(((i,), item) for i, item in enumerate(value))]
    if isinstance(value, dict) and _any_of(value.values(), dspy.BaseLM):
        return [((), value), *(((k,), item) for k, item in value.items() if isinstance(k, str))]
    return [((), value)]


def _any_of(values: Iterable[Any], kinds: type | tuple[type, ...]) -> bool:
    """Whether any of ``values`` is of ``kinds``, each of their types checked once: a retriever's 20,000 passages
    are one type, str (7 ms a call to check one by one, 0.5 ms so)."""
    return any(issubclass(cls, kinds) for cls in set(map(type, values)))


def streamified(program: Any) -> bool:
    """Whether ``program`` was made by ``dspy.streamify``: it returns a stream of its listeners' tokens."""
    return getattr(program, "__module__", None) == dspy.streamify.__module__


def asyncified(program: Any) -> bool:
    """Whether ``program`` was made by ``dspy.asyncify``: an async function that runs its program in a thread."""
    return getattr(program, "__module__", None) == dspy.asyncify.__module__


def streamified_program(streamer: Any) -> Any:
    """The program a ``dspy.streamify``'d (or ``dspy.asyncify``'d) function runs, as DSPy keeps it: the ``program``
    its closures hold (under ``dspy.asyncify``'s, or as the bound ``acall`` of ``is_async_program=True``); None where
    none is found."""
    functions, seen = deque([streamer]), {id(streamer)}
    while functions:
        function = functions.popleft()
        for name, cell in zip(function.__code__.co_freevars, function.__closure__ or (), strict=True):
            value = cell.cell_contents
            if inspect.isfunction(value) and value.__module__.partition(".")[0] == "dspy":
                if id(value) not in seen:
                    seen.add(id(value))
                    functions.append(value)
            elif name == "program":
                return value.__self__ if inspect.ismethod(value) else value
    return None


def _program_of(shipped: dict[str, Any]) -> Any:
    """The program of a shipment, its code given the names its signature strings use, as DSPy finds them there."""
    for function, names in shipped.get("names", ()):
        for key, value in names.items():
            function.__globals__.setdefault(key, value)
    return shipped["program"]


def unpickled(payload: str) -> Any:
    """What the kernel pickled (``programs._payload``), its modules imported from where the kernel imports
    them (the directories of the kernel's ``sys.path`` that this worker's lacks are added, at the end), with
    their code as the kernel has it: a module whose code differs (``code_digest``) is reloaded from its file,
    and if that is not the kernel's code either (edited since the kernel imported it), this says so."""
    path, modules, data = pickle.loads(base64.b64decode(payload))
    sys.path.extend(entry for entry in path if entry not in sys.path and os.path.exists(entry))
    value = _last_of(data)
    stale = code_digest.stale(modules)
    if stale:
        for name in stale:
            importlib.reload(sys.modules[name])
        value = _last_of(data)
        if stale := code_digest.stale(modules):
            raise ImportError(f"the kernel runs other code of {', '.join(stale)} than its file has now (edited "
                              "since the kernel imported it?): reload it in the kernel (importlib.reload, "
                              "%autoreload) or restart the kernel, so that the pool runs the code the kernel runs")
    return value


def _last_of(data: bytes) -> Any:
    """The last of the pickles one pickler made in a row (``programs.ship``): those before it fill the memo it
    refers to."""
    stream = io.BytesIO(data)
    unpickler = pickle.Unpickler(stream)
    value = None
    while stream.tell() < len(data):
        value = unpickler.load()
    return value


def load_shipment(tool_name: str, payload: str) -> typed.Shipment:
    """The classes and code that came by value with a call's inputs (``programs.shipment`` in the kernel)."""
    shipment = _loaded(tool_name, payload, "the inputs' classes and code")
    typed.remember(shipment.tokens)
    return shipment


def _loaded(tool_name: str, payload: str, what: str) -> Any:
    """A call's by-value argument (base64 cloudpickle from the kernel, ``programs._by_value``), unpickled; an
    ArgumentError naming ``what`` if it cannot be."""
    try:
        return unpickled(payload)
    except Exception as exc:
        raise ArgumentError(tool_name, "ArgumentError",
                            f"{what} could not be loaded on the worker: {type(exc).__name__}: {exc} (the worker's "
                            "Python must be able to import every module they use by reference)") from None
