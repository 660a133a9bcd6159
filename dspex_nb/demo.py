"""The main job, ``python -m dspex_nb demo``: a pool on the demo LM streaming to the terminal."""

from __future__ import annotations

import sys
import time

from dspex_nb.api import Chunk, Pool
from dspex_nb.words import count

QUESTIONS = ["What is DSPy?", "Why stream tokens?", "How does gRPC stream?", "What is a worker pool?",
             "Why use Unix sockets?"]


def run_demo(workers: int = 2, items: int = 20, out=sys.stdout) -> int:
    start = time.monotonic()
    with Pool(workers=workers, lm="demo", lm_kwargs={"per_token": 0.002}) as pool:
        out.write(f"pool of {count(workers, 'worker')} ready in {time.monotonic() - start:.2f} s\n")

        out.write("\n-- token stream: chain_of_thought('question -> answer') --\n")
        field = None

        def show_token(chunk: Chunk) -> None:
            nonlocal field
            if chunk.kind == "token":
                if chunk["field"] != field:
                    field = chunk["field"]
                    out.write(f"\n[{field}] ")
                out.write(chunk["text"])
                out.flush()

        pool.execute_stream("chain_of_thought", {"signature": "question -> answer",
                                                 "inputs": {"question": "What makes a good pool?"}},
                            on_chunk=show_token).result()

        out.write(f"\n\n-- batch_inference: {count(items, 'item')} --\n")
        batch = [{"question": f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})"} for i in range(items)]
        seen = 0

        def show_item(chunk: Chunk) -> None:
            nonlocal seen
            if chunk.kind == "item":
                seen += 1
                status = "ok" if chunk["ok"] else f"failed: {chunk['error']['message']}"
                out.write(f"[{seen:>3}/{items}] item {chunk['index']:>3} {status}\n")

        run = pool.execute_stream("batch_inference", {"signature": "question -> answer", "batch_items": batch,
                                                      "concurrency": 4}, on_chunk=show_item)
        result = run.result()
        out.write(f"done: {result['ok']} ok, {result['failed']} failed in {run.elapsed:.2f} s\n")
        out.write(f"first answer: {result['results'][0]['result']['answer']}\n")
        for row in pool.status():
            out.write(f"  {row['worker']}: pid {row['pid']} {row['state']}, {count(row['done'], 'call')} done,"
                      f" {count(row['items'], 'batch item')}\n")
    return 0 if result["failed"] == 0 else 1
