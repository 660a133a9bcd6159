"""``%dspex`` (pool control, status, LM, config) and ``%%dspex`` (predict, batch, define, run).

A thin layer over the Python API, as ipyparallel's ``%px`` is over its ``View``: parse arguments,
turn the cell into inputs, call ``Pool``, hand the handle to a renderer. Defaults are traitlets
(``%config Dspex.workers = 4``, or ``c.Dspex.workers = 4`` in ipython_config.py).
"""

from __future__ import annotations

import _string  # str.format's own field parsing (string.Formatter uses it)
import argparse
import ast
import builtins
import contextlib
import importlib
import json
import keyword
import os
import re
import shlex
import sqlite3
import string
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser
from traitlets import Bool, Enum, Integer, Unicode, observe

from dspex_nb import programs, redact, typed, ui
from dspex_nb.api import Pool
from dspex_nb.batch import BatchRun
from dspex_nb.errors import ArgumentError, Cancelled, DspexError, ToolError, one_line
from dspex_nb.journal import Journal
from dspex_nb.pool import local
from dspex_nb.pool.calls import Run
from dspex_nb.pool.settings import SettingError
from dspex_nb.ui import MODES, rerun
from dspex_nb.ui.progress import field_text, fields_of, printable, text_table
from dspex_nb.ui.render import show_batch, show_pool, show_run
from dspex_nb.wire import sole_input
from dspex_nb.words import count

# -- argument parsers, one per sub-command ------------------------------------------------------
PARSERS: dict[str, MagicArgumentParser] = {}
CELL_COMMANDS = ("predict", "batch", "define", "run")


def _parser(command: str, description: str) -> MagicArgumentParser:
    """A sub-command's parser; its usage line gets one ``%`` from IPython's formatter, so ``prog`` has one less."""
    parser = MagicArgumentParser(prog=f"dspex {command}" if command not in CELL_COMMANDS else f"%dspex {command}",
                                 description=description, add_help=False)
    PARSERS[command] = parser
    return parser


def _run_options(parser: MagicArgumentParser) -> None:
    parser.add_argument("-o", "--output", metavar="VAR", help="store the result (or, with -a, the handle) in VAR")
    parser.add_argument("-a", "--async", dest="background", action="store_true",
                        help="return a handle at once; the view keeps updating while other cells run")
    parser.add_argument("--timeout", type=float, metavar="S", help="cancel the call after S seconds")
    parser.add_argument("--no-interpolate", action="store_true", help="keep {name} in the cell as it is")


_p = _parser("start", "Start the pool (defaults from %config Dspex).")
_p.add_argument("-n", "--workers", type=int, help="number of worker processes")
_p.add_argument("--lm", help="'demo' or a dspy.LM model string, e.g. openai/gpt-4o-mini")
_p.add_argument("--python", metavar="EXE", help="the workers' Python interpreter")
_p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                help="run the workers as Ray actors: on the cluster at ADDRESS ('auto', 'HEAD_IP:6379'), "
                     "or without one on a local Ray instance the pool starts")
_parser("stop", "Stop the pool and every worker process.")
_parser("restart", "Stop the pool and start it again with the same settings and defined modules.")
_p = _parser("status", "Show the pool dashboard (refreshes while shown), with per-tool call timings.")
_p.add_argument("--stats", action="store_true", help="outside a live notebook, also print the call timings")
_parser("config", "Show the magics' defaults and the running pool's settings.")
_p = _parser("lm", "Switch the LM on every worker (and on workers started later).")
_p.add_argument("model", help="'demo' or a dspy.LM model string")
_p.add_argument("--temperature", type=float)
_p.add_argument("--max-tokens", type=int)
_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                help="any other dspy.LM (or demo LM) setting; VALUE is JSON or a string")
_p = _parser("predict", "Run a DSPy signature on the cell: the cell is the input (one input field) or "
                        "`field: value` lines; tokens of each output field stream live.")
_p.add_argument("signature", help='e.g. "question -> answer"')
_p.add_argument("--cot", action="store_true", help="use dspy.ChainOfThought (streams its reasoning too)")
_p.add_argument("--no-stream", action="store_true", help="wait for the whole answer instead of streaming tokens")
_run_options(_p)
_p = _parser("run", "Run a module on the cell's input, streaming: one defined with %%dspex define, or a "
                    "dspy.Module of the kernel (a compiled program).")
_p.add_argument("name", help="the module's name, or the kernel's variable that holds it")
_p.add_argument("--no-stream", action="store_true", help="wait for the whole answer instead of streaming tokens")
_run_options(_p)
_p = _parser("batch", "Fan items out over the pool; OUT gets one result per item, in input order. "
                      "With --items and nothing else in the cell, use one %: %dspex batch ... --items VAR.")
_p.add_argument("signature", nargs="?", default="", help='e.g. "question -> answer" (not with --module)')
_p.add_argument("--items", metavar="VAR", help="a list of strings or dicts, or a pandas DataFrame "
                                              "(default: the cell's non-empty lines)")
_p.add_argument("--module", metavar="NAME", help="a module defined with %%%%dspex define, or a dspy.Module of "
                                                "the kernel")  # argparse reads %% in a help as %
_p.add_argument("--cot", action="store_true", help="use dspy.ChainOfThought")
_p.add_argument("--concurrency", type=int, metavar="K", help="items at a time per worker (default: the pool's)")
_p.add_argument("--item-timeout", type=float, metavar="S", help="retry an item that runs for S seconds")
_p.add_argument("--no-journal", action="store_true",
                help="neither take finished items from the journal nor write them to it")
