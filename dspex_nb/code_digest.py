"""Whether the kernel and a worker run the same code of a module that a program uses by reference.

A class or function of a module imported from a file of the user's (``from my_program import RAG``: not
installed, not the notebook's own cells) travels by reference, as pickle sends it, and a worker imports the
module from the same file. After the file is edited and reloaded in the kernel (``%autoreload``,
``importlib.reload``), the kernel runs the new code and a worker that imported the old one would silently
run that. So the kernel sends a digest of each such module's code with the program; a worker whose copy
differs reloads it, and if the kernel's code is not the file's either, the call fails saying so.

The digest covers the code the module defines, as compiled from its source: its functions' and classes'
bytecode, constants and names, their docstrings, and the field declarations of its pydantic models and
``dspy.Signature``s (types, descriptions, instructions). Not values that change as the program runs
(module globals, class attributes, mutable defaults), so a digest is the same in every process that
imported the same source. Only modules loaded by Python's own source loader qualify: one an import hook
rewrote (pytest's assertions) is not the file's plain compilation anywhere else.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import os
import re
import site
import sys
import sysconfig
import types
from typing import Any

_IMMUTABLE = (str, bytes, int, float, complex, bool, type(None), type(Ellipsis))
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # in a repr (a validator's function in a field type): this process's


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
    """Whether module ``name`` is the user's own code from a source file: not installed, not ``__main__``, not
    ours, and loaded by Python's source loader."""
    module = sys.modules.get(name) if name else None
    file = getattr(module, "__file__", None)
    loader = getattr(getattr(module, "__spec__", None), "loader", None)
    if not file or name == "__main__" or name.partition(".")[0] == "dspex_nb":
        return False
    return type(loader) is importlib.machinery.SourceFileLoader and _is_local_file(file)


def digest(module: types.ModuleType) -> str:
    """The digest of the code ``module`` defines (see the module's docstring)."""
    out = hashlib.sha256()
    for key, value in sorted(vars(module).items()):
        if isinstance(value, (type, types.FunctionType)) and getattr(value, "__module__", None) == module.__name__:
            out.update(f"\0{key}:".encode())
            _code(out, value, module.__name__, set())
    return out.hexdigest()


def digests(names: set[str]) -> dict[str, str]:
    """``{name: digest}`` of the modules named (those already imported)."""
    return {name: digest(sys.modules[name]) for name in sorted(names) if name in sys.modules}


def stale(expected: dict[str, str]) -> list[str]:
    """The modules of ``expected`` whose code here is not the kernel's."""
    return [name for name, value in expected.items() if name in sys.modules and digest(sys.modules[name]) != value]


def _code(out: Any, value: Any, module: str, seen: set[str]) -> None:
    """Write the code of a function or class of ``module`` into ``out``; another module's by its name."""
    if getattr(value, "__module__", None) != module or value.__qualname__ in seen:
        out.update(f"<{getattr(value, '__module__', '?')}.{value.__qualname__}>".encode())
        return
    seen.add(value.__qualname__)
    if isinstance(value, types.FunctionType):
        _compiled(out, value.__code__)
        out.update(repr(tuple(d for d in value.__defaults__ or () if isinstance(d, _IMMUTABLE))).encode())
        return
    out.update(f"class {value.__qualname__}{[b.__qualname__ for b in value.__bases__]}".encode())
    out.update(repr(value.__doc__).encode())  # a Signature's instructions
    for key, item in sorted(vars(value).items()):
        function = item.__func__ if isinstance(item, (staticmethod, classmethod)) else item
        if isinstance(function, property):
            function = function.fget
        if isinstance(function, (types.FunctionType, type)):
            out.update(f"\0{key}:".encode())
            _code(out, function, module, seen)
    for name, info in sorted((getattr(value, "model_fields", None) or {}).items()):  # pydantic, dspy.Signature
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        field = f"\0field {name}: {info.annotation!r} {info.description!r} {sorted(extra.items())!r}"
        out.update(_ADDRESS.sub("", field).encode())


def _compiled(out: Any, code: types.CodeType) -> None:
    out.update(code.co_code)
    out.update(repr(code.co_names).encode())
    _constant(out, code.co_consts)


def _constant(out: Any, const: Any) -> None:
    """A compile-time constant: nested code, a literal, a tuple or frozenset of those."""
    if isinstance(const, types.CodeType):
        _compiled(out, const)
    elif isinstance(const, tuple):
        out.update(b"(")
        for item in const:
            _constant(out, item)
            out.update(b",")
        out.update(b")")
    elif isinstance(const, frozenset):  # its order differs between processes
        out.update(repr(sorted(map(repr, const))).encode())
    else:
        out.update(repr(const).encode())
