"""Cancelling a streamed DSPy call at any moment closes its LM stream: the event loop behind
``dspy.streamify`` stays up until the program thread it abandoned has returned (else a late token's
hand-off is dropped with the loop and that thread waits forever, holding the stream open)."""

from __future__ import annotations

import threading
import time

import dspy
from helpers import wait_until

from dspex_nb.worker import dspy_tools, tools
from dspex_nb.worker.calls import drive
from dspex_nb.worker.demo_lm import make_demo_lm
from dspex_nb.worker.state import WorkerState


def test_cancel_at_any_moment_closes_the_lm_stream() -> None:
    lm, engine = make_demo_lm(per_token=0.002, answer_tokens=3000)
    worker = WorkerState("w0", "run", 2**20, lm=lm)
    for i in range(60):
        ctx = tools.ToolContext(streaming=True, worker=worker)
        gen = dspy_tools._call(dspy.Predict("question -> answer"), {"question": f"long? {i}"}, ctx, settings="")
        first = threading.Event()

        def on_emit(emit: tools.Emit, first: threading.Event = first) -> None:
            if emit.kind == "token":
                first.set()

        runner = threading.Thread(target=drive, args=(gen, ctx, on_emit))
        runner.start()
        assert first.wait(20)
        time.sleep((i % 30) / 1000)  # cancel 0-29 ms after the first token: every phase of a token's hand-off
        ctx.cancelled.set()
        runner.join(20)
        assert not runner.is_alive()
        wait_until(lambda: engine.streaming == 0, timeout=10, what=f"the LM stream of call {i} to close")
