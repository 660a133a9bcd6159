"""Bad input gets a clear error naming what is wrong, and the pool stays usable."""

from __future__ import annotations

import asyncio
import copy
import gc
import pickle
import subprocess
import sys
import threading
import traceback
import types
import weakref
from pathlib import Path
from typing import Any

import pytest

import dspex_nb
from dspex_nb import Pool
from dspex_nb.errors import ArgumentError, MessageTooLarge, ToolError, UnknownTool, WorkerStartError


@pytest.fixture(autouse=True)
def pool_still_serves(pool: Pool):
    yield
    assert pool.execute("echo", {"still": "alive"}) == {"still": "alive"}
    assert [r["state"] for r in pool.status()] == ["ready", "ready"]


def test_unknown_tool_lists_the_tools(pool: Pool) -> None:
    with pytest.raises(UnknownTool, match="no tool named 'nope'; available tools: .*batch_inference.*echo"):
        pool.execute("nope")
    with pytest.raises(UnknownTool):
        pool.execute_stream("nope")


def test_bad_calls_are_refused_before_they_are_sent(pool: Pool) -> None:
    before = [pool.describe(w)["counters"]["total_requests"] for w in ("w0", "w1")]
    for tool, args in [("nope", {}), ("sleep", {}), ("sleep", {"seconds": "soon"}), ("echo", {"x": {1}})]:
        with pytest.raises((UnknownTool, ArgumentError)):
            pool.execute(tool, args)
        with pytest.raises((UnknownTool, ArgumentError)):
            pool.execute_stream(tool, args)
    assert [pool.describe(w)["counters"]["total_requests"] for w in ("w0", "w1")] == before
    assert pool.schemas["sleep"]["args"]["seconds"] == {"type": "float", "required": True}


def test_the_worker_checks_arguments_too(pool: Pool) -> None:
    from dspex_nb._proto import bridge_pb2

    stub = pool.workers[0].conn.stub  # a client that skips the pool's own check
    reply = stub.Execute(bridge_pb2.ExecuteRequest(tool="sleep", args_json=b'{"seconds": "soon"}'), timeout=10)
    assert reply.error.type == "ArgumentError"
    assert reply.error.message == "argument 'seconds' must be float, got str ('soon')"
    reply = stub.Execute(bridge_pb2.ExecuteRequest(tool="nope"), timeout=10)
    assert reply.error.type == "UnknownTool" and "available tools" in reply.error.message


def test_missing_argument_is_named(pool: Pool) -> None:
    with pytest.raises(ArgumentError, match="missing required argument 'seconds'"):
        pool.execute("sleep", {})


def test_wrongly_typed_argument_is_named(pool: Pool) -> None:
    with pytest.raises(ArgumentError, match="argument 'seconds' must be float, got str"):
        pool.execute("sleep", {"seconds": "soon"})
    with pytest.raises(ArgumentError, match="argument 'batch_items' must be list, got dict"):
        pool.execute("batch_inference", {"signature": "q -> a", "batch_items": {"q": "x"}})


def test_unexpected_argument_is_named(pool: Pool) -> None:
    with pytest.raises(ArgumentError, match=r"unexpected argument\(s\) \['secs'\]"):
        pool.execute("sleep", {"seconds": 0, "secs": 1})


def test_bad_signature_string(pool: Pool) -> None:
    with pytest.raises(ArgumentError, match="'question answer' is not a valid DSPy signature"):
        pool.execute("predict", {"signature": "question answer", "inputs": {"question": "x"}})


def test_inputs_that_do_not_match_the_signature(pool: Pool) -> None:
    with pytest.raises(ArgumentError, match=r"'inputs' must have the input fields \['question'\]; missing "
                                            r"\['question'\]; it has \['q'\], which are not input fields"):
        pool.execute("predict", {"signature": "question -> answer", "inputs": {"q": "x"}})
    with pytest.raises(ArgumentError, match=r"batch_items\[1\] must have the input fields .*missing \['question'\]"):
        pool.execute("batch_inference", {"signature": "question -> answer",
                                         "batch_items": [{"question": "a"}, {"text": "b"}]})