_run_options(_p)
_p = _parser("journal", "List the batch journal (finished items that a re-run takes instead of calling the "
                        "LM), or clear it: all of it, or the batches of a key (or a key prefix).")
_p.add_argument("action", nargs="?", default="list", metavar="list|clear",
                help="list (the default: a KEY alone lists its batches) or clear")
_p.add_argument("key", nargs="?", help="the batch key (or prefix) to list or to forget")
JOURNAL_ACTIONS = ("list", "clear")
_p = _parser("define", "Define a DSPy module (a dspy.Module subclass or a function) on every worker, "
                       "including workers started later; `dspy` is imported.")
_p.add_argument("name", help="the name the cell defines")

DEFAULT_POOL = "default"
for _parser_of_command in PARSERS.values():
    _parser_of_command.add_argument("--pool", default=DEFAULT_POOL, metavar="NAME",
                                    help="which of the kernel's pools (default: 'default'); each has its own "
                                         "settings and dashboard")

HELP = "\n".join(["Run DSPy on a pool of background workers.", ""] + [p.format_help() for p in PARSERS.values()])


# -- turning a cell into inputs -----------------------------------------------------------------
_PLACEHOLDER = re.compile(r"[A-Za-z_]\w*(?:[.\[].*)?")  # {name}, {name.attr}, {name[key]}
_QUOTED_KEY = re.compile(r"""(['"])([^'"\]]*)\1""")  # 'key' or "key" in brackets, as Python writes a key


def lookup(field: str, namespace: dict[str, Any]) -> Any:
    """The kernel value a placeholder names, as ``str.format`` finds it; a key in quotes, as Python writes it
    (``{row['text']}``, which IPython's own ``{}`` takes), is that str without them where ``str.format``'s reading
    (the quotes as part of the key) finds none: ``{row['0']}`` is ``row["0"]``, not ``row[0]``."""
    first, rest = _string.formatter_field_name_split(field)  # how str.format splits it (string.Formatter's own)
    value = namespace[first]
    for is_attribute, key in rest:
        value = getattr(value, key) if is_attribute else _item(value, key)
    return value


def _item(value: Any, key: Any) -> Any:
    try:
        return value[key]
    except KeyError:
        quoted = _QUOTED_KEY.fullmatch(key) if isinstance(key, str) else None
        if quoted is None:
            raise
        return value[quoted.group(2)]


def interpolate(text: str, namespace: dict[str, Any]) -> str:
    """Replace {name} (also {name.attr}, {name[key]}, {name['key']}, with format specs) by kernel variables; braces
    around anything else (a dict literal such as {"a": 1}, or {x: 1}) stay as they are."""
    formatter = string.Formatter()
    parts = []
    try:
        fields = list(formatter.parse(text))
    except ValueError as exc:
        raise UsageError(f"{exc} in the cell: write {{{{ and }}}} for literal braces, or use --no-interpolate") \
            from None
    for literal, field, spec, conversion in fields:
        parts.append(literal)
        if field is None:
            continue
        if not _PLACEHOLDER.fullmatch(field) or spec[:1].isspace():  # not a name: the text as it was
            parts.append("{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}")
            continue
        try:
            value = lookup(field, namespace)
        except (KeyError, AttributeError, IndexError, TypeError, ValueError) as exc:  # {xs[name]} of a list: TypeError
            root = re.split(r"[.\[]", field, maxsplit=1)[0]
            what = f"no variable named {root!r} in the kernel" if root not in namespace else f"{exc!r}"
            raise UsageError(f"{{{field}}}: {what} (use --no-interpolate to keep braces as they are)") from None
        try:
            parts.append(format(formatter.convert_field(value, conversion), spec or ""))
        except (TypeError, ValueError) as exc:  # {x!z}, {x:zz}: a conversion or format spec the value does not take
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise UsageError(f"{shown}: {exc} (use --no-interpolate to keep braces as they are)") from None
    return "".join(parts)


INTERRUPTED = {  # what an interrupted command leaves, where it is not a call's remote work cancelled
    "start": "the pool was not started",
    "restart": "the pool is stopped; the next dspex command starts it again as it was",
    "define": "every worker keeps what it had before under that name (nothing, for a new one)",
}
SIGNATURE_TIMEOUT = 30.0  # seconds a worker may take to parse a signature (it waits for a free worker first)


def signature_inputs(signature: Any, pool: Pool) -> list[str]:
    """The input field names of a signature (class or string), parsed by DSPy itself (so types with commas,
    such as ``scores: dict[str, int]``, work): a string by a worker, where DSPy is imported already, so the
    kernel need not import it (about 1.5 s) before a first answer."""
    try:
        if isinstance(signature, str):
            return pool.execute("signature_fields", {"signature": signature}, timeout=SIGNATURE_TIMEOUT)["inputs"]
        return programs.input_names(signature) or []
    except ArgumentError as exc:  # DSPy's reason, from the worker
        raise UsageError(f"{signature!r} is not a DSPy signature: expected 'inputs -> outputs', e.g. "
                         f"'question -> answer' ({exc.message})") from None
    except DspexError:  # the pool's own trouble (a worker died, a full queue): not the signature's
        raise
    except Exception as exc:
        raise UsageError(f"{signature!r} is not a DSPy signature: expected 'inputs -> outputs', e.g. "
                         f"'question -> answer' ({exc})") from None


