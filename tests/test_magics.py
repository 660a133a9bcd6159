"""%dspex / %%dspex in a real IPython shell (terminal-like: the text renderer), on a real pool."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import TWO_STEP, pid_alive, wait_until
from IPython.core.interactiveshell import InteractiveShell

from dspex_nb import Pool, demo_lm
from dspex_nb.errors import PoolClosed
from dspex_nb.magics import CELL_COMMANDS, PARSERS, Dspex


class Shell:
    """Runs cells and returns (stdout, stderr); raises on an unexpected Python error."""

    def __init__(self, ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
        self.ip = ip
        self.capsys = capsys

    def __call__(self, source: str) -> tuple[str, str]:
        self.capsys.readouterr()
        result = self.ip.run_cell(source)
        out, err = self.capsys.readouterr()
        if result.error_in_exec is not None:
            raise result.error_in_exec
        return out, err

    def usage_error(self, source: str) -> str:
        """Run a cell that must fail with a UsageError (shown without a traceback); return its text."""
        result = self.ip.run_cell(source)
        out, err = self.capsys.readouterr()
        from IPython.core.error import UsageError

        error = result.error_in_exec or result.error_before_exec
        assert isinstance(error, UsageError), (error, out, err)
        assert "Traceback" not in out + err
        return str(error)

    def fails(self, source: str) -> str:
        """Run a cell that must fail as a dspex command does (its ``dspex: ...`` lines, no traceback): a failed
        cell, so Run All and nbval stop at it; return those lines."""
        result = self.ip.run_cell(source)
        out, err = self.capsys.readouterr()
        from dspex_nb.magics import CellFailed, CellInterrupted

        assert isinstance(result.error_in_exec, (CellFailed, CellInterrupted)), (result.error_in_exec, out, err)
        assert "Traceback" not in out + err
        shown = "\n".join(result.error_in_exec._render_traceback_())
        assert shown in out + err  # IPython printed those lines
        return shown

    @property
    def ns(self) -> dict:
        return self.ip.user_ns

    @property
    def magics(self) -> Dspex:
        return next(c for c in self.ip.configurables if isinstance(c, Dspex))

    @property
    def pool(self) -> Pool:
        assert self.magics.pool is not None
        return self.magics.pool


@pytest.fixture(scope="module")
def ipython() -> Iterator[InteractiveShell]:
    ip = InteractiveShell.instance()
    ip.run_cell("%load_ext dspex_nb")
    ip.run_cell("%dspex start -n 2")
    yield ip
    ip.run_cell("%unload_ext dspex_nb")


@pytest.fixture
def sh(ipython: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> Shell:
    return Shell(ipython, capsys)


def test_help_lists_every_subcommand(sh: Shell) -> None:
    doc = sh.ip.find_line_magic("dspex").__doc__
    for usage in ("%dspex start", "%dspex status", "%dspex lm", "%%dspex predict", "%%dspex batch",
                  "%%dspex define", "%%dspex run", "--items VAR", "--cot"):
        assert usage in doc
    usages = re.findall(r"^  (%+dspex \w+)", doc, re.MULTILINE)  # IPython's usage prefix adds one % itself
    assert sorted(usages) == sorted(f"%%dspex {c}" if c in CELL_COMMANDS else f"%dspex {c}" for c in PARSERS)
    assert "%dspex define" not in doc.replace("%%dspex define", "")  # a cell magic, as every help names it


def test_status_and_config(sh: Shell) -> None:
    out, _ = sh("%dspex status")
    assert out.startswith("pool: 2 workers, lm=demo, running\nworker  pid")
    assert out.count(" ready ") == 2
    sh.pool.execute("echo", {"x": 1})
    out, _ = sh("%dspex status --stats")
    assert "tool" in out and "time p50" in out and "\necho " in out
    out, _ = sh("%config Dspex.workers = 3\n%dspex config")
    assert "Dspex.workers = 3" in out and "pool 'default': <Pool 2 workers" in out
    assert all(f"Dspex.{name} = " in out for name in Dspex.class_own_traits(config=True))  # warm too
    sh("%config Dspex.workers = 2")


def test_config_display_widgets_says_what_is_missing(sh: Shell, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "anywidget", None)  # as if it were not installed
    try:
        _, err = sh('%config Dspex.display = "widgets"')
        assert err == ("dspex: display mode 'widgets' needs ipywidgets, anywidget and markdown-it-py: "
                       "pip install 'ipywidgets>=8.1' 'anywidget>=0.9' 'markdown-it-py>=3'\n")
    finally:
        sh('%config Dspex.display = "auto"')


def test_predict_prints_the_answer_and_stores_a_prediction(sh: Shell) -> None:
    out, _ = sh('%%dspex predict "question -> answer" -o p\nWhy is the sky blue?')
    lines = out.splitlines()
    assert lines[0].startswith("answer: Demo LM answer to 'Why is the sky blue?': ")
    assert lines[1].startswith("done · predict on w") and " tokens · " in lines[1]
    assert len(lines) == 2  # no progress spam outside a live notebook
    assert sh.ns["p"].answer == lines[0].removeprefix("answer: ")
    assert sh.ns["_"] is sh.ns["p"]


def test_a_later_cells_value_still_reaches_underscore(sh: Shell) -> None:
    """The magics' ``_`` is a cell's value as IPython keeps it: the next value replaces it (IPython stopped
    updating ``_`` for good once a magic had assigned it, so ``_`` kept the magic's result)."""
    sh('%%dspex predict "question -> answer" -o p\nFirst?')
    assert sh.ns["_"] is sh.ns["p"]
    sh("6 * 7")
    assert sh.ns["_"] == 42 and sh.ns["__"] is sh.ns["p"]


def test_a_magic_leaves_an_underscore_the_user_assigned(sh: Shell) -> None:
    """As a cell's value leaves it (IPython's ``DisplayHook.update_user_ns``): the magics overwrote it."""
    try:
        sh("_ = 5")
        sh('%%dspex predict "question -> answer" -o p\nMine?')
        assert sh.ns["_"] == 5 and sh.ns["p"].answer.startswith("Demo LM answer to 'Mine?'")
    finally:
        sh("del _")
    sh('%%dspex predict "question -> answer" -o p\nYours again?')  # once it is gone, `_` is IPython's again
    assert sh.ns["_"] is sh.ns["p"]


def test_text_output_is_deterministic(sh: Shell) -> None:
    cell = '%%dspex predict "question -> answer"\nSame question?'
    first, second = sh(cell)[0].splitlines()[0], sh(cell)[0].splitlines()[0]
    assert first == second


def test_cot_shows_reasoning_then_answer(sh: Shell) -> None:
    out, _ = sh('%%dspex predict "question -> answer" --cot -o r\nWhat is DSPy?')
    assert out.index("reasoning: Demo LM reasoning") < out.index("answer: Demo LM answer")
    assert sh.ns["r"].reasoning.startswith("Demo LM reasoning about 'What is DSPy?'")


def test_several_input_fields_and_interpolation(sh: Shell) -> None:
    sh("topic = 'tides'")
    sh('%%dspex predict "question, context -> answer" -o r\nquestion: Why {topic}?\ncontext: the moon\n  and sun')
    assert sh.ns["r"].answer.startswith("Demo LM answer to 'Why tides?'")
    sh('%%dspex predict "question -> answer" --no-interpolate -o r\nkeep {braces}')
    assert sh.ns["r"].answer.startswith("Demo LM answer to 'keep {braces}'")


def test_a_one_input_cell_may_be_its_field_line(sh: Shell) -> None:
    """`question: Why?` for a one-input program is the question 'Why?', as for several inputs (it was the whole
    text, 'question: Why?'); a cell that does not start so is the value as it is."""
    sh('%%dspex predict "question -> answer" -o r\nquestion: Why so?')
    assert sh.ns["r"].answer.startswith("Demo LM answer to 'Why so?'"), sh.ns["r"].answer
    sh('%%dspex predict "question -> answer" -o r\nquestions: many')
    assert sh.ns["r"].answer.startswith("Demo LM answer to 'questions: many'"), sh.ns["r"].answer


def test_no_stream_waits_for_the_whole_answer(sh: Shell) -> None:
    out, _ = sh('%%dspex predict "question -> answer: int" --no-stream -o r\nplain')
    assert out == f"answer: {sh.ns['r'].answer}\n" and isinstance(sh.ns["r"].answer, int)  # shown once, whole


def test_batch_of_50_on_2_workers_fills_out_in_input_order(sh: Shell) -> None:
    sh("qs = [f'question {i}?' for i in range(50)]")
    out, _ = sh('%dspex batch "question -> answer" --items qs -o OUT --no-journal')
    assert out.startswith("batch done: 50 items, 50 ok, 0 failed on 2 workers in ")
    answers = [p.answer for p in sh.ns["OUT"]]
    assert len(answers) == 50
    assert all(a.startswith(f"Demo LM answer to 'question {i}?'") for i, a in enumerate(answers))


def test_journal_magic_and_a_rerun_from_the_journal(sh: Shell) -> None:
    sh("jq = [f'journaled {i}?' for i in range(12)]")
    sh('%dspex journal clear')
    first, _ = sh('%dspex batch "question -> answer" --items jq -o J1')
    assert "from the journal" not in first
    second, _ = sh('%dspex batch "question -> answer" --items jq -o J2')
    assert second.startswith("batch done: 12 items, 12 ok, 0 failed in ") and "(12 from the journal)" in second
    assert [p.answer for p in sh.ns["J1"]] == [p.answer for p in sh.ns["J2"]]
    out, _ = sh("%dspex journal")
    assert "1 batch\n" in out and "predict question -> answer" in out
    key = out.split("predict question -> answer")[0].splitlines()[-1].split()[0]  # the table's key column
    out, _ = sh(f"%dspex journal list {key}")
    assert "1 batch\n" in out and key in out
    assert sh(f"%dspex journal {key}") == (out, "")  # list is the default action, with a key too
    out, _ = sh("%dspex journal list no-such-key")
    assert "0 batches\n" in out
    out, _ = sh("%dspex journal clear")
    assert out.startswith("dspex: cleared 1 batch from ")


def test_a_journal_that_cannot_be_used_is_a_usage_error(sh: Shell, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    os.mkfifo(tmp_path / "pipe")
    monkeypatch.setenv("DSPEX_JOURNAL", str(tmp_path / "pipe"))  # read without a pool: DSPEX_JOURNAL's journal
    assert "is not a file (a device, a pipe, a socket)" in sh.usage_error("%dspex journal list --pool nopool")
    (tmp_path / "dir").mkdir()
    monkeypatch.setenv("DSPEX_JOURNAL", str(tmp_path / "dir"))
    assert "Is a directory" in sh.usage_error("%dspex journal clear --pool nopool")


def test_batch_of_dicts_and_of_cell_lines(sh: Shell) -> None:
    sh("rows = [{'question': 'a?', 'context': 'x'}, {'question': 'b?', 'context': 'y'}]")
    sh('%dspex batch "question, context -> answer" --items rows -o OUT --cot')
    assert [p.answer[:22] for p in sh.ns["OUT"]] == ["Demo LM answer to 'a?'", "Demo LM answer to 'b?'"]
    assert all(p.reasoning for p in sh.ns["OUT"])
    sh('%%dspex batch "question -> answer" -o OUT\nfirst?\n\nsecond?\n')
    first, second = (p.answer for p in sh.ns["OUT"])
    assert first.startswith("Demo LM answer to 'first?'") and second.startswith("Demo LM answer to 'second?'")


def test_pandas_dataframe_items(sh: Shell) -> None:
    pd = pytest.importorskip("pandas")
    sh.ns["df"] = pd.DataFrame({"question": ["x?", "y?"], "answer": ["gold x", "gold y"]})  # a label column
    sh('%dspex batch "question -> answer" --items df -o OUT')  # ignored, as dspy.Predict(...)(**row) ignores it
    import dspy

    with dspy.context(lm=demo_lm()):
        expected = [dspy.Predict("question -> answer")(**row).answer for row in sh.ns["df"].to_dict("records")]
    assert [p.answer for p in sh.ns["OUT"]] == expected and not any(p.get("error") for p in sh.ns["OUT"])




def test_define_then_run_and_batch_with_the_module(sh: Shell) -> None:
    out, _ = sh("%%dspex define TwoStep" + TWO_STEP)
    assert out == ("dspex: defined TwoStep (module class; inputs: question) on 2 workers; "
                   "run it with %%dspex run TwoStep\n")
    out, _ = sh("%%dspex run TwoStep -o r\nWhy?")
    lines = out.splitlines()  # one group per step (predictor), each with its own streamed fields
    assert [line.split(":")[0] for line in lines[:5]] == ["[topic]", "  reasoning", "  topic", "[answer]", "  answer"]
    assert lines[2].startswith("  topic: Demo LM answer to 'Why?'")  # the first step's field, kept in its group
    assert lines[4] == f"  answer: {sh.ns['r'].answer}" and sh.ns["r"].answer.startswith("Demo LM answer to 'Why?'")
    sh("%dspex batch --module TwoStep --items qs -o OUT")
    assert len(sh.ns["OUT"]) == 50 and sh.ns["OUT"][7].answer.startswith("Demo LM answer to 'question 7?'")


def test_run_shows_what_the_program_prints_apart_from_its_answer_and_summary(sh: Shell) -> None:
    sh("%%dspex define Says\nclass Says(dspy.Module):\n    def __init__(self):\n        super().__init__()\n"
       "        self.qa = dspy.Predict('question -> answer')\n    def forward(self, question):\n"
       "        print('searching for', question)\n        return self.qa(question=question)\n")
    out, _ = sh("%%dspex run Says -o said\nWhere?")
    lines = out.splitlines()
    assert lines[0] == "searching for Where?"  # before the fields, on a line of its own
    assert lines[1] == f"answer: {sh.ns['said'].answer}"
    assert "searching" not in "".join(lines[1:])


def test_a_batch_of_a_module_runs_every_item_past_dspys_max_errors(sh: Shell) -> None:
    """The dashboard's batch shows every item, failed or not (pool.map stops at max_errors, as Module.batch)."""
    sh('''
import dspy

def picky(question):
    if question.startswith("bad"):
        raise ValueError("no")
    return dspy.Prediction(answer=question.upper())

mixed = ["a", "bad 1", "bad 2", "b"]
''')
    with sh.ns["dspy"].context(max_errors=1):
        sh("%dspex batch --module picky --items mixed --no-journal -o OUT")
    assert [p and p.answer for p in sh.ns["OUT"]] == ["A", None, None, "B"]


def test_run_and_batch_take_the_kernels_module_as_it_is_now_not_as_defined(sh: Shell) -> None:
    sh('%%dspex define qa_later\nqa_later = dspy.ChainOfThought("question -> answer")')
    sh('''
trainset = [dspy.Example(question=f"q{i}", answer=f"a{i}").with_inputs("question") for i in range(3)]
qa_later.load_state(dspy.LabeledFewShot(k=2).compile(qa_later, trainset=trainset).dump_state())  # in place
''')
    expected = kernel_run(sh.ns["qa_later"], question="Why?")
    assert expected.answer != kernel_run(sh.ns["dspy"].ChainOfThought("question -> answer"), question="Why?").answer
    sh("%%dspex run qa_later -o r\nWhy?")
    assert sh.ns["r"] == expected  # the demos loaded since the define are in the prompt
    sh("later = ['Why?']")
    sh("%dspex batch --module qa_later --items later --no-journal -o OUT")
    assert sh.ns["OUT"] == [expected]


def test_define_a_module_whose_string_signature_names_a_type_of_an_earlier_cell(sh: Shell) -> None:
    sh("import enum\nclass Mood(enum.Enum):\n    HAPPY = 'happy'\n    SAD = 'sad'")
    sh('''%%dspex define Feel
class Feel(dspy.Module):
    def __init__(self):
        super().__init__()
        self.answer = dspy.Predict("question -> answer, mood: Mood")  # DSPy finds Mood in this cell's globals

    def forward(self, question):
        return self.answer(question=question)
''')
    sh("%%dspex run Feel -o r\nWhy?")
    assert isinstance(sh.ns["r"].mood, sh.ns["Mood"])


def test_a_pool_that_cannot_use_its_runtime_directory_says_so_without_a_traceback(
        sh: Shell, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPEX_RUNTIME_DIR", str(tmp_path / "missing"))
    shown = sh.fails("%dspex start -n 1 --pool elsewhere")
    assert f"the runtime directory {tmp_path / 'missing'} ($DSPEX_RUNTIME_DIR" in shown
    assert "set $DSPEX_RUNTIME_DIR to a directory of your own" in shown
    assert "elsewhere" not in sh.magics.pools


def test_threads_that_ask_for_a_pool_at_once_share_one_start(sh: Shell) -> None:
    # each thread that found no pool started one of its own: 8 threads, up to 8 pools, all but the last one
    # forgotten by the magics and running until the kernel's end
    from dspex_nb import notebook_pool

    barrier = threading.Barrier(8)

    def ask() -> Pool:
        barrier.wait()
        return notebook_pool("racing")

    with concurrent.futures.ThreadPoolExecutor(8) as threads:
        pools = list(threads.map(lambda _: ask(), range(8)))
    try:
        assert len({id(pool) for pool in pools}) == 1
        assert sh.capsys.readouterr().out.count("pool 'racing' of ") == 1  # one "ready" line
    finally:
        sh("%dspex stop --pool racing")


def test_defined_module_survives_a_worker_restart(sh: Shell) -> None:
    sh('%%dspex define Shout\ndef Shout(text):\n    return {"loud": text.upper()}')
    pool = sh.pool
    old = pool.status()[0]
    pool.kill_worker("w0", signal.SIGKILL)
    wait_until(lambda: pool.status()[0]["restarts"] == old["restarts"] + 1 and pool.status()[0]["state"] == "ready",
               timeout=30, what="w0 to be replaced")
    assert pool.execute("run_module", {"name": "Shout", "inputs": "hi"}, worker="w0")["value"] == {"loud": "HI"}
    sh("%%dspex run Shout -o r\nhey")
    assert sh.ns["r"] == {"loud": "HEY"}  # what Shout returns, as in the kernel


def test_define_errors(sh: Shell) -> None:
    err = sh.fails("%%dspex define Broken\nclass Broken(:\n    pass")
    assert err.startswith("dspex: ") and "invalid syntax" in err
    with pytest.raises(ValueError, match="bad module"):  # the cell runs in the kernel first, as any cell
        sh("%%dspex define Boom\nraise ValueError('bad module')")
    assert "no module named 'Nope'" in sh.usage_error("%%dspex run Nope\nx")


def test_running_a_program_that_cannot_be_pickled_says_which_part_and_what_to_do(sh: Shell) -> None:
    # was: "dspex: tool 'define' failed: TypeError: Holder cannot be sent ...", as if a worker tool had failed
    sh("import dspy, socket\nclass Holder(dspy.Module):\n    def __init__(self):\n        super().__init__()\n"
       "        self.client = socket.socket()\n        self.qa = dspy.Predict('question -> answer')\n"
       "    def forward(self, question):\n        return self.qa(question=question)\nholder = Holder()")
    err = sh.fails("%%dspex run holder\nWhy?")
    sh("holder.client.close()")
    assert err.startswith("dspex: Holder cannot be sent to the workers: Holder.client (a socket) cannot be pickled: "
                          "TypeError: cannot pickle 'socket' object (a program travels pickled; a client, a socket or "
                          "a file open for writing cannot be: create that inside the module's forward instead)"), err


def test_a_failed_runs_control_characters_are_printed_as_escapes(sh: Shell) -> None:
    # a program's error often quotes the LM's answer (DSPy's parse errors do): the view's summary line showed it
    # escaped, the magic's own "dspex: ValueError: ..." line raw, which could erase lines above or retitle a terminal
    sh("def fails(question):\n    raise ValueError(question)")
    err = sh.fails("%%dspex run fails\n\x1b[1A\x1b[2Kall fine\x1b]0;owned\x07")
    assert "\x1b" not in err and "\x07" not in err, repr(err)
    assert "dspex: ValueError: \\x1b[1A\\x1b[2Kall fine\\x1b]0;owned\\x07" in err, repr(err)


def test_background_run_returns_a_handle(sh: Shell) -> None:
    out, _ = sh('%%dspex predict "question -> answer" -a -o h\nlater?')
    assert "running in the background; h.result() waits for it" in out
    from dspex_nb import Run

    assert isinstance(sh.ns["h"], Run)
    assert sh.ns["h"].result()["answer"].startswith("Demo LM answer to 'later?'")
    sh('%dspex batch "question -> answer" --items qs -a -o hb')
    assert len(sh.ns["hb"].result()) == 50


def test_lm_switch_and_an_lm_error_is_shown(sh: Shell) -> None:
    out, _ = sh("%dspex lm demo --set answer_tokens=12")
    assert out == "dspex: LM 'demo' with {'answer_tokens': 12} on 2 workers\n"
    sh('%%dspex predict "question -> answer" -o r\nshort?')
    assert len(sh.ns["r"].answer.split()) == 12
    sh("%dspex lm demo --set rate_limit_first=2 --set num_retries=0")  # dspy.LM retries a 429 unless told not to
    err = sh.fails('%%dspex predict "question -> answer"\nlimited?')
    assert "RateLimitError" in err and "429" in err and "what arrived before is in _.chunks" in err
    from dspex_nb import Run

    assert isinstance(sh.ns["_"], Run) and sh.ns["_"].status == "failed"
    sh("%dspex lm demo")


@pytest.mark.parametrize("cell, message", [
    ("%dspex", "expected one of start, stop"),
    ("%dspex bogus", "expected one of start, stop"),
    ("%dspex start --bad", "unrecognized arguments: --bad"),
    ("%dspex start -n many", "argument -n/--workers: invalid int value: 'many'"),
    ('%dspex predict "q -> a"', "use %%dspex predict as a cell magic"),
    ("%%dspex status\nx", "%dspex status is a line magic"),
    ('%%dspex predict "q -> a\nx', "No closing quotation"),
    ('%%dspex predict "question answer"\nx', "'question answer' is not a DSPy signature"),
    ('%%dspex predict "a, b -> c"\na: 1', "no value for input field(s) ['b']"),
    ('%%dspex predict "q -> a"\n{undefined_var}', "{undefined_var}: no variable named 'undefined_var' in the kernel"),
    ('%%dspex predict "q -> a" -a --no-stream\nx', "--no-stream waits for the whole answer"),
    ('%dspex batch "q -> a" --items no_such_var', "--items no_such_var: no variable named 'no_such_var'"),
    ('%dspex batch "q -> a" --items not_a_list', "--items not_a_list must be a list of strings, dicts"),
    ("%dspex batch --items qs", "takes a signature or --module NAME"),
    ('%dspex lm demo --set novalue', "--set takes KEY=VALUE"),
    ("%dspex journal drop some-key", "%dspex journal: 'drop' is not list or clear"),
    ("%dspex start -n 0 --pool zero", r"Pool(workers=...) must be an int from 1 to"),
    ("%dspex start -n 1000000 --pool huge", r"Pool(workers=...) must be an int from 1 to"),
    ('%%dspex predict "q -> a" --timeout -1\nx', "predict(timeout=...) must be a finite number > 0"),
    ('%dspex batch "q -> a" --items qs --concurrency 0', "batch(concurrency=...) must be an int from 1 to 1024, got 0"),
    ('%dspex batch "q -> a" --items qs --concurrency 1000000', "batch(concurrency=...) must be an int from 1 to 1024"),
    ("%dspex lm demo --temperature nan", "configure_lm(temperature=...) must be a finite number >= 0, got nan"),
    ("%dspex lm demo --temperature -1", "configure_lm(temperature=...) must be a finite number >= 0, got -1.0"),
    ("%dspex lm demo --set temperature=nan", "configure_lm(temperature=...) must be a finite number >= 0, got 'nan'"),
    ("%dspex lm demo --max-tokens 0", "configure_lm(max_tokens=...) must be an int >= 1, got 0"),
    ("%dspex lm demo --set max_tokens=1.5", "configure_lm(max_tokens=...) must be an int >= 1, got 1.5"),
    ("%dspex lm demo --set api_key=sk-live-0123456789abcdef", "configure_lm(api_key=...) is a connection's: the demo"),
    ('%%dspex predict "q -> a" -o 1x\nx', "-o '1x': expected a Python identifier"),
    ('%%dspex predict "q -> a" -o "a b"\nx', "-o 'a b': expected a Python identifier"),
    ('%%dspex predict "q -> a" -o class\nx', "-o 'class': expected a Python identifier"),
    ('%%dspex predict "q -> a" -o print\nx', "-o print: the result would hide Python's builtin print"),
    ('%dspex batch "q -> a" --items qs -o Out', "-o Out: the result would hide IPython's Out"),
    ('%%dspex predict "q -> a"\n{qs[first]}', "{qs[first]}: TypeError("),
    ('%%dspex predict "q -> a"\nsay {qs[first]}', "{qs[first]}: TypeError("),
    ('%%dspex predict "q -> a"\nsay {qs!z}', "{qs!z}: Unknown conversion specifier z"),
    ('%%dspex predict "q -> a"\nsay {qs:zz}', "{qs:zz}: unsupported format string"),
])
def test_argument_errors_are_usage_errors(sh: Shell, cell: str, message: str) -> None:
    sh.ns["not_a_list"] = 5
    sh.ns.setdefault("qs", ["a", "b"])
    assert message in sh.usage_error(cell)
    assert sh.pool.execute("echo", {"ok": 1}) == {"ok": 1}
    assert "print" not in sh.ns and not any(name in sh.ns for name in ("1x", "a b", "class"))


def test_a_worker_python_without_dspy_is_said_without_a_traceback(sh: Shell, bare_python: str) -> None:
    message = sh.usage_error(f"%dspex start --pool bare -n 1 --python {bare_python}")
    assert "dspy" in message and "not installed" in message and f"{bare_python} -m pip install" in message
    assert "bare" not in sh.magics.pools


def test_an_output_name_the_kernel_gave_a_value_may_be_used_again(sh: Shell) -> None:
    sh("list = 'mine'")
    try:
        sh('%%dspex predict "question -> answer" -o list --no-stream\nWhy?')
        assert sh.ns["list"].answer.startswith("Demo LM answer to 'Why?'")
    finally:
        del sh.ns["list"]


def test_named_pools_have_their_own_settings(sh: Shell) -> None:
    out, _ = sh("%dspex start --pool small -n 1 --lm demo")
    assert out.startswith("dspex: pool 'small' of 1 worker ready")
    sh("%dspex lm demo --set answer_tokens=9 --pool small")
    sh('%%dspex predict "question -> answer" --pool small -o small_answer\nhow big?')
    sh('%%dspex predict "question -> answer" -o default_answer\nhow big?')
    assert len(sh.ns["small_answer"].answer.split()) == 9
    assert sh.ns["default_answer"].answer != sh.ns["small_answer"].answer
    out, _ = sh("%dspex status --pool small")
    assert out.startswith("pool: 1 worker, lm=demo, running")
    assert set(sh.magics.pools) == {"default", "small"}
    sh.magics.pools["small"].shutdown()  # stopped under the magics (as by an interrupted %dspex restart)
    sh('%%dspex predict "question -> answer" --pool small -o again\nhow big?')
    assert sh.ns["again"] == sh.ns["small_answer"]  # started again as it was: one worker, its LM settings
    assert sh.magics.pools["small"].size == 1 and sh.magics.pools["small"].running
    small = sh.magics.pools["small"]
    out, _ = sh("%dspex stop --pool small")
    assert out == "dspex: pool 'small' stopped\n" and set(sh.magics.pools) == {"default"}
    with pytest.raises(PoolClosed, match="%dspex stop stopped this pool"):
        small.run("q -> a", q="x")
    small.start().shutdown()  # started and stopped by the user since: the magics' note is not why any more
    with pytest.raises(PoolClosed, match=r"^the pool is not running: start it with Pool.start\(\)"):
        small.run("q -> a", q="x")


class InterruptedJoin:
    """A pool's worker-restart thread whose first join is interrupted (Ctrl-C while %dspex restart waits)."""

    def __init__(self) -> None:
        self.interrupted = False

    def join(self) -> None:
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt


@pytest.mark.parametrize("then", ['%%dspex predict "question -> answer" --pool stopping\nwhy?',
                                  "%dspex start --pool stopping -n 1 --lm demo"])
def test_a_restart_interrupted_while_stopping_leaves_no_worker_behind(sh: Shell, then: str) -> None:
    sh("%dspex start --pool stopping -n 1 --lm demo")
    old = sh.magics.pools["stopping"]
    pids = [r["pid"] for r in old.status()]
    old._restarting.append(InterruptedJoin())  # type: ignore[arg-type]
    err = sh.fails("%dspex restart --pool stopping")
    assert "interrupted; the pool is stopped" in err
    sh(then)  # it starts again
    assert sh.magics.pools["stopping"] is not old and sh.magics.pools["stopping"].running
    wait_until(lambda: not any(pid_alive(p) for p in pids), what="the old pool's workers to stop")
    sh("%dspex stop --pool stopping")


def test_restart_keeps_settings_and_modules_and_unload_stops_workers(sh: Shell) -> None:
    before = sh.pool
    old = [r["pid"] for r in before.status()]
    out, _ = sh("%dspex restart")
    assert "pool of 2 workers ready" in out
    assert not any(pid_alive(p) for p in old)
    with pytest.raises(PoolClosed, match=r"started anew in its place \(%dspex restart\): "
                                         r"dspex_nb.notebook_pool\('default'\) is the new one"):
        before.run("q -> a", q="x")  # a variable that held the pool before the restart says where the pool is
    assert "TwoStep" in sh.pool.definitions
    sh("%%dspex run TwoStep -o r\nagain?")
    assert sh.ns["r"].answer.startswith("Demo LM answer to 'again?'")
    pids = [r["pid"] for r in sh.pool.status()]
    sh("%unload_ext dspex_nb")
    wait_until(lambda: not any(pid_alive(p) for p in pids), what="the workers to stop")
    sh("%load_ext dspex_nb")
    out, _ = sh('%%dspex predict "q -> a"\nx')
    assert out.startswith("dspex: no pool yet; starting 2 workers with lm='demo'")


def kernel_run(program: object, **inputs: object) -> object:
    """``program`` run in the kernel on the demo LM the workers use (its answers depend on the whole prompt)."""
    import dspy

    from dspex_nb.worker.demo_lm import make_demo_lm

    with dspy.context(lm=make_demo_lm()[0]):
        return program(**inputs)  # type: ignore[operator]


def test_predict_and_batch_take_a_signature_class_from_the_kernel(sh: Shell) -> None:
    sh('''
import dspy
from typing import Literal

class Emotion(dspy.Signature):
    """Classify emotion."""
    sentence: str = dspy.InputField()
    sentiment: Literal["sadness", "joy", "anger"] = dspy.OutputField()
    intensity: float = dspy.OutputField()
''')
    import dspy

    sh("%%dspex predict Emotion -o r\ni am so happy today")
    expected = kernel_run(dspy.Predict(sh.ns["Emotion"]), sentence="i am so happy today")
    assert sh.ns["r"] == expected and isinstance(sh.ns["r"].intensity, float)
    sh('feelings = ["i lost my keys", "what a lovely day"]')
    sh("%dspex batch Emotion --items feelings --no-journal -o OUT")
    assert sh.ns["OUT"] == [kernel_run(dspy.Predict(sh.ns["Emotion"]), sentence=s) for s in sh.ns["feelings"]]


def test_predict_and_batch_of_a_signature_whose_class_cell_ran_again_give_the_class_it_names(sh: Shell) -> None:
    # was: the output came back as the class the cell made the second time, not the one the signature names
    sh('''
import dspy
from pydantic import BaseModel

class Item16(BaseModel):
    name: str

class Use16(dspy.Signature):
    item: Item16 = dspy.InputField()
    out: Item16 = dspy.OutputField()
''')
    sh("class Item16(BaseModel):\n    name: str\n\nnew16 = Item16(name='new')\nitems16 = [{'item': new16}]")
    named = sh.ns["Use16"].output_fields["out"].annotation
    assert named is not sh.ns["Item16"]
    sh("%%dspex predict Use16 -o r\n{new16}")
    assert type(sh.ns["r"].out) is named
    sh("%dspex batch Use16 --items items16 --no-journal -o OUT")
    assert type(sh.ns["OUT"][0].out) is named


def test_a_signature_string_naming_kernel_types_works_as_in_a_cell(sh: Shell) -> None:
    sh('''
import dspy
from pydantic import BaseModel

class Guest(BaseModel):
    name: str
    age: int

ada = Guest(name="Ada", age=36)
guests = [ada, Guest(name="Bob", age=5)]
''')
    import dspy

    signature = "guest: Guest -> greeting, next: Guest"
    greet = dspy.Predict(dspy.Signature(signature, custom_types={"Guest": sh.ns["Guest"]}))
    sh('%%dspex predict "guest: Guest -> greeting, next: Guest" -o r\n{ada}')
    assert sh.ns["r"] == kernel_run(greet, guest=sh.ns["ada"]) and isinstance(sh.ns["r"].next, sh.ns["Guest"])
    sh('%dspex batch "guest: Guest -> greeting, next: Guest" --items guests --no-journal -o OUT')
    assert sh.ns["OUT"] == [kernel_run(greet, guest=g) for g in sh.ns["guests"]]
    assert "Unknown name: Gest" in sh.usage_error('%%dspex predict "guest: Gest -> greeting"\n{ada}')


def test_the_text_view_shows_typed_outputs_as_the_prediction_holds_them(sh: Shell) -> None:
    sh('''
import dspy, enum
from pydantic import BaseModel

class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"

class Person(BaseModel):
    name: str
    age: int

class Feeling(dspy.Signature):
    """Classify the mood and describe the person."""
    sentence: str = dspy.InputField()
    mood: Mood = dspy.OutputField()
    who: Person = dspy.OutputField()
''')
    out, _ = sh("%%dspex predict Feeling -o r\nI am so happy today")
    assert f"mood: {sh.ns['r'].mood!r}" in out and f"who: {sh.ns['r'].who!r}" in out
    assert "__dspex__" not in out


def test_a_lone_placeholder_passes_the_object_itself(sh: Shell) -> None:
    import dspy

    sh('docs = ["one page", "two pages"]')
    sh('%%dspex predict "docs: list[str], question -> count: int" -o r\ndocs: {docs}\nquestion: how many {docs[0]}?')
    expected = kernel_run(dspy.Predict("docs: list[str], question -> count: int"), docs=["one page", "two pages"],
                          question="how many one page?")
    assert sh.ns["r"] == expected  # the prompt held the list, not its repr (the demo LM's answer shows the prompt)
    sh('row = {"docs": docs}')  # a key in quotes, as Python (and IPython's own {}) writes it: was a KeyError
    sh('%%dspex predict "docs: list[str], question -> count: int" -o r2\ndocs: {row[\'docs\']}\n'
       'question: how many {row["docs"][0]}?')
    assert sh.ns["r2"] == expected


def test_run_a_module_instance_from_the_kernel_fills_its_input_field(sh: Shell) -> None:
    sh('import dspy\nqa = dspy.ChainOfThought("question -> answer")')
    out, _ = sh("%%dspex run qa -o r\nWhat is DSPy?")
    assert out.startswith("reasoning: ")
    assert sh.ns["r"] == kernel_run(sh.ns["qa"], question="What is DSPy?")


@pytest.mark.parametrize("streamify", ["async_streaming=False", "is_async_program=True"])
def test_run_a_streamified_program_takes_its_programs_input_fields(sh: Shell, streamify: str) -> None:
    # DSPy's streaming tutorial's program: streamify's function takes (*args, **kwargs), so the cell was refused
    # ("write one `field: value` line per input field []"), where stream(question=...) runs in the kernel
    sh(f'''
import dspy
from dspy.streaming import StreamListener

def streaming():
    return dspy.streamify(dspy.ChainOfThought("question, context -> answer"), {streamify},
                          stream_listeners=[StreamListener(signature_field_name="answer")])

stream = streaming()
''')
    out, _ = sh("%%dspex run stream -o r\nquestion: Why is the sky blue?\ncontext: light")
    assert out.startswith("answer: Demo LM answer")  # the listener's field streams first
    assert sh.ns["r"] == kernel_run(sh.ns["dspy"].ChainOfThought("question, context -> answer"),
                                    question="Why is the sky blue?", context="light")


def test_run_and_batch_an_asyncified_program_take_its_programs_input_fields(sh: Shell) -> None:
    # DSPy's async tutorial's program: asyncify's function takes (*args, **kwargs), so the cell was refused ("takes
    # keyword arguments (**kwargs)") and a batch's string items too ("must be a dict of async_program's inputs []")
    sh('import dspy\naqa = dspy.asyncify(dspy.ChainOfThought("question -> answer"))\nqs = ["Why?", "How?"]')
    import asyncio

    expected = [kernel_run(lambda **inputs: asyncio.run(sh.ns["aqa"](**inputs)), question=q) for q in sh.ns["qs"]]
    sh("%%dspex run aqa -o r\nWhy?")
    assert sh.ns["r"] == expected[0]
    sh("%dspex batch --module aqa --items qs --no-journal -o OUT")
    assert sh.ns["OUT"] == expected


def test_run_leaves_out_the_inputs_a_modules_forward_gives_defaults(sh: Shell) -> None:
    sh('''
import dspy

class Answers(dspy.Module):
    def __init__(self):
        super().__init__()
        self.qa = dspy.Predict("question -> answer")

    def forward(self, question: str, n: int = 2):
        return dspy.Prediction(answers=[self.qa(question=f"{question} {i}").answer for i in range(n)])

answers = Answers()
''')
    sh("%%dspex run answers -o r\nquestion: Why?")  # as answers(question="Why?") in the kernel
    assert sh.ns["r"] == kernel_run(sh.ns["answers"], question="Why?")
    assert "no value for input field(s) ['question']" in sh.usage_error("%%dspex run answers\nn: {len('ab')}")


def test_batch_takes_dspy_examples_with_a_signature_string(sh: Shell) -> None:
    sh('import dspy\ndevset = [dspy.Example(question=f"q{i}?", answer="x").with_inputs("question") for i in range(3)]')
    sh('%dspex batch "question -> answer" --items devset --no-journal -o OUT')
    assert [p.answer.split(":")[0] for p in sh.ns["OUT"]] == [f"Demo LM answer to 'q{i}?'" for i in range(3)]


def test_only_names_in_braces_are_kernel_variables() -> None:
    from dspex_nb.magics import interpolate

    ns = {"name": "Ada", "xs": [1, 2]}
    assert interpolate('{name} {xs[1]} {{kept}}', ns) == "Ada 2 {kept}"
    rows = {"rows": [{"text": "hi", "'q'": "a key with quotes"}]}  # a key as Python writes it, as IPython's {} takes
    assert interpolate("""{rows[0]['text']} {rows[0]["text"]} {rows[0][text]} {rows[0]['q']}""", rows) == \
        "hi hi hi a key with quotes"
    digits = {"row": {"0": "the str key", 1: "the int key"}}  # a quoted key is a str, as in Python: it was read as
    assert interpolate("{row['0']} {row[1]}", digits) == "the str key the int key"  # the int 0 (a KeyError)
    assert interpolate("{row['1']}", {"row": {"1": "str", 1: "int"}}) == "str"  # and gave the int key's value
    for text in ('scores: {"a": 1}', "What does {x: 1} mean?", '{"a": {"b": 2}}', "{}"):  # not names: as written
        assert interpolate(text, ns) == text


def test_run_and_batch_give_a_code_modules_cell_and_items_to_its_signatures_inputs(sh: Shell) -> None:
    # dspy.RLM's forward(*, interpreter_factory=None, **input_args) and dspy.CodeAct's
    # forward(interpreter=None, /, **kwargs) take their signature's inputs, not those call options
    sh('''
import dspy

def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b

rlm = dspy.RLM("context, query -> answer", max_iters=1, interpreter_factory=dspy.LocalInterpreter)
act = dspy.CodeAct("question -> answer", tools=[add], max_iters=1, interpreter_factory=dspy.LocalInterpreter)
questions = ["What is 2+2?", "What is 3+3?"]
''')
    sh("%%dspex run rlm -o r\ncontext: Bees dance.\nquery: What do bees do?")
    assert sh.ns["r"] == kernel_run(sh.ns["rlm"], context="Bees dance.", query="What do bees do?")
    sh("%%dspex run act -o r\nWhat is 2+2?")
    assert sh.ns["r"] == kernel_run(sh.ns["act"], question="What is 2+2?")
    sh("%dspex batch --module act --items questions --no-journal -o OUT")
    assert sh.ns["OUT"] == [kernel_run(sh.ns["act"], question=q) for q in sh.ns["questions"]]


def test_run_leaves_out_inputs_when_every_forward_parameter_has_a_default(sh: Shell) -> None:
    sh('''
import dspy

class Styled(dspy.Module):
    def __init__(self):
        super().__init__()
        self.qa = dspy.Predict("question -> answer")

    def forward(self, question: str = "What?", style: str = "short"):
        return dspy.Prediction(answer=self.qa(question=f"{question} ({style})").answer)

styled = Styled()
''')
    sh("%%dspex run styled -o r\nquestion: Why?\nstyle: long")  # two lines: the cell is one line per input
    sh("%%dspex run styled -o s\nquestion: Why?")  # as styled(question="Why?") in the kernel
    assert sh.ns["s"] == kernel_run(sh.ns["styled"], question="Why?")


def test_predict_takes_a_numpy_array_of_the_kernel_as_an_input(sh: Shell) -> None:
    # numpy values travel as themselves: one given as a cell's {name} reaches the program as the array it is
    sh('import numpy as np\nscores = np.array([0.25, 0.5, 0.75])')
    sh('%%dspex predict "question, scores -> answer" -o r\nquestion: Which is best?\nscores: {scores}')
    assert sh.ns["r"].answer.startswith("Demo LM answer to 'Which is best?'")


def test_run_gives_each_line_to_the_field_a_forwards_kwargs_pass_on(sh: Shell) -> None:
    # forward(self, question, **kwargs) and dspy.MultiChainComparison's forward(self, completions, **kwargs): the
    # `context:` / `question:` line went into the first input's text, as if the cell were one value
    sh('''
import dspy

class Answer(dspy.Module):
    def __init__(self):
        super().__init__()
        self.qa = dspy.Predict("question, context -> answer")

    def forward(self, question, **kwargs):
        return self.qa(question=question, **kwargs)

answer = Answer()
mcc = dspy.MultiChainComparison("question -> answer", M=2)
attempts = [dspy.Prediction(reasoning="It is blue.", answer="blue"), dspy.Prediction(reasoning="Grey.", answer="grey")]
''')
    sh("%%dspex run answer -o r\nquestion: Why?\ncontext: The sky scatters blue light.")
    assert sh.ns["r"] == kernel_run(sh.ns["answer"], question="Why?", context="The sky scatters blue light.")
    sh('questions = ["Why?", "How?"]\n%dspex batch --module answer --items questions --no-journal -o OUT')
    assert sh.ns["OUT"] == [kernel_run(sh.ns["answer"], question=q) for q in sh.ns["questions"]]  # context: optional
    sh("%%dspex run mcc -o r\ncompletions: {attempts}\nquestion: What colour is the sky?")
    assert sh.ns["r"] == kernel_run(sh.ns["mcc"], completions=sh.ns["attempts"], question="What colour is the sky?")


def test_run_and_batch_give_the_cell_or_item_to_the_one_input_a_call_must_give(sh: Shell) -> None:
    sh('''
%%dspex define shout
def shout(text: str, times: int = 2):
    return dspy.Prediction(loud=" ".join([text.upper()] * times))
''')
    sh("%%dspex run shout -o r\nhey")  # as shout("hey") in the kernel
    assert sh.ns["r"] == sh.ns["shout"]("hey")
    sh('words = ["hi", "ho"]\n%dspex batch --module shout --items words --no-journal -o OUT')
    assert sh.ns["OUT"] == [sh.ns["shout"](w) for w in sh.ns["words"]]


def test_run_takes_a_retrievers_query_as_its_call_in_the_kernel(sh: Shell) -> None:
    # dspy.Retrieve is a Parameter, not a Module: its __call__(*args, **kwargs) passes on to forward(query, k=None),
    # so the cell was refused ("write one `field: value` line per input field []") where retrieve("bees") runs
    sh('''
import dspy

def local_rm(query, k=3, **kwargs):
    docs = ["Bees find flowers by scent.", "Cats purr.", "Yeast makes bread rise.", "Rain is water."]
    return [dspy.Prediction(long_text=d) for d in docs[:k]]

dspy.configure(rm=local_rm)
retrieve = dspy.Retrieve(k=2)
''')
    try:
        sh("%%dspex run retrieve -o r\nbees")
        assert sh.ns["r"] == sh.ns["retrieve"]("bees")
        sh("three = 3")
        sh("%%dspex run retrieve -o r\nquery: bees\nk: {three}")
        assert sh.ns["r"] == sh.ns["retrieve"]("bees", k=3) and len(sh.ns["r"].passages) == 3
    finally:
        sh("dspy.configure(rm=None)")


def test_a_signature_without_output_fields_gives_the_kernels_empty_prediction(sh: Shell) -> None:
    # DSPy answers it with a Prediction of no fields, whose repr raises StopIteration: the view showed that repr
    sh('''
import dspy

class Silent(dspy.Signature):
    """Read the note."""
    note: str = dspy.InputField()
''')
    import dspy

    for options in ("", " --no-stream"):
        out, _ = sh(f"%%dspex predict Silent -o r{options}\nHello")
        expected = kernel_run(dspy.Predict(sh.ns["Silent"]), note="Hello")
        assert type(sh.ns["r"]) is type(expected) and dict(sh.ns["r"].items()) == dict(expected.items()) == {}
        assert "StopIteration" not in out


def test_the_real_lm_notebooks_error_cell_goes_on_with_a_key(sh: Shell, monkeypatch: pytest.MonkeyPatch) -> None:
    # 05-real-lms shows an LM's error where OPENAI_API_KEY is set (nbval runs it without one): since a failed command
    # fails its cell, that cell failed there, stopping Run All and nbval, and left the pool on openai/no-such-model
    import nbformat

    notebook = nbformat.read(Path(__file__).parents[1] / "notebooks" / "05-real-lms.ipynb", as_version=4)
    cell = next(c.source for c in notebook.cells if "no-such-model" in c.source)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # the LM fails at once, without the network
    sh("HAVE_KEY = True\nMODEL = 'demo'")
    out, _ = sh(cell)
    assert "the cell failed with the LM's error" in out and sh.pool.lm == "demo"


def test_a_call_options_line_passes_the_kernels_object_as_the_call_in_the_kernel(sh: Shell) -> None:
    # Was: `lm: {short}` under `question: Why?` was more text of the question (the LM's repr in it), silently
    sh('''
import dspy
from dspex_nb import demo_lm
qa_opts = dspy.Predict("question -> answer")
short = demo_lm(answer_tokens=3)
''')
    expected = sh.ns["qa_opts"](question="Why?", lm=sh.ns["short"]).answer
    assert expected != sh.ns["qa_opts"](question="Why?", lm=demo_lm()).answer  # the option makes a difference
    for cell in ("question: Why?\nlm: {short}", "Why?\nlm: {short}", "lm: {short}\nquestion: Why?"):
        sh(f"%%dspex run qa_opts -o r\n{cell}")
        assert sh.ns["r"].answer == expected, cell
    sh("%%dspex run qa_opts -o r --no-interpolate\nquestion: Why?\nlm: {short}")  # braces as they are: text
    assert "lm: {short}" in sh.ns["r"].answer


def test_a_config_line_written_as_a_dict_passes_that_dict_as_dspys_cheatsheet_call(sh: Shell) -> None:
    # DSPy's cheatsheet: predict(question="1+1", config={"rollout_id": 1, "temperature": 1.0}). Written so in a cell,
    # the dict reached DSPy as its text: "TypeError: 'str' object is not a mapping"
    sh('''
import dspy
from dspex_nb import demo_lm
fresh = dspy.Predict("question -> answer")
''')
    with sh.ns["dspy"].context(lm=demo_lm()):
        expected = sh.ns["fresh"](question="1+1", config={"rollout_id": 1, "temperature": 1.0, "n": 2})
    assert len(expected.completions) == 2  # the config made a difference
    sh('%%dspex run fresh -o r\nquestion: 1+1\nconfig: {"rollout_id": 1, "temperature": 1.0, "n": 2}')
    assert sh.ns["r"].completions.answer == expected.completions.answer
    assert "neither a kernel variable ({name}) nor a dict literal" in sh.usage_error(
        "%%dspex run fresh\nquestion: 1+1\nconfig: {temperature: 1.0}")
    for typo in ('{"temperature", 1.0}', "{1, 2}"):  # a set, not a dict: was its text, "'str' object is not a mapping"
        assert "neither a kernel variable ({name}) nor a dict literal" in sh.usage_error(
            f"%%dspex run fresh\nquestion: 1+1\nconfig: {typo}")
    sh('a, b = "x", "y"')
    sh("%%dspex run fresh -o r\nquestion: 1+1\nconfig: {a} and {b}")
    with sh.ns["dspy"].context(lm=demo_lm()):  # two placeholders are the question's text, as before
        assert sh.ns["r"].answer == sh.ns["fresh"](question="1+1\nconfig: x and y").answer


def test_run_gives_a_program_taking_any_keywords_one_line_per_keyword(sh: Shell) -> None:
    # dspy.KNN's __call__(**kwargs) names no input: the cell was refused ("per input field []")
    sh('''
import dspy

def letters(texts):
    return [[text.count(c) for c in "abcdefghijklmnopqrstuvwxyz"] for text in texts]

trainset = [dspy.Example(question=q, answer=a).with_inputs("question")
            for q, a in [("bees and flowers", "pollen"), ("cats purring", "content"), ("rain clouds", "water")]]
knn = dspy.KNN(k=1, trainset=trainset, vectorizer=dspy.Embedder(letters))
''')
    sh("%%dspex run knn -o near\nquestion: a cat purring")
    assert sh.ns["near"] == sh.ns["knn"](question="a cat purring") and sh.ns["near"][0].answer == "content"
    assert "takes keyword arguments (**kwargs): write one `name: value` line" in sh.usage_error(
        "%%dspex run knn\na cat purring")


def test_a_signature_or_module_name_the_kernel_lacks_is_refused_without_a_failed_call(sh: Shell) -> None:
    # Was: `%%dspex predict Emotoin` (a typo) went to a worker as a signature string, so `%dspex status` counted a
    # failed call the user never made, and the error said "expected 'inputs -> outputs'" of a class name; and the
    # names listed with an unknown module were those the pool ships kernel programs under (_ChainOfThought_9f3e...)
    sh('import dspy\nqa17 = dspy.ChainOfThought("question -> answer")\nsentences17 = ["i am happy"]')
    sh("%%dspex run qa17\nWhy?")  # shipped under a name of its own, which no one wrote
    sh("%%dspex define TwoStep\n" + TWO_STEP)
    failed = sum(worker["errors"] for worker in sh.pool.status())
    for cell in ("%%dspex predict Emotoin\ni am happy", "%dspex batch Emotoin --items sentences17 --no-journal"):
        assert "'Emotoin' names no signature class of the kernel" in sh.usage_error(cell)
    assert sum(worker["errors"] for worker in sh.pool.status()) == failed
    for cell in ("%%dspex run Nope17\nx", "%dspex batch --module Nope17 --items sentences17"):
        error = sh.usage_error(cell)
        assert "(defined: ['TwoStep'" in error and "_ChainOfThought_" not in error, error
    out, _ = sh("%dspex config")
    assert "TwoStep" in out and "_ChainOfThought_" not in out
