"""``wire.loads`` reads what ``wire.dumps`` wrote on the other side, and any other JSON as ``json.loads`` does,
its errors too."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dspex_nb.wire import dumps, loads


@pytest.mark.parametrize("value", [{"x": 1}, [1, 2.5, None, True], "é \u2028 \ud800", {"a": {"b": [{}]}}, 0, ""])
def test_what_dumps_writes_reads_back_as_it_was(value: Any) -> None:
    assert loads(dumps(value)) == value


@pytest.mark.parametrize("data", [b' {"a": 1} ', '"é"'.encode(), b"[1]\n", '"x"'.encode("utf-16")])
def test_other_json_reads_as_json_loads_reads_it(data: bytes) -> None:
    assert loads(data) == json.loads(data)


@pytest.mark.parametrize("data", [b"", b"{", b'{"a": 1} x', b"\xff", b"[1,]"])
def test_what_is_not_json_raises_json_loads_error(data: bytes) -> None:
    with pytest.raises(ValueError) as ours:
        loads(data)
    with pytest.raises(ValueError) as theirs:
        json.loads(data)
    assert (type(ours.value), str(ours.value)) == (type(theirs.value), str(theirs.value))