def test_non_json_argument_is_named(pool: Pool) -> None:
    with pytest.raises(ArgumentError, match="argument 'x' is not JSON-serialisable"):
        pool.execute("echo", {"ok": 1, "x": {1, 2}})
    circular: list = []
    circular.append(circular)
    with pytest.raises(ArgumentError, match="argument 'x' is not JSON-serialisable: Circular reference detected"):
        pool.execute("echo", {"x": circular})
    with pytest.raises(ArgumentError, match="arguments must be a dict, got list"):
        pool.execute("echo", [1, 2])  # type: ignore[arg-type]


def test_tool_exception_is_structured_and_the_worker_survives(pool: Pool) -> None:
    with pytest.raises(ToolError) as info:
        pool.execute("fail", {"message": "boom", "type": "ValueError"}, worker="w0")
    err = info.value
    assert (err.tool, err.type, err.message, err.worker) == ("fail", "ValueError", "boom", "w0")
    assert "Traceback" in err.remote_traceback and "ValueError: boom" in err.remote_traceback
    run = pool.execute_stream("fail", {"message": "boom in a stream"})
    with pytest.raises(ToolError, match="boom in a stream"):
        run.result()
    assert run.status == "failed" and run.chunks[-1].kind == "error"
    assert pool.execute("whoami", worker="w0")["worker"] == "w0"


class NotebookError(ValueError):
    """An exception class of the user's, defined where the program is (here: a test module, as a notebook)."""


def test_a_programs_exception_is_caught_as_its_own_class_as_in_the_kernel(pool: Pool) -> None:
    import dspy

    def program(kind: str) -> None:
        raise {"key": KeyError("missing"), "value": ValueError("bad value"), "ours": NotebookError("ours"),
               "dspy": dspy.utils.exceptions.AdapterParseError("ChatAdapter", dspy.Signature("a -> b"), "x"),
               "exit": SystemExit(3)}[kind]

    for kind, expected in [("key", KeyError), ("value", ValueError), ("ours", NotebookError),
                           ("dspy", dspy.utils.exceptions.AdapterParseError)]:
        for call in (pool.run, lambda p, **kw: pool.run_stream(p, **kw).result()):
            with pytest.raises(expected) as info:
                call(program, kind=kind)
            assert isinstance(info.value, ToolError) and info.value.type == expected.__name__
            assert info.value.worker.startswith("w") and "raised on worker w" in info.value.__notes__[-1]
    with pytest.raises(ToolError) as info:  # a BaseException of the program: an error, not the kernel's exit
        pool.run(program, kind="exit")
    assert not isinstance(info.value, SystemExit) and info.value.type == "SystemExit"
    with pytest.raises(dspy.LMError, match="LMRateLimitError"):  # an LM's error, as dspy.LM raises it
        with Pool(workers=1, lm="demo", lm_kwargs={"rate_limit_first": 10, "num_retries": 0}) as limited:
            limited.run("question -> answer", question="Too many?")


