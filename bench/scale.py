"""How a batch scales with the pool: 1, 2, 4, ... workers up to the machine's cores, each next to in-kernel
DSPy threads (``Module.batch``) at the same total concurrency and to the ideal rate of the LM, in one run.

Run ``python bench/scale.py [--items N] [--latency S] [--concurrency K]``. Every LM is the demo LM with a
fixed time to first token, so the figures measure the machinery, not a provider.
"""

from __future__ import annotations

import argparse
import os
import time

import dspy

from dspex_nb import Pool, demo_lm

SIGNATURE = "question -> answer"


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
    print(f"{'workers':>8}{'pool items/s':>14}{'threads items/s':>17}{'ideal':>9}{'vs threads':>12}{'vs ideal':>10}")
    for n in counts:
        questions = [f"scale {n} question {i}?" for i in range(args.items)]  # new prompts: no cache hit
        ours = pool_rate(n, questions, args.latency, args.concurrency)
        threads = threads_rate(n * args.concurrency, [f"threads {q}" for q in questions], args.latency)
        ideal = n * args.concurrency / args.latency
        print(f"{n:>8}{ours:>14.0f}{threads:>17.0f}{ideal:>9.0f}{ours / threads:>11.2f}x{ours / ideal:>9.2f}x")


if __name__ == "__main__":
    main()
