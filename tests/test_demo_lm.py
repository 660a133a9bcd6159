"""Tests for the embedded demo LM, driven through real DSPy modules."""

from __future__ import annotations

import asyncio
import enum
import os
import subprocess
import sys
import threading
from pathlib import Path

import dspy
import pytest
from dspy.lm15 import Message, Request
from dspy.utils.exceptions import LMRateLimitError

from dspex_nb.worker.demo_lm import DemoEngine, make_demo_lm

TYPED_SIG = "text -> sentiment: bool, keywords: list[str], score: float, n: int, label: Literal['a', 'b']"


def _listeners() -> list[dspy.streaming.StreamListener]:
    return [dspy.streaming.StreamListener(signature_field_name="reasoning"),
            dspy.streaming.StreamListener(signature_field_name="answer")]


def _stream_cot(lm: dspy.LM, question: str) -> tuple[dict[str, list[str]], dspy.Prediction]:
    program = dspy.streamify(dspy.ChainOfThought("question -> answer"), stream_listeners=_listeners(),
                             async_streaming=False)
    chunks: dict[str, list[str]] = {}
    final = None
    with dspy.context(lm=lm):
        for item in program(question=question):
            if isinstance(item, dspy.streaming.StreamResponse):
                chunks.setdefault(item.signature_field_name, []).append(item.chunk)
            elif isinstance(item, dspy.Prediction):
                final = item
    assert final is not None
    return chunks, final


def test_predict_mentions_demo_and_is_deterministic() -> None:
    answers = []
    for _ in range(2):
        lm, engine = make_demo_lm()
        with dspy.context(lm=lm):
            answers.append(dspy.Predict("question -> answer")(question="what?").answer)
        assert engine.calls == 1
    assert answers[0] == answers[1]
    assert answers[0].startswith("Demo LM answer to 'what?':")
    lm, _ = make_demo_lm()
    with dspy.context(lm=lm):
        assert dspy.Predict("question -> answer")(question="other?").answer != answers[0]


def test_long_input_is_truncated_in_quote() -> None:
    lm, _ = make_demo_lm()
    with dspy.context(lm=lm):
        answer = dspy.Predict("question -> answer")(question="x" * 500).answer
    assert "x" * 59 in answer and "x" * 61 not in answer