def test_a_programs_exception_reads_as_in_the_kernel_with_the_workers_traceback_in_a_note(pool: Pool) -> None:
    def program(kind: str) -> None:
        if kind == "file":
            open("/nonexistent/dspex-test")  # noqa: SIM115 -- its errno and filename are an OSError's fields in C
        if kind == "import":
            import dspex_no_such_module  # noqa: F401 -- ModuleNotFoundError's name
        raise {"key": KeyError("missing"), "args": ValueError("boom", 3),
               "ours": NotebookError("ours", {"a": [1]})}[kind]

    for kind in ("key", "args", "ours", "file", "import"):
        with pytest.raises(Exception) as local:
            program(kind)
        for call in (pool.run, lambda p, **kw: pool.run_stream(p, **kw).result()):
            with pytest.raises(local.type) as info:
                call(program, kind=kind)
            error, expected = info.value, local.value
            assert (str(error), repr(error), error.args) == (str(expected), repr(expected), expected.args)
            assert traceback.format_exception_only(error)[0] == traceback.format_exception_only(expected)[0]
            fields = ("errno", "strerror", "filename", "name")
            assert [getattr(error, f, None) for f in fields] == [getattr(expected, f, None) for f in fields]
            note = error.__notes__[-1]  # the worker's traceback starts at the program's call, as the kernel's does
            assert note.startswith(f"raised on worker {error.worker} (dspex_nb tool 'run_module')"), note
            assert note.splitlines()[2].endswith(", in program") and "dspex_nb" not in note.split("\n", 1)[1]
            for copied in (copy.deepcopy(error), pickle.loads(pickle.dumps(error))):
                assert isinstance(copied, local.type) and isinstance(copied, ToolError)
                assert (repr(copied), copied.worker, copied.__notes__) == (repr(error), error.worker, error.__notes__)


class ErrorWithAttributes(Exception):
    """A user's exception class with attributes of its own, set in its constructor."""

    def __init__(self, code: int) -> None:
        super().__init__(f"failed with {code}")
        self.code = code
        self.details = {"retry": [1, 2.5, None], "ok": False}
        self.tool = "shadowed"  # a ToolError's own attribute: the ToolError's stays
        self.api_key = "sk-secret-value"  # a secret-named attribute: left out (its value would be masked)
        self.hint = "use api_key=sk-secret-value"
        self.lock = threading.Lock()  # not JSON: left out
        self.pair = (1, 2)  # a tuple would come back as a list: left out
        self._private = 1


def test_a_programs_exception_keeps_its_own_attributes(pool: Pool) -> None:
    import dspy
    import litellm

    def program(kind: str) -> None:
        raise {"ours": ErrorWithAttributes(7),
               "dspy": dspy.utils.exceptions.AdapterParseError("ChatAdapter", dspy.Signature("a -> b"), "resp",
                                                               parsed_result={"a": "1"}),
               "litellm": litellm.RateLimitError("slow down", llm_provider="openai", model="gpt-x")}[kind]

    for call in (pool.run, lambda p, **kw: pool.run_stream(p, **kw).result()):
        with pytest.raises(ErrorWithAttributes) as info:
            call(program, kind="ours")
        error = info.value
        assert (error.code, error.details) == (7, {"retry": [1, 2.5, None], "ok": False})
        assert error.tool == "run_module" and "sk-secret-value" not in error.hint
        assert not any(hasattr(error, name) for name in ("lock", "pair", "_private", "api_key"))
        with pytest.raises(dspy.utils.exceptions.AdapterParseError) as info:
            call(program, kind="dspy")
        assert (info.value.adapter_name, info.value.lm_response, info.value.parsed_result) == \
            ("ChatAdapter", "resp", {"a": "1"})
        with pytest.raises(litellm.RateLimitError) as info:
            call(program, kind="litellm")
        assert (info.value.status_code, info.value.llm_provider, info.value.model) == (429, "openai", "gpt-x")


class CodedError(ValueError):
    """An exception class whose own ``__new__`` takes other arguments than a ToolError's."""

    def __new__(cls, code: int) -> CodedError:
        error = super().__new__(cls, code)
        error.code = code
        return error


def test_a_programs_exception_of_a_class_made_otherwise_is_still_its_error(pool: Pool) -> None:
    def program() -> None:
        raise CodedError(7)

    with pytest.raises(ValueError, match="CodedError: 7") as info:  # its next class, that takes them
        pool.run(program)
    assert isinstance(info.value, ToolError) and not isinstance(info.value, CodedError)


