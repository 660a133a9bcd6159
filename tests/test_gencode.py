"""The committed gRPC code in dspex_nb/_proto/ must be what proto/generate.py produces now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from helpers import ROOT


def load_generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_gencode_is_fresh(tmp_path: Path) -> None:
    generator = load_generator()
    generated = generator.generate(tmp_path)
    assert len(generated) == 3
    for path in generated:
        committed = ROOT / "dspex_nb" / "_proto" / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run `python proto/generate.py` and commit the result")


def test_generated_service_has_the_rpcs() -> None:
    from dspex_nb._proto import bridge_pb2

    methods = {m.name for m in bridge_pb2.DESCRIPTOR.services_by_name["Bridge"].methods}
    assert methods == {"Ping", "Describe", "Execute", "ExecuteStream"}
