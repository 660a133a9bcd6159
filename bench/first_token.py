"""From ``%load_ext dspex_nb`` to the first token of a first ``%%dspex predict`` cell, cold, in one run.

Run ``python bench/first_token.py [--repeats N] [--pause S]``. Each repeat is a fresh Python process with an
IPython shell (what a kernel runs): it loads the extension, waits ``--pause`` seconds (0: Run All; a person
typing the next cell takes a few), runs ``%%dspex predict "question -> answer"`` on the demo LM and reports
when the first token reached the kernel and when the cell ended. The peer is in-kernel DSPy in a fresh
process: ``import dspy`` and a first token through ``dspy.streamify`` on the same demo LM, which is the
least any way of running DSPy from a kernel can take there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import asyncio, json, sys, time
pause, mode = float(sys.argv[1]), sys.argv[2]
if mode == "dspex":
    from IPython.testing.globalipapp import start_ipython
    from dspex_nb.pool import calls
    first = []
    add = calls.Run._add
    def _add(self, chunks):
        if not first and any(c.kind == "token" for c in chunks):
            first.append(time.monotonic())
        add(self, chunks)
    calls.Run._add = _add
    shell = start_ipython()
    t0 = time.monotonic()
    shell.run_line_magic("load_ext", "dspex_nb")
    time.sleep(pause)
    started = time.monotonic()
    shell.run_cell_magic("dspex", 'predict "question -> answer"', "What is a first token?")
    ended = time.monotonic()
    shell.run_line_magic("unload_ext", "dspex_nb")
    print(json.dumps({"first_token": first[0] - started + (started - t0 - pause), "cell": ended - started}))
else:
    t0 = time.monotonic()
    import dspy
    from dspex_nb import demo_lm
    program = dspy.streamify(dspy.Predict("question -> answer"),
                             stream_listeners=[dspy.streaming.StreamListener(signature_field_name="answer")])
    async def first_token():  # read to the end: leaving DSPy's stream early leaves its thread blocked
        at = None
        async for chunk in program(question="What is a first token?"):
            if at is None and isinstance(chunk, dspy.streaming.StreamResponse):
                at = time.monotonic()
        return at
    with dspy.context(lm=demo_lm()):
        at = asyncio.run(first_token())
    print(json.dumps({"first_token": at - t0, "cell": time.monotonic() - t0}))
"""


def run(mode: str, pause: float) -> dict[str, float]:
    env = dict(os.environ, DSPEX_NONINTERACTIVE="1")
    out = subprocess.run([sys.executable, "-c", CHILD, str(pause), mode], capture_output=True, text=True,
                         timeout=300, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _runs(rows: list[dict[str, float]]) -> str:
    return ", ".join(f"{row['first_token']:.2f}" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between %%load_ext and the cell")
    args = parser.parse_args()
    ours = [run("dspex", args.pause) for _ in range(args.repeats)]
    peer = [run("dspy", 0.0) for _ in range(args.repeats)]
    first = statistics.median(r["first_token"] for r in ours)
    peer_first = statistics.median(r["first_token"] for r in peer)
    print(f"{os.cpu_count()} cores; {args.repeats} cold runs each; pause between %load_ext and the cell: "
          f"{args.pause} s")
    print(f"  %load_ext -> first token (pause excluded): {first:.2f} s "
          f"(runs: {_runs(ours)}); "
          f"first cell {statistics.median(r['cell'] for r in ours):.2f} s")
    print(f"  in-kernel import dspy -> first token via dspy.streamify: {peer_first:.2f} s "
          f"(runs: {_runs(peer)})")
    print(f"  ratio {first / peer_first:.2f}x")


if __name__ == "__main__":
    main()