def grouped(kind: str) -> None:
    """Raises an exception group, as ``asyncio.TaskGroup`` does (``except*`` in the kernel catches its parts)."""
    if kind == "nested":
        raise ExceptionGroup("several", [KeyError("a", 3), ExceptionGroup("inner", [NotebookError("ours")])])  # noqa: F821
    raise BaseExceptionGroup("base", [KeyboardInterrupt(), KeyError("k")])  # noqa: F821


async def grouped_by_a_task_group(kind: str) -> None:
    async def fails() -> None:
        raise KeyError(kind)

    async with asyncio.TaskGroup() as tasks:  # type: ignore[attr-defined]
        tasks.create_task(fails())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="ExceptionGroup is Python 3.11's")
def test_a_programs_exception_group_comes_back_as_a_group_that_except_star_splits(pool: Pool) -> None:
    calls = {"run": pool.run, "run_stream": lambda p, **kw: pool.run_stream(p, **kw).result(),
             "run_async": lambda p, **kw: asyncio.run(pool.run_async(p, **kw))}
    for name, call in calls.items():
        for program in (grouped, grouped_by_a_task_group):
            with pytest.raises(ExceptionGroup) as local:  # noqa: F821
                asyncio.run(program("nested")) if program is grouped_by_a_task_group else program("nested")
            with pytest.raises(ExceptionGroup) as info:  # noqa: F821
                call(program, kind="nested")
            error, expected = info.value, local.value
            assert isinstance(error, ToolError) and error.worker and "raised on worker" in error.__notes__[-1], name
            assert (str(error), repr(error), error.message) == (str(expected), repr(expected), expected.message)
            assert "KeyError" in error.__notes__[-1]  # the worker's traceback shows every sub-exception
            parts = [error.split(cls)[0] for cls in (KeyError, NotebookError)]  # what `except* cls` catches
            assert all(isinstance(p, ToolError) and p.__notes__ == error.__notes__ for p in parts if p is not None)
            caught = [e for part in parts if part is not None for e in part.exceptions]
            assert [repr(e) for e in caught] == [repr(e) for e in expected.exceptions], name
            assert all(isinstance(e, ToolError) and e.worker == error.worker for e in caught)
    with pytest.raises(ExceptionGroup) as info:  # noqa: F821 -- its KeyboardInterrupt comes back as a ToolError
        pool.run(grouped, kind="base")
    assert str(info.value) == f"tool 'run_module' failed on worker {info.value.worker}: BaseExceptionGroup: base " \
                              "(2 sub-exceptions)"
    interrupt, key = info.value.exceptions
    assert interrupt.type == "KeyboardInterrupt" and not isinstance(interrupt, KeyboardInterrupt)
    assert isinstance(key, KeyError) and repr(key) == "KeyError('k')"
    for copied in (copy.deepcopy(info.value), pickle.loads(pickle.dumps(info.value))):
        assert isinstance(copied, ExceptionGroup) and isinstance(copied, ToolError)  # noqa: F821
        assert (repr(copied), copied.worker, copied.__notes__) == (repr(info.value), info.value.worker,
                                                                   info.value.__notes__)
    batch = pool.map(grouped, ["nested"], max_errors=2)
    assert batch.result() == [None]
    error = batch.records[0]["error"]  # with its classes, args and group, so pool.evaluate raises it as itself
    assert (error["type"], error["message"]) == ("ExceptionGroup", "several (2 sub-exceptions)")
    assert error["bases"][0] == "builtins:ExceptionGroup" and len(error["group"]["exceptions"]) == 2


class FrozenError(ValueError):
    """An exception class whose instances take no new attributes (as attrs' frozen classes, e.g. referencing's)."""

    def __setattr__(self, name: str, value: object) -> None:
        if not name.startswith("__"):  # Python's own (__traceback__, __cause__...) it takes, as attrs' do
            raise AttributeError(f"{type(self).__name__} is frozen")
        super().__setattr__(name, value)