CALL_OPTIONS = ("lm", "config", "demos")  # what a DSPy predictor's call takes beside its inputs
_OPTION_LINE = re.compile(rf"^({'|'.join(CALL_OPTIONS)})\s*:\s*(\{{.*\}})\s*$")  # `lm: {fast}` in a cell passes
# the kernel's object, as qa(question=..., lm=fast) does; `config: {"temperature": 1.0}` a dict, as DSPy's cheatsheet


def _option(line: str) -> tuple[str, str] | None:
    """(option, value) of a call option's line: one ``{...}`` (a kernel variable), or a dict literal (nested too)."""
    match = _OPTION_LINE.match(line)
    if match is None or (re.search(r"[{}]", match.group(2)[1:-1]) and _dict_literal(match.group(2)) is None):
        return None  # `config: {a} and {b}`: text
    return match.group(1), match.group(2)


def _dict_literal(text: str) -> dict[Any, Any] | None:
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def cell_inputs(body: str, names: list[str] | None, required: list[str] | None = None,
                options: bool = True) -> dict[str, str]:
    """The cell as inputs: one `field: value` line per field, or all of it for the one input field, or for the one
    in ``required`` (unless it starts as a field's line, `question: ...`); the lines of fields not in ``required``
    (a module's inputs with defaults) may be left out, as in a call in the kernel. ``names`` None: a program whose
    call takes any keyword (``**kwargs``, ``dspy.KNN``): a line per keyword. With ``options``, a line `lm: {name}`
    (`config`, `demos`) that names no input field is that call option (its ``{name}`` a kernel object:
    ``typed_value``), not more text of the field before it."""
    given: dict[str, str] = {}
    kept = []
    for line in body.strip("\n").splitlines():
        option = _option(line) if options and names is not None else None
        if option and option[0] not in names:
            given[option[0]] = option[1]
        else:
            kept.append(line)
    text = "\n".join(kept)
    sole = None if names is None else sole_input(names, names if required is None else required)
    first = re.match(r"\s*(\w+)\s*:", text)
    if sole is not None and not (first and first.group(1) in names):
        return {sole: text.strip(), **given}
    values: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^(\w+)\s*:\s?(.*)$", line)
        if match and (names is None or match.group(1) in names):
            current = match.group(1)
            values[current] = [match.group(2)]
        elif current is None:
            if line.strip():
                raise UsageError(f"write one `field: value` line per input field {names}; got {line!r}"
                                 if names is not None else "this program takes keyword arguments (**kwargs): "
                                 f"write one `name: value` line per argument; got {line!r}")
        else:
            values[current].append(line)
    missing = [n for n in (names or [] if required is None else required) if n not in values]
    if missing:
        raise UsageError(f"the cell gives no value for input field(s) {missing}: write one `field: value` "
                         f"line per input field {names}")
    return {**{name: "\n".join(lines).strip() for name, lines in values.items()}, **given}


LOOKUP_ERRORS = (KeyError, AttributeError, IndexError, TypeError, ValueError)  # of a {name} that names no value
_LONE_NAME = re.compile(r"\s*\{([^{}!:]+)\}\s*")  # a value that is one {name}: the kernel's object


def typed_value(text: str, namespace: dict[str, Any]) -> Any:
    """A field's value: the kernel object itself when the value is one ``{name}`` (a list stays a list),
    else the text with every {name} interpolated."""
    match = _LONE_NAME.fullmatch(text)
    if match is None:
        return interpolate(text, namespace)
    try:
        return lookup(match.group(1), namespace)
    except LOOKUP_ERRORS:
        return interpolate(text, namespace)  # raises the clear error


def option_value(option: str, text: str, namespace: dict[str, Any]) -> Any:
    """A call option's value (`lm: {fast}`, `config: {"rollout_id": 1, "temperature": 1.0}`): the kernel object a
    lone ``{name}`` names, or a dict written as a Python literal; never its text, which no call option takes."""
    if match := _LONE_NAME.fullmatch(text):
        try:
            return lookup(match.group(1), namespace)
        except LOOKUP_ERRORS:
            interpolate(text, namespace)  # raises the clear error where it names a variable; `{1, 2}` (a set) does not
    value = _dict_literal(text)
    if value is None:
        raise UsageError(f"{option}: {text.strip()} is neither a kernel variable ({{name}}) nor a dict literal "
                         f"(e.g. {option}: {{\"temperature\": 1.0}}); write {option}: {{name}} of a variable that "
                         "holds it, or --no-interpolate to keep the line as text")
    return value


def as_items(value: Any, name: str) -> list[Any]:
    if type(value).__name__ == "DataFrame" and hasattr(value, "to_dict"):
        return value.to_dict("records")
    if isinstance(value, (list, tuple)):
        return list(value)
    raise UsageError(f"--items {name} must be a list of strings, dicts or dspy.Examples, or a pandas DataFrame; "
                     f"got {type(value).__name__}")


def check_output_name(name: str, shell: Any) -> None:
    """Refuse, before anything runs, an ``-o`` name the result could not be used under: not an identifier
    (``1x``, ``a b``) or a keyword (``class``), which only ``globals()[...]`` reaches; or a builtin (``print``,
    ``list``) or IPython's own name (``In``, ``get_ipython``) that the result would hide, where the kernel has not
    given that name a value of its own already."""
    if not name.isidentifier() or keyword.iskeyword(name):
        raise UsageError(f"-o {name!r}: expected a Python identifier to store the result in, e.g. -o pred")
    hidden = getattr(shell, "user_ns_hidden", {})
    if name in hidden or (hasattr(builtins, name) and name not in shell.user_ns):
        owner = "IPython's" if name in hidden else "Python's builtin"
        raise UsageError(f"-o {name}: the result would hide {owner} {name}; store it under another name, e.g. "
                         f"-o {name}_result")