def test_answer_is_deterministic_across_processes() -> None:
    user, system = "[[ ## q ## ]]\nhello", "Your output fields are:\n1. `a` (str): \n2. `n` (int):\nAll interactions"
    code = ("from dspy.lm15 import Message, Request\nfrom dspex_nb.worker.demo_lm import DemoEngine\n"
            f"r = Request(model='demo', messages=(Message.user({user!r}),), system={system!r})\n"
            "print(DemoEngine().answer(r), end='')")
    env = {**os.environ, "PYTHONHASHSEED": "12345",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    request = Request(model="demo", messages=(Message.user(user),), system=system)
    assert out.stdout == DemoEngine().answer(request)
    assert out.stdout.startswith("[[ ## a ## ]]\nDemo LM answer to 'hello':")
    assert out.stdout.endswith("\n\n[[ ## completed ## ]]")


def test_chain_of_thought_gives_reasoning_and_answer() -> None:
    lm, _ = make_demo_lm()
    with dspy.context(lm=lm):
        pred = dspy.ChainOfThought("question -> answer")(question="why is the sky blue?")
    assert pred.reasoning.startswith("Demo LM reasoning about 'why is the sky blue?':")
    assert pred.answer.startswith("Demo LM answer to 'why is the sky blue?':")


def test_typed_fields_parse_into_python_types() -> None:
    lm, _ = make_demo_lm()
    with dspy.context(lm=lm):
        pred = dspy.Predict(TYPED_SIG)(text="I love it")
        meta = dspy.Predict("text -> meta: dict[str, Any], maybe: Optional[int]")(text="I love it")
    assert isinstance(pred.sentiment, bool)
    assert isinstance(pred.keywords, list) and pred.keywords and all(isinstance(k, str) for k in pred.keywords)
    assert isinstance(pred.score, float)
    assert isinstance(pred.n, int) and not isinstance(pred.n, bool)
    assert pred.label in ("a", "b")
    assert meta.meta == {}  # an open object (dict[str, Any]) needs no keys
    assert isinstance(meta.maybe, int)


def test_streaming_chunks_match_final_prediction() -> None:
    lm, engine = make_demo_lm()
    chunks, final = _stream_cot(lm, "what is streaming?")
    assert len(chunks["reasoning"]) > 5 and len(chunks["answer"]) > 5
    assert "".join(chunks["reasoning"]) == final.reasoning
    assert "".join(chunks["answer"]) == final.answer
    assert final.answer.startswith("Demo LM answer to 'what is streaming?':")
    assert engine.calls == 1 and engine.tokens_streamed > len(chunks["reasoning"]) + len(chunks["answer"])
    chunks2, final2 = _stream_cot(lm, "what is streaming?")  # fresh listeners work on a second call
    assert final2.answer == final.answer and "".join(chunks2["answer"]) == final.answer


def test_async_calls_get_the_same_answers_and_stream() -> None:
    # DSPy's async tutorial: ``await predict.acall(...)``, an async module's ``aforward``, and async streams
    lm, engine = make_demo_lm()
    program = dspy.ChainOfThought("question -> answer")
    streamed = dspy.streamify(program, stream_listeners=_listeners(), is_async_program=True)

    async def main() -> tuple[dspy.Prediction, dict[str, list[str]], dspy.Prediction]:
        chunks: dict[str, list[str]] = {}
        final = None
        async for item in streamed(question="Why?"):
            if isinstance(item, dspy.streaming.StreamResponse):
                chunks.setdefault(item.signature_field_name, []).append(item.chunk)
            elif isinstance(item, dspy.Prediction):
                final = item
        return await program.acall(question="Why?"), chunks, final

    with dspy.context(lm=lm):
        expected = program(question="Why?")
        answered, chunks, final = asyncio.run(main())
    assert answered == final == expected
    assert "".join(chunks["reasoning"]) == expected.reasoning and "".join(chunks["answer"]) == expected.answer
    assert engine.calls == 3 and engine.streaming == 0


def test_answer_tokens_gives_long_stream() -> None:
    lm, _ = make_demo_lm(answer_tokens=500)
    chunks, final = _stream_cot(lm, "long please")
    assert len(chunks["answer"]) >= 400
    assert abs(len(final.answer.split()) - 500) <= 5
    assert "".join(chunks["answer"]) == final.answer
    assert len(final.reasoning.split()) < 50


def test_stream_tokens_reproduce_text_and_stop_on_close() -> None:
    request = Request(model="demo", messages=(Message.user("[[ ## q ## ]]\nhi"),),
                      system="Your output fields are:\n1. `a` (str):\nAll interactions will be")
    engine = DemoEngine(answer_tokens=50)
    events = list(engine.stream(request))
    text = "".join(e.delta.text for e in events[1:-1])
    assert text == engine.answer(request) == engine.complete(request).message.text
    assert engine.tokens_streamed == len(events) - 2 and engine.calls == 2
    gen = DemoEngine(answer_tokens=10_000, per_token=0.001)
    stream = gen.stream(request)
    for _ in range(4):
        next(stream)
    stream.close()
    assert gen.tokens_streamed == 3


def test_rate_limit_first_calls_raise_then_succeed() -> None:
    lm, engine = make_demo_lm(rate_limit_first=2)
    with dspy.context(lm=lm):
        for expected_calls in (1, 2):
            with pytest.raises(LMRateLimitError):
                dspy.Predict("question -> answer")(question="q")
            assert engine.calls == expected_calls
        assert dspy.Predict("question -> answer")(question="q").answer.startswith("Demo LM answer")
    assert engine.calls == 3


def test_rate_limits_are_retried_by_dspy_lm_after_retry_after() -> None:
    lm, engine = make_demo_lm(rate_limit_first=2, retry_after=0.01, num_retries=3)
    with dspy.context(lm=lm):
        assert dspy.Predict("question -> answer")(question="q").answer.startswith("Demo LM answer")
    assert (engine.calls, engine.rate_limited) == (3, 2)  # two 429s, each retried once by dspy.LM


def test_calls_are_counted_under_concurrency() -> None:
    lm, engine = make_demo_lm(rate_limit_first=3)
    errors: list[Exception] = []
    answers: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        with dspy.context(lm=lm):
            for j in range(5):
                try:
                    answer = dspy.Predict("question -> answer")(question=f"q{i}-{j}").answer
                    with lock:
                        answers.append(answer)
                except LMRateLimitError as exc:
                    with lock:
                        errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert engine.calls == 40
    assert len(errors) == 3 and len(answers) == 37
    assert all(a.startswith("Demo LM answer") for a in answers)


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Rate(dspy.Signature):
    """Rate it."""

    text: str = dspy.InputField()
    level: Level = dspy.OutputField()  # ChatAdapter cannot parse "2" as an IntEnum: DSPy falls back to JSON
    ok: bool = dspy.OutputField()


def test_the_json_adapter_and_int_enums_are_answered() -> None:
    lm, _ = make_demo_lm()
    with dspy.context(lm=lm):
        rated = dspy.Predict(Rate)(text="fine")
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        answered = dspy.ChainOfThought("question -> answer: float")(question="Why?")
    assert isinstance(rated.level, Level) and isinstance(rated.ok, bool)
    assert isinstance(answered.answer, float) and answered.reasoning.startswith("Demo LM reasoning about 'Why?'")


def test_the_demo_lm_takes_a_real_lms_settings_and_answers_the_same() -> None:
    tuned, _ = make_demo_lm(temperature=0.5, max_tokens=100, ttft=0.0)  # as %dspex lm demo --temperature 0.5
    plain, _ = make_demo_lm()
    assert tuned.kwargs == {"temperature": 0.5, "max_tokens": 100}
    predict = dspy.Predict("question -> answer")
    assert predict(question="Why?", lm=tuned).answer == predict(question="Why?", lm=plain).answer


def test_a_program_with_the_demo_lm_of_its_own_saves_and_loads(tmp_path: Path) -> None:
    # DSPy's trusted-monitor tutorial saves a predictor given its LM with set_lm, and loads it again; a custom
    # engine is saved with its knobs, and loaded where the file is trusted (allow_unsafe_lm_state=True)
    predictor = dspy.ChainOfThought("code -> suspicion_score: int")
    predictor.set_lm(make_demo_lm(answer_tokens=5)[0])
    predictor.save(tmp_path / "monitor.json")
    loaded = dspy.ChainOfThought("code -> suspicion_score: int")
    loaded.load(tmp_path / "monitor.json", allow_unsafe_lm_state=True)
    assert loaded.predict.lm._engine_spec.answer_tokens == 5
    assert loaded(code="print(1)") == predictor(code="print(1)")
    assert asyncio.run(loaded.acall(code="print(1)")) == predictor(code="print(1)")
