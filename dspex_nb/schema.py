"""Tool argument schemas: derived on the worker from a tool's signature, checked on both sides.

A schema is JSON: {"name", "description", "streaming", "open", "args": {name: {"type", "required" |
"default"}}}, with type names such as "str", "float", "dict | str", "list", "Any". The pool checks a
call against the schema it got from ``Describe`` before sending it; the worker checks again.
Standard library only.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

from dspex_nb import redact
from dspex_nb.errors import ArgumentError

_CHECKS: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "list": (list,), "dict": (dict,),
    "None": (type(None),),
}


def type_name(annotation: Any) -> str:
    """'str', 'list', 'dict | str', 'None', 'Any' ... for a type hint."""
    if annotation in (Any, inspect.Parameter.empty):
        return "Any"
    if annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in typing.get_args(annotation))
    return getattr(origin or annotation, "__name__", str(annotation))


def accepts(name: str, value: Any) -> bool:
    """Whether a JSON value fits a type name (unknown names accept anything)."""
    for part in name.split("|"):
        checks = _CHECKS.get(part.strip())
        if checks is None:
            return True
        if isinstance(value, bool) and bool not in checks:
            continue  # JSON true is not an int here
        if isinstance(value, checks):
            return True
    return False


def validate(schema: dict[str, Any], args: Any) -> None:
    """Raise ArgumentError naming the argument that is missing, unexpected or of the wrong type."""
    tool = schema["name"]
    if not isinstance(args, dict):
        raise ArgumentError(tool, "ArgumentError", f"arguments must be a dict, got {type(args).__name__}")
    params = schema["args"]
    if not schema.get("open") and (unexpected := args.keys() - params.keys()):
        raise ArgumentError(tool, "ArgumentError",
                            f"unexpected argument(s) {sorted(unexpected)}; '{tool}' takes {list(params)}")
    for name, spec in params.items():
        if name not in args:
            if spec.get("required"):
                raise ArgumentError(tool, "ArgumentError", f"missing required argument '{name}'")
        elif not accepts(spec["type"], args[name]):
            raise ArgumentError(tool, "ArgumentError", f"argument '{name}' must be {spec['type']}, got "
                                f"{type(args[name]).__name__} ({redact.shown(args[name]):.80})")