def _setting(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--set takes KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


# -- the magics ---------------------------------------------------------------------------------
@magics_class
class Dspex(Magics):
    workers = Integer(2, help="Workers in a pool the magics start.").tag(config=True)
    lm = Unicode("", help="LM of a pool the magics start: 'demo' or a dspy.LM model string; empty: the kernel's "
                          "DSPy LM (dspy.configure(lm=...)) where one is set, else 'demo'.").tag(config=True)
    python = Unicode("", help="The workers' Python interpreter (default: the kernel's).").tag(config=True)
    display = Enum(MODES, "auto", help="'widgets', 'text', or 'auto' (widgets in a kernel unless "
                                       "DSPEX_NONINTERACTIVE=1).").tag(config=True)
    warm = Bool(True, help="At %load_ext, start a template process (one idle process that imports DSPy) so "
                           "that the first pool's workers start at once.").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.pools: dict[str, Pool] = {}  # by name (--pool NAME); the magics' own pools
        self._starting = threading.Lock()  # one start of a pool its first users (threads, notebook_pool) share
        ui.default_mode = self.display

    @observe("display")
    def _display_changed(self, change: dict[str, Any]) -> None:
        """The Python API's views follow ``%config Dspex.display`` too. 'widgets' where they are not installed says
        so at once (a view refuses it when it shows)."""
        ui.default_mode = change["new"]
        if change["new"] == "widgets" and not ui.have_widgets():
            print(f"dspex: {ui.WIDGETS_MISSING}", file=sys.stderr)

    @property
    def pool(self) -> Pool | None:
        """The pool named "default" (the one used without --pool)."""
        return self.pools.get(DEFAULT_POOL)

    @line_cell_magic
    def dspex(self, line: str, cell: str | None = None) -> None:
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"%dspex: {exc} in {line!r}") from None
        if not argv or argv[0] not in PARSERS:
            raise UsageError(f"%dspex: expected one of {', '.join(PARSERS)}; see %dspex?")
        command = argv[0]
        if command == "batch" and cell is None:  # `%dspex batch ... --items VAR`: IPython refuses empty cells
            cell = ""
        if (cell is None) != (command not in CELL_COMMANDS):
            raise UsageError(f"use %%dspex {command} as a cell magic" if cell is None
                             else f"%dspex {command} is a line magic: use one %, not %%")
        args = PARSERS[command].parse_args(argv[1:])
        if getattr(args, "output", None):
            check_output_name(args.output, self.shell)
        handler: Callable[..., None] = getattr(self, f"_{command}")
        try:
            with _dspy_meanwhile(command in ("predict", "run", "batch") and not getattr(args, "background", False)):
                handler(args, cell) if cell is not None else handler(args)
        except (CellFailed, CellInterrupted):
            raise
        except KeyboardInterrupt:
            raise CellInterrupted(f"interrupted; {INTERRUPTED.get(command, 'the remote work was cancelled')}") \
                from None
        except SettingError as exc:  # -n 0, --concurrency 0, --timeout -1: named, without a traceback
            raise UsageError(f"%dspex {command}: {exc}") from None
        except (DspexError, SyntaxError) as exc:
            raise CellFailed(_said(exc)) from exc

    dspex.__doc__ = HELP

    # -- pool control ---------------------------------------------------------------------------
    def _require_pool(self, name: str) -> Pool:
        with self._starting:  # 32 notebook threads calling notebook_pool() at once start one pool, not 15
            pool = self.pools.get(name)
            if pool is None:
                pool = self._start_pool(name, self.workers, self.lm, self.python, first_use=True)
            elif not pool.running:  # stopped under it (an interrupted %dspex restart, pool.shutdown()): as it was
                pool = self._again(name, pool)
            return pool

    def _again(self, name: str, old: Pool) -> Pool:
        """Stop ``old`` (again: a stop that was interrupted left its workers running) and start pool ``name``
        anew with its settings and definitions."""
        old.shutdown()
        old.stopped_note = (f"this pool was stopped and pool {name!r} started anew in its place (%dspex restart): "
                            f"dspex_nb.notebook_pool({name!r}) is the new one")
        python = getattr(old.backend, "python", sys.executable)
        python = "" if python == sys.executable else python
        ray = (old.backend.address or "") if old.backend.name == "ray" else None
        return self._start_pool(name, old.size, old.lm, python, old.definitions, old.lm_kwargs, ray)

    def _start_pool(self, name: str, workers: int, lm: str, python: str, definitions: dict | None = None,
                    lm_kwargs: dict | None = None, ray: str | None = None, first_use: bool = False) -> Pool:
        """Start a pool: local worker processes, or (``ray`` not None) Ray actors on the cluster at that
        address ("" for a local Ray instance). ``lm`` "": the kernel's DSPy LM, else the demo LM."""
        started = time.monotonic()
        where = {} if ray is None else {"backend": "ray", "address": ray or None}
        try:
            pool = Pool(workers=workers, lm=lm or None, lm_kwargs=lm_kwargs, python=python or None, **where)
        except (ValueError, ImportError) as exc:  # the kernel's LM is not a dspy.LM; Ray is not installed
            raise UsageError(str(exc)) from None
        label = "" if name == DEFAULT_POOL else f" {name!r}"
        if first_use:
            print(f"dspex: no pool{label} yet; starting {count(workers, 'worker')} with lm={pool.lm!r} "
                  "(%dspex start to choose)")
        pool.definitions.update(definitions or {})
        try:
            pool.start()
        except ImportError as exc:  # MissingDependency: the workers' Python lacks dspy (its message says what to run)
            raise UsageError(str(exc)) from None
        except OSError as exc:  # a runtime directory or DSPy cache it refuses: its message names it and what to do
            ours = exc.strerror and exc.errno and exc.strerror != os.strerror(exc.errno)  # else the system's own,
            raise CellFailed(exc.strerror if ours else str(exc)) from exc  # with its file name
        self.pools[name] = pool
        on = "" if ray is None else f", Ray actors at {ray or 'a local Ray instance'}{_dashboard(pool.backend)}"
        print(f"dspex: pool{label} of {count(workers, 'worker')} ready (lm={pool.lm!r}{on}) in "
              f"{time.monotonic() - started:.1f} s")
        return pool

    def _start(self, args: argparse.Namespace) -> None:
        pool = self.pools.get(args.pool)
        if pool is not None and pool.running:
            print(f"dspex: pool {args.pool!r} is already running ({pool!r}); use %dspex restart to change it")
            return
        if pool is not None:  # stopped under the magics: a stop that was interrupted left its workers running
            pool.shutdown()
        workers = self.workers if args.workers is None else args.workers
        self._start_pool(args.pool, workers, args.lm or self.lm, args.python or self.python, ray=args.ray)

    def _stop(self, args: argparse.Namespace) -> None:
        pool = self.pools.pop(args.pool, None)
        if pool is None:
            print(f"dspex: no pool {args.pool!r} is running")
            return
        pool.shutdown()
        pool.stopped_note = (f"%dspex stop stopped this pool: %dspex start, or dspex_nb.notebook_pool({args.pool!r}), "
                             "starts the notebook's pool anew")
        print("dspex: pool stopped" if args.pool == DEFAULT_POOL else f"dspex: pool {args.pool!r} stopped")

    def _restart(self, args: argparse.Namespace) -> None:
        old = self.pools.get(args.pool)
        if old is None:
            self._start_pool(args.pool, self.workers, self.lm, self.python)
            return
        # old stays in self.pools until its successor is ready: interrupted, the next command starts it again
        self._again(args.pool, old)

    def _status(self, args: argparse.Namespace) -> None:
        pool = self.pools.get(args.pool)
        if pool is None:
            print(f"dspex: no pool {args.pool!r} is running (%dspex start)")
            return
        show_pool(pool, mode=self.display, show_stats=args.stats)

    def _config(self, args: argparse.Namespace) -> None:
        for name in ("workers", "lm", "python", "display", "warm"):
            print(f"Dspex.{name} = {getattr(self, name)!r}")
        for name, pool in self.pools.items():
            print(f"pool {name!r}: {pool!r}, lm_kwargs={redact.mapping(pool.lm_kwargs)}, "
                  f"modules={pool.defined_names()}")

    def _lm(self, args: argparse.Namespace) -> None:
        settings = dict(_setting(s) for s in args.set)
        if args.temperature is not None:
            settings["temperature"] = args.temperature
        if args.max_tokens is not None:
            settings["max_tokens"] = args.max_tokens
        pool = self._require_pool(args.pool)
        pool.configure_lm(args.model, **settings)
        extra = f" with {redact.mapping(settings)}" if settings else ""
        print(f"dspex: LM {args.model!r}{extra} on {count(pool.size, 'worker')}")

    # -- cells ----------------------------------------------------------------------------------
    def _body(self, cell: str, args: argparse.Namespace) -> str:
        return cell if args.no_interpolate else interpolate(cell, self.shell.user_ns)

    def _program(self, name: str) -> Any:
        """The kernel variable ``name`` when it holds a DSPy module, signature class or function, or a signature
        string naming kernel types made here, else None."""
        if not name.isidentifier():
            return self._typed_signature(name)
        value = self.shell.user_ns.get(name)
        if callable(value) and not isinstance(value, type):  # a function, or a module instance
            return value
        if not isinstance(value, type) or "dspy" not in sys.modules:  # no DSPy class before DSPy is imported
            return None
        import dspy

        return value if issubclass(value, (dspy.Module, dspy.Signature)) else None

    def _typed_signature(self, text: str) -> Any:
        """A signature string that names kernel types ("person: Person -> greeting") as a signature class, made
        as DSPy makes it in a cell (the types found in the notebook's namespace); None for any other string,
        which a worker parses (so a plain first cell need not import DSPy here)."""
        names = programs.signature_types(text, self.shell.user_ns)
        if not names:
            return None
        import dspy

        try:
            return dspy.Signature(text, custom_types=names)
        except Exception as exc:
            raise UsageError(f"{text!r} is not a DSPy signature: expected 'inputs -> outputs', e.g. "
                             f"'question -> answer' ({exc})") from None

    def _module(self, name: str, pool: Pool) -> Any:
        """What ``%%dspex run NAME`` and ``--module NAME`` run: the kernel's ``NAME`` as it is now (what
        ``NAME(...)`` runs here, also after it was compiled or changed since ``%%dspex define``), unless NAME
        was defined on the pool from source (``pool.define(name, source)``), which runs as defined; None if
        neither is there."""
        defined = pool.definitions.get(name)
        program = self._program(name)
        if program is not None and (defined is None or defined["tool"] == "define_object"):
            return program
        return name if defined is not None else None

    def _inputs(self, cell: str, names: list[str] | None, args: argparse.Namespace,
                required: list[str] | None = None) -> dict[str, Any]:
        values = cell_inputs(cell, names, required, options=not args.no_interpolate)
        if args.no_interpolate:
            return values
        options = set(CALL_OPTIONS).difference(names) if names is not None else set()  # as cell_inputs takes them
        ns = self.shell.user_ns
        return {name: option_value(name, text, ns) if name in options else typed_value(text, ns)
                for name, text in values.items()}

    def _signature(self, text: str) -> Any:
        """A ``%%dspex predict`` / ``batch`` signature: the kernel's class (or a string naming kernel types as
        one), else the string, which a worker parses. A bare name is never a signature string (DSPy's have a
        ``->``): one the kernel lacks is the user's, refused here, not a failed call on a worker."""
        signature = self._program(text)
        if signature is None and text.isidentifier():
            raise UsageError(f"{text!r} names no signature class of the kernel: run the cell that defines it "
                             f"(class {text}(dspy.Signature): ...), or give a signature string, e.g. "
                             "'question -> answer'")
        return signature or text

    def _predict(self, args: argparse.Namespace, cell: str) -> None:
        signature = self._signature(args.signature)
        inputs = self._inputs(cell, signature_inputs(signature, self._require_pool(args.pool)), args)
        if isinstance(signature, str) and typed.plain(inputs):  # the built-in tools take JSON as it is
            tool = "chain_of_thought" if args.cot else "predict"
            tokens = {} if not args.no_stream else {"tokens": False}
            self._stream(lambda pool, stream: pool.call_tool(tool, {"signature": signature, "inputs": inputs,
                                                                    **tokens}, stream=stream, timeout=args.timeout),
                         f"{tool} {signature!r}", args)
            return
        program = programs.as_program(signature, cot=args.cot)
        self._stream(lambda pool, stream: pool.call(program, inputs, stream=stream, timeout=args.timeout,
                                                    tokens=not args.no_stream), f"predict {args.signature}", args)

    def _run(self, args: argparse.Namespace, cell: str) -> None:
        pool = self._require_pool(args.pool)
        program = self._module(args.name, pool)
        if program is None:
            raise UsageError(f"no module named {args.name!r}: define it with %%dspex define {args.name}, or make "
                             f"{args.name} a dspy.Module in the kernel (defined: {pool.defined_names() or 'none'})")
        name = pool.ensure_defined(program)
        definition = pool.definitions[name]
        # a forward's parameters with defaults may be left out (all of them, where each has one); a predictor's
        # inputs, which DSPy does not require either, may not
        optional = definition.get("optional") or []
        required = [n for n in definition["inputs"] if n not in optional]
        names = None if definition.get("open_ended") and not definition["inputs"] else definition["inputs"]
        inputs = self._inputs(cell, names, args, required)
        self._stream(lambda pool, stream: pool.call(name, inputs, stream=stream, timeout=args.timeout,
                                                    tokens=not args.no_stream), f"run {args.name}", args)

    def _stream(self, call: Callable[[Pool, bool], Any], title: str, args: argparse.Namespace) -> None:
        """``call(pool, stream)``: the program's value, or (streaming) its Run, shown live. With --no-stream the
        program runs without DSPy's streaming: in a notebook its view has no tokens but still its Stop; as text
        the whole answer is printed once (so not with -a)."""
        live = ui.live_frontend(self.display)
        if args.no_stream and args.background and not live:
            raise UsageError("--no-stream waits for the whole answer: use it without -a (outside a notebook)")
        pool = self._require_pool(args.pool)
        if args.no_stream and not live:
            value = call(pool, False)
            self._store(args.output, value)
            print("\n".join(_field_lines(value)))
            return
        run = call(pool, True)
        self._show(run, lambda: show_run(run, title, mode=self.display, block=not args.background), args)

    def _batch(self, args: argparse.Namespace, cell: str) -> None:
        if bool(args.signature) == bool(args.module):
            raise UsageError("%%dspex batch takes a signature or --module NAME (one of them)")
        if args.items:
            if args.items not in self.shell.user_ns:
                raise UsageError(f"--items {args.items}: no variable named {args.items!r} in the kernel")
            items = as_items(self.shell.user_ns[args.items], args.items)
        else:
            items = [line.strip() for line in self._body(cell, args).splitlines() if line.strip()]
            if not items:
                raise UsageError("%%dspex batch needs --items VAR or one item per line in the cell")
        pool = self._require_pool(args.pool)
        options = {"concurrency": args.concurrency, "timeout": args.timeout, "item_timeout": args.item_timeout,
                   "journal": not args.no_journal}
        signature = self._signature(args.signature) if args.signature else None
        if args.module and self._module(args.module, pool) is None:
            raise UsageError(f"--module {args.module}: no module of that name is defined (%%dspex define) or in "
                             f"the kernel (defined: {pool.defined_names() or 'none'})")
        if isinstance(signature, str):  # a signature string: the built-in tools
            signature_inputs(signature, pool)
            batch = pool.batch(items, args.signature, module="chain_of_thought" if args.cot else "predict",
                               **options)
            batch.decode = partial(programs.to_output, batch=True, resolve=typed.Resolver(),
                                   fill_usage=not programs.usage_tracked())
        else:
            program = programs.as_program(signature, cot=args.cot) if signature is not None else \
                self._module(args.module, pool)
            batch = pool.map(program, items, max_errors=len(items) + 1, **options)  # every item, as the built-in
        batch.caller, batch.kept_in = "%dspex batch", _kept(batch, args.output)  # where _show and _finish put it
        title = f"batch {args.module or args.signature!r}"
        self._show(batch, lambda: show_batch(batch, title, mode=self.display, block=not args.background), args)

    def _journal(self, args: argparse.Namespace) -> None:
        action, key = ((args.action, args.key) if args.action in JOURNAL_ACTIONS or args.key is not None
                       else ("list", args.action))  # a KEY alone: its batches
        if action not in JOURNAL_ACTIONS:
            raise UsageError(f"%dspex journal: {action!r} is not list or clear")
        pool = self.pools.get(args.pool)
        if pool is not None and pool.journal is None:
            print(f"dspex: pool {args.pool!r} keeps no journal (Pool(journal=False))")
            return
        try:
            journal = pool.journal if pool is not None else Journal()  # no need to start workers to read a file
        except (OSError, sqlite3.Error) as exc:  # a pipe, a place other users may write to, a disk error
            raise UsageError(f"%dspex journal: {exc}") from None
        try:
            if action == "clear":
                removed = journal.clear(key)
                print(f"dspex: cleared {removed} batch{'es' * (removed != 1)} from {journal.path}")
                return
            batches = [b for b in journal.batches() if b["key"].startswith(key or "")]
        except sqlite3.Error as exc:  # locked by another kernel's long write, a disk error...
            raise UsageError(f"%dspex journal: the batch journal {journal.path} cannot be used now: {exc}") from None
        finally:
            if pool is None:
                journal.close()
        print(f"journal {journal.path}: {len(batches)} batch{'es' * (len(batches) != 1)}")
        rows = [[b["key"][:12], str(b["items"]), time.strftime("%Y-%m-%d %H:%M", time.localtime(b["updated"])),
                 b["description"]] for b in batches]
        if rows:
            print(text_table(("key", "items", "updated", "program"), rows))

    def _define(self, args: argparse.Namespace, cell: str) -> None:
        """Run the cell here, as any cell, then ship what it defines under ``name`` to every worker, by value
        (with the names it uses from earlier cells, and its source for inspect.getsource)."""
        import dspy

        pool = self._require_pool(args.pool)
        lm_before = dspy.settings.lm
        filename = self.shell.compile.cache(cell)
        self.shell.user_ns.setdefault("dspy", dspy)  # as documented: `dspy` is imported in a define cell
        exec(compile(cell, filename, "exec", dont_inherit=True), self.shell.user_ns)
        if dspy.settings.lm is not lm_before:
            print("dspex: dspy.configure(lm=...) in this cell set the kernel's LM; the workers' LM is set with "
                  "%dspex lm MODEL (or pool.configure_lm)", file=sys.stderr)
        if args.name not in self.shell.user_ns:
            raise UsageError(f"the cell defines no {args.name!r}")
        try:
            info = pool.define(args.name, self.shell.user_ns[args.name])
        except ToolError as exc:
            raise CellFailed(f"define {args.name} failed: {_said(exc)}\n{printable(exc.remote_traceback)}") from exc
        inputs = ", ".join(info.get("inputs", [])) or "none"
        print(f"dspex: defined {args.name} ({info.get('kind')}; inputs: {inputs}) on {count(pool.size, 'worker')}; "
              f"run it with %%dspex run {args.name}")

    def _show(self, handle: Run | BatchRun, show: Callable[[], None], args: argparse.Namespace) -> None:
        """Show ``handle`` (blocking unless -a), then store its result; interrupted, keep what arrived. The cell run
        again (its output cleared, view and Stop with it) stops it."""
        rerun.stop_when_rerun(handle)
        try:
            show()
        except KeyboardInterrupt:
            self._store(args.output, handle)  # nothing computed is lost: `_` (and -o VAR) hold the partial run
            raise CellInterrupted("interrupted; the remote work was cancelled; what arrived before the interrupt is "
                                  f"in {_kept(handle, args.output)}") from None
        self._finish(handle, args)

    def _finish(self, handle: Run | BatchRun, args: argparse.Namespace) -> None:
        """Store the result of a finished call (or the handle of a background one) and report errors."""
        if args.background:
            self._store(args.output, handle)
            name = args.output or "_"
            print(f"dspex: running in the background; {name}.result() waits for it, {name}.cancel() stops it")
            return
        try:
            result = handle.result()
        except DspexError as exc:  # stopped (the view's Stop), or an LM or tool error (the view shows it too)
            if isinstance(exc, Cancelled):  # the user's own choice, as a batch's failed items: the cell goes on
                self._store(args.output, handle)  # as an interrupt does: `_` and -o VAR keep what arrived
                said, kept = _said(exc), _kept(handle, args.output)  # a batch's says where (its kept_in)
                print(f"dspex: {said}" + ("" if kept in said else f"; what arrived before is in {kept}"),
                      file=sys.stderr)
                return
            self._store(None, handle)  # nothing computed is lost: `_` keeps what arrived
            raise CellFailed(f"{_said(exc)}\ndspex: what arrived before is in {_kept(handle, None)}") from exc
        self._store(args.output, result)

    def _store(self, name: str | None, value: Any) -> None:
        """``value`` in ``name`` and in ``_``, as a cell's value is: IPython's ``__`` and ``___`` move on, and so
        does ``_`` at the next cell's value (it stops updating ``_`` for good once a cell assigns it). By IPython's
        rules (``DisplayHook.update_user_ns``): not with its output cache off, and ``_`` and the others are left
        as they are where the user assigned one of them, or ``_`` is a builtin (gettext's)."""
        if name:
            self.shell.user_ns[name] = value
        hook = self.shell.displayhook
        if not hook.cache_size:
            return
        ours = _unders_are_ipythons(self.shell)
        hook.___, hook.__, hook._ = hook.__, hook._, value
        if ours and "_" not in vars(builtins):
            self.shell.push({"_": hook._, "__": hook.__, "___": hook.___}, interactive=False)