def test_a_programs_exception_whose_class_cannot_be_a_tool_error_is_still_its_error(pool: Pool) -> None:
    import traceback
    import urllib.error

    def program(kind: str) -> None:
        raise {"frozen": FrozenError("cold"),  # HTTPError reads its response's file
               "http": urllib.error.HTTPError("http://x", 404, "Not Found", {}, None)}[kind]  # type: ignore[arg-type]

    for kind, expected in [("frozen", "FrozenError: cold"),
                           ("http", "HTTPError: HTTP Error 404: Not Found")]:
        for call in (pool.run, lambda p, **kw: pool.run_stream(p, **kw).result()):
            with pytest.raises(ToolError, match=expected) as info:
                call(program, kind=kind)
            assert isinstance(info.value, ValueError if kind != "http" else urllib.error.URLError)  # its next class
            assert expected in "".join(traceback.format_exception(info.value)) and repr(info.value)


class FinalError(ValueError):
    """An exception class that refuses subclasses with an error of its own."""

    def __init_subclass__(cls) -> None:
        raise RuntimeError("no subclasses of FinalError")


class PluginError(ValueError):
    """An exception class that registers its subclasses by name (a plugin's or an API's error codes)."""

    by_name: dict[str, type] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        PluginError.by_name[cls.__name__] = cls


class NotFound(PluginError):
    pass


class Registering(type):
    """A metaclass that registers every class it makes."""

    made: list[type] = []

    def __init__(cls, name: str, bases: tuple[type, ...], namespace: dict) -> None:
        super().__init__(name, bases, namespace)
        Registering.made.append(cls)


class RegisteredError(ValueError, metaclass=Registering):
    pass


def test_a_programs_exception_changes_nothing_of_its_classes_in_the_kernel(pool: Pool) -> None:
    """The ToolError class made for a program's exception class ran that class's __init_subclass__ and its
    metaclass in the kernel: it replaced NotFound in the notebook's registry of error classes (whose lookups then
    made ToolErrors, TypeError for want of their arguments) and was listed by the metaclass's registry."""
    def program(kind: str) -> None:
        raise {"final": FinalError("last"), "plugin": NotFound("gone"), "meta": RegisteredError("listed")}[kind]

    for kind, expected, shown in [("final", FinalError, "last"), ("plugin", NotFound, "gone"),
                                  ("meta", ValueError, "RegisteredError: listed")]:  # its next class: no metaclass
        with pytest.raises(expected) as info:
            pool.run(program, kind=kind)
        assert isinstance(info.value, ToolError) and shown in str(info.value)
    assert PluginError.by_name == {"NotFound": NotFound}
    assert Registering.made == [RegisteredError]


class ReadOnlyArgsError(ValueError):
    """An exception class whose ``args`` is a property without a setter."""

    @property
    def args(self) -> tuple:  # type: ignore[override]
        return ("read-only",)


class NoNotesError(ValueError):
    """An exception class whose ``__notes__`` is a property without a setter: it takes no note."""

    @property
    def __notes__(self) -> list[str]:  # type: ignore[override]
        return []


class SealedError(KeyError):
    """An exception class whose ``__setattr__`` refuses its ``args`` and notes once it is made."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("args", "__notes__"):
            raise TypeError(f"{type(self).__name__} is sealed")
        super().__setattr__(name, value)


def test_a_programs_exception_whose_class_refuses_its_args_or_a_note_is_still_its_error(pool: Pool) -> None:
    """Setting the args or the note ran outside any try: the kernel raised AttributeError or TypeError of our
    own instead of the program's error."""
    def program(kind: str) -> None:
        raise {"args": ReadOnlyArgsError("given"), "notes": NoNotesError("unnoted"), "sealed": SealedError("k")}[kind]

    for kind, expected, shown in [("args", ValueError, "ReadOnlyArgsError: given"),  # its next class, that takes them
                                  ("notes", NoNotesError, "unnoted"), ("sealed", KeyError, "SealedError: 'k'")]:
        for call in (pool.run, lambda p, **kw: pool.run_stream(p, **kw).result()):
            with pytest.raises(expected) as info:
                call(program, kind=kind)
            assert isinstance(info.value, ToolError) and shown in str(info.value)
            assert "Traceback" in info.value.remote_traceback
            for copied in (copy.copy(info.value), pickle.loads(pickle.dumps(info.value))):
                assert isinstance(copied, ToolError) and str(copied) == str(info.value)


