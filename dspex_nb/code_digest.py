"""Whether the kernel and a worker run the same code of a module that a program uses by reference.

A class or function of a module imported from a file of the user's (``from my_program import RAG``: not
installed, not the notebook's own cells) travels by reference, as pickle sends it, and a worker imports the
module from the same file. After the file is edited and reloaded in the kernel (``%autoreload``,
``importlib.reload``), the kernel runs the new code and a worker that imported the old one would silently
run that. So the kernel sends a digest of each such module's code with the program; a worker whose copy
differs reloads it, and if the kernel's code is not the file's either, the call fails saying so.

The digest covers what the module defines itself: its functions' and classes' code (bytecode, constants,
names, primitive defaults), class attributes and field declarations (a ``dspy.Signature``'s instructions and
fields), and its primitive constants (prompts). It is the same in every process of the same interpreter:
only primitives are written out, never an object's ``repr`` (which may hold its address).
"""

from __future__ import annotations

import functools
import hashlib
import os
import site
import sys
import sysconfig
import types
from typing import Any

_PRIMITIVES = (str, bytes, int, float, bool, type(None))


@functools.cache
def _installed() -> tuple[str, ...]:
    """Directories whose modules are installed (the standard library, site-packages), as real paths."""
    paths = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.update(site.getsitepackages() if hasattr(site, "getsitepackages") else ())
    paths.add(site.getusersitepackages())
    return tuple(os.path.join(os.path.realpath(p), "") for p in paths if p)


@functools.lru_cache(maxsize=1024)
def _is_local_file(file: str) -> bool:
    return not os.path.realpath(file).startswith(_installed())


def local_module(name: str) -> bool:
    """Whether module ``name`` is the user's own code from a file (not installed, not ``__main__``, not ours)."""
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    if not file or name == "__main__" or name.partition(".")[0] == "dspex_nb":
        return False
    return _is_local_file(file)


def digest(module: types.ModuleType) -> str:
    """The digest of what ``module`` defines (see the module's docstring)."""
    out = hashlib.sha256()
    for key, value in sorted(vars(module).items()):
        if isinstance(value, (type, types.FunctionType)) and getattr(value, "__module__", None) == module.__name__:
            out.update(f"\0{key}:".encode())
            _feed(out, value, {}, module.__name__)
        elif isinstance(value, _PRIMITIVES) and not key.startswith("__"):
            out.update(f"\0{key}={value!r}".encode())
    return out.hexdigest()


def digests(names: set[str]) -> dict[str, str]:
    """``{name: digest}`` of the modules named (those already imported)."""
    return {name: digest(sys.modules[name]) for name in sorted(names) if name in sys.modules}


def stale(expected: dict[str, str]) -> list[str]:
    """The modules of ``expected`` whose code here is not the kernel's."""
    return [name for name, value in expected.items() if name in sys.modules and digest(sys.modules[name]) != value]


def _declared(key: str, value: Any) -> bool:
    """Whether a class attribute is the class's own declaration: its code, docstring and plain attributes, not
    what Python or a library made for it (``__dict__``, pydantic's ``__pydantic_core_schema__``, ``_abc_impl``)."""
    if isinstance(value, (types.FunctionType, staticmethod, classmethod, property)):
        return True
    return key == "__doc__" or not (key.startswith("__") and key.endswith("__") or key == "_abc_impl")


def _feed(out: Any, value: Any, seen: dict[int, Any], module: str) -> None:
    """Write ``value`` into ``out``: primitives, and the code of ``module``'s functions and classes, as they are;
    a class or function of another module by its name; anything else by its type's name."""
    if isinstance(value, (type, types.FunctionType)) and getattr(value, "__module__", None) != module:
        out.update(f"<{getattr(value, '__module__', '?')}.{value.__qualname__}>".encode())
        return
    if id(value) in seen:
        out.update(b"<again>")
        return
    if isinstance(value, _PRIMITIVES):
        out.update(repr(value).encode())
    elif isinstance(value, (tuple, list)):
        seen[id(value)] = value  # kept alive: an id is not reused meanwhile
        out.update(b"(")
        for item in value:
            _feed(out, item, seen, module)
            out.update(b",")
        out.update(b")")
    elif isinstance(value, (frozenset, set)):  # order differs between processes: sorted by what each writes
        out.update(b"{" + b",".join(sorted(repr(v).encode() for v in value if isinstance(v, _PRIMITIVES))) + b"}")
    elif isinstance(value, dict):
        seen[id(value)] = value  # kept alive: an id is not reused meanwhile
        out.update(b"{")
        for key, item in value.items():
            out.update(f"{key!r}:".encode() if isinstance(key, _PRIMITIVES) else b"?:")
            _feed(out, item, seen, module)
        out.update(b"}")
    elif isinstance(value, types.CodeType):
        out.update(value.co_code)
        out.update(repr(value.co_names).encode())
        _feed(out, value.co_consts, seen, module)
    elif isinstance(value, types.FunctionType):
        seen[id(value)] = value  # kept alive: an id is not reused meanwhile
        _feed(out, value.__code__, seen, module)
        _feed(out, value.__defaults__, seen, module)
        _feed(out, value.__kwdefaults__, seen, module)
    elif isinstance(value, (staticmethod, classmethod)):
        _feed(out, value.__func__, seen, module)
    elif isinstance(value, property):
        _feed(out, (value.fget, value.fset, value.fdel), seen, module)
    elif isinstance(value, type):
        seen[id(value)] = value  # kept alive: an id is not reused meanwhile
        out.update(f"class {value.__qualname__}({[b.__qualname__ for b in value.__bases__]})".encode())
        for key, item in sorted(vars(value).items()):
            if _declared(key, item):
                out.update(f"\0{key}:".encode())
                _feed(out, item, seen, module)
        for name, info in sorted((getattr(value, "model_fields", None) or {}).items()):  # pydantic, dspy.Signature
            out.update(f"\0field {name}: {info.annotation!r}".encode())
            _feed(out, (info.default, info.json_schema_extra, info.description), seen, module)
    else:
        out.update(f"<{type(value).__module__}.{type(value).__qualname__}>".encode())
