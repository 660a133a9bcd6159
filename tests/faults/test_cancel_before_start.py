"""A call whose cancel reached its worker before its program started never runs it: a forward that writes a file
before its LM call writes nothing. (A cancel that arrives after the program started stops it at its next LM call.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dspex_nb.errors import Cancelled
from dspex_nb.worker import dspy_tools, tools
from dspex_nb.worker.calls import drive
from dspex_nb.worker.demo_lm import make_demo_lm
from dspex_nb.worker.state import WorkerState


def writes_then_asks(path: str) -> str:
    import dspy

    Path(path).write_text("the program ran")
    return dspy.Predict("question -> answer")(question="q").answer


@pytest.fixture
def worker() -> WorkerState:
    lm, _ = make_demo_lm()
    return WorkerState("w0", "run", 2**20, lm=lm)


def test_a_call_cancelled_before_it_reached_a_thread_never_starts_its_tool(worker: WorkerState) -> None:
    started: list[bool] = []

    def tool() -> Iterator[tools.Emit]:  # a tool's generator: its first step runs its program (run_module's, unary)
        started.append(True)
        yield tools.Emit("item", {})
        return "done"

    ctx = tools.ToolContext(streaming=False, worker=worker)
    ctx.cancelled.set()  # gRPC's callback, where the call ended before its handler ran
    emitted: list[tools.Emit] = []
    assert drive(tool(), ctx, emitted.append) is None
    assert started == [] and emitted == []  # was: the tool started, its call long cancelled
    assert drive(tool(), tools.ToolContext(streaming=False, worker=worker), emitted.append) == "done"
    assert started == [True]


@pytest.mark.parametrize("streaming", [True, False])
def test_a_call_cancelled_while_its_program_was_made_ready_never_runs_it(worker: WorkerState, tmp_path: Path,
                                                                          streaming: bool) -> None:
    written = tmp_path / "written"
    ctx = tools.ToolContext(streaming=streaming, worker=worker)
    call = dspy_tools._call(writes_then_asks, {"path": str(written)}, ctx, settings="")
    ctx.cancelled.set()  # as the worker unpickled the program and decoded its inputs
    with pytest.raises(Cancelled, match="cancelled before its program started"):
        next(call)
    assert not written.exists()


def test_a_call_not_cancelled_runs_its_program(worker: WorkerState, tmp_path: Path) -> None:
    written = tmp_path / "written"
    ctx = tools.ToolContext(streaming=True, worker=worker)
    result = drive(dspy_tools._call(writes_then_asks, {"path": str(written)}, ctx, settings=""), ctx, lambda e: None)
    assert written.read_text() == "the program ran" and result is not None