class UnlistedError(ValueError):
    """An exception class whose ``__dict__`` raises (a proxy, a lazy object): its attributes cannot be listed."""

    @property
    def __dict__(self) -> dict:  # type: ignore[override]
        raise RuntimeError("no listing")


class UnprintableError(ValueError):
    """An exception class whose ``__notes__`` raises: Python's traceback module cannot format it."""

    @property
    def __notes__(self) -> list[str]:  # type: ignore[override]
        raise RuntimeError("no notes")


def test_a_programs_exception_whose_attributes_or_traceback_cannot_be_read_is_still_its_error(pool: Pool) -> None:
    """The worker's report of the error raised: a unary call failed with gRPC's 'Exception calling application',
    a streamed one with 'ended without its result or error', neither naming the program's exception."""
    def program(kind: str) -> None:
        raise {"unlisted": UnlistedError("hidden"), "unprintable": UnprintableError("shy")}[kind]

    for kind, shown, traceback_shows in [("unlisted", "hidden", 'raise {"unlisted"'),
                                         ("unprintable", "UnprintableError: shy", "could not be formatted")]:
        for call in (pool.run, lambda p, **kw: pool.run_stream(p, **kw).result()):
            with pytest.raises(ValueError) as info:
                call(program, kind=kind)
            assert isinstance(info.value, ToolError) and shown in str(info.value)
            assert traceback_shows in info.value.remote_traceback


def _cell_error(number: int) -> tuple[type, dict]:
    """An exception class of a module of its own (as a notebook cell's), and the error info a worker gives for it."""
    module = types.ModuleType(f"dspex_test_cell_{number}")
    exec("class CellError(ValueError):\n    pass\n", vars(module))
    sys.modules[module.__name__] = module
    info = {"type": "CellError", "message": "cell", "args": ["cell"], "attributes": {"code": 7},
            "bases": [f"{module.__name__}:CellError", "builtins:ValueError"]}
    return module.CellError, info


def test_an_exception_class_is_not_kept_alive_by_its_errors_that_came_back() -> None:
    """builtin_fields and the ToolError classes made for a program's classes kept every class (and module) alive."""
    from dspex_nb import errors

    cls, info = _cell_error(0)
    error = errors.remote_error("run_module", info, "w0")
    assert isinstance(error, cls) and errors.builtin_fields(type(error)) == ()
    gone = weakref.ref(cls)
    del cls, error, sys.modules["dspex_test_cell_0"]
    for number in range(1, 300):  # more classes than the 256 kept since: they push it out
        errors.remote_error("run_module", _cell_error(number)[1], "w0")
        del sys.modules[f"dspex_test_cell_{number}"]
    gc.collect()
    assert gone() is None


def test_a_copy_that_cannot_be_the_programs_class_reads_as_the_plain_tool_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """It read as the program's error (its message alone, its args), though it was not of the program's class."""
    from dspex_nb import errors

    cls, info = _cell_error(0)
    error = errors.remote_error("run_module", info, "w0")
    monkeypatch.setattr(errors, "_tool_error_for", lambda base: None)  # where the class cannot be a ToolError
    for copied in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert type(copied) is ToolError and str(copied) == "tool 'run_module' failed on worker w0: CellError: cell"
        assert copied.args == (str(copied),) and (copied.code, copied.__notes__) == (7, error.__notes__)
    del sys.modules["dspex_test_cell_0"]


