"""Secrets never reach the user's screen or a saved notebook: errors, describe(), magic output and
dashboards mask keys and the values of secret-named environment variables."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dspy
import pytest
from IPython.core.interactiveshell import InteractiveShell

from dspex_nb import Pool, ToolError
from dspex_nb.redact import text
from dspex_nb.typed import NotPortable

SECRET = "sk-proj-very-secret-4711"


@pytest.fixture(scope="module")
def secret_pool(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[Pool]:
    monkeypatch_module.setenv("MY_SERVICE_API_KEY", SECRET)  # in the kernel's environment, as a user's key is
    with Pool(workers=1, lm="openai/gpt-4o-mini", lm_kwargs={"api_key": SECRET}, journal=False) as pool:
        yield pool


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_an_error_naming_the_environment_does_not_show_it(secret_pool: Pool) -> None:
    secret_pool.define("leak", "import os\ndef leak(x):\n    raise KeyError(dict(os.environ))\n")
    with pytest.raises(ToolError) as caught:
        secret_pool.run("leak", x=1)
    shown = str(caught.value) + caught.value.remote_traceback
    assert SECRET not in shown and "MY_SERVICE_API_KEY" in shown and "***" in shown


def test_describe_and_status_mask_the_lm_key(secret_pool: Pool) -> None:
    described = secret_pool.describe()
    assert described["lm"]["kwargs"] == {"api_key": "***"}
    assert SECRET not in repr(described) + repr(secret_pool.status()) + repr(secret_pool)


def test_magics_do_not_print_keys(capsys: pytest.CaptureFixture[str]) -> None:
    ip = InteractiveShell.instance()
    ip.run_cell("%load_ext dspex_nb")
    try:
        ip.run_cell("%dspex start -n 1 --pool secrets")
        ip.run_cell(f"%dspex lm openai/gpt-4o-mini --set api_key={SECRET} --set token=abcdefgh --pool secrets")
        ip.run_cell("%dspex config")
        out, err = capsys.readouterr()
        assert "api_key" in out and "***" in out
        assert SECRET not in out + err and "abcdefgh" not in out + err
    finally:
        ip.run_cell("%dspex stop --pool secrets")
        ip.run_cell("%unload_ext dspex_nb")


@pytest.mark.parametrize("leak", [f"api_key='{SECRET}'", f'"token": "{SECRET}"', f"Authorization: Bearer {SECRET}"])
def test_assigned_secrets_are_masked_in_text(leak: str) -> None:
    assert SECRET not in text(f"failed with {leak} and more")


def test_a_key_given_in_lm_kwargs_is_masked_where_an_error_quotes_it(secret_pool: Pool) -> None:
    secret_pool.define("quote", f"def quote(x):\n    raise PermissionError('Incorrect API key provided: {SECRET}')\n")
    with pytest.raises(ToolError) as caught:
        secret_pool.run("quote", x=1)
    batch = secret_pool.batch(["a"], module="quote", journal=False)
    batch.wait(60)
    shown = str(caught.value) + caught.value.remote_traceback + repr(batch.records)
    assert SECRET not in shown and "Incorrect API key provided: ***" in shown


class AuthError(Exception):
    """A program's exception class whose str() keeps its argument (a token) from view."""

    def __str__(self) -> str:
        return "auth failed"


class PlainWordedError(Exception):
    """A program's exception class with a str() of its own that shows its one argument as Python's does."""

    def __str__(self) -> str:
        return str(self.args[0])


def test_an_exceptions_args_that_its_str_does_not_show_stay_on_the_worker(secret_pool: Pool) -> None:
    """The args travel to the kernel, where repr(e) shows them: a token that str() hid in the worker showed there."""
    def program(kind: str) -> None:
        token = "-".join(["tok", "0815", "hidden"])  # not in the source line, which the traceback quotes
        raise {"auth": AuthError(token), "plain": PlainWordedError("shown"),
               "known": ValueError(f"Incorrect API key provided: {SECRET}", 401)}[kind]

    with pytest.raises(AuthError) as caught:
        secret_pool.run(program, kind="auth")
    error = caught.value
    assert (str(error), repr(error), error.args) == ("auth failed", "AuthError('auth failed')", ("auth failed",))
    assert "tok-0815-hidden" not in repr(vars(error))
    with pytest.raises(PlainWordedError) as caught:  # one whose str() shows its args keeps them
        secret_pool.run(program, kind="plain")
    assert (str(caught.value), caught.value.args) == ("shown", ("shown",))
    with pytest.raises(ValueError) as caught:  # a known secret is masked in the args too
        secret_pool.run(program, kind="known")
    assert caught.value.args == ("Incorrect API key provided: ***", 401) and SECRET not in repr(caught.value)


