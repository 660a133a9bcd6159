"""The README's main job, `python -m dspex_nb demo`, runs end to end on the demo LM."""

from __future__ import annotations

import subprocess
import sys


def test_demo_streams_tokens_and_a_batch() -> None:
    out = subprocess.run([sys.executable, "-m", "dspex_nb", "demo", "--items", "6"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pool of 2 workers ready in" in out.stdout
    assert "[reasoning] Demo LM reasoning about 'What makes a good pool?'" in out.stdout
    assert "[answer] Demo LM answer to 'What makes a good pool?'" in out.stdout
    assert sum(line.startswith("[") and "/6] item" in line for line in out.stdout.splitlines()) == 6
    assert "done: 6 ok, 0 failed in " in out.stdout