def _dashboard(backend: Any) -> str:
    return f", dashboard {backend.dashboard}" if backend.dashboard else ""


def _unders_are_ipythons(shell: Any) -> bool:
    """Whether none of ``_``, ``__``, ``___`` in the user's namespace was assigned by the user, as IPython's
    ``DisplayHook.update_user_ns`` tells: each is missing, or what IPython (or ``_store``) last put there."""
    for name in ("_", "__", "___"):
        if name not in shell.user_ns:
            continue
        ours = shell.user_ns_hidden[name] if name in shell.user_ns_hidden else getattr(shell.displayhook, name)
        if shell.user_ns[name] is not ours:
            return False
    return True


class CellFailed(Exception):
    """Why a dspex command failed, shown as its lines (``dspex: ...``) in place of a traceback (IPython's
    ``_render_traceback_``), failing the cell: Run All, nbval and papermill stop there, as they do where the same
    call fails in plain Python. Its ``__cause__`` is the error itself."""

    def _render_traceback_(self) -> list[str]:
        return f"dspex: {self}".split("\n")


class CellInterrupted(KeyboardInterrupt):
    """An interrupt (Jupyter's ■) of a dspex command, said as what it left: the cell fails as an interrupted one."""

    _render_traceback_ = CellFailed._render_traceback_


