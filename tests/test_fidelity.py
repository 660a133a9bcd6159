"""A DSPy program gives the same outputs in the kernel and on the pool: same fields, same types, same values.

Each program below is written as in DSPy's documentation and defined the way a notebook user defines it:
in cells of a real IPython shell (``__main__``), then run in the kernel on the demo LM and on the pool
(``run``, ``run_stream``, ``map``). The demo LM's answers depend on the whole prompt, so equal outputs
also mean equal prompts (demos and instructions included).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import io
import logging
import os
import re
import subprocess
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import dspy
import pytest
from dspy.utils import DummyLM
from IPython.core.interactiveshell import InteractiveShell

from dspex_nb import Pool, typed
from dspex_nb.errors import (
    ArgumentError,
    CallbacksNotRun,
    LMStateNotKept,
    StateNotKept,
    ToolError,
    TraceIncomplete,
)
from dspex_nb.typed import NotPortable
from dspex_nb.worker.demo_lm import make_demo_lm

SETUP = '''
import datetime, enum
from typing import Literal, Optional
import dspy
from pydantic import BaseModel
'''

PROGRAMS: dict[str, tuple[str, dict[str, Any]]] = {
    "literal": ('''
class Emotion(dspy.Signature):
    """Classify emotion."""
    sentence: str = dspy.InputField()
    sentiment: Literal["sadness", "joy", "love", "anger", "fear", "surprise"] = dspy.OutputField()

program = dspy.Predict(Emotion)
''', {"sentence": "i started feeling a little vulnerable when the giant spotlight started blinding me"}),
    "enum_and_models": ('''
class Sentiment(enum.Enum):
    POSITIVE = "positive"
    NEGATIVE = "negative"

class Address(BaseModel):
    city: str
    zip_code: int

class Person(BaseModel):
    name: str
    age: int
    address: Address

class ExtractPeople(dspy.Signature):
    """Extract the people mentioned in the text and the overall sentiment."""
    text: str = dspy.InputField()
    people: list[Person] = dspy.OutputField()
    lead: Person = dspy.OutputField()
    sentiment: Sentiment = dspy.OutputField()

program = dspy.Predict(ExtractPeople)
''', {"text": "Ada, 36, from London, met Alan."}),
    "datetime_optional_collections": ('''
class Schedule(dspy.Signature):
    """Plan a meeting."""
    request: str = dspy.InputField()
    when: datetime.datetime = dspy.OutputField()
    day: datetime.date = dspy.OutputField()
    room: Optional[int] = dspy.OutputField()
    tags: set[str] = dspy.OutputField()
    seats: dict[int, str] = dspy.OutputField()
    slot: tuple[int, str] = dspy.OutputField()
    confirmed: bool = dspy.OutputField()
    cost: float = dspy.OutputField()

program = dspy.ChainOfThought(Schedule)
''', {"request": "A sync with the data team next week"}),
    "typed_inputs": ('''
class Item(BaseModel):
    name: str
    price: float

class Total(dspy.Signature):
    """Add up the order."""
    items: list[Item] = dspy.InputField()
    scores: dict[str, int] = dspy.InputField()
    total: float = dspy.OutputField()

program = dspy.Predict(Total)
inputs = {"items": [Item(name="tea", price=2.5), Item(name="cake", price=4.0)], "scores": {"a": 1}}
''', {}),
    "string_signature_with_commas": ('''
program = dspy.Predict("scores: dict[str, int], question -> answer: float")
''', {"scores": {"alice": 3, "bob": 5}, "question": "What is the mean score?"}),
    "rag_with_earlier_cell_names": ('''
CORPUS = ["Bees find flowers by scent and colour.", "Cats purr when content.", "Yeast makes bread rise."]

def search(query: str, k: int = 2) -> list[str]:
    words = set(query.lower().split())
    return sorted(CORPUS, key=lambda p: -len(words & set(p.lower().split())))[:k]

class RAG(dspy.Module):
    def __init__(self):
        super().__init__()
        self.respond = dspy.ChainOfThought("context: list[str], question -> response")

    def forward(self, question):
        return self.respond(context=search(question), question=question)

program = RAG()
''', {"question": "How do bees find flowers?"}),
    "multi_hop": ('''
class Hop(dspy.Module):
    def __init__(self, num_hops=2):
        super().__init__()
        self.num_hops = num_hops
        self.generate_query = dspy.ChainOfThought("claim, notes: list[str] -> query")
        self.append_notes = dspy.ChainOfThought("claim, notes: list[str], context -> new_notes: list[str]")

    def forward(self, claim: str) -> dspy.Prediction:
        notes = []
        for _ in range(self.num_hops):
            query = self.generate_query(claim=claim, notes=notes).query
            notes.extend(self.append_notes(claim=claim, notes=notes, context=query).new_notes)
        return dspy.Prediction(notes=notes)

program = Hop()
''', {"claim": "The Eiffel Tower is taller than the Statue of Liberty."}),
    "react_with_tools": ('''
def evaluate_math(expression: str = "1") -> float:
    """Evaluate a math expression."""
    return float(len(expression))

def search_wikipedia(query: str = "") -> list[str]:
    """Search Wikipedia."""
    return [f"An article about {query}"]

program = dspy.ReAct("question -> answer: float", tools=[evaluate_math, search_wikipedia], max_iters=3)
''', {"question": "What is 9362158 divided by the year of birth of David Gregory of Kinnairdy castle?"}),
    "refine_with_reward": ('''
def one_word_answer(args, pred):
    return 1.0 if len(pred.answer.split()) == 1 else 0.0

program = dspy.Refine(module=dspy.ChainOfThought("question -> answer"), N=2, reward_fn=one_word_answer,
                      threshold=1.0)
''', {"question": "What is the capital of Belgium?"}),
    "best_of_n": ('''
def short(args, pred):
    return 1.0 / len(pred.answer)

program = dspy.BestOfN(module=dspy.Predict("question -> answer"), N=2, reward_fn=short, threshold=1.0)
''', {"question": "Name a colour."}),
    "refine_wrapping_a_module": ('''
class Verify(dspy.Module):  # its input is claim, not its first predictor's (claim, notes)
    def __init__(self):
        super().__init__()
        self.generate_query = dspy.ChainOfThought("claim, notes: list[str] -> query")
        self.verdict = dspy.Predict("claim, context -> verdict: bool")

    def forward(self, claim):
        query = self.generate_query(claim=claim, notes=[]).query
        return self.verdict(claim=claim, context=query)

def any_verdict(args, pred):
    return 1.0

program = dspy.Refine(module=Verify(), N=2, reward_fn=any_verdict, threshold=1.0)
''', {"claim": "The sky is green."}),
    "best_of_n_wrapping_a_module": ('''
class Shorten(dspy.Module):
    def __init__(self):
        super().__init__()
        self.shorten = dspy.Predict("text, style -> short")

    def forward(self, text):
        return self.shorten(text=text, style="terse")

program = dspy.BestOfN(module=Shorten(), N=2, reward_fn=lambda args, pred: 1.0, threshold=1.0)
''', {"text": "A long sentence about nothing in particular."}),
    "predict_with_an_input_missing": ('''
program = dspy.Predict("question, context -> answer")  # DSPy warns of the missing context and answers
''', {"question": "Why?"}),
    "parallel_returns_a_list": ('''
class Fan(dspy.Module):
    def __init__(self):
        super().__init__()
        self.qa = dspy.Predict("question -> answer")

    def forward(self, questions: list[str]):
        return dspy.Parallel(num_threads=2)([(self.qa, {"question": q}) for q in questions])

program = Fan()
''', {"questions": ["Why is the sky blue?", "What is rain?"]}),
    "parallel_made_in_init": ('''
class FanOut(dspy.Module):
    def __init__(self):
        super().__init__()
        self.qa = dspy.Predict("question -> answer")
        self.parallel = dspy.Parallel(num_threads=2)  # holds a lock: it travels as a new one

    def forward(self, questions: list[str]):
        return self.parallel([(self.qa, {"question": q}) for q in questions])

program = FanOut()
''', {"questions": ["Why is the sky blue?", "What is rain?"]}),
    "module_batch_inside": ('''
class Summaries(dspy.Module):
    def __init__(self):
        super().__init__()
        self.summarize = dspy.Predict("document -> summary")

    def forward(self, documents: list[str]):
        examples = [dspy.Example(document=d).with_inputs("document") for d in documents]
        results = self.summarize.batch(examples, num_threads=2)
        return dspy.Prediction(summaries=[r.summary for r in results])

program = Summaries()
''', {"documents": ["One long text.", "Another long text."]}),
    "call_only_module": ('''
class Shout(dspy.Module):
    def __call__(self, text):
        return dspy.Prediction(loud=text.upper(), length=len(text))

program = Shout()
''', {"text": "quiet please"}),
    "forward_with_kwargs": ('''
class Answer(dspy.Module):
    def __init__(self):
        super().__init__()
        self.qa = dspy.Predict("question -> answer")

    def forward(self, question, **kwargs):
        return self.qa(question=question, **kwargs)

program = Answer()
''', {"question": "What is DSPy?"}),
    "pydantic_round_trip": ('''
from pydantic import ConfigDict, Field, HttpUrl

class Profile(BaseModel):
    model_config = ConfigDict(extra="allow")
    user_name: str = Field(alias="userName")
    homepage: HttpUrl

def program(name: str):
    return dspy.Prediction(profile=Profile(userName=name, homepage="https://example.org/x", team="core"),
                           wait=datetime.timedelta(days=100_000, microseconds=1))
''', {"name": "ada"}),
    "dataclass_with_derived_fields": ('''
import asyncio
import dataclasses
import logging
import os
import subprocess
import sys

@dataclasses.dataclass
class Tally:
    items: list[str]
    count: int = dataclasses.field(init=False, default=0)

    def __post_init__(self):
        self.items = [*self.items, "seen"]
        self.count = len(self.items)

def program(text: str):
    return Tally(items=text.split())
''', {"text": "a b"}),
    "several_completions": ('''
program = dspy.Predict("question -> answer", n=3)
''', {"question": "Pick a colour"}),
    "function_returning_a_dataclass": ('''
import asyncio
import dataclasses
import logging
import os
import subprocess
import sys

@dataclasses.dataclass
class Stats:
    words: int
    first: str

def program(text: str) -> Stats:
    return Stats(words=len(text.split()), first=text.split()[0])
''', {"text": "programming not prompting"}),
    "dataclass_as_a_signatures_field_types": ('''
import dataclasses

@dataclasses.dataclass
class Point:
    x: int
    y: float = 0.0
    tags: list[str] = dataclasses.field(default_factory=list)

class Locate(dspy.Signature):
    """Locate the place."""
    place: str = dspy.InputField()
    near: Point = dspy.InputField()
    point: Point = dspy.OutputField()

program = dspy.ChainOfThought(Locate)
inputs = {"place": "the harbour", "near": Point(1, 2.5)}
''', {}),
    "pydantic_state_as_it_was": ('''
from pydantic import Field, PrivateAttr, field_serializer, field_validator

class Tag(BaseModel):
    name: str
    secret: str = Field(default="default", exclude=True)
    _hits: int = PrivateAttr(default=0)

    @field_validator("name")
    @classmethod
    def bang(cls, v):
        return v + "!"  # runs once, when the program makes the model

class Event(BaseModel):
    when: datetime.datetime

    @field_serializer("when")
    def as_day(self, v):
        return v.strftime("%d/%m/%Y")  # a dump that does not validate back

def program(name: str):
    tag = Tag(name=name, secret="s3cret")
    tag._hits = 7
    return dspy.Prediction(tag=tag, event=Event(when=datetime.datetime(2024, 5, 17, 9, 30)))
''', {"name": "hi"}),
    "dspy_multimodal_types_in_and_out": ('''
class Describe(dspy.Signature):
    """Describe the image."""
    image: dspy.Image = dspy.InputField()
    caption: str = dspy.OutputField()

describe = dspy.Predict(Describe)

def program(image: dspy.Image, audio: dspy.Audio, file: dspy.File):
    return dspy.Prediction(caption=describe(image=image).caption, image=image, audio=audio, file=file)

inputs = {"image": dspy.Image("https://example.org/cat.png"), "audio": dspy.Audio(data="AAAA", audio_format="wav"),
          "file": dspy.File(file_data="aGVsbG8=", filename="a.txt")}
''', {}),
    "prediction_subclass": ('''
class Scored(dspy.Prediction):
    def best(self):
        return max(self.scores)

def program(text: str):
    scored = Scored(scores=[1, 3, 2], text=text)
    scored._seen = True  # an attribute of its own, besides the fields
    return scored
''', {"text": "x"}),
    "prediction_with_our_tag_as_a_field": ('''
def program(x):
    return dspy.Prediction(value=x, __dspex__="output", __dspex_usage__={})
''', {"x": 1}),
    "input_of_a_class_the_program_does_not_name": ('''
class Doc(BaseModel):
    title: str
    body: str

program = dspy.Predict("doc -> summary")  # DSPy formats any input: the worker needs Doc to rebuild it
inputs = {"doc": Doc(title="DSPy", body="Programming, not prompting.")}
''', {}),
    "tools_as_an_input": ('''
def get_weather(city: str) -> str:
    """Get the weather for a city."""
    return f"The weather in {city} is sunny"

class ToolSignature(dspy.Signature):
    """Call tools."""
    question: str = dspy.InputField()
    tools: list[dspy.Tool] = dspy.InputField()
    outputs: dspy.ToolCalls = dspy.OutputField()

program = dspy.Predict(ToolSignature)
inputs = {"question": "Weather in Paris?", "tools": [dspy.Tool(get_weather)]}  # a function: it travels by value
''', {}),
    "codeact_with_notebook_tools": ('''
from dspy.primitives import LocalInterpreter

def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b

# CodeAct sends each tool's source (inspect.getsource) to its interpreter in forward: on the worker too
program = dspy.CodeAct("question -> answer", tools=[add], max_iters=2, interpreter_factory=LocalInterpreter)
''', {"question": "What is 1 + 2?"}),
    "rag_with_dspy_retrievers_embeddings": ('''
import numpy as np

def embed(texts: list[str]) -> np.ndarray:  # dspy.Embedder takes a function of your own
    return np.array([[len(t), sum(map(ord, t)) % 97, t.count("e")] for t in texts], dtype=np.float32)

corpus = ["Bees find flowers by scent.", "Cats purr.", "Yeast makes bread rise.", "Rain is water."]
search = dspy.retrievers.Embeddings(embedder=dspy.Embedder(embed), corpus=corpus, k=2)  # as DSPy's RAG tutorial

class RAG(dspy.Module):
    def __init__(self):
        super().__init__()
        self.respond = dspy.ChainOfThought("context, question -> response")

    def forward(self, question):
        return self.respond(context=search(question).passages, question=question)

program = RAG()
''', {"question": "How do bees find flowers?"}),
    "numpy_values": ('''
import numpy as np

def program(query: np.ndarray, documents: np.ndarray):  # a similarity computed with numpy, its values as numpy's
    scores = documents @ query / (np.linalg.norm(documents, axis=1) * np.linalg.norm(query))
    return dspy.Prediction(scores=scores, best=np.argmax(scores), top=scores.max(), mean=np.float32(scores.mean()),
                           ok=scores.max() > 0.5, shape=scores.shape, names=np.array(["a", "bc", "d"]))

inputs = {"query": np.array([0.1, 0.2, 0.7]), "documents": np.arange(9.0).reshape(3, 3) / 7}
''', {}),
    "function_reading_a_helpers_source": ('''
import inspect

def helper(x: int) -> int:
    """Double x."""
    return 2 * x

def program(name: str):
    return dspy.Prediction(source=inspect.getsource(helper), file=helper.__code__.co_filename)
''', {"name": "helper"}),
    "types_nested_in_a_class": ('''
import pydantic

class MyContainer:  # as DSPy's signatures page: a signature string names classes nested in a class
    class Query(pydantic.BaseModel):
        text: str
    class Score(pydantic.BaseModel):
        score: float

program = dspy.Predict(dspy.Signature("query: MyContainer.Query -> score: MyContainer.Score"))
inputs = {"query": MyContainer.Query(text="hi")}
''', {}),
    "types_made_in_a_function": ('''
def make_classifier():
    class Label(BaseModel):
        label: str
        weight: int

    class Classify(dspy.Signature):
        """Label the text."""
        text: str = dspy.InputField()
        label: Label = dspy.OutputField()

    return dspy.Predict(Classify), Label

program, Label = make_classifier()
inputs = {"text": "hello"}
''', {}),
    "tool_calls_executed_by_name": ('''
def weather(city: str) -> str:
    """Get weather information for a city."""
    return f"The weather in {city} is sunny"

tools = {"weather": dspy.Tool(weather)}

def program(city: str):  # as DSPy's tools page: call.execute() finds the tool in its caller's globals by name
    calls = dspy.ToolCalls.from_dict_list([{"name": name, "args": {"city": city}} for name in tools])
    return [call.execute() for call in calls.tool_calls]
''', {"city": "Paris"}),
    "history_as_an_input": ('''
class QA(dspy.Signature):  # as DSPy's conversation history tutorial
    question: str = dspy.InputField()
    history: dspy.History = dspy.InputField()
    answer: str = dspy.OutputField()

program = dspy.Predict(QA)
inputs = {"question": "And of Italy?", "history": dspy.History(messages=[
    {"question": "What is the capital of France?", "answer": "Paris"},
    {"question": "What is the capital of Germany?", "answer": "Berlin"}])}
''', {}),
    "code_and_reasoning_types": ('''
class Refactor(dspy.Signature):
    """Rewrite the code."""
    code: dspy.Code["python"] = dspy.InputField()
    reasoning: dspy.Reasoning = dspy.OutputField()
    better: dspy.Code["python"] = dspy.OutputField()

program = dspy.Predict(Refactor)
inputs = {"code": dspy.Code(code="def f(x):\\n    return x + 1", language="python")}
''', {}),
    "multi_chain_comparison": ('''
program = dspy.MultiChainComparison("question -> answer", M=2)
inputs = {"completions": [dspy.Prediction(reasoning="It scatters blue.", answer="blue"),
                          dspy.Prediction(reasoning="Clouds.", answer="grey")], "question": "What colour is the sky?"}
''', {}),
    "knn_few_shot_compiled": ('''
import numpy as np

def embed(texts: list[str]) -> np.ndarray:
    return np.array([[len(t), sum(map(ord, t)) % 97, t.count("e")] for t in texts], dtype=np.float32)

trainset = [dspy.Example(question=q, answer=a).with_inputs("question") for q, a in
            [("What is 1+1?", "2"), ("Capital of France?", "Paris"), ("Colour of the sky?", "blue")]]
# KNNFewShot's compiled program runs a forward bound to the instance, with the optimizer in its closure
program = dspy.KNNFewShot(k=2, trainset=trainset, vectorizer=dspy.Embedder(embed)).compile(
    dspy.ChainOfThought("question -> answer"))
''', {"question": "Capital of Spain?"}),
    "named_tuples_in_and_out": ('''
import collections
import typing

class Item(BaseModel):
    name: str
    qty: int

class Pick(typing.NamedTuple):  # pydantic parses a NamedTuple field: it came back as NotPortable
    label: str
    item: Item

Point = collections.namedtuple("Point", "x y")

class Choose(dspy.Signature):
    """Pick one item."""
    where: Point = dspy.InputField()
    pick: Pick = dspy.OutputField()
    picks: list[Pick] = dspy.OutputField()

choose = dspy.Predict(Choose)

def program(where):
    pred = choose(where=where)
    return dspy.Prediction(pick=pred.pick, picks=pred.picks, where=where, row=Point(*where))

inputs = {"where": Point(1, 2)}
''', {}),
    "parallel_returning_failed_examples": ('''
class Flaky(dspy.Module):  # dspy.Parallel's docs: return_failed_examples gives results, failed examples, exceptions
    def __init__(self):
        super().__init__()
        self.qa = dspy.Predict("question -> answer")

    def forward(self, question):
        if "fail" in question:
            raise ValueError("cannot answer " + question)
        return self.qa(question=question)

flaky = Flaky()

def program(questions: list[str]):
    parallel = dspy.Parallel(num_threads=2, max_errors=5, return_failed_examples=True, disable_progress_bar=True)
    results, failed, exceptions = parallel([(flaky, {"question": q}) for q in questions])
    return dspy.Prediction(results=results, failed=failed, errors=[str(e) for e in exceptions])
''', {"questions": ["Why?", "please fail", "How?"]}),
    "ensemble_with_majority": ('''
from dspy.teleprompt import Ensemble

program = Ensemble(reduce_fn=dspy.majority).compile(
    [dspy.Predict("question -> answer"), dspy.ChainOfThought("question -> answer")])
''', {"question": "What is 2+2?"}),
    "random_search_compiled": ('''
from dspex_nb import demo_lm

trainset = [dspy.Example(question=q, answer=a).with_inputs("question") for q, a in
            [("What is 1+1?", "2"), ("Capital of France?", "Paris"), ("Colour of the sky?", "blue"), ("2+3?", "5")]]
optimizer = dspy.BootstrapFewShotWithRandomSearch(metric=lambda example, pred, trace=None: len(pred.answer) > 0,
                                                  max_bootstrapped_demos=2, max_labeled_demos=2,
                                                  num_candidate_programs=2, num_threads=1)
with dspy.context(lm=demo_lm()):
    program = optimizer.compile(dspy.ChainOfThought("question -> answer"), trainset=trainset)
''', {"question": "Capital of Spain?"}),
    "custom_dspy_type": ('''
from typing import Any

class Bullet(dspy.Type):  # DSPy's custom types: format() is how the value is put in the prompt
    text: str
    level: int = 0

    def format(self) -> list[dict[str, Any]]:
        return [{"type": "text", "text": "  " * self.level + "* " + self.text}]

class Outline(dspy.Signature):
    """Expand the outline."""
    bullets: list[Bullet] = dspy.InputField()
    summary: str = dspy.OutputField()
    top: Bullet = dspy.OutputField()

program = dspy.Predict(Outline)
inputs = {"bullets": [Bullet(text="intro"), Bullet(text="detail", level=1)]}
''', {}),
    "multi_turn_history": ('''
class QA(dspy.Signature):  # the conversation history tutorial's loop: each answer joins the history
    question: str = dspy.InputField()
    history: dspy.History = dspy.InputField()
    answer: str = dspy.OutputField()

predict = dspy.Predict(QA)

def program(questions: list[str]):
    history = dspy.History(messages=[])
    for question in questions:
        outputs = predict(question=question, history=history)
        history.messages.append({"question": question, **outputs})
    return history
''', {"questions": ["Capital of France?", "And Italy?", "And Spain?"]}),
    "signature_edited_with_its_methods": ('''
class QA(dspy.Signature):  # DSPy's signatures API: each method returns a new signature class
    """Answer questions with short factoid answers."""
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()

edited = (QA.with_updated_fields("answer", desc="often between 1 and 5 words", type_=int)
          .append("confidence", dspy.OutputField(), type_=float)
          .prepend("context", dspy.InputField(), type_=list[str])
          .with_instructions("Answer precisely."))
program = dspy.Predict(edited.delete("context").insert(1, "style", dspy.InputField(), type_=str))
''', {"question": "How many legs?", "style": "terse"}),
    "make_signature_from_a_dict": ('''
program = dspy.ChainOfThought(dspy.make_signature(
    {"question": (str, dspy.InputField()), "answer": (int, dspy.OutputField(desc="a number"))},
    "Answer the question with a number.", signature_name="Numeric"))
''', {"question": "How many legs does a cat have?"}),
    "gepa_compiled_in_the_kernel": ('''
from dspex_nb import demo_lm

trainset = [dspy.Example(question=q, answer=a).with_inputs("question") for q, a in
            [("What is 1+1?", "2"), ("Capital of France?", "Paris"), ("Colour of the sky?", "blue")]]

def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):  # GEPA's metric, with feedback
    return dspy.Prediction(score=float(len(pred.answer) % 2), feedback="Be shorter.")

with dspy.context(lm=demo_lm()):
    program = dspy.GEPA(metric=metric, max_metric_calls=8, reflection_lm=demo_lm(), num_threads=1).compile(
        dspy.ChainOfThought("question -> answer"), trainset=trainset, valset=trainset[:2])
''', {"question": "Capital of Spain?"}),
    "saved_and_loaded_whole_program": ('''
import tempfile

class Rewrite(dspy.Module):
    def __init__(self):
        super().__init__()
        self.rewrite = dspy.Predict("question -> query")
        self.respond = dspy.ChainOfThought("question, query -> answer: Literal['yes', 'no']")

    def forward(self, question):
        return self.respond(question=question, query=self.rewrite(question=question).query)

compiled = dspy.LabeledFewShot(k=1).compile(
    Rewrite(), trainset=[dspy.Example(question="Is it?", query="it", answer="yes").with_inputs("question")])
folder = tempfile.mkdtemp()
compiled.save(folder, save_program=True)
program = dspy.load(folder, allow_pickle=True)
''', {"question": "Is the sky blue?"}),
    "tool_as_the_program": ('''
def my_function(param1: str, param2: int = 5) -> str:  # DSPy's tools page: a Tool's parameters are in its args too
    """A sample function with parameters."""
    return f"Processed {param1} with value {param2}"

program = dspy.Tool(my_function)
''', {"param1": "x"}),
    "completions_of_a_prediction": ('''
qa = dspy.ChainOfThought("question -> answer", n=3)

def program(question):  # DSPy's modules page: response.completions.answer
    return qa(question=question).completions
''', {"question": "Pick a colour"}),
    "root_models_in_and_out": ('''
from pydantic import RootModel

class Tags(RootModel[list[str]]):  # its pickled state has no extra or private values: it failed with a KeyError
    pass

class Retag(dspy.Signature):
    """Tag the text again."""
    text: str = dspy.InputField()
    old: Tags = dspy.InputField()
    tags: Tags = dspy.OutputField()

program = dspy.Predict(Retag)
inputs = {"text": "bees and flowers", "old": Tags(["nature"])}
''', {}),
}


@pytest.fixture(scope="module")
def shell() -> Iterator[InteractiveShell]:
    ip = InteractiveShell.instance()
    ip.run_cell(SETUP)
    yield ip


@pytest.fixture(scope="module")
def demo_lm() -> dspy.LM:
    return make_demo_lm()[0]


def define(shell: InteractiveShell, source: str) -> tuple[Any, dict[str, Any]]:
    result = shell.run_cell(source)
    result.raise_error()
    ns = shell.user_ns
    return ns["program"], ns.pop("inputs", None)


def assert_same(kernel: Any, pool: Any, where: str = "output") -> None:
    """Equal values of the same types, all the way down (a Prediction's completions too)."""
    assert type(pool) is type(kernel), f"{where}: {type(pool)} on the pool, {type(kernel)} in the kernel"
    if isinstance(kernel, dspy.Prediction):  # one completion (n=1) too, or none for a Prediction made by hand
        assert (pool.completions is None) == (kernel.completions is None), f"{where}: completions {pool.completions}"
        if kernel.completions is not None:
            assert_same(dict(kernel.completions.items()), dict(pool.completions.items()), f"{where}.completions")
    if isinstance(kernel, dspy.Completions):
        assert_same(dict(kernel.items()), dict(pool.items()), where)
    elif isinstance(kernel, dspy.Example):
        assert_same(dict(kernel.items()), dict(pool.items()), where)
        assert_same({k: v for k, v in vars(kernel).items() if k not in ("_store", "_completions", "_lm_usage")},
                    {k: v for k, v in vars(pool).items() if k not in ("_store", "_completions", "_lm_usage")},
                    f"{where} attributes")
    elif isinstance(kernel, dict):
        assert list(pool) == list(kernel), f"{where}: keys {list(pool)} != {list(kernel)}"
        for key in kernel:
            assert_same(kernel[key], pool[key], f"{where}[{key!r}]")
    elif isinstance(kernel, (list, tuple)):
        assert len(pool) == len(kernel), f"{where}: {len(pool)} items != {len(kernel)}"
        for i, (a, b) in enumerate(zip(kernel, pool, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    elif hasattr(type(kernel), "model_fields"):  # its fields (dspy.Reasoning iterates as the str it stands for)
        assert_same({name: getattr(kernel, name) for name in type(kernel).model_fields},
                    {name: getattr(pool, name) for name in type(pool).model_fields}, where)
        assert pool.model_extra == kernel.model_extra, f"{where}: extra fields {pool.model_extra}"
        assert pool.__pydantic_private__ == kernel.__pydantic_private__, f"{where}: {pool.__pydantic_private__}"
        assert pool.model_fields_set == kernel.model_fields_set, f"{where}: fields set {pool.model_fields_set}"
    elif type(kernel).__module__ == "numpy" and hasattr(kernel, "tobytes"):  # an array or scalar: bit for bit
        assert (pool.dtype, pool.shape, pool.tobytes()) == (kernel.dtype, kernel.shape, kernel.tobytes()), where
    elif dataclasses.is_dataclass(kernel):
        assert_same(dataclasses.asdict(kernel), dataclasses.asdict(pool), where)
    else:
        assert pool == kernel, f"{where}: {pool!r} on the pool, {kernel!r} in the kernel"


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_program_gives_the_same_outputs_on_the_pool(name: str, shell: InteractiveShell, pool: Pool,
                                                    demo_lm: dspy.LM) -> None:
    source, inputs = PROGRAMS[name]
    program, cell_inputs = define(shell, source)
    inputs = cell_inputs or inputs
    with dspy.context(lm=demo_lm):
        expected = program(**inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_same(expected, pool.run(program, **inputs), "run")
        assert_same(expected, pool.run_stream(program, **inputs).result(60), "run_stream")
        assert_same([expected, expected], pool.map(program, [inputs, inputs], journal=False).result(60), "map")
    # none of them changes its own state: a StateNotKept would be a false alarm
    assert [str(w.message) for w in caught if w.category is StateNotKept] == []


def test_a_program_that_changes_its_own_state_says_the_change_stays_on_the_worker(shell: InteractiveShell,
                                                                                pool: Pool, demo_lm: dspy.LM) -> None:
    # as DSPy's customer service agent tutorial: its tools add to the notebook's dicts (and a module may keep a
    # memory); each worker kept its own changed copy, so a call's answer depended on the calls that worker had run
    program, _ = define(shell, '''
tickets = {}

def file_ticket(request: str) -> str:
    tickets[f"T{len(tickets)}"] = request
    return f"T{len(tickets) - 1}"

class Desk(dspy.Module):
    def __init__(self):
        super().__init__()
        self.reply = dspy.Predict("request, ticket -> reply")
        self.seen = []

    def forward(self, request):
        self.seen.append(request)
        return self.reply(request=request, ticket=file_ticket(request))

program = Desk()
''')
    inputs = {"request": "My bag is lost."}
    with dspy.context(lm=demo_lm):
        expected = program(**inputs)
    shell.run_cell("tickets.clear(); program.seen.clear()").raise_error()
    calls = [lambda: pool.run(program, **inputs)] * 3 + [
        lambda: pool.run_stream(program, **inputs).result(60),
        lambda: pool.map(program, [inputs], journal=False).result(60)[0]]
    with pytest.warns(StateNotKept, match="Desk changed its own state as it ran on the pool"):
        assert_same(expected, calls[0]())
    for call in calls[1:]:  # more calls than workers, the same change each: each starts from the kernel's state, on
        with warnings.catch_warnings(record=True) as caught:  # whichever worker; the warning was said once
            warnings.simplefilter("always")
            assert_same(expected, call())
        assert not [w for w in caught if w.category is StateNotKept]
    assert shell.user_ns["tickets"] == {} and program.seen == []
    assert_same(expected, pool.run(dspy.Predict("request, ticket -> reply"), request=inputs["request"], ticket="T0"))


def test_a_program_that_makes_a_lock_and_a_cache_on_its_first_call_answers_as_in_the_kernel_warned_once(
        shell: InteractiveShell, pool: Pool, demo_lm: dspy.LM) -> None:
    # Was: a program that made a lock or a functools.cached_property on its first call changed its state at every
    # call on the pool (from the kernel's, which has neither): a StateNotKept warning at every call
    program, _ = define(shell, '''
import functools, threading

class Lazy(dspy.Module):
    def __init__(self):
        super().__init__()
        self.qa = dspy.Predict("question, style -> answer")

    @functools.cached_property
    def style(self):
        print("making the style")
        return "short"

    def forward(self, question):
        if not hasattr(self, "_lock"):
            self._lock = threading.Lock()
        with self._lock:
            return self.qa(question=question, style=self.style)

program = Lazy()
''')
    questions = [f"Why {n}?" for n in range(3 * pool.size)]
    with dspy.context(lm=demo_lm):
        expected = [program(question=q) for q in questions]
    lazy = shell.user_ns["Lazy"]()  # as the kernel's was before its calls made them
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        answers = [pool.run(lazy, question=q) for q in questions]
    assert_same(expected, answers)
    assert [str(w.message).split(" changed")[0] for w in caught if w.category is StateNotKept] == ["Lazy"]


def test_a_counter_a_program_makes_on_its_first_call_starts_from_the_kernels_state_at_every_call(
        shell: InteractiveShell, pool: Pool) -> None:
    # Was (this session, for a while): a copy whose first two calls made the same attributes was kept, so a counter
    # made on the first call counted on from the third: [1, 1, 2, 1, ...] where each call starts from the kernel's
    define(shell, '''
class Counts(dspy.Module):
    def forward(self, question):
        self.calls = getattr(self, "calls", 0) + 1
        return dspy.Prediction(calls=self.calls)

program = Counts()
''')
    program = shell.user_ns["Counts"]()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        counts = [pool.run(program, question=f"q{n}").calls for n in range(4 * pool.size)]
    assert counts == [1] * len(counts) and not hasattr(program, "calls")


def test_a_memory_a_program_makes_on_its_first_call_is_undone_as_any_change(shell: InteractiveShell, pool: Pool,
                                                                           demo_lm: dspy.LM) -> None:
    # what a first call makes is kept only where the next call, on other inputs, makes the same: a memory made on
    # the first call and added to holds each call's question, so every call starts from the kernel's state
    define(shell, '''
class Remembers(dspy.Module):
    def __init__(self):
        super().__init__()
        self.reply = dspy.Predict("question, earlier: int -> answer")

    def forward(self, question):
        if not hasattr(self, "memory"):
            self.memory = []
        self.memory.append(question)
        return self.reply(question=question, earlier=len(self.memory) - 1)

program = Remembers()
''')
    questions = ["Why?", "Why?", "How?", "Why?", "When?", "How?"] * pool.size
    with dspy.context(lm=demo_lm):
        expected = [shell.user_ns["Remembers"]()(question=q) for q in questions]  # each from the kernel's state
    program = shell.user_ns["Remembers"]()
    with pytest.warns(StateNotKept, match="Remembers changed its own state"):
        assert_same(expected, [pool.run(program, question=q) for q in questions])
    assert not hasattr(program, "memory")


def test_a_batch_of_a_program_holding_a_large_array_is_not_taken_for_one_that_changed_it(
        shell: InteractiveShell, pool: Pool, demo_lm: dspy.LM) -> None:
    # Was: a shard's copy of the program, loaded again, has arrays of its own, which the state check compares by
    # identity (past 1 MB): it was compared with the program's, so every batch of a RAG program said StateNotKept
    program, _ = define(shell, '''
import numpy as np

class Indexed(dspy.Module):
    def __init__(self):
        super().__init__()
        self.index = np.zeros(300_000)  # 2.4 MB
        self.qa = dspy.Predict("question -> answer")

    def forward(self, question, replace=False):
        if replace:
            self.index = np.ones(300_000)
        return self.qa(question=question)

program = Indexed()
''')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(pool.map(program, [f"q{n}" for n in range(4)], journal=False).result(60)) == 4
    assert not [w for w in caught if w.category is StateNotKept]
    with pytest.warns(StateNotKept, match="Indexed changed its own state"):
        pool.map(program, [{"question": "q", "replace": True}], journal=False).result(60)


def test_a_tools_traceback_in_react_shows_the_notebooks_cell(shell: InteractiveShell, pool: Pool,
                                                             demo_lm: dspy.LM) -> None:
    # ReAct puts a failed tool's traceback in its trajectory, so the LM's next prompt holds it: the tool's frame
    # names the cell and its line, as in the kernel, and DSPy's own frames are the kernel's too (a streamed call
    # runs without the status callback streamify adds, which takes DSPy's callback wrapper's other branch)
    program, _ = define(shell, '''
def lookup(query: str = "x") -> str:
    """Look something up."""
    raise ValueError("no such page: " + query)

program = dspy.ReAct("question -> answer", tools=[lookup], max_iters=2)
''')
    inputs = {"question": "What is on the page?"}
    with dspy.context(lm=demo_lm):
        expected = program(**inputs)
    assert 'raise ValueError("no such page: " + query)' in expected.trajectory["observation_0"]
    assert_same(expected, pool.run(program, **inputs), "run")
    assert_same(expected, pool.run_stream(program, **inputs).result(60), "run_stream")
    assert_same([expected], pool.map(program, [inputs], journal=False).result(60), "map")


def test_a_compiled_program_travels_with_its_demos(shell: InteractiveShell, pool: Pool, demo_lm: dspy.LM) -> None:
    program, _ = define(shell, '''
trainset = [dspy.Example(question=q, answer=a).with_inputs("question")
            for q, a in [("What is 2+2?", "4"), ("Capital of France?", "Paris"), ("Colour of the sky?", "blue")]]
program = dspy.LabeledFewShot(k=2).compile(dspy.ChainOfThought("question -> answer"), trainset=trainset)
''')
    question = {"question": "Capital of Italy?"}
    with dspy.context(lm=demo_lm):
        expected = program(**question)
        plain = dspy.ChainOfThought("question -> answer")(**question)
    assert expected.answer != plain.answer  # the demos are in the prompt, and the demo LM's answer shows it
    assert_same(expected, pool.run(program, **question))


def test_completions_keep_the_signature_they_were_made_under(shell: InteractiveShell, pool: Pool,
                                                             demo_lm: dspy.LM) -> None:
    # was: a returned dspy.Completions (a Prediction's .completions) came back with signature None
    define(shell, '''
class Pick(dspy.Signature):
    """Pick one."""
    question: str = dspy.InputField()
    choice: str = dspy.OutputField()
    why: str = dspy.OutputField()

cot = dspy.ChainOfThought("question -> answer", n=3)
pick = dspy.Predict(Pick, n=3)

def program(question):  # DSPy's modules page: response.completions
    return cot(question=question).completions
''')
    ns, question = shell.user_ns, {"question": "Pick a colour"}
    for program, signature in ((ns["cot"], ns["cot"].predict.signature), (ns["pick"], ns["Pick"]),
                               (ns["program"], ns["cot"].predict.signature)):
        with dspy.context(lm=demo_lm):
            expected = program(**question)
        for got in (pool.run(program, **question), pool.run_stream(program, **question).result(60),
                    *pool.map(program, [question], journal=False).result(60)):
            completions = got if isinstance(got, dspy.Completions) else got.completions
            assert completions.signature is signature
            kernel = expected if isinstance(expected, dspy.Completions) else expected.completions
            assert dict(dspy.majority(completions)) == dict(dspy.majority(kernel))


def test_programs_that_differ_only_in_types_or_attributes_stay_apart(shell: InteractiveShell, pool: Pool,
                                                                    demo_lm: dspy.LM) -> None:
    as_int, _ = define(shell, 'program = dspy.Predict("question -> answer: int")')
    as_float, _ = define(shell, 'program = dspy.Predict("question -> answer: float")')
    with dspy.context(lm=demo_lm):
        expected = [as_int(question="q"), as_float(question="q")]
    assert_same(expected, [pool.run(as_int, question="q"), pool.run(as_float, question="q")])
    assert_same(expected, [pool.map(p, ["q"]).result(60)[0] for p in (as_int, as_float)])  # journal keys differ too


def test_a_streamified_program_returns_its_final_prediction(shell: InteractiveShell, pool: Pool,
                                                           demo_lm: dspy.LM) -> None:
    program, _ = define(shell, '''
program = dspy.streamify(dspy.Predict("question -> answer"), async_streaming=False)
''')
    with dspy.context(lm=demo_lm):
        expected = list(program(question="What is DSPy?"))[-1]
    assert_same(expected, pool.run(program, question="What is DSPy?"))


def test_a_streamified_program_streams_its_listeners_fields(shell: InteractiveShell, pool: Pool,
                                                           demo_lm: dspy.LM) -> None:
    # streamify keys its listeners by their predictors' ids, which differ on the workers
    define(shell, '''
from dspy.streaming import StreamListener

cot = dspy.ChainOfThought("question -> answer")

def streaming():  # a listener streams once (allow_reuse=False): one program for the kernel, one for the pool
    return dspy.streamify(cot, stream_listeners=[StreamListener(signature_field_name="answer")])

program = streaming()
''')
    inputs = {"question": "Why is the sky blue?"}

    async def kernel_stream() -> list[Any]:
        return [value async for value in shell.user_ns["program"](**inputs)]

    with dspy.context(lm=demo_lm):
        values = asyncio.run(kernel_stream())
    run = pool.run_stream(shell.user_ns["streaming"](), **inputs)
    chunks = list(run)
    assert [c["message"] for c in chunks if c.kind == "status"] == []  # not "no str output field to stream"
    tokens = [(c["predictor"], c["field"], c["text"], c["last"]) for c in chunks if c.kind == "token"]
    expected = [(v.predict_name, v.signature_field_name, v.chunk, v.is_last_chunk) for v in values[:-1]]
    assert expected and tokens == expected
    assert_same(values[-1], run.result(60))


def test_an_asyncified_module_streams_its_fields_as_the_module(shell: InteractiveShell, pool: Pool,
                                                              demo_lm: dspy.LM) -> None:
    # DSPy's async tutorial: `dspy.asyncify(program)` is a function, so its stream said "no str output field to
    # stream" and a %%dspex cell showed nothing until the end, where the module it runs streams each field
    program, _ = define(shell, 'program = dspy.asyncify(dspy.ChainOfThought("question -> answer"))')

    async def kernel() -> dspy.Prediction:
        with dspy.context(lm=demo_lm):
            return await program(question="Why?")

    run = pool.run_stream(program, question="Why?")
    assert_same(asyncio.run(kernel()), run.result(60))
    module = pool.run_stream(dspy.ChainOfThought("question -> answer"), question="Why?")
    module.result(60)
    tokens = [(c["predictor"], c["field"], c["text"]) for c in run.chunks if c.kind == "token"]
    assert tokens and tokens == [(c["predictor"], c["field"], c["text"]) for c in module.chunks if c.kind == "token"]
    assert [c["message"] for c in run.chunks if c.kind == "status"] == []


def test_a_streamified_program_made_again_streams_again(shell: InteractiveShell, pool: Pool,
                                                       demo_lm: dspy.LM) -> None:
    # a cell re-run makes the streamify'd program of an earlier cell's predictor anew, with a new listener, which
    # streams in the kernel: on the pool it was the same shipped program, whose listener had streamed once and ended
    shell.run_cell('''
from dspy.streaming import StreamListener

answers = dspy.Predict("topic -> answer")

def streaming():
    return dspy.streamify(answers, async_streaming=False,
                          stream_listeners=[StreamListener(signature_field_name="answer")])
''').raise_error()
    with dspy.context(lm=demo_lm):
        expected = [value.chunk for value in list(shell.user_ns["streaming"]()(topic="tides"))[:-1]]
    for _ in range(pool.size + 1):  # one worker runs it twice at least
        run = pool.run_stream(shell.user_ns["streaming"](), topic="tides")
        assert expected and [chunk["text"] for chunk in run if chunk.kind == "token"] == expected


def test_a_streamified_program_with_a_status_message_provider_streams_its_messages(shell: InteractiveShell,
                                                                                   pool: Pool,
                                                                                   demo_lm: dspy.LM) -> None:
    # DSPy's streaming tutorial, "Intermediate Status Streaming": without a listener streamify gives the LM's raw
    # chunks too, which the pool dropped without a word (a %%dspex cell showed nothing until the end)
    define(shell, '''
class MyStatusMessageProvider(dspy.streaming.StatusMessageProvider):
    def tool_start_status_message(self, instance, inputs):
        return f"Calling Tool {instance.name} with inputs {inputs}..."

    def tool_end_status_message(self, outputs):
        return f"Tool finished with output: {outputs}!"

class MyProgram(dspy.Module):
    def __init__(self):
        super().__init__()
        self.tool = dspy.Tool(lambda x: 2 * x, name="double_the_number")
        self.predict = dspy.ChainOfThought("num1, num2->sum")

    def forward(self, num, **kwargs):
        num2 = self.tool(x=num)
        return self.predict(num1=num, num2=num2)

program = dspy.streamify(MyProgram(), status_message_provider=MyStatusMessageProvider(), async_streaming=False)
''')
    with dspy.context(lm=demo_lm):
        values = list(shell.user_ns["program"](num=3))
    statuses = [v.message for v in values if isinstance(v, dspy.streaming.StatusMessage)]
    assert statuses == ["Calling Tool double_the_number with inputs {'kwargs': {'x': 3}}...",
                        "Tool finished with output: 6!"]
    raw = [v for v in values[:-1] if not isinstance(v, dspy.streaming.StatusMessage)]
    assert raw and not any(isinstance(v, dspy.streaming.StreamResponse) for v in raw)  # the LM's own chunks
    run = pool.run_stream(shell.user_ns["program"], num=3)
    assert_same(values[-1], run.result(60))
    said = [chunk["message"] for chunk in run.chunks if chunk.kind == "status"]
    assert said[:2] == statuses
    assert len(said) == 3 and said[2].startswith(f"the LM's raw stream chunks ({type(raw[0]).__name__}) that this "
                                                 "dspy.streamify'd program gives without stream listeners are not "
                                                 "passed on: give streamify a StreamListener")
    assert not any(chunk.kind == "token" for chunk in run.chunks)


@pytest.mark.parametrize("async_streaming", [True, False])
def test_a_stream_without_its_final_prediction_raises_a_clear_error(async_streaming: bool, shell: InteractiveShell,
                                                                    pool: Pool) -> None:
    # in the kernel the stream is all there is; the pool returns a stream's final Prediction, and has none to give
    shell.run_cell(f'''
from dspy.streaming import StreamListener

def no_final(signature):  # a listener streams once: a program for each call
    return dspy.streamify(dspy.ChainOfThought(signature), async_streaming={async_streaming},
                          stream_listeners=[StreamListener(signature_field_name="answer")],
                          include_final_prediction_in_output_stream=False)
''').raise_error()
    no_final = shell.user_ns["no_final"]
    with pytest.raises(NotPortable, match="ended without its final Prediction"):
        pool.run(no_final("question -> answer"), question="Why?")
    run = pool.run_stream(no_final("topic -> answer"), topic="tides")
    assert any(chunk.kind == "token" for chunk in run)
    with pytest.raises(NotPortable, match="ended without its final Prediction"):
        run.result(60)
    batch = pool.map(no_final("text -> answer"), [{"text": "tides"}], journal=False)
    assert batch.result(60) == [None]
    assert "ended without its final Prediction" in batch.records[0]["error"]["message"]


@pytest.mark.parametrize("adapter", ["dspy.JSONAdapter()", "dspy.XMLAdapter()", "NotebookAdapter()"])
def test_the_kernels_adapter_applies_on_the_pool(adapter: str, shell: InteractiveShell, pool: Pool,
                                                 demo_lm: dspy.LM) -> None:
    program, _ = define(shell, f'''
class NotebookAdapter(dspy.JSONAdapter):
    """An adapter of the notebook's own: it travels by value."""

adapter = {adapter}
program = dspy.Predict("question -> answer: int, tags: list[str]")
''')
    question = {"question": "How many?"}
    with dspy.context(lm=demo_lm):
        plain = program(**question)
        with dspy.context(adapter=shell.user_ns["adapter"]):
            expected = program(**question)
            assert expected.toDict() != plain.toDict()  # the adapter shapes the prompt, so the demo LM's answer
            assert_same(expected, pool.run(program, **question), "run")
            assert_same(expected, pool.run_stream(program, **question).result(60), "run_stream")
            assert_same([expected], pool.map(program, [question]).result(60), "map")  # journal key differs
        assert_same(plain, pool.run(program, **question), "run without the adapter")
        assert_same([plain], pool.map(program, [question]).result(60), "map without the adapter")


def test_the_kernels_dspy_settings_apply_on_the_pool(shell: InteractiveShell, pool: Pool, demo_lm: dspy.LM) -> None:
    program, _ = define(shell, '''
import asyncio

async def lookup(query: str = "DSPy") -> str:
    """Look something up."""
    await asyncio.sleep(0)
    return f"Result for {query}"

program = dspy.ReAct("question -> answer", tools=[lookup], max_iters=2)
''')
    inputs = {"question": "What is DSPy?"}
    with dspy.context(lm=demo_lm, allow_tool_async_sync_conversion=True):  # as DSPy's tools tutorial has it
        expected = program(**inputs)
        assert expected.trajectory["observation_0"] == "Result for DSPy"  # the async tool ran, synchronously
        assert_same(expected, pool.run(program, **inputs), "run")
        assert_same(expected, pool.run_stream(program, **inputs).result(60), "run_stream")
        assert_same([expected], pool.map(program, [inputs]).result(60), "map")
    assert "async tool" in pool.run(program, **inputs).trajectory["observation_0"]  # without it: DSPy's error
    with dspy.context(rm=(x for x in ())), pytest.raises(ArgumentError, match=r"DSPy settings \['rm'\] cannot"):
        pool.run(program, **inputs)  # a setting that cannot travel is named, not dropped


def test_callbacks_are_said_not_to_run_on_the_pool(shell: InteractiveShell, pool: Pool, demo_lm: dspy.LM) -> None:
    program, _ = define(shell, '''
from dspy.utils.callback import BaseCallback

class AgentLoggingCallback(BaseCallback):
    def __init__(self):
        self.started = []

    def on_module_start(self, call_id, instance, inputs):
        self.started.append(type(instance).__name__)

program = dspy.ChainOfThought("question -> answer")
''')
    callback = shell.user_ns["AgentLoggingCallback"]()
    warning = r"the DSPy callbacks \['AgentLoggingCallback'\] of the {}.* do not run on the pool"
    with dspy.context(lm=demo_lm, callbacks=[callback]):
        expected = program(question="Why?")
        assert callback.started == ["ChainOfThought", "Predict"]
        with pytest.warns(CallbacksNotRun, match=warning.format("kernel")) as caught:
            assert_same(expected, pool.run(program, question="Why?"))
        assert caught[0].filename == __file__  # it names the user's line
        with pytest.warns(CallbacksNotRun, match=warning.format("kernel")):
            assert_same([expected], pool.map(program, ["Why?"]).result(60))
    assert callback.started == ["ChainOfThought", "Predict"]
    program.callbacks = [callback]  # a module's own: DSPy pickles a module without them
    with pytest.warns(CallbacksNotRun, match=warning.format("program's modules")):
        assert_same(expected, pool.run(program, question="Why?"))
    assert callback.started == ["ChainOfThought", "Predict"]


def test_a_predictor_with_its_own_lm_keeps_it_and_its_key_stays_masked(shell: InteractiveShell, pool: Pool,
                                                                         demo_lm: dspy.LM) -> None:
    program, _ = define(shell, '''
from dspex_nb import demo_lm as _demo_lm

short = dspy.Predict("question -> answer")
short.set_lm(_demo_lm(answer_tokens=2))  # DSPy's rule: a predictor's own LM wins over the configured one

class Leaky(dspy.Module):
    def __init__(self):
        self.p = dspy.Predict("question -> answer")
        self.p.set_lm(dspy.LM("openai/gpt-4o-mini", api_key="sk-own-predictor-key-123"))

    def forward(self, question):
        raise ValueError("the key is " + self.p.lm.kwargs["api_key"])

program = short
''')
    with dspy.context(lm=demo_lm):
        expected = program(question="Why?")
    assert_same(expected, pool.run(program, question="Why?"))
    with pytest.raises(Exception, match=r"the key is \*\*\*") as caught:
        pool.run(shell.user_ns["Leaky"](), question="Why?")
    assert "sk-own-predictor-key-123" not in str(caught.value)
    define(shell, '''
def program(question):  # the key of an LM inside the kernel's adapter, which travels with the call
    raise ValueError("the key is " + dspy.settings.adapter.extraction_model.kwargs["api_key"])
''')
    adapter = dspy.TwoStepAdapter(extraction_model=dspy.LM("openai/gpt-4o-mini", api_key="sk-adapter-lm-key-456"))
    with dspy.context(adapter=adapter), pytest.raises(Exception, match=r"the key is \*\*\*") as caught:
        pool.run(shell.user_ns["program"], question="Why?")
    assert "sk-adapter-lm-key-456" not in str(caught.value)


def test_evaluate_on_the_pool_scores_as_dspy_evaluate(shell: InteractiveShell, pool: Pool, demo_lm: dspy.LM,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    program, _ = define(shell, '''
devset = [dspy.Example(question=f"question {i}?", answer="x").with_inputs("question") for i in range(12)]

def metric(example, pred, trace=None):
    return len(pred.answer) % 3 == 0

program = dspy.Predict("question -> answer")
''')
    devset, metric = shell.user_ns["devset"], shell.user_ns["metric"]
    with dspy.context(lm=demo_lm):
        expected = dspy.Evaluate(devset=devset, metric=metric)(program)
    printed = capsys.readouterr().out
    got = pool.evaluate(program, devset, metric, journal=False)
    assert capsys.readouterr().out == printed == ""  # was: the batch's summary line, which DSPy's default shows not
    assert 0 < expected.score < 100  # a score that tells outputs apart
    assert got.score == expected.score
    assert [r[2] for r in got.results] == [r[2] for r in expected.results]
    options = {"num_threads": 4, "display_progress": True, "max_errors": 5, "provide_traceback": True}
    with dspy.context(lm=demo_lm):  # dspy.Evaluate's own options, as a user passes them there
        expected = dspy.Evaluate(devset=devset, metric=metric, **options)(program)
    capsys.readouterr()
    got = pool.evaluate(program, devset, metric, journal=False, **options)
    assert got.score == expected.score
    assert capsys.readouterr().out.startswith("batch done: 12 items, 12 ok")  # its progress: the batch's view
    with pytest.raises(TypeError, match=r"Pool.evaluate\(\) got unexpected keyword argument\(s\) \['num_thread'\]"):
        pool.evaluate(program, devset, metric, num_thread=4)


def test_map_and_evaluate_stop_at_max_errors_failed_items_as_dspy_does(shell: InteractiveShell, pool: Pool,
                                                                       demo_lm: dspy.LM) -> None:
    program, _ = define(shell, '''
class Picky(dspy.Module):
    def __init__(self):
        super().__init__()
        self.qa = dspy.Predict("question -> answer")

    def forward(self, question):
        if question.startswith("bad"):
            raise ValueError(f"cannot answer {question}")
        return self.qa(question=question)

devset = [dspy.Example(question=q, answer="x").with_inputs("question") for q in ["a?", "bad 1", "b?", "bad 2", "c?"]]

def metric(example, pred, trace=None):
    return len(pred.answer) % 2

program = Picky()
''')
    devset, metric = shell.user_ns["devset"], shell.user_ns["metric"]
    with dspy.context(lm=demo_lm):  # 2 failed items, under DSPy's max_errors (10): None for each
        expected = program.batch(devset, disable_progress_bar=True)
    assert expected[1] is None and expected[3] is None
    assert_same(expected, pool.map(program, devset, journal=False).result(60), "map")
    stopped = "Execution cancelled due to errors or interruption"
    with dspy.context(lm=demo_lm), pytest.raises(Exception, match=stopped):  # as Module.batch, which stops
        program.batch(devset, max_errors=2, disable_progress_bar=True)
    with pytest.raises(Exception, match=stopped):
        pool.map(program, devset, max_errors=2, journal=False).result(60)
    with dspy.context(max_errors=2):  # the kernel's DSPy setting, which Module.batch and dspy.Evaluate take
        with pytest.raises(Exception, match=stopped):
            pool.map(program, devset, journal=False).result(60)
        with pytest.raises(Exception, match=stopped):
            pool.evaluate(program, devset, metric, journal=False)
    assert len(pool.map(program, devset, max_errors=3, journal=False).result(60)) == 5


@pytest.mark.parametrize("provide_traceback", [False, True])
def test_evaluate_logs_a_failed_example_as_dspy_evaluate(provide_traceback: bool, shell: InteractiveShell,
                                                         pool: Pool, demo_lm: dspy.LM,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    # DSPy's ParallelExecutor logs "Error for <example>: <str(exc)>"; the pool's said "ValueError: <message>", the
    # error's type put in its message, and the metric's callbacks saw a RuntimeError, not the program's error
    program, _ = define(shell, '''
class Fussy(dspy.Module):
    def __init__(self):
        super().__init__()
        self.qa = dspy.Predict("question -> answer")

    def forward(self, question):
        if question.startswith("bad"):
            raise KeyError(f"cannot answer {question}")  # str() quotes a KeyError's message
        return self.qa(question=question)

devset = [dspy.Example(question=q, answer="x").with_inputs("question") for q in ["a?", "bad 1"]]

def metric(example, pred, trace=None):
    return len(pred.answer) % 2

program = Fussy()
''')
    devset, metric = shell.user_ns["devset"], shell.user_ns["metric"]

    def logged() -> list[str]:
        lines = [r.getMessage().partition("\n")[0] for r in caplog.records if r.name == "dspy.utils.parallelizer"]
        caplog.clear()
        return lines

    with caplog.at_level(logging.ERROR, logger="dspy.utils.parallelizer"):
        with dspy.context(lm=demo_lm):
            expected = dspy.Evaluate(devset=devset, metric=metric, provide_traceback=provide_traceback)(program)
        kernel = logged()
        assert pool.evaluate(program, devset, metric, journal=False,
                             provide_traceback=provide_traceback).score == expected.score
        assert logged() == kernel == [f"Error for {devset[1]}: 'cannot answer bad 1'" + (
            "" if provide_traceback else ". Set `provide_traceback=True` for traceback.")]


def test_a_program_from_source_runs_with_its_types_and_source(pool: Pool) -> None:
    info = pool.define("Rated", '''
from __future__ import annotations  # the user's own: annotations stay strings, resolved by DSPy
from typing import Literal
import inspect

def reward(args, pred):
    return 1.0

class Rated(dspy.Module):
    def __init__(self):
        super().__init__()
        self.rate = dspy.Predict("review -> rating: Literal['good', 'bad']")
        self.source_lines = len(inspect.getsource(reward).splitlines())  # defined source is findable

    def forward(self, review):
        return dspy.Prediction(rating=self.rate(review=review).rating, lines=self.source_lines)
''')
    assert info["inputs"] == ["review"]
    out = pool.run("Rated", review="Loved it")
    assert out.rating in ("good", "bad") and out.lines == 2


def test_values_that_cannot_travel_raise_a_clear_error(shell: InteractiveShell, pool: Pool) -> None:
    program, _ = define(shell, '''
import threading

def program(text):
    return threading.Lock() if text == "lock" else dspy.Prediction(text=text)
''')
    with pytest.raises(Exception, match="has no JSON form, so it cannot come back as itself"):
        pool.run(program, text="lock")
    batch = pool.map(program, ["a", "lock", "b"], journal=False)  # one such item costs the others nothing
    assert [r and r.text for r in batch.result(60)] == ["a", None, "b"]
    assert batch.records[1]["error"]["type"] == "NotPortable" and (batch.ok, batch.failed) == (2, 1)


def test_a_module_compiled_on_the_pool_comes_back_as_its_state(shell: InteractiveShell, pool: Pool,
                                                              demo_lm: dspy.LM) -> None:
    # a module (compiled on a worker) or the exceptions of dspy.Parallel's return_failed_examples=True have no JSON
    # form: the error said only "return JSON-able values"; it now says what to return, and the state does the job
    program, _ = define(shell, '''
trainset = [dspy.Example(question=q, answer=a).with_inputs("question")
            for q, a in [("What is 2+2?", "4"), ("Capital of France?", "Paris"), ("Colour of the sky?", "blue")]]

def compiled(k: int):
    return dspy.LabeledFewShot(k=k).compile(dspy.ChainOfThought("question -> answer"), trainset=trainset)

def program(k: int):
    return compiled(k).dump_state()

class Flaky(dspy.Module):
    def forward(self, question):
        raise ValueError("cannot answer " + question)

def failures(questions: list[str]):
    parallel = dspy.Parallel(num_threads=2, return_failed_examples=True, disable_progress_bar=True)
    return parallel([(Flaky(), {"question": q}) for q in questions])[2]
''')
    ns = shell.user_ns
    with pytest.raises(NotPortable, match=r"a DSPy module, .* return its state, module.dump_state\(\)"):
        pool.run(ns["compiled"], k=2)
    with pytest.raises(NotPortable, match=r"builtins:ValueError, an exception, .* str\(exc\)"):
        pool.run(ns["failures"], questions=["Why?"])
    state = pool.run(program, k=2)
    assert_same(ns["compiled"](2).dump_state(), state)
    loaded = dspy.ChainOfThought("question -> answer")
    loaded.load_state(state)
    question = {"question": "Capital of Italy?"}
    with dspy.context(lm=demo_lm):
        assert_same(ns["compiled"](2)(**question), loaded(**question))
        assert_same(ns["compiled"](2)(**question), pool.run(loaded, **question))


def test_an_output_that_contains_itself_is_not_blamed_on_the_program(shell: InteractiveShell, pool: Pool) -> None:
    # its encoding on the worker recursed: the call raised "RecursionError: maximum recursion depth exceeded", as if
    # the program had recursed, while the program returned normally
    program, _ = define(shell, '''
def program(kind):
    loop = []
    loop.append(loop)
    deep = {}
    for _ in range(5000):
        deep = {"a": deep}
    return {"loop": loop, "deep": deep}[kind]
''')
    for kind in ("loop", "deep"):
        with pytest.raises(NotPortable, match="the program's output contains itself, or is nested over"):
            pool.run(program, kind=kind)
    batch = pool.map(program, ["loop"], journal=False)
    assert batch.result(60) == [None] and batch.records[0]["error"]["type"] == "NotPortable"


def test_a_program_that_calls_the_pool_itself_gets_a_clear_error_on_the_pool(shell: InteractiveShell,
                                                                             pool: Pool) -> None:
    # a module whose forward runs its predictor with pool.run compiles in the kernel; sent to the pool itself (to
    # evaluate the compiled program there) it cannot travel: the error says why and what to do, not "an open file"
    shell.user_ns["pool"] = pool
    program, _ = define(shell, '''
class Remote(dspy.Module):
    def __init__(self):
        super().__init__()
        self.prog = dspy.ChainOfThought("question -> answer")
        self.pool = pool

    def forward(self, question):
        return pool.run(self.prog, question=question)

program = Remote()
''')
    for send in (lambda: pool.run(program, question="Why?"),
                 lambda: pool.evaluate(program, [dspy.Example(question="Why?").with_inputs("question")],
                                       lambda example, pred, trace=None: 1.0)):
        with pytest.raises(ArgumentError, match=r"Remote cannot be sent to the workers: KernelOnly: it uses a "
                                                r"dspex_nb Pool .* run that program in the kernel") as caught:
            send()
        assert "open file" not in str(caught.value)
    assert program.deepcopy().pool is pool  # as DSPy's optimizers copy a student: the copy shares the pool


def test_numpy_values_that_cannot_travel_raise_a_clear_error(shell: InteractiveShell, pool: Pool) -> None:
    program, _ = define(shell, '''
import numpy as np

def program(kind):
    return {"objects": np.array([1, "x"], dtype=object), "records": np.zeros(2, dtype=[("a", "i4")]),
            "masked": np.ma.masked_array([1, 2], mask=[0, 1])}[kind]
''')
    for kind, message in [("objects", "an array of dtype object"), ("records", r"an array of dtype \[\('a'"),
                          ("masked", "a subclass of numpy's ndarray")]:
        with pytest.raises(NotPortable, match=message):
            pool.run(program, kind=kind)


def test_list_and_dict_subclasses_come_back_as_their_class(shell: InteractiveShell, pool: Pool) -> None:
    # a retriever's passages are DSPy dotdicts, read as passage.long_text: as plain dicts they raised AttributeError
    program, _ = define(shell, '''
import collections
from dspy.dsp.utils import dotdict

class Hits(list):
    pass

class Text(str):
    pass

class Count(int):
    def __int__(self):
        return 0  # its own conversion is not its value

class Tagged(str):
    __slots__ = ("tag",)

def program(kind, given=None):
    return {"passages": lambda: dspy.Prediction(passages=[dotdict(long_text="p1", score=0.5)]),
            "counter": lambda: collections.Counter("hello"), "hits": lambda: Hits(["a"]),
            "ordered": lambda: collections.OrderedDict([("b", 1), ("a", 2)]), "given": lambda: type(given).__name__,
            "factory": lambda: collections.defaultdict(list, a=[1]), "text": lambda: Text("x"),
            "count": lambda: Count(3), "tagged": lambda: (tagged := Tagged("t"), setattr(tagged, "tag", 1))[0],
            "code": lambda: collections.defaultdict(lambda: 0), "keyed": lambda: dotdict(default_factory="f")}[kind]()
''')
    assert pool.run(program, kind="passages").passages[0].long_text == "p1"
    counter = pool.run(program, kind="counter")
    assert type(counter).__name__ == "Counter" and counter["absent"] == 0 and counter == program(kind="counter")
    assert type(pool.run(program, kind="hits")) is shell.user_ns["Hits"]
    assert pool.run(program, kind="ordered").popitem(last=False) == ("b", 1)
    assert pool.run(program, kind="given", given=shell.user_ns["Hits"]([1])) == "Hits"  # as an input too
    grouped = pool.run(program, kind="factory")  # a common way to group: it comes back with its factory
    grouped["b"].append(2)
    assert type(grouped) is collections.defaultdict and grouped == {"a": [1], "b": [2]}
    assert pool.run(program, kind="keyed").default_factory == "f"  # a dotdict's key, not a defaultdict's factory
    with pytest.raises(NotPortable, match="a defaultdict, a subclass of dict that holds more than its items"):
        pool.run(program, kind="code")  # a factory that is code does not come from data
    text, number = pool.run(program, kind="text"), pool.run(program, kind="count")
    assert type(text) is shell.user_ns["Text"] and text == "x" and type(number) is shell.user_ns["Count"]
    assert number == 3 and pool.run(program, kind="given", given=shell.user_ns["Text"]("y")) == "Text"
    with pytest.raises(NotPortable, match="a Tagged, a subclass of str that holds more than its value"):
        pool.run(program, kind="tagged")


def test_a_defaultdicts_factory_from_data_is_only_a_plain_type() -> None:
    # the factory is called on a missing key: data (a worker's answer, the journal) never names another class for it
    for factory in ("subprocess:Popen", "dspy.clients.lm:LM"):
        raw = {typed.TAG: "dict", "class": "collections:defaultdict", "items": [], "factory": factory}
        with pytest.raises(NotPortable, match="is not a factory a defaultdict gets from data"):
            typed.decode(raw)


def test_a_named_tuple_from_data_has_as_many_items_as_fields() -> None:
    point = collections.namedtuple("point", "x y")
    raw = typed.encode(point(1, 2))
    assert typed.decode(raw, typed.Resolver([point])) == point(1, 2)
    with pytest.raises(NotPortable, match="a point has 2 fields, not 3"):
        typed.decode({**raw, "items": [1, 2, 3]}, typed.Resolver([point]))


def local_time(seconds: float) -> Any:
    import time

    return time.localtime(seconds)


def test_a_struct_sequence_comes_back_as_itself(pool: Pool) -> None:
    # time.struct_time, os.stat_result: tuple subclasses that tuple.__new__ cannot make; since tuple subclasses travel
    # as their class, a program's time.localtime() came back as NotPortable ("tuple.__new__(time.struct_time) is not
    # safe"), where it had come back as a plain tuple
    made = pool.run(local_time, seconds=86400.5)
    assert made == local_time(86400.5) and type(made).__name__ == "struct_time"
    assert (made.tm_zone, made.tm_gmtoff) == (local_time(86400.5).tm_zone, local_time(86400.5).tm_gmtoff)
    with pytest.raises(NotPortable, match="a version_info, which Python cannot make again: use tuple"):
        typed.decode(typed.encode(sys.version_info))


def test_first_calls_of_a_program_at_once_all_get_its_answer(pool: Pool, demo_lm: dspy.LM) -> None:
    program = dspy.Predict("question -> answer, first: bool")  # not shipped before: the calls race to ship it

    async def together() -> list[Any]:
        return await asyncio.gather(*(pool.run_async(program, question=q) for q in "abcd"))

    with dspy.context(lm=demo_lm):
        expected = [program(question=q) for q in "abcd"]
    assert_same(expected, asyncio.run(together()))


def test_a_key_error_reads_as_in_the_kernel_not_as_a_masked_secret(shell: InteractiveShell, pool: Pool) -> None:
    # a tutorial's metric or tool that reads a missing field: its traceback's last line, "KeyError: 'answer'", was
    # taken for a secret assigned to a setting named like a key, and showed as "KeyError: '***'"
    program, _ = define(shell, '''
def program(question):
    return {"question": question}["answer"]
''')
    with pytest.raises(KeyError) as kernel:
        program(question="Why?")
    with pytest.raises(KeyError) as caught:
        pool.run(program, question="Why?")
    shown = "".join(traceback.format_exception(caught.value))
    assert caught.value.args == kernel.value.args == ("answer",)
    assert caught.value.remote_traceback.rstrip().endswith("KeyError: 'answer'") and "***" not in shown


def test_wrong_inputs_and_programs_get_errors_that_name_them(shell: InteractiveShell, pool: Pool) -> None:
    program, _ = define(shell, '''
class QA(dspy.Module):
    def __init__(self):
        self.answer = dspy.Predict("question -> answer")

    def forward(self, question):
        return self.answer(question=question)

program = QA()
''')
    with pytest.raises(ArgumentError, match=r"lacks QA's input\(s\) \['question'\] and has input\(s\) \['q'\] "
                                            r"that QA does not take"):
        pool.run(program, q="Why?")
    with pytest.raises(TypeError, match=r"takes the program's inputs by keyword"):
        pool.run(program, "Why?")
    with pytest.raises(TypeError, match="^the program must be a dspy.Module .* got NoneType$"):
        pool.run(None, question="Why?")


def test_a_cancelled_stream_ends_its_request_on_the_worker(shell: InteractiveShell, pool: Pool) -> None:
    program, _ = define(shell, PROGRAMS["parallel_returns_a_list"][0])
    run = pool.run_stream(program, questions=[f"q{i}" for i in range(400)])
    run.cancel()
    assert run.wait(30) and run.status == "cancelled"
    from helpers import wait_until

    wait_until(lambda: all(pool.describe(r["worker"])["counters"]["active_requests"] == 0 for r in pool.status()),
               timeout=60, what="the worker's requests to end")


def test_a_program_changed_and_run_again_replaces_its_old_version(shell: InteractiveShell, pool: Pool) -> None:
    program, _ = define(shell, 'program = dspy.Predict("question -> answer")')
    names = set()
    for i in range(3):
        program.demos = [dspy.Example(question=f"q{i}", answer=f"a{i}")]
        pool.run(program, question="q")
        names.add(pool.ensure_defined(program))
    shipped = [n for n in pool.definitions if n.startswith("_Predict_") and n in names]
    assert len(names) == 3 and len(shipped) == 1  # the latest version only, on the pool and its workers
    assert set(pool.describe("w0")["modules"]) & names == set(shipped)


def test_signature_strings_are_programs(pool: Pool, demo_lm: dspy.LM) -> None:
    with dspy.context(lm=demo_lm):
        expected = dspy.Predict("question -> answer: int")(question="How many?")
    assert_same(expected, pool.run("question -> answer: int", question="How many?"))
    assert pool.define("count_it", "question -> answer: int")["inputs"] == ["question"]
    assert_same(expected, pool.run("count_it", question="How many?"))


def test_a_lazily_loaded_module_travels_before_it_is_loaded(shell: InteractiveShell, pool: Pool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # As dspy.streamify's and dspy.asyncify's anyio, in a kernel that has not imported anyio yet
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    program, _ = define(shell, '''
from dspy.utils.lazy_import import require

colorsys = require("colorsys")

def program(red: float):
    return colorsys.rgb_to_hsv(red, 0.0, 0.0)
''')
    on_pool = pool.run(program, red=0.5)  # shipped before the kernel loads colorsys
    assert_same(program(red=0.5), on_pool)


def test_an_async_program_is_awaited_on_the_pool(shell: InteractiveShell, pool: Pool, demo_lm: dspy.LM) -> None:
    program, _ = define(shell, '''
import asyncio

qa = dspy.Predict("question -> answer")

async def program(question):
    await asyncio.sleep(0)
    return qa(question=question)
''')
    module, _ = define(shell, '''
class AsyncQA(dspy.Module):
    def __init__(self):
        self.qa = dspy.Predict("question -> answer")

    async def forward(self, question):
        return self.qa(question=question)

program = AsyncQA()
''')
    awaits, _ = define(shell, '''
class AwaitsLM(dspy.Module):
    def __init__(self):
        self.qa = dspy.ChainOfThought("question -> answer")

    async def forward(self, question):
        return await self.qa.acall(question=question)

program = AwaitsLM()
''')
    async_only, _ = define(shell, '''
class MyModule(dspy.Module):  # DSPy's Async tutorial: only an aforward, run with await module.acall(...)
    def __init__(self):
        self.predict1 = dspy.ChainOfThought("question->answer")
        self.predict2 = dspy.ChainOfThought("answer->simplified_answer")

    async def aforward(self, question, **kwargs):
        answer = await self.predict1.acall(question=question)
        return await self.predict2.acall(answer=answer)

program = MyModule()
''')
    for name, async_program, call in [
            ("async def", program, program), ("async forward", module, module),
            ("asyncify", *[dspy.asyncify(dspy.Predict("question -> answer: int"))] * 2),
            ("async forward awaiting the LM", awaits, awaits), ("aforward only", async_only, async_only.acall)]:
        inputs = {"question": "How many?"}
        with dspy.context(lm=demo_lm):
            expected = asyncio.run(call(**inputs))  # as the kernel awaits it
        assert_same(expected, pool.run(async_program, **inputs), f"{name} run")
        assert_same(expected, pool.run_stream(async_program, **inputs).result(60), f"{name} run_stream")
        assert_same([expected], pool.map(async_program, [inputs], journal=False).result(60), f"{name} map")


def test_a_program_that_returns_a_generator_raises_a_clear_error(shell: InteractiveShell, pool: Pool) -> None:
    # In the kernel the program gives a generator; it cannot travel, and its last value must not stand in for it
    for source in ("def program(text):\n    yield from text.split()",
                   "async def program(text):\n    yield text"):
        program, _ = define(shell, source)
        error = "returned an? (async )?generator .*cannot travel from the worker"
        with pytest.raises(Exception, match=error):
            pool.run(program, text="a b")
        with pytest.raises(Exception, match=error):
            pool.run_stream(program, text="a b").result(60)
        batch = pool.map(program, [{"text": "a b"}], journal=False)
        assert batch.result(60) == [None] and "cannot travel" in batch.records[0]["error"]["message"]


def test_a_string_signature_naming_a_notebook_type(shell: InteractiveShell, pool: Pool, demo_lm: dspy.LM) -> None:
    # DSPy finds Mood in the globals of the code that makes the signature, which runs again on the workers:
    # a module class's __init__ (run, define), a function's body
    program, _ = define(shell, '''
class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"

class Feel(dspy.Module):
    def __init__(self):
        super().__init__()
        self.answer = dspy.Predict("question -> answer, mood: Mood")

    def forward(self, question):
        return self.answer(question=question)

def program(question):
    return dspy.Predict("question -> mood: Mood")(question=question)
''')
    feel, inputs = shell.user_ns["Feel"], {"question": "Why?"}
    with dspy.context(lm=demo_lm):
        expected = [feel()(**inputs), program(**inputs)]
    assert isinstance(expected[1].mood, shell.user_ns["Mood"])
    assert_same(expected, [pool.run(feel, **inputs), pool.run(program, **inputs)], "run")
    assert_same(expected, [pool.map(p, [inputs], journal=False).result(60)[0] for p in (feel, program)], "map")
    pool.define("Feel", feel)
    assert_same(expected[0], pool.run("Feel", **inputs), "define")


def test_code_imported_from_the_notebooks_own_folders_runs_on_the_pool(
        shell: InteractiveShell, pool: Pool, demo_lm: dspy.LM, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A package in a folder the notebook put on sys.path, and a module in the folder it %cd-ed to later
    name = f"notebook_lib_{tmp_path.name.replace('-', '_')}"
    (tmp_path / "src" / name).mkdir(parents=True)
    (tmp_path / "src" / name / "__init__.py").write_text(
        'import dspy\n\nclass Asker(dspy.Module):\n    def __init__(self):\n        super().__init__()\n'
        '        self.ask = dspy.ChainOfThought("question -> answer: int")\n\n'
        '    def forward(self, question):\n        return self.ask(question=question)\n')
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / f"{name}_here.py").write_text('def shout(text: str) -> str:\n    return text.upper()\n')
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.syspath_prepend("")  # as a kernel's sys.path starts
    program, _ = define(shell, f'''
import sys
sys.path.append({str(tmp_path / "src")!r})
from {name} import Asker
from {name}_here import shout
program = Asker()
''')
    with dspy.context(lm=demo_lm):
        assert_same(program(question="How many?"), pool.run(program, question="How many?"))
    assert pool.run(shell.user_ns["shout"], text="hi") == "HI"


NOTEBOOK_MODULE = '''
import dataclasses, enum, time, uuid
import dspy
from pydantic import BaseModel

PROMPT = "Answer briefly."
KINDS = frozenset({"a", "b", "c"})
LOADED_AT, RUN = time.time(), uuid.uuid4().hex  # values of this process: not the module's code

class Tone(enum.Enum):
    CALM = "calm"
    LOUD = "loud"

class Reply(BaseModel):
    text: str
    tone: Tone

@dataclasses.dataclass
class Note:
    body: str = "x"

class Ask(dspy.Signature):
    """Answer the question."""
    question: str = dspy.InputField(desc="a question")
    reply: Reply = dspy.OutputField()

def helper(x, default=Note(), kinds=KINDS):
    return [k for k in sorted(kinds) if k != x]

class Program(dspy.Module):
    calls = 0  # a class attribute that the program changes as it runs

    def __init__(self):
        super().__init__()
        self.ask = dspy.Predict(Ask)

    def forward(self, question):
        Program.calls += 1
        return self.ask(question=question)
'''


def test_a_module_edited_and_reloaded_in_the_kernel_runs_as_reloaded_on_the_pool(
        shell: InteractiveShell, pool: Pool, demo_lm: dspy.LM, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"notebook_program_{tmp_path.name.replace('-', '_')}"
    file = tmp_path / f"{name}.py"
    file.write_text(NOTEBOOK_MODULE)
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])
    define(shell, f"import importlib\nimport {name}\nprogram = {name}.Program()")
    with dspy.context(lm=demo_lm):
        before = pool.run(shell.user_ns["program"], question="Why?")
        assert_same(shell.user_ns["program"](question="Why?"), before)
        file.write_text(NOTEBOOK_MODULE.replace("Answer the question.", "Answer the question in one word."))
        program, _ = define(shell, f"importlib.reload({name})\nprogram = {name}.Program()")  # as %autoreload does
        after = pool.run(program, question="Why?")
        assert_same(program(question="Why?"), after)
        assert after != before  # the demo LM's answer depends on the whole prompt: the new instructions count
        file.write_text(NOTEBOOK_MODULE.replace("Answer the question.", "Answer at length."))  # not reloaded here
        with Pool(workers=1, lm="demo") as fresh, pytest.raises(ToolError, match=f"other code of {name}"):
            fresh.run(program, question="Why?")  # its worker imports the file as it is now: not the kernel's code


VALIDATED_MODULE = '''
from typing import Annotated
import dspy
from pydantic import AfterValidator, BaseModel

def tidy(text: str) -> str:
    return text.strip().lower()

class Tagged(BaseModel):
    tags: list[Annotated[str, AfterValidator(tidy)]]

class Tag(dspy.Signature):
    """Tag the text."""
    text: str = dspy.InputField()
    tagged: Tagged = dspy.OutputField()
'''


def test_a_module_whose_field_types_hold_functions_runs_on_the_pool(
        shell: InteractiveShell, pool: Pool, demo_lm: dspy.LM, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # the field type's repr names its validator's address, which differs in every process: not the module's code
    name = f"validated_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(VALIDATED_MODULE)
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])
    program, _ = define(shell, f"import dspy\nfrom {name} import Tag\nprogram = dspy.Predict(Tag)")
    with dspy.context(lm=demo_lm):
        assert_same(program(text="Hi there"), pool.run(program, text="Hi there"))


def test_a_worker_runs_a_program_as_dspy_does_without_its_warnings(demo_lm: dspy.LM) -> None:
    from dspex_nb.worker import programs as on_worker

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("dspy")
    logger.addHandler(handler)
    try:
        with dspy.context(lm=demo_lm):
            on_worker.invoke(dspy.Predict("question -> answer"), {"question": "Why?"})
    finally:
        logger.removeHandler(handler)
    assert not [message for message in seen if "discouraged" in message], seen


def test_a_programs_warnings_are_warned_in_the_kernel_as_its_own_code_warns_them(
        shell: InteractiveShell, pool: Pool, demo_lm: dspy.LM) -> None:
    # a warning made on the pool came back as text on stderr: catch_warnings and pytest.warns did not see it, the
    # kernel's filters (warnings.filterwarnings("ignore"), as notebooks silence DSPy's deprecations) did not apply,
    # and each worker showed it once of its own
    program, _ = define(shell, '''
import warnings

class CareWarning(UserWarning):
    pass

def program(x: str):
    warnings.warn("careful with " + x, CareWarning)
    return dspy.settings.lm(messages=[{"role": "user", "content": x}])  # DSPy's DeprecationWarning, on this line
''')
    care = shell.user_ns["CareWarning"]

    def warned(call: Any) -> list[tuple[type[Warning], str, str, int]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        return [(w.category, str(w.message), w.filename, w.lineno) for w in caught]

    with dspy.context(lm=demo_lm):
        expected = warned(lambda: program(x="a"))
    assert [category for category, *_ in expected] == [care, DeprecationWarning]
    assert warned(lambda: pool.run(program, x="a")) == expected
    assert warned(lambda: pool.run_stream(program, x="a").result(60)) == expected
    assert warned(lambda: pool.map(program, [{"x": "a"}, {"x": "a"}], journal=False).result(60)) == expected * 2
    with warnings.catch_warnings(record=True) as caught:  # the kernel's filters decide
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("default", category=care)  # once per place, as the kernel's registry counts
        pool.run(program, x="b")
        pool.run(program, x="b")
        warnings.filterwarnings("ignore", category=care)
        pool.run(program, x="c")
    assert [str(w.message) for w in caught] == ["careful with b"]


def test_a_warning_made_in_a_long_loop_costs_no_other_output_of_its_call(shell: InteractiveShell, pool: Pool,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # each warning went back as a line of the call's output: 30,000 of one filled its 1 MB, and what the program
    # printed after them reached the worker's log only
    program, _ = define(shell, '''
import warnings

def program(n: int):
    for i in range(n):
        warnings.warn("again", UserWarning)
    print("after the loop")
    return n
''')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pool.run(program, n=30_000) == 30_000
    assert "after the loop" in capsys.readouterr().out
    assert 1 <= len(caught) <= 100 and {str(w.message) for w in caught} == {"again"}


def test_a_programs_log_records_are_handled_by_the_kernels_logging(shell: InteractiveShell, pool: Pool,
                                                                   demo_lm: dspy.LM,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # DSPy's log records made on the pool were printed as text: dspy.disable_logging() (DSPy's API to silence them)
    # and the kernel's logger levels did not apply, and no handler of the kernel (caplog, a file) saw them
    program, _ = define(shell, '''
import logging

def program(question: str):
    logging.getLogger("notebook.steps").warning("answering %s", question)
    return dspy.Predict("question, context -> answer")(question=question)  # DSPy warns: no context
''')
    seen: list[tuple[str, int, str]] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append((record.name, record.levelno, record.getMessage()))  # type: ignore
    logging.getLogger().addHandler(handler)
    logging.getLogger("dspy").addHandler(handler)
    try:
        with dspy.context(lm=demo_lm):
            program(question="Why?")
        expected, printed = list(seen), capsys.readouterr().err
        assert [name for name, *_ in expected] == ["notebook.steps", "dspy.predict.predict"]
        assert "WARNING dspy.predict.predict: Not all input fields were provided" in printed  # DSPy's format
        seen.clear()
        pool.run(program, question="Why?")
        at = re.compile(r"^\S+ \S+ ", re.M)  # the time it was logged
        assert (seen, at.sub("", capsys.readouterr().err)) == (expected, at.sub("", printed))
        seen.clear()
        dspy.disable_logging()
        logging.getLogger("notebook").setLevel(logging.ERROR)
        pool.run(program, question="Why?")
        pool.run_stream(program, question="Why?").result(60)
        assert "Missing" not in capsys.readouterr().err
        assert [name for name, *_ in seen] == ["dspy.predict.predict"] * 2  # the kernel's handler only
    finally:
        dspy.enable_logging()
        logging.getLogger("notebook").setLevel(logging.NOTSET)
        logging.getLogger().removeHandler(handler)
        logging.getLogger("dspy").removeHandler(handler)


def test_a_log_record_with_secret_named_extras_still_reaches_the_kernel_masked(shell: InteractiveShell,
                                                                              pool: Pool) -> None:
    # the worker masks each output line: a record's JSON with a secret-named number ("api_key": 12345) or a message
    # with an unclosed quote after a secret's name became no JSON, and the kernel dropped the record
    program, _ = define(shell, '''
import logging

def program(question: str):
    log = logging.getLogger("notebook.secrets")
    log.warning("calling with %s", question, extra={"api_key": 12345678, "token_id": 4321})
    log.warning("header Authorization: 'Bearer abcdefghijkl")
    return question
''')
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger("notebook.secrets").addHandler(handler)
    try:
        assert pool.run(program, question="Why?") == "Why?"
    finally:
        logging.getLogger("notebook.secrets").removeHandler(handler)
    assert [record.getMessage() for record in seen] == ["calling with Why?", "header Authorization: 'Bearer ***"]
    assert (seen[0].api_key, seen[0].token_id) == ("***", "***")  # type: ignore[attr-defined]


def test_a_streamed_calls_many_log_records_each_reach_the_kernel_as_records(shell: InteractiveShell, pool: Pool,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # the worker cut a stream's output into chunks of 64K characters anywhere, a record's JSON line too: the records
    # cut so showed as fragments of JSON on stderr, and their handlers never saw them
    program, _ = define(shell, '''
import logging

def program(n: int):
    for i in range(n):
        logging.getLogger("notebook.many").warning("record %d %s", i, "x" * 40_000)
    return n
''')
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    many = logging.getLogger("notebook.many")
    many.addHandler(handler)
    many.propagate = False
    try:
        assert pool.run_stream(program, n=20).result(60) == 20
    finally:
        many.removeHandler(handler)
        many.propagate = True
    assert [record.getMessage().split()[1] for record in seen] == [str(i) for i in range(20)]
    assert capsys.readouterr().err == ""


def test_the_kernels_dspy_trace_gets_the_predictor_calls_of_a_program_on_the_pool(
        shell: InteractiveShell, pool: Pool, demo_lm: dspy.LM) -> None:
    # DSPy's optimizers (BootstrapFewShot's demos, GEPA's and SIMBA's reflections) and Refine read the predictor
    # calls that a program makes from dspy.settings.trace: a module whose forward runs its predictor on the pool
    # compiles to the same demos as the one that runs it in the kernel
    shell.user_ns["pool"] = pool
    define(shell, '''
trainset = [dspy.Example(question=f"What is {i} plus {i}?", answer=str(2 * i)).with_inputs("question")
            for i in range(6)]

def metric(example, pred, trace=None):
    return sum(map(ord, pred.answer)) % 2 == 0

class InKernel(dspy.Module):
    def __init__(self):
        super().__init__()
        self.qa = dspy.ChainOfThought("question -> answer")

    def forward(self, question):
        return self.qa(question=question)

class OnPool(InKernel):
    def forward(self, question):
        return pool.run(self.qa, question=question)

program = None
''')
    ns = shell.user_ns
    with dspy.context(lm=demo_lm):
        expected, got = (dspy.BootstrapFewShot(metric=ns["metric"], max_bootstrapped_demos=2, max_labeled_demos=0)
                         .compile(ns[cls](), trainset=ns["trainset"]) for cls in ("InKernel", "OnPool"))
        assert len(expected.qa.predict.demos) == 2
        assert got.dump_state() == expected.dump_state()
        traces = []
        for program in (expected, got):
            with dspy.context(trace=[]):
                program(question="Why?")
                traces.append(dspy.settings.trace)
    (kernel_step,), (pool_step,) = traces
    assert kernel_step[0] is expected.qa.predict and pool_step[0] is got.qa.predict
    assert_same(kernel_step[1:], pool_step[1:], "trace")
    with dspy.context(trace=[]):
        run = pool.run_stream(got.qa, question="Why?")
        assert_same(run.result(60), run.result(60))
        assert [step[0] for step in dspy.settings.trace] == [got.qa.predict]  # once, however often it is read
    # a predictor that the program does not hold as its own: the kernel has no object for it, and says so
    function, _ = define(shell, 'qa = dspy.Predict("question -> answer")\n\n'
                                'def program(question):\n    return qa(question=question)')
    with dspy.context(trace=[]), pytest.warns(TraceIncomplete, match="1 predictor call"):
        pool.run(function, question="Why?")


def test_map_and_evaluate_add_their_predictor_calls_to_the_kernels_trace(shell: InteractiveShell, pool: Pool,
                                                                         demo_lm: dspy.LM) -> None:
    # Module.batch and dspy.Evaluate inside dspy.context(trace=[]) add every item's predictor calls to that trace,
    # so a metric that reads dspy.settings.trace sees each example's calls when it scores it
    program, _ = define(shell, 'program = dspy.ChainOfThought("question -> answer")')
    devset = [dspy.Example(question=q, answer="x").with_inputs("question") for q in ("Why?", "How?", "What?")]
    seen: dict[str, list[Any]] = {}

    def metric(example: dspy.Example, pred: dspy.Prediction, trace: Any = None) -> bool:
        seen.setdefault(where, []).append([(step[0], step[1]) for step in dspy.settings.trace])
        return len(pred.answer) % 3 == 0

    traces, scores = {}, {}
    for where in ("kernel", "pool"):
        with dspy.context(lm=demo_lm, trace=[]):
            if where == "kernel":
                program.batch(devset, num_threads=2, disable_progress_bar=True)
            else:
                pool.map(program, devset, journal=False).result(60)
            traces[where] = sorted((str(step[1]), step[2].answer, step[0] is program.predict)
                                   for step in dspy.settings.trace)  # in the order the items ended
        with dspy.context(lm=demo_lm, trace=[]):
            scores[where] = (dspy.Evaluate(devset=devset, metric=metric, num_threads=1)(program) if where == "kernel"
                             else pool.evaluate(program, devset, metric, num_threads=1)).score
    assert traces["pool"] == traces["kernel"] and len(traces["kernel"]) == 3
    assert scores["pool"] == scores["kernel"]
    assert seen["pool"] == seen["kernel"] and [len(steps) for steps in seen["kernel"]] == [1, 2, 3]


def test_a_forward_that_reads_dspys_trace_gets_the_same_answer_on_every_worker(shell: InteractiveShell, pool: Pool,
                                                                              demo_lm: dspy.LM) -> None:
    # A forward reading dspy.settings.trace (its last predictor call, how many there are) saw the worker's global
    # trace: the predictor calls of whatever that worker had run before, so the answer changed from call to call and
    # from worker to worker. Each call has a trace of its own now, as in the kernel under dspy.context(trace=[])
    program, _ = define(shell, '''
class ReadsTrace(dspy.Module):
    def __init__(self):
        super().__init__()
        self.qa = dspy.Predict("question -> answer")

    def forward(self, question):
        before = len(dspy.settings.trace)
        answer = self.qa(question=question).answer
        return dspy.Prediction(before=before, after=len(dspy.settings.trace), answer=answer,
                               last=dspy.settings.trace[-1][0] is self.qa)

program = ReadsTrace()
''')
    with dspy.context(lm=demo_lm, trace=[]):
        expected = program(question="Why?")
    assert (expected.before, expected.after, expected.last) == (0, 1, True)
    pool.run(dspy.Predict("question -> answer"), question="What ran before?")  # on a worker's trace, were it global
    got = [pool.run(program, question="Why?") for _ in range(3)]
    got += pool.map(program, ["Why?"] * 4, journal=False).result(60)
    got.append(pool.run_stream(program, question="Why?").result(60))
    for i, pred in enumerate(got):
        assert_same(expected, pred, f"call {i}")


def last_calls(n: int = 1) -> str:
    """``dspy.inspect_history(n=n)``'s text, its times left out."""
    import io
    import re

    shown = io.StringIO()
    dspy.inspect_history(n=n, file=shown)
    return re.sub(r"\[\d{4}-\d\d-\d\dT[\d:.]+\]", "[time]", shown.getvalue())


def calls(n: int) -> list[str]:
    """The last ``n`` calls ``dspy.inspect_history(n=n)`` shows, as a sorted list."""
    return sorted(last_calls(n).split("[time]"))


def test_dspy_inspect_history_shows_the_pools_calls_as_the_kernels(pool: Pool, demo_lm: dspy.LM) -> None:
    last_call = last_calls
    qa = dspy.ChainOfThought("question -> answer")
    with dspy.context(lm=demo_lm):
        qa(question="Where is the history?")
        in_kernel = last_call()
        for run in (lambda: pool.run(qa, question="Where is the history?"),
                    lambda: pool.run_stream(qa, question="Where is the history?").result(60)):
            before = len(qa.history)
            run()
            assert last_call() == in_kernel and "Where is the history?" in in_kernel
            assert len(qa.history) == before + 1  # the program's own history too, as DSPy keeps it
        with dspy.context(disable_history=True):
            pool.run(qa, question="Not kept?")
        assert "Not kept?" not in last_call()


def test_map_and_evaluate_join_dspys_history_as_module_batch_and_evaluate(pool: Pool, demo_lm: dspy.LM) -> None:
    # DSPy's docs read dspy.inspect_history(n=3) after a batch: the pool's batch calls did not join DSPy's history
    # (it showed the kernel's older calls), nor the program's own, as Module.batch's and Evaluate's threads do
    qa = dspy.ChainOfThought("question -> answer")
    questions = ["Which batch is kept?", "What does history show?", "Who reads the history?"]
    examples = [dspy.Example(question=q, answer="x").with_inputs("question") for q in questions]
    with dspy.context(lm=demo_lm):
        qa.batch(examples, num_threads=2, disable_progress_bar=True)
    in_kernel = calls(3)  # in the order the items finished, here as there
    assert all(any(q in call for call in in_kernel) for q in questions)
    for run in (lambda: pool.map(qa, questions, journal=False).result(60),
                lambda: pool.evaluate(qa, examples, lambda example, pred, trace=None: 1.0, journal=False)):
        with dspy.context(lm=demo_lm):
            qa(question="Something else?")  # the last calls are no longer the batch's
        assert calls(3) != in_kernel
        before = len(qa.history)
        run()
        assert calls(3) == in_kernel
        assert len(qa.history) == before + len(questions)


def test_the_pools_lm_calls_join_the_histories_of_the_modules_and_lm_that_made_them(
        shell: InteractiveShell, pool: Pool, demo_lm: dspy.LM) -> None:
    # DSPy keeps each LM call in the history of every module it ran in and of its LM: lm.history is where DSPy's
    # docs sum the cost, sub-module.inspect_history() shows a step's prompt; the pool's calls land in the same ones
    program, _ = define(shell, '''
from dspex_nb import demo_lm

class TwoSteps(dspy.Module):
    def __init__(self):
        super().__init__()
        self.topic = dspy.ChainOfThought("question -> topic")
        self.answer = dspy.Predict("question, topic -> answer")
        self.answer.set_lm(demo_lm())  # a predictor with an LM of its own: its calls are in that LM's history

    def forward(self, question):
        return self.answer(question=question, topic=self.topic(question=question).topic)

program = TwoSteps()
''')

    def histories() -> dict[str, int]:
        return {name: len(module.history) for name, module in program.named_sub_modules()} | {
            "lm": len(demo_lm.history), "own lm": len(program.answer.lm.history)}

    with dspy.context(lm=demo_lm):
        before = histories()
        program(question="Whose history?")
        in_kernel = {name: count - before[name] for name, count in histories().items()}
        assert in_kernel == {"self": 2, "self.topic": 1, "self.topic.predict": 1, "self.answer": 1, "lm": 1,
                             "own lm": 1}
        for run in (lambda: pool.run(program, question="Whose history?"),
                    lambda: pool.run_stream(program, question="Whose history?").result(60)):
            before = histories()
            run()
            assert {name: count - before[name] for name, count in histories().items()} == in_kernel
        assert demo_lm.history[-1]["messages"] == program.topic.predict.history[-1]["messages"]


def test_the_pools_calls_of_an_lm_a_module_holds_join_that_lms_history(
        shell: InteractiveShell, pool: Pool, demo_lm: dspy.LM) -> None:
    # DSPy's PAPILLON tutorial: a module keeps an "untrusted" LM and calls it itself; that call is in the held LM's
    # history, the predictor's in the kernel's LM's, also where both LMs are of one model
    program, _ = define(shell, '''
from dspex_nb import demo_lm

class Papillon(dspy.Module):
    def __init__(self, untrusted_model):
        self.craft = dspy.Predict("user_query -> llm_request")
        self.untrusted_model = untrusted_model

    def forward(self, user_query):
        llm_request = self.craft(user_query=user_query).llm_request
        return dspy.Prediction(llm_request=llm_request, llm_response=self.untrusted_model(llm_request)[0])

program = Papillon(untrusted_model=demo_lm())
''')

    def histories() -> tuple[int, int]:
        return len(demo_lm.history), len(program.untrusted_model.history)

    with dspy.context(lm=demo_lm):
        before = histories()
        program(user_query="My name is Ann; write my cover letter")
        assert [after - count for after, count in zip(histories(), before, strict=True)] == [1, 1]
        for run in (lambda: pool.run(program, user_query="My name is Ann; write my cover letter"),
                    lambda: pool.run_stream(program, user_query="My name is Ann; write my cover letter").result(60)):
            before = histories()
            run()
            assert [after - count for after, count in zip(histories(), before, strict=True)] == [1, 1]
            assert program.untrusted_model.history[-1]["prompt"].startswith("Demo LM answer")


def test_the_pools_calls_of_lms_a_module_holds_in_a_list_or_dict_join_their_histories(
        shell: InteractiveShell, pool: Pool, demo_lm: dspy.LM) -> None:
    # was: only an LM held in an attribute itself got its calls; those in self.lms[1] went to the kernel's DSPy LM
    program, _ = define(shell, '''
from dspex_nb import demo_lm

class Panel(dspy.Module):
    def __init__(self):
        super().__init__()
        self.qa = dspy.Predict("question -> answer")
        self.lms = [demo_lm(), demo_lm()]
        self.judges = {"strict": demo_lm()}

    def forward(self, question):
        with dspy.context(lm=self.lms[1]):
            answer = self.qa(question=question).answer
        return dspy.Prediction(answer=answer, verdict=self.judges["strict"](answer)[0])

program = Panel()
''')

    def histories() -> list[int]:
        return [len(lm.history) for lm in (demo_lm, *program.lms, program.judges["strict"])]

    with dspy.context(lm=demo_lm):
        before = histories()
        program(question="Who judges?")
        in_kernel = [after - count for after, count in zip(histories(), before, strict=True)]
        assert in_kernel == [0, 0, 1, 1]
        before = histories()
        pool.run(program, question="Who judges?")
        assert [after - count for after, count in zip(histories(), before, strict=True)] == in_kernel


def test_history_entries_made_on_the_pool_have_dspys_keys_and_its_response(pool: Pool, demo_lm: dspy.LM) -> None:
    # was: no "response" key (lm.history[-1]["response"] raised KeyError after a pool call)
    qa = dspy.Predict("question -> answer")
    with dspy.context(lm=demo_lm):
        qa(question="Which keys?")
        in_kernel = demo_lm.history[-1]
        pool.run(qa, question="Which keys?")
        on_pool = demo_lm.history[-1]
    assert on_pool is not in_kernel and on_pool.keys() == in_kernel.keys()
    response, expected = on_pool["response"], in_kernel["response"]
    assert type(response) is type(expected)  # the object DSPy's LM made (an lm15 Response), rebuilt
    assert (response.text, response.model, response.usage) == (expected.text, expected.model, expected.usage)


def _last_lm_call() -> str:
    import io

    shown = io.StringIO()
    dspy.inspect_history(n=1, file=shown)
    return shown.getvalue()


def test_inspect_history_shows_the_last_lm_call_of_a_program_that_makes_many(
        shell: InteractiveShell, pool: Pool) -> None:
    # a call brings back at most its newest 100 entries: the last call is the one inspect_history(n=1) shows
    program, _ = define(shell, '''
qa = dspy.Predict("question -> answer")

def program(question):
    for i in range(105):
        answer = qa(question=f"{question} number {i}")
    return answer
''')
    assert pool.run(program, question="Many calls").answer.startswith("Demo LM answer to 'Many calls number 104'")
    assert "Many calls number 104" in _last_lm_call()


def test_history_entries_that_are_not_plain_json_come_back_readable(shell: InteractiveShell, pool: Pool) -> None:
    # an LM's tool calls are the provider's objects (litellm's, pydantic models): inspect_history reads their
    # fields; a dict key that JSON has no form for is left out rather than failing the call
    program, _ = define(shell, '''
def program(question):
    from litellm import ModelResponse
    from litellm.types.utils import ChatCompletionMessageToolCall, Choices, Function, Message

    class ToolLM(dspy.BaseLM):
        def forward(self, prompt=None, messages=None, **kwargs):
            call = ChatCompletionMessageToolCall(id="c1", type="function",
                                                 function=Function(name="search", arguments='{"q": "tides"}'))
            return ModelResponse(model="tool-lm", choices=[Choices(message=Message(content="hi", tool_calls=[call]))])

    outputs = ToolLM("tool-lm")(messages=[{"role": "user", "content": question}], metadata={("a", 1): "x"})
    return outputs[0]["text"]
''')
    assert pool.run(program, question="Which tool?") == "hi"
    shown = _last_lm_call()
    assert "Which tool?" in shown and 'search: {"q": "tides"}' in shown
    from dspy.clients.base_lm import GLOBAL_HISTORY

    response = GLOBAL_HISTORY[-1]["response"]  # litellm's ModelResponse, which the kernel does not rebuild: its fields
    assert response["model"] == "tool-lm" and response["choices"][0]["message"]["content"] == "hi"
    assert response["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "search"


@pytest.fixture(scope="module")
def small_pool() -> Iterator[Pool]:
    with Pool(workers=1, lm="demo", max_message_mb=1, journal=False) as p:
        yield p


def test_a_programs_history_never_makes_its_result_too_large(shell: InteractiveShell, small_pool: Pool) -> None:
    # each entry holds the whole prompt: six calls over a 240 KB document are over a 1 MiB message, the
    # program's own output is not; the newest entries that fit come back
    program, _ = define(shell, '''
qa = dspy.Predict("document, question -> answer")

def program(document, question):
    for i in range(6):
        answer = qa(document=document, question=f"{question} {i}")
    return answer
''')
    for run in (small_pool.run, lambda *a, **kw: small_pool.run_stream(*a, **kw).result(60)):
        result = run(program, document="lorem ipsum " * 20_000, question="Large history")
        assert result.answer.startswith("Demo LM answer")
        assert "Large history 5" in _last_lm_call()



@pytest.mark.parametrize("track_usage", [True, False])
def test_predictions_get_their_lm_usage_as_in_the_kernel(track_usage: bool, shell: InteractiveShell, pool: Pool,
                                                         demo_lm: dspy.LM) -> None:
    # DSPy sets a module's usage on its prediction when track_usage is on and no tracker is open yet: the
    # kernel's setting (dspy.configure / dspy.context) or the program's own dspy.context holds on the pool too
    function, _ = define(shell, '''
qa = dspy.Predict("question -> answer")

def program(question):
    first, second = qa(question=question), qa(question=question + "?")
    return dspy.Prediction(first=first.get_lm_usage(), answer=second.answer, second=second.get_lm_usage())
''')
    module, _ = define(shell, '''
class Tracked(dspy.Module):
    def __init__(self):
        super().__init__()
        self.qa = dspy.Predict("question -> answer")

    def forward(self, question):
        with dspy.context(track_usage=True):
            return dspy.Prediction(inner=self.qa(question=question).get_lm_usage(), top=self.qa(question=question))

program = Tracked()
''')
    returned, _ = define(shell, 'qa = dspy.Predict("question -> answer")\n\ndef program(question):\n'
                                '    qa(question=question + "!")\n    return qa(question=question)')
    with dspy.context(lm=demo_lm, track_usage=track_usage):
        for program in (function, module, returned):
            expected = program(question="Whose usage?")
            for result in (pool.run(program, question="Whose usage?"),
                           pool.run_stream(program, question="Whose usage?").result(60),
                           *pool.map(program, ["Whose usage?"], journal=False).result(60)):
                assert_same(expected, result)
                if "top" in expected:
                    assert result.top.get_lm_usage() == expected.top.get_lm_usage()
                if track_usage:
                    assert result.get_lm_usage() == expected.get_lm_usage()
                else:  # the kernel's prediction has none: the pool's has the call's usage (README, "Usage")
                    assert result.get_lm_usage()["demo/demo"]["prompt_tokens"] > 0
        assert (expected.get_lm_usage() is not None) is track_usage  # returned: its last call's usage
        assert (function(question="Whose usage?").first is not None) is track_usage
        assert (module(question="Whose usage?").inner is not None) is not track_usage  # a tracker was open
        total = pool.run(module, question="Whose usage?").get_lm_usage()["demo/demo"]["prompt_tokens"]
        batch = pool.map(module, ["Whose usage?", "Whose usage?"], journal=False)
        batch.result(60)
        assert batch.tokens_in == 2 * total > 0


def test_dspy_track_usage_counts_the_pools_calls_as_the_kernels(shell: InteractiveShell, pool: Pool,
                                                                demo_lm: dspy.LM) -> None:
    # DSPy's docs read a program's usage with `with dspy.track_usage() as usage: ...; usage.get_total_tokens()`;
    # and with track_usage on, a kernel module whose forward runs its predictor on the pool gets that usage too
    shell.user_ns["pool"] = pool
    program, _ = define(shell, '''
program = dspy.ChainOfThought("question -> answer")

class OnPool(dspy.Module):
    def __init__(self):
        super().__init__()
        self.qa = dspy.Predict("question -> answer")

    def forward(self, question):
        return dspy.Prediction(answer=pool.run(self.qa, question=question).answer)
''')
    totals = {}
    with dspy.context(lm=demo_lm):
        for where, call in {"kernel": lambda: program(question="Why?"),
                            "run": lambda: pool.run(program, question="Why?"),
                            "run_stream": lambda: pool.run_stream(program, question="Why?")}.items():
            with dspy.track_usage() as usage:
                result = call()
            if where == "run_stream":
                result.result(60), result.result(60)  # read twice, counted once
            totals[where] = usage.get_total_tokens()
        with dspy.context(track_usage=True):
            expected = dspy.Predict("question -> answer")(question="Why?").get_lm_usage()
            on_pool = shell.user_ns["OnPool"]()(question="Why?").get_lm_usage()
    assert totals["kernel"]["demo/demo"]["prompt_tokens"] > 0
    assert totals["run"] == totals["run_stream"] == totals["kernel"]
    assert on_pool == expected


def test_threads_a_program_starts_call_the_lm_as_in_the_kernel(shell: InteractiveShell, pool: Pool,
                                                                demo_lm: dspy.LM) -> None:
    # DSPy: "user threads work", seeing what dspy.configure set; on a worker they found no LM
    program, _ = define(shell, '''
import threading
from concurrent.futures import ThreadPoolExecutor

qa = dspy.Predict("question -> answer")

def program(questions: list[str]):
    with ThreadPoolExecutor(2) as executor:
        answers = list(executor.map(lambda q: qa(question=q).answer, questions))
    thread = threading.Thread(target=lambda: answers.append(qa(question="And then?").answer))
    thread.start()
    thread.join()
    return answers
''')
    inputs = {"questions": ["Why?", "How?"]}
    before = dspy.settings.lm
    dspy.configure(lm=demo_lm)
    try:
        expected = program(**inputs)
    finally:
        dspy.configure(lm=before)
    assert_same(expected, pool.run(program, **inputs), "run")
    assert_same(expected, pool.run_stream(program, **inputs).result(60), "run_stream")
    assert_same([expected], pool.map(program, [inputs], journal=False).result(60), "map")


def test_a_streamed_call_under_the_xml_adapter_gives_the_kernels_answer(shell: InteractiveShell, pool: Pool,
                                                                        demo_lm: dspy.LM) -> None:
    # DSPy retries with JSONAdapter where a reply does not parse, but not once a stream showed some of it: the
    # demo LM answered in ChatAdapter's format only, so run_stream (and the magics, which stream) failed with an
    # AdapterParseError where the kernel's call answered
    program, _ = define(shell, '''
class Pirate(dspy.Module):
    def __init__(self):
        super().__init__()
        self.qa = dspy.ChainOfThought("question -> answer, tags: list[str], score: float")

    def forward(self, question):
        with dspy.context(adapter=dspy.XMLAdapter()):  # a program's own adapter
            return self.qa(question=question)

program = Pirate()
''')
    qa = program.qa
    with dspy.context(lm=demo_lm):
        for run, inputs in ((program, {"question": "Why <so> & how?"}),
                            (qa, {"question": "Why?"})):  # the kernel's adapter, which travels with the call
            with dspy.context(adapter=dspy.XMLAdapter()):
                expected = run(**inputs)
                assert_same(expected, pool.run(run, **inputs), "run")
                assert_same(expected, pool.run_stream(run, **inputs).result(60), "run_stream")


@pytest.mark.parametrize("adapter", ["NotebookAdapter()", "dspy.TwoStepAdapter(extraction_model)"])
def test_a_streamed_call_under_an_adapter_dspy_cannot_stream_gives_the_kernels_answer(
        adapter: str, shell: InteractiveShell, pool: Pool, demo_lm: dspy.LM) -> None:
    # DSPy's StreamListener reads ChatAdapter's, JSONAdapter's and XMLAdapter's replies only, by class name:
    # under another adapter run_stream (and the magics) failed with "Unsupported adapter for streaming"
    program, _ = define(shell, f'''
import dspex_nb

class NotebookAdapter(dspy.JSONAdapter):
    """An adapter of the notebook's own."""

extraction_model = dspex_nb.demo_lm()
adapter = {adapter}
program = dspy.ChainOfThought("question -> answer")
''')
    with dspy.context(lm=demo_lm, adapter=shell.user_ns["adapter"]):
        expected = program(question="Why?")
        assert_same(expected, pool.run(program, question="Why?"), "run")
        run = pool.run_stream(program, question="Why?")
        assert_same(expected, run.result(60), "run_stream")
    assert any("cannot read the fields of" in chunk.get("message", "")
               for chunk in run.chunks if chunk.kind == "status")


def test_a_kernel_with_a_hash_seed_orders_sets_of_strings_as_its_workers(shell: InteractiveShell,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # list(set(...)) follows Python's per-process string hash (DSPy's modules page's Hop returns one): the README
    # says to set PYTHONHASHSEED in the kernel's environment, which its workers inherit
    monkeypatch.setenv("PYTHONHASHSEED", "1234")
    program, _ = define(shell, '''
def program(words: list[str]):
    import os
    return dspy.Prediction(seed=os.environ.get("PYTHONHASHSEED"), order=list(set(words)))
''')
    words = [f"word{i}" for i in range(20)]
    with Pool(workers=1, lm="demo") as pool:
        result = pool.run(program, words=words)
    assert result.seed == "1234"
    kernel = subprocess.run([sys.executable, "-c", f"print(list(set({words!r})))"], capture_output=True, text=True,
                            check=True, env={**os.environ, "PYTHONHASHSEED": "1234"}).stdout  # a kernel with that seed
    assert str(result.order) == kernel.strip()


def test_an_lm_that_changes_itself_as_it_answers_gives_the_next_answer_as_in_the_kernel(pool: Pool) -> None:
    # DSPy's DummyLM given a list gives its next answer at each call: a call on the pool took the next answer of the
    # worker's copy only, so the kernel's LM gave its next call the first answer again ('red', 'red'); then the pool
    # refused such an LM, after it had answered
    from dspy.utils import DummyLM

    program, question = dspy.Predict("question -> answer"), "What color is the sky?"
    answers = [{"answer": "red"}, {"answer": "blue"}, {"answer": "green"}]
    with dspy.context(lm=DummyLM(answers)):  # as in the kernel: red, blue, green
        assert [pool.run(program, question=question).answer, pool.run_stream(program, question=question).result(60)
                .answer, program(question=question).answer] == ["red", "blue", "green"]
    program.set_lm(DummyLM(answers))  # the program's own LM, as set_lm gives it
    assert [pool.run(program, question=question).answer for _ in answers] == ["red", "blue", "green"]
    with dspy.context(lm=DummyLM(answers)), pytest.warns(LMStateNotKept, match="in a batch, each worker changes"):
        assert pool.map(dspy.Predict("question -> answer"), [question], journal=False).result(60)[0].answer == "red"


def test_two_calls_in_flight_on_one_changing_lm_say_that_the_second_change_is_not_kept(pool: Pool) -> None:
    # two calls sent before either came back each changed a copy of the LM as the kernel had it: the second set its
    # count over the first's, without a word (1 call counted of 2)
    from dspy.utils import DummyLM

    class Counting(DummyLM):
        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.calls = getattr(self, "calls", 0) + 1
            return super().forward(*args, **kwargs)

    program, question = dspy.Predict("question -> answer"), "What color is the sky?"
    counting = Counting({question: {"answer": "blue"}})
    with dspy.context(lm=counting):
        first, second = (pool.run_stream(program, question=question) for _ in range(2))
        assert first.result(60).answer == "blue"
        with pytest.warns(LMStateNotKept, match=r"\['calls'\] .*another call on the pool changed it since this one "
                                                "was sent"):
            assert second.result(60).answer == "blue"
        assert counting.calls == 1  # the first call's change, kept
        assert pool.run(program, question=question).answer == "blue"  # sent after: its change is kept
    assert counting.calls == 2
    judged = Judged(counting)  # the context's LM, held by the program too: two copies on the worker
    with dspy.context(lm=counting), pytest.warns(LMStateNotKept, match="on the pool it was also the LM that the "
                                                                       "program holds in self.judge"):
        assert pool.run(judged, question=question).answer == "blue"
    assert counting.calls == 3  # one of its two calls


def test_two_results_read_at_once_keep_one_change_of_their_lm() -> None:
    # Was: keep_lm_state checked the kernel LM's version, then set a call's change on it, without a lock: two calls'
    # results read at once (two threads, a view's pump and a cell) both found the version they were sent at, and both
    # set their change, the second over the first, without a word
    from dspex_nb import programs
    from dspex_nb.wire import LM_VERSION

    entered, go = threading.Event(), threading.Event()

    class Held:  # an LM whose code holds the first change half-way through being set
        def __setattr__(self, name: str, value: Any) -> None:
            if name == "calls" and not entered.is_set():
                entered.set()
                go.wait(30)
            object.__setattr__(self, name, value)

    lm = Held()

    def keep(calls: int) -> threading.Thread:
        change = {"lm": None, "label": "dspy.context set around this call", "name": "Held ''", "changed": ["calls"],
                  "removed": [], "version": 0, "attributes": {"calls": typed.encode(calls)}}
        thread = threading.Thread(target=programs.keep_lm_state, args=([change], {}, lm, typed.Resolver()))
        thread.start()
        return thread

    first = keep(1)
    assert entered.wait(30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = keep(5)
        second.join(1)  # it waits for the first (or, without the lock, sets its change now)
        go.set()
        first.join(30)
        second.join(30)
    assert (lm.calls, getattr(lm, LM_VERSION)) == (1, 1)
    assert [str(w.message) for w in caught] == [
        "the LM Held '' that dspy.context set around this call changed its attribute(s) ['calls'] as it answered on "
        "the pool, but another call on the pool changed it since this one was sent: its change is kept, not this "
        "one's (in the kernel, this one would have started where that one left)"]


def test_an_lm_that_counts_its_calls_in_a_slot_gives_the_count_as_in_the_kernel(pool: Pool) -> None:
    # Was: the attributes of an LM that changed as it answered were read from its __dict__ only: one in __slots__
    # (a count) changed on the worker's copy alone, though the README says the kernel's LM takes every change
    program, question = dspy.Predict("question -> answer"), "What color is the sky?"
    counting = Slotted({question: {"answer": "blue"}})
    with dspy.context(lm=counting):
        assert [pool.run(program, question=question).answer,
                pool.run_stream(program, question=question).result(60).answer] == ["blue", "blue"]
        assert counting.calls == 2
        program(question=question)  # in the kernel: it goes on from there
    assert counting.calls == 3


class Slotted(DummyLM):  # an LM class that travels by reference (as an installed package's): its slot with it
    __slots__ = ("calls",)

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        self.calls = getattr(self, "calls", 0) + 1
        return super().forward(*args, **kwargs)


class Judged(dspy.Module):
    def __init__(self, judge: dspy.BaseLM) -> None:
        super().__init__()
        self.judge, self.predict = judge, dspy.Predict("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        self.judge(question)
        return self.predict(question=question)


class AnswerChecked(dspy.Module):
    """A program that raises once its LM answered: "red" is not an answer it takes."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        prediction = self.predict(question=question)
        if prediction.answer == "red":
            raise ValueError("the sky is not red")
        return prediction


@pytest.mark.parametrize("how", ["run", "run_stream", "run_async", "held"])
def test_an_lm_that_changed_itself_before_its_program_raised_keeps_the_change(pool: Pool, how: str) -> None:
    # in the kernel, a DummyLM given a list has given its answer when the program raises: a retry gets the next one;
    # from the pool, the change came back with a result only, so each retry got the first answer again, for ever
    from dspy.utils import DummyLM

    program, question = AnswerChecked(), "What color is the sky?"
    lm = DummyLM([{"answer": "red"}, {"answer": "blue"}])
    call = {"run": lambda: pool.run(program, question=question),
            "run_stream": lambda: pool.run_stream(program, question=question).result(60),
            "run_async": lambda: asyncio.run(pool.run_async(program, question=question)),
            "held": lambda: pool.run(program, question=question)}[how]
    if how == "held":
        program.set_lm(lm)
    with dspy.context(lm=lm) if how != "held" else contextlib.nullcontext():
        with pytest.raises(ValueError, match="the sky is not red"):
            call()
        assert call().answer == "blue"


@pytest.mark.parametrize("loop", ["for", "async for"])
def test_a_stream_only_looped_over_leaves_the_history_and_the_lm_as_the_call_left_them(pool: Pool, loop: str) -> None:
    # what the call did in the kernel (its LM call in the LM's history, the DummyLM's next answer) came only with
    # result(): a loop over the chunks that never asked for it left the LM giving 'red' again and no history
    from dspy.utils import DummyLM

    async def chunks_of(run: Any) -> list[Any]:
        return [chunk async for chunk in run]

    program, question = dspy.Predict("question -> answer"), "What color is the sky?"
    lm = DummyLM([{"answer": "red"}, {"answer": "blue"}])
    with dspy.context(lm=lm):
        run = pool.run_stream(program, question=question)
        chunks = list(run) if loop == "for" else asyncio.run(chunks_of(run))
        assert chunks[-1].kind == "final" and len(lm.history) == 1
        assert run.result().answer == "red" and len(lm.history) == 1  # asked for after all: nothing happens twice
        assert pool.run(program, question=question).answer == "blue"


def test_a_cell_run_again_with_a_new_changing_lm_gives_its_answers_again(small_pool: Pool) -> None:
    # the worker kept the LM a call came with, by its pickle, and the call changed that one: a new DummyLM given the
    # same list (the cell run again) started where the first had left ('blue', 'green', then no answer left)
    from dspy.utils import DummyLM

    program, question = dspy.Predict("question -> answer"), "What color is the sky?"
    for _ in range(2):
        with dspy.context(lm=DummyLM([{"answer": "red"}, {"answer": "blue"}])):
            assert [small_pool.run(program, question=question).answer for _ in range(2)] == ["red", "blue"]


def test_an_iterator_over_a_list_travels_as_one_over_the_items_it_has_left() -> None:
    items = iter([1, (2, 3), "x"])  # as DSPy's DummyLM keeps its answers
    next(items)
    back = typed.decode(typed.encode(items))
    assert type(back) is type(items) and list(back) == [(2, 3), "x"] == list(items)
    assert list(typed.decode(typed.encode(items))) == []  # once at its end


def test_an_lm_that_refuses_its_changes_in_the_kernel_keeps_the_answer(pool: Pool) -> None:
    # the kernel's setattr of a changed attribute raised (an LM's own __setattr__ or a property without a setter):
    # the call failed with that error after the LM had answered on the pool
    from dspy.utils import DummyLM

    class Sealed(DummyLM):  # counts its calls where no one may set the count
        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.__dict__["calls"] = self.__dict__.get("calls", 0) + 1
            return super().forward(*args, **kwargs)

        def __setattr__(self, name: str, value: Any) -> None:
            if name == "calls":
                raise AttributeError("calls is counted, not set")
            super().__setattr__(name, value)

    program, question = dspy.Predict("question -> answer"), "What color is the sky?"
    with dspy.context(lm=Sealed({question: {"answer": "blue"}})):
        with pytest.warns(LMStateNotKept, match=r"the kernel's LM refused to take them \(AttributeError: calls is"):
            assert pool.run(program, question=question).answer == "blue"


def test_an_lm_whose_change_cannot_come_back_keeps_its_answer_and_is_refused_next(pool: Pool) -> None:
    from dspy.utils import DummyLM

    class Counting(DummyLM):  # a notebook's LM that keeps count of its calls, and one value JSON has no form for
        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.calls = getattr(self, "calls", 0) + 1
            return super().forward(*args, **kwargs)

    program, question = dspy.Predict("question -> answer"), "What color is the sky?"
    counting = Counting({question: {"answer": "blue"}})
    with dspy.context(lm=counting):
        assert [pool.run(program, question=question).answer for _ in range(2)] == ["blue", "blue"]
    assert counting.calls == 2  # as two calls in the kernel leave it
    odd = Counting({question: {"answer": "blue"}})
    odd.calls = 1j  # a complex: 1j + 1 has no JSON form
    with dspy.context(lm=odd):
        with pytest.warns(LMStateNotKept, match=r"changed its attribute\(s\) \['calls'\] on the pool as it "
                                                r"answered, which cannot come back.*this answer is kept"):
            assert pool.run(program, question=question).answer == "blue"
        with pytest.raises(NotPortable, match="Counting 'dummy' that dspy.context set around this call changed its "
                                              r"attribute\(s\) \['calls'\] on the pool"):
            pool.run(program, question=question)




def test_a_class_defined_again_in_a_later_cell_leaves_the_programs_values_of_its_own_class(
        shell: InteractiveShell, pool: Pool, demo_lm: dspy.LM) -> None:
    # the class cell run again after the program's: the signature still names the first Item9, which DSPy parses
    # its output as, while the pool's output came back as the second (the one of that path the kernel saw last)
    program, _ = define(shell, '''
class Item9(BaseModel):
    name: str

class Use9(dspy.Signature):
    item: Item9 = dspy.InputField()
    out: Item9 = dspy.OutputField()

program = dspy.Predict(Use9)
''')
    shell.run_cell("class Item9(BaseModel):\n    name: str").raise_error()
    old, new = shell.user_ns["Use9"].output_fields["out"].annotation, shell.user_ns["Item9"]
    assert old is not new
    inputs = {"item": new(name="new")}
    devset = [dspy.Example(**inputs).with_inputs("item")]
    with dspy.context(lm=demo_lm):
        expected = program(**inputs)
        score = dspy.Evaluate(devset=devset, metric=lambda example, pred, trace=None: type(pred.out) is old)(program)
    assert type(expected.out) is old and score.score == 100
    assert_same(expected, pool.run(program, **inputs), "run")
    assert_same(expected, pool.run_stream(program, **inputs).result(60), "run_stream")
    assert_same([expected, expected], pool.map(program, [inputs, inputs], journal=False).result(60), "map")
    assert pool.evaluate(program, devset, lambda example, pred, trace=None: type(pred.out) is old,
                         journal=False).score == 100
    returned = program_returning_its_inputs(shell)  # each input comes back as the class it was sent as
    assert_same({"a": inputs["item"], "b": old(name="old")},
                pool.run(returned, a=inputs["item"], b=old(name="old")), "inputs of two classes of one path")


def program_returning_its_inputs(shell: InteractiveShell) -> Any:
    shell.run_cell("def echo9(a, b):\n    return {'a': a, 'b': b}").raise_error()
    return shell.user_ns["echo9"]


def test_a_signature_with_two_classes_of_one_path_gives_each_field_its_own(shell: InteractiveShell, pool: Pool,
                                                                          demo_lm: dspy.LM) -> None:
    # was: NotPortable "the state of a Shadow has names it does not declare" (both read as the last Shadow)
    program, _ = define(shell, '''
class Shadow(BaseModel):
    old: str

OldShadow = Shadow

class Shadow(BaseModel):
    new: int

class Both(dspy.Signature):
    first: OldShadow = dspy.InputField()
    second: Shadow = dspy.OutputField()
    third: OldShadow = dspy.OutputField()

program = dspy.Predict(Both)
''')
    inputs = {"first": shell.user_ns["OldShadow"](old="x")}
    with dspy.context(lm=demo_lm):
        expected = program(**inputs)
    assert type(expected.second) is shell.user_ns["Shadow"] and type(expected.third) is shell.user_ns["OldShadow"]
    assert_same(expected, pool.run(program, **inputs), "run")
    assert_same([expected], pool.map(program, [inputs], journal=False).result(60), "map")
