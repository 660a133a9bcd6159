"""How a batch scales with the pool: 1, 2, 4, ... workers up to the machine's cores, each next to in-kernel
DSPy threads (``Module.batch``) at the same total concurrency, to an ipyparallel cluster of as many engines
(a load-balanced ``map`` of 50-item chunks, each run with ``Module.batch`` at the same concurrency, as
``bench/peers.py`` does; skipped when ipyparallel is not installed) and to the ideal rate of the LM, in one run.

Run ``python bench/scale.py [--items N] [--latency S] [--concurrency K]``. Every LM is the demo LM with a
fixed time to first token, so the figures measure the machinery, not a provider.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dspy
from peers import _engine_batch

from dspex_nb import Pool, demo_lm

SIGNATURE = "question -> answer"
CHUNK = 50  # items per ipyparallel task


def pool_rate(workers: int, questions: list[str], latency: float, concurrency: int) -> float:
    with Pool(workers=workers, lm_kwargs={"ttft": latency}, journal=False, concurrency=concurrency) as pool:
        pool.batch(questions[:workers * concurrency], SIGNATURE).result()  # warm
        started = time.perf_counter()
        pool.batch(questions, SIGNATURE).result()
        return len(questions) / (time.perf_counter() - started)


def threads_rate(threads: int, questions: list[str], latency: float) -> float:
    examples = [dspy.Example(question=q).with_inputs("question") for q in questions]
    with dspy.context(lm=demo_lm(ttft=latency)):
        started = time.perf_counter()
        dspy.Predict(SIGNATURE).batch(examples, num_threads=threads, disable_progress_bar=True)
        return len(questions) / (time.perf_counter() - started)


def _importable(directory: str) -> None:
    """On an engine: make bench/ importable, so that ``peers._engine_batch`` travels by reference."""
    import sys

    sys.path.insert(0, directory)


@contextlib.contextmanager
def ipyparallel_cluster(engines: int) -> Iterator[Any]:
    """A client of a local ipyparallel cluster of ``engines``, each with DSPy imported; None when ipyparallel is
    not installed. One cluster serves every row (a row of n workers uses n of its engines): a cluster start
    takes seconds."""
    try:
        import ipyparallel as ipp
    except ImportError:
        yield None
        return
    cluster = ipp.Cluster(n=engines, log_level=40)
    client = cluster.start_and_connect_sync()
    try:
        client.wait_for_engines(engines, timeout=120)
        client[:].apply_sync(_importable, str(Path(__file__).resolve().parent))
        client[:].apply_sync(_engine_batch, ["warm"], 0.0, 1)  # each engine imports DSPy
        yield client
    finally:
        client.close()
        cluster.stop_cluster_sync()


def ipyparallel_rate(client: Any, engines: int, questions: list[str], latency: float, concurrency: int) -> float:
    """Items/s of ipyparallel's load-balanced map over ``engines`` engines of ``client``'s cluster."""
    view = client.load_balanced_view(targets=list(range(engines)))
    chunks = [questions[i:i + CHUNK] for i in range(0, len(questions), CHUNK)]
    started = time.perf_counter()
    view.map_sync(_engine_batch, chunks, [latency] * len(chunks), [concurrency] * len(chunks))
    return len(questions) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.02, help="the demo LM's time to first token, s")
    parser.add_argument("--concurrency", type=int, default=8, help="items in flight per worker")
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 1, help="default: the core count")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= min(cores, args.max_workers)] or [1]
    print(f"{cores} cores; {args.items} items; demo LM ttft {args.latency} s; {args.concurrency} in flight per worker")
    print(f"{'workers':>8}{'pool items/s':>14}{'threads items/s':>17}{'ipp items/s':>13}{'ideal':>9}"
          f"{'vs threads':>12}{'vs ipp':>9}{'vs ideal':>10}")
    with ipyparallel_cluster(counts[-1]) as client:
        for n in counts:
            questions = [f"scale {n} question {i}?" for i in range(args.items)]  # new prompts: no cache hit
            ours = pool_rate(n, questions, args.latency, args.concurrency)
            threads = threads_rate(n * args.concurrency, [f"threads {q}" for q in questions], args.latency)
            ipp = client and ipyparallel_rate(client, n, [f"ipp {q}" for q in questions], args.latency,
                                              args.concurrency)
            ideal = n * args.concurrency / args.latency
            ipp_cells = (f"{ipp:>13.0f}", f"{ours / ipp:>8.2f}x") if ipp else (f"{'-':>13}", f"{'-':>9}")
            print(f"{n:>8}{ours:>14.0f}{threads:>17.0f}{ipp_cells[0]}{ideal:>9.0f}{ours / threads:>11.2f}x"
                  f"{ipp_cells[1]}{ours / ideal:>9.2f}x")
    if client is None:
        print("ipyparallel is not installed (pip install 'ipyparallel>=9'): its column is empty", file=sys.stderr)


if __name__ == "__main__":
    main()