def _kept(handle: Run | BatchRun, output: str | None) -> str:
    """Where what a stopped command's handle received is: the -o variable's, else ``_``'s, as ``_store`` puts it."""
    return f"{output or '_'}.{'records' if isinstance(handle, BatchRun) else 'chunks'}"


def _said(error: BaseException) -> str:
    """``error`` as a magic prints it (``one_line``), ``printable``: a program's error often quotes what the LM
    answered (DSPy's parse errors do), which may hold escape sequences that rewrite the lines above."""
    return printable(one_line(error) if isinstance(error, DspexError) else str(error))


def _field_lines(value: Any) -> list[str]:
    """A whole answer as the text view ends a stream: ``field: value`` per field, or the value itself; printable."""
    fields = fields_of(value)
    if fields is None:
        return [printable(repr(value))]
    return [printable(f"{name}: {field_text(v)}") for name, v in fields.items()]


def notebook_pool(name: str = DEFAULT_POOL) -> Pool:
    """The pool the magics use in this IPython session (started with ``%dspex start``, or now), so that
    ``pool.run`` / ``pool.map`` / ``pool.evaluate`` share its workers and dashboard."""
    from IPython import get_ipython

    shell = get_ipython()
    magics = next((c for c in getattr(shell, "configurables", ()) if isinstance(c, Dspex)), None)
    if magics is None:
        raise RuntimeError("the dspex_nb magics are not loaded here: %load_ext dspex_nb first (or use Pool(...))")
    return magics._require_pool(name)