@pytest.mark.parametrize("leak", [
    "password='correct horse battery staple'", "{'password': 'p@ss,w0rd;secret&x'}",
    '"Authorization": "Basic dXNlcjpwYXNzd29yZA=="', "headers={'Authorization': 'Token dXNlcjpwYXNzd29yZA'}",
    'client_secret="s3cr3t&more)text"', "{'x-api-key': 'sk-ant api03 dXNlcjpwYXNz'}"])
def test_a_quoted_secret_is_masked_whole_whatever_its_characters(leak: str) -> None:
    shown = text(f"failed with {leak} and more")
    assert shown.count("***") == 1 and not any(part in shown for part in (
        "horse", "staple", "w0rd", "dXNl", "Basic", "Token", "more)", "api03")), shown


def test_a_quoted_text_of_a_field_named_like_a_key_is_shown() -> None:
    assert text('key_points="Demo LM answer to x", token_summary="a b"') == (
        'key_points="Demo LM answer to x", token_summary="a b"')


def test_settings_named_like_counts_or_delays_are_shown() -> None:
    from dspex_nb import redact

    assert [redact.is_secret_name(n) for n in ("per_token", "max_tokens", "answer_tokens")] == [False] * 3
    assert [redact.is_secret_name(n) for n in ("token", "api_token", "hf_token", "api_key")] == [True] * 4


SETTINGS = """
import pydantic

class Headers(pydantic.BaseModel):
    Authorization: int

class Settings(pydantic.BaseModel):
    api_key: int
    name: int
    headers: Headers

def configure(path):
    key = open(path).read()  # a key kept in a file: no setting or variable of the pool's names it
    return dspy.Prediction(settings=Settings(api_key=key, name="bob", headers={"Authorization": "Basic " + key}))
"""


def test_the_value_a_validation_error_quotes_for_a_field_named_like_a_key_is_masked(secret_pool: Pool,
                                                                                       tmp_path: Path) -> None:
    # was: "api_key\n  Input should be a valid integer ... [type=int_parsing, input_value='sk-...', input_type=str]"
    # in the error and its traceback, while the traceback's line above it, Settings(api_key=...), was masked
    other = "sk-from-a-file-0815"
    (tmp_path / "key").write_text(other)
    secret_pool.define("configure", SETTINGS)
    with pytest.raises(ToolError) as caught:
        secret_pool.run("configure", path=str(tmp_path / "key"))
    shown = str(caught.value) + caught.value.remote_traceback
    assert other not in shown and shown.count("input_value=***") == 4  # message and traceback, two fields each
    assert "input_value='bob'" in shown  # a field not named as a secret shows the value it was given


def test_a_result_without_json_form_comes_back_without_the_keys_in_its_repr(secret_pool: Pool) -> None:
    # a value with no JSON form comes back as its repr: in the error, the batch's records (and so the dashboard
    # and the journal); an object holding a key, or os.environ, shows it there
    secret_pool.define("holder", "import os, types\ndef holder(x):\n    return types.SimpleNamespace("
                                 "key=os.environ['MY_SERVICE_API_KEY'], env=os.environ)\n")
    with pytest.raises(NotPortable) as caught:
        secret_pool.run("holder", x=1)
    batch = secret_pool.batch(["a"], module="holder", journal=False)
    batch.wait(60)
    shown = str(caught.value) + repr(caught.value.raw) + repr(batch.records)
    assert "namespace(key='***'" in shown and SECRET not in shown


class _LongRepr:
    def __repr__(self) -> str:  # a key that the 2,000 characters kept of a repr would cut in two
        return "x" * 1990 + SECRET + "y" * 100_000


def test_a_key_cut_by_the_end_of_a_kept_repr_is_masked_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    from dspex_nb import typed

    monkeypatch.setenv("MY_SERVICE_API_KEY", SECRET)
    kept = typed.encode(_LongRepr())["repr"]
    assert len(kept) == 2000 and kept.startswith("x" * 1990) and SECRET[:10] not in kept


def test_a_password_in_a_url_is_masked_in_text() -> None:
    shown = text("ProxyError: https://me:p%40ss-unseen@proxy.example:8080 refused; see ftp://anon@host, mailto:a@b")
    assert shown == "ProxyError: https://me:***@proxy.example:8080 refused; see ftp://anon@host, mailto:a@b"


