"""Nothing from a worker or the journal runs code in the kernel: typed JSON names only classes that
travelled with the program (or DSPy's own), and only as the kind of class it claims to be."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from dspex_nb import Pool
from dspex_nb.journal import Journal
from dspex_nb.typed import NotPortable, Resolver, decode

GADGETS = [
    {"__dspex__": "enum", "class": "subprocess:Popen", "value": ["touch", "MARK"]},
    {"__dspex__": "dataclass", "class": "subprocess:Popen", "fields": {"args": ["touch", "MARK"]}},
    {"__dspex__": "model", "class": "os:system", "json": '"touch MARK"'},
    {"__dspex__": "enum", "class": "builtins:eval", "value": "__import__('os').system('touch MARK')"},
]


@pytest.mark.parametrize("gadget", GADGETS)
def test_a_class_that_did_not_travel_with_the_program_is_refused(gadget: dict, tmp_path: Path) -> None:
    mark = tmp_path / "pwned"
    payload = json.loads(json.dumps(gadget).replace("MARK", str(mark)))
    with pytest.raises(NotPortable, match="did not travel with the program|is not a"):
        decode(payload, Resolver())
    assert not mark.exists()


def test_pydantic_types_other_than_urls_are_refused() -> None:
    import pydantic.networks  # noqa: F401  (imported, as wherever a value of its types exists)

    # ImportString would import (and run) any module named in the data
    with pytest.raises(NotPortable, match="not one of pydantic's URL types"):
        decode({"__dspex__": "pydantic", "class": "pydantic:ImportString", "json": '"this"'}, Resolver())
    url = {"__dspex__": "pydantic", "class": "pydantic.networks:HttpUrl", "json": '"https://dspy.ai/"'}
    assert str(decode(url, Resolver())) == "https://dspy.ai/"


def test_data_sets_only_the_names_a_class_declares() -> None:
    import dataclasses

    import dspy
    import pydantic

    @dataclasses.dataclass
    class Point:
        x: int

    class Person(pydantic.BaseModel):
        name: str

    class Scored(dspy.Prediction):
        def best(self) -> str:
            return "best"

    known = Resolver([Point, Person, Scored])
    swap = {"__dspex__": "dataclass", "class": f"{__name__}:{Point.__qualname__}", "fields": {"__class__": 1}}
    with pytest.raises(NotPortable, match=r"has no field\(s\) \['__class__'\]"):
        decode(swap, known)
    model = {"__dspex__": "model", "class": f"{__name__}:{Person.__qualname__}", "fields": {"name": "a", "age": 1},
             "set": ["name"], "extra": None, "private": None}
    with pytest.raises(NotPortable, match="names it does not declare"):
        decode(model, known)
    for name in ("best", "_store", "__class__", "answer"):  # a method, its state, a dunder, a field
        forged = {"__dspex__": "prediction", "class": f"{__name__}:{Scored.__qualname__}",
                  "fields": {"answer": "4"}, "attrs": {name: "forged"}}
        with pytest.raises(NotPortable, match="can get from data"):
            decode(forged, known)
    plain = decode({"__dspex__": "prediction", "fields": {"answer": "4"}, "attrs": {"answer": "forged"}}, known)
    assert plain.answer == "4" and type(plain) is dspy.Prediction  # a plain Prediction takes no attributes


def test_a_known_class_of_the_wrong_kind_is_refused() -> None:
    import enum

    class Color(enum.Enum):
        RED = "red"

    with pytest.raises(NotPortable, match="is not a dataclass class"):
        decode({"__dspex__": "dataclass", "class": f"{Color.__module__}:{Color.__qualname__}", "fields": {}},
               Resolver([Color]))


def test_a_tampered_journal_row_cannot_run_code(tmp_path: Path) -> None:
    journal_path, mark = tmp_path / "journal.sqlite3", tmp_path / "pwned"
    with Pool(workers=1, journal=journal_path) as pool:
        import dspy

        program = dspy.Predict("question -> answer")
        assert pool.map(program, ["q?"]).result(60)[0].answer.startswith("Demo LM answer to 'q?'")
        raw = sqlite3.connect(journal_path)
        evil = {"answer": {"__dspex__": "enum", "class": "subprocess:Popen", "value": ["touch", str(mark)]}}
        raw.execute("UPDATE items SET result = ?", (json.dumps(evil),))
        raw.commit()
        raw.close()
        again = pool.map(program, ["q?"])
        assert again.result(60) == [None]  # refused, as an item that failed
        assert again.records[0]["error"]["type"] == "NotPortable"
        assert "subprocess:Popen" in again.records[0]["error"]["message"]
    assert not mark.exists()


def test_a_journal_file_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("a file of another user needs root to make (chown)")
    path = tmp_path / "shared.sqlite3"
    path.touch(mode=0o666)
    os.chown(path, 65534, 65534)
    with pytest.raises(PermissionError, match="belongs to another user"):
        Journal(path)
    link = tmp_path / "link.sqlite3"
    link.symlink_to(tmp_path / "elsewhere.sqlite3")
    with pytest.raises(OSError):
        Journal(link)