def test_message_over_the_limit_says_the_limit_and_how_to_raise_it() -> None:
    with Pool(workers=1, max_message_mb=1) as small:
        with pytest.raises(MessageTooLarge, match=r"over the 1 MiB message limit; raise it with Pool\(max_message_mb"):
            small.execute("echo", {"blob": "x" * (2 * 2**20)})
        small.configure_lm("demo", answer_tokens=300_000)  # an answer of about 2 MiB
        args = {"signature": "q -> a", "inputs": {"q": "x"}}
        with pytest.raises(MessageTooLarge, match=r"the result is 1\.\d MiB, over the 1 MiB .*max_message_mb"):
            small.execute("predict", args)
        small.configure_lm("demo", answer_tokens=2000)  # 150 answers of ~14 KiB: the final chunk is too large
        run = small.execute_stream("batch_inference", {"signature": "q -> a", "batch_items": ["x"] * 150})
        with pytest.raises(MessageTooLarge, match=r"a final chunk is 1\.\d MiB, over the 1 MiB .*max_message_mb"):
            run.result()
        assert sum(c.kind == "item" for c in run.chunks) == 150  # what was streamed before is kept
        assert small.execute("echo", {"small": True}) == {"small": True}


def test_worker_python_that_does_not_exist() -> None:
    with pytest.raises(WorkerStartError, match="the worker Python '/no/such/python' does not exist"):
        Pool(workers=1, python="/no/such/python").start()


def test_a_template_that_closes_its_output_before_it_exits_fails_with_its_output(tmp_path: Path) -> None:
    """A template that cannot start (a worker Python without DSPy) ends its stdout a moment before it can be
    reaped; the pool waited its whole start_timeout (60 s) for an answer that could no longer come."""
    from dspex_nb.pool.template import Template

    python = tmp_path / "python"  # an interpreter that says why it cannot serve, then exits a moment later
    python.write_text("#!/bin/sh\necho 'no dspy in this interpreter' >&2\nexec 1>&-\nsleep 2\nexit 3\n")
    python.chmod(0o755)
    template = Template(str(python), {}, tmp_path / "template.log", "run")
    try:
        with pytest.raises(WorkerStartError, match="no dspy in this interpreter"):
            template.spawn([], {}, tmp_path / "w0.log", "", ready_timeout=0.5)  # < the 2 s it takes to exit
    finally:
        template.close()


def test_worker_python_without_dependencies_fails_fast(bare_python: str) -> None:
    from dspex_nb import MissingDependency

    with pytest.raises(MissingDependency) as info:
        Pool(workers=2, python=bare_python).start()
    text = str(info.value)
    assert bare_python in text
    for name in ("grpcio", "protobuf", "dspy"):
        assert f"{name}>=" in text and "not installed" in text
    assert f": {bare_python} -m pip install '" in text  # commands to paste into a shell
    assert f"python -m dspex_nb doctor --python {bare_python}`" in text


def test_bad_pool_arguments() -> None:
    with pytest.raises(ValueError, match=r"Pool\(workers=...\) must be an int from 1 to \d+, got 0"):
        Pool(workers=0)
    with pytest.raises(ValueError, match=r"Pool\(max_message_mb=...\) must be an int from 1 to 2047"):
        Pool(max_message_mb=0)
    with pytest.raises(ValueError, match=r"Pool\(journal=...\) must be True, False, a path or a Journal, got 5"):
        Pool(journal=5)
    with pytest.raises(ValueError, match=r"Pool\(python=...\) must be None or the path of a Python interpreter"):
        Pool(python=123)