def test_a_percent_encoded_url_password_is_masked_as_written_and_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the decoded form was a secret: an error quoting the URL without its scheme, or the password alone,
    showed the percent-encoded one."""
    from dspex_nb import redact

    monkeypatch.setenv("HTTPS_PROXY", "http://user:p%40ss-proxy-0815@proxy.example/v1")
    redact.register({"api_base": "http://bob:lm%2Fpass-4711@127.0.0.1:9/v1"})
    for password in ("p%40ss-proxy-0815", "p@ss-proxy-0815", "lm%2Fpass-4711", "lm/pass-4711"):
        assert text(f"failed to connect to user:{password}@host") == "failed to connect to user:***@host"
        assert text(f"bad password {password}") == "bad password ***"


def test_a_password_in_an_lm_url_is_masked_where_it_shows() -> None:
    # a LiteLLM proxy or Ollama behind basic auth: api_base="http://user:password@host/v1". describe() showed the
    # URL whole, and an LM error quoted it without its scheme ("failed to connect to bob:...@127.0.0.1:9")
    settings = {"api_key": SECRET, "api_base": "http://bob:url-password-0815@127.0.0.1:9/v1", "num_retries": 0}
    with Pool(workers=1, lm="openai/gpt-4o-mini", lm_kwargs=settings, journal=False) as pool:
        described = pool.describe()
        with pytest.raises(ToolError) as caught:  # nothing listens on port 9: connection refused
            pool.run(dspy.Predict("question -> answer"), question="hi")
    shown = repr(described) + str(caught.value) + caught.value.remote_traceback + "".join(caught.value.__notes__)
    assert "127.0.0.1:9" in shown and "url-password-0815" not in shown


def test_the_key_of_an_lm_a_dspy_context_sends_with_a_call_is_masked() -> None:
    # dspy.context(lm=...) around a pool call sends that LM with the call (DSPy runs the call on it): its key
    # and URL password must be masked in what comes back, as the pool's own LM's are
    lm = dspy.LM("openai/gpt-4o-mini", api_key=SECRET, api_base="http://bob:url-password-0815@127.0.0.1:9/v1",
                 num_retries=0, cache=False)
    with Pool(workers=1, lm="demo", journal=False) as pool, dspy.context(lm=lm):
        with pytest.raises(ToolError) as caught:  # nothing listens on port 9: the call ran on the context's LM
            pool.run(dspy.Predict("question -> answer"), question="hi")
        described = pool.describe()
    shown = repr(described) + str(caught.value) + caught.value.remote_traceback + "".join(caught.value.__notes__)
    assert "127.0.0.1:9" in shown
    assert SECRET not in shown and "url-password-0815" not in shown


class KeptKey(dspy.BaseLM):
    """A custom LM that keeps its key in an attribute of its own, not in dspy.LM's kwargs."""

    def __init__(self, api_key: str) -> None:
        super().__init__("kept/key")
        self.api_key = api_key

    def forward(self, prompt=None, messages=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
        raise RuntimeError(f"the server refused {self.api_key}")  # as a client's 401 quotes the key it was given


def test_the_key_a_custom_lm_keeps_in_an_attribute_is_masked() -> None:
    # only an LM's kwargs were registered: the key of a dspy.context LM or of a set_lm one came back in clear
    held = "sk-proj-held-key-0815"  # another key each: a key registered once is masked in every later call
    program = dspy.Predict("question -> answer")
    program.set_lm(KeptKey(held))
    with Pool(workers=1, lm="demo", journal=False) as pool:
        for key, lm, run in ((held, None, program), (SECRET, KeptKey(SECRET), dspy.Predict("question -> answer"))):
            with dspy.context(lm=lm) if lm else dspy.context(), pytest.raises(ToolError) as caught:
                pool.run(run, question="hi")
            shown = str(caught.value) + caught.value.remote_traceback + "".join(caught.value.__notes__)
            assert "the server refused ***" in shown and key not in shown


def test_a_batch_whose_lm_changes_as_it_answers_journals_neither_its_key_nor_its_state(tmp_path: Path) -> None:
    # Was: each item of a batch brought back the attributes its LM changed (the kernel only names them, as it does not
    # set a batch's), and the journal kept them with its answer: an LM that counts its calls in its kwargs wrote its
    # api_key to disk with every item, and DSPy's DummyLM given a list its answers still to come, 8 MB for 300 items
    from dspy.utils import DummyLM

    from dspex_nb.errors import LMStateNotKept
    from dspex_nb.journal import Journal

    class Counting(DummyLM):
        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.kwargs["calls"] = self.kwargs.get("calls", 0) + 1
            return super().forward(*args, **kwargs)

    items = [f"q{i}" for i in range(20)]
    listed = DummyLM([{"answer": f"answer {i} {'z' * 50}"} for i in range(len(items))])
    counting = Counting({item: {"answer": "counted"} for item in items})
    counting.kwargs["api_key"] = SECRET
    journal = Journal(tmp_path / "journal.sqlite3")
    with Pool(workers=1, lm="demo", journal=journal) as pool, pytest.warns(LMStateNotKept, match="in a batch"):
        for lm in (listed, counting):
            with dspy.context(lm=lm):
                assert None not in pool.map(dspy.Predict("question -> answer"), items).result(60)
    journal.close()
    kept = b"".join(path.read_bytes() for path in tmp_path.iterdir())
    assert SECRET.encode() not in kept and kept.count(b"z" * 50) == len(items)  # each answer once, as it came