@contextlib.contextmanager
def _dspy_meanwhile(blocking: bool) -> Iterator[None]:
    """In a first blocking cell, import DSPy in a thread while the pool starts and the answer streams (the
    result is a dspy.Prediction; the import takes about 1.5 s on 2 cores), joined before the cell ends. No
    user code runs meanwhile, and ours imports only ``dspy`` itself (which waits for the import to finish),
    so nothing reaches a half-imported part of DSPy. A background cell (-a) does not: the next cell could."""
    if not blocking or "dspy" in sys.modules:
        yield
        return
    thread = threading.Thread(target=_import_dspy, name="dspex-import-dspy", daemon=True)
    thread.start()
    try:
        yield
    finally:
        while thread.is_alive():  # not even Ctrl-C leaves it importing when the next cell runs
            with contextlib.suppress(KeyboardInterrupt):
                thread.join()


def _import_dspy() -> None:
    with contextlib.suppress(Exception):  # should it fail, the import where DSPy is needed says why
        importlib.import_module("dspy")


def load(shell: Any) -> Dspex:
    magics = Dspex(shell=shell)
    shell.register_magics(magics)
    shell.configurables.append(magics)
    rerun.listen(getattr(shell, "kernel", None))
    if magics.warm:
        try:
            local.warm(magics.python or None)
        except Exception as exc:  # the first pool starts its own template, and says what is wrong with it
            print(f"dspex: could not start a template process ahead of the first pool: {exc}", file=sys.stderr)
    return magics


def unload(shell: Any) -> None:
    for magics in [c for c in shell.configurables if isinstance(c, Dspex)]:
        for pool in magics.pools.values():
            pool.shutdown()
        magics.pools.clear()
        shell.configurables.remove(magics)
    local.close_spare()
    shell.magics_manager.magics["line"].pop("dspex", None)
    shell.magics_manager.magics["cell"].pop("dspex", None)