def test_bad_call_arguments_name_themselves(pool: Pool) -> None:
    with pytest.raises(ValueError, match=r"echo\(timeout=...\) must be a finite number > 0"):
        pool.execute("echo", {}, timeout="x")
    with pytest.raises(ValueError, match=r"count\(timeout=...\) must be a finite number > 0"):
        pool.execute_stream("count", {"n": 1}, timeout=-1)
    with pytest.raises(ValueError, match=r"batch\(on_item=...\) must be None or a function"):
        pool.batch(["a"], "question -> answer", on_item=5)
    with pytest.raises(ValueError, match=r"no worker 'w9' in this pool: \['w0', 'w1'\]"):
        pool.kill_worker("w9", 9)
    for bad in (999, 9.0, True):  # was: OSError "[Errno 22] Invalid argument", a TypeError, a SIGHUP
        with pytest.raises(ValueError, match=rf"kill_worker\(signal_number=...\) must be a signal .*, got {bad}"):
            pool.kill_worker("w0", bad)  # type: ignore[arg-type]
    assert pool.execute("echo", {"alive": 1}) == {"alive": 1}


def test_doctor_command_reports_versions(bare_python: str) -> None:
    ok = subprocess.run([sys.executable, "-m", "dspex_nb", "doctor"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "[ok ] grpcio" in ok.stdout and "[ok ] dspy" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "dspex_nb", "doctor", "--python", bare_python],
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert "[BAD] dspy      not installed" in bad.stdout


def failing_program(question: str) -> str:
    raise ValueError(f"boom {question}")


async def _awaited(run: Any) -> Any:
    return await run


def test_a_programs_error_has_none_of_the_pools_frames_in_its_kernel_traceback(pool: Pool) -> None:
    """The traceback in the kernel reads as the program's would where it ran: the caller's code, then (in the
    note) the worker's; not the six frames of the pool's machinery the error came back through. An error of
    dspex_nb's own keeps its whole traceback."""
    package = str(Path(dspex_nb.__file__).parent)
    for call in (lambda: pool.run(failing_program, question="q"),
                 lambda: pool.run_stream(failing_program, question="q").result(),
                 lambda: pool.execute("fail", {"message": "m", "type": "KeyError"})):
        with pytest.raises((ValueError, KeyError)) as caught:
            call()
        ours = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)
                if frame.filename.startswith(package)]
        assert ours == ["raised_here"], ours
        assert "raise" in caught.value.remote_traceback
    for awaited in (lambda: pool.run_async(failing_program, question="q"),
                    lambda: _awaited(pool.run_stream(failing_program, question="q"))):
        with pytest.raises(ValueError) as caught:
            asyncio.run(awaited())
        ours = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)
                if frame.filename.startswith(package)]
        assert ours == ["awaited_here"], ours
    with pytest.raises(UnknownTool) as caught:
        pool.execute("nope")
    assert "_args_json" in [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="ExceptionGroup is Python 3.11's")
def test_an_exception_group_too_deep_or_too_large_comes_back_bounded(pool: Pool) -> None:
    def program(kind: str) -> None:
        if kind == "large":  # its sub-exceptions' messages alone are over the 256,000 characters that come back
            raise ExceptionGroup("large", [ValueError("x" * 3000) for _ in range(100)])  # noqa: F821
        group = ValueError("deepest")
        for depth in range(30):
            group = ExceptionGroup(f"depth {depth}", [group])  # noqa: F821
        raise group

    with pytest.raises(ToolError, match=r"ExceptionGroup: large \(100 sub-exceptions\)") as info:
        pool.run(program, kind="large")
    assert not isinstance(info.value, ExceptionGroup)  # noqa: F821 -- the note's traceback lists them
    with pytest.raises(ExceptionGroup) as info:  # noqa: F821
        pool.run(program, kind="deep")
    groups = [info.value]
    while isinstance(groups[-1], ExceptionGroup):  # noqa: F821
        groups.append(groups[-1].exceptions[0])
    assert len(groups) == 11 and str(groups[-1]).endswith("ExceptionGroup: depth 19 (1 sub-exception)")
