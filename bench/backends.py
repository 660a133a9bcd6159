"""The same work on the local backend and the Ray backend, in one run: a batch of 2,000 items on the demo
LM with a fixed latency, the per-call overhead (an ``echo`` round trip), and the time a pool of 16 takes to
be ready.

Run ``python bench/backends.py [--workers N] [--items M] [--latency S] [--ready 16]`` (``pip install -e
".[ray]"``). The Ray pool starts a local Ray instance of its own (``Pool(backend="ray")`` with no address)
and ends it. Figures are medians; ratios are Ray's over local's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from dspex_nb import Pool


def ready_time(backend: str, workers: int) -> float:
    started = time.perf_counter()
    with Pool(workers=workers, backend=backend, journal=False):
        return time.perf_counter() - started


def measure(backend: str, workers: int, items: int, latency: float, calls: int) -> dict[str, float]:
    with Pool(workers=workers, backend=backend, journal=False, lm_kwargs={"ttft": latency}) as pool:
        for _ in range(20):  # warm
            pool.execute("echo", {"x": 1})
        round_trips = []
        for _ in range(calls):
            started = time.perf_counter()
            pool.execute("echo", {"x": 1})
            round_trips.append(time.perf_counter() - started)
        questions = [f"question {i}?" for i in range(items)]
        started = time.perf_counter()
        batch = pool.batch(questions, "question -> answer")
        batch.result()
        elapsed = time.perf_counter() - started
    return {"items/s": items / elapsed, "echo p50 ms": statistics.median(round_trips) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.02, help="the demo LM's time to first token, s")
    parser.add_argument("--calls", type=int, default=200, help="echo round trips to time")
    parser.add_argument("--ready", type=int, default=16, help="workers of the pool whose ready time is timed")
    args = parser.parse_args()
    figures = {backend: measure(backend, args.workers, args.items, args.latency, args.calls)
               for backend in ("local", "ray")}
    for backend in ("local", "ray"):
        figures[backend][f"ready ({args.ready} workers) s"] = ready_time(backend, args.ready)
    print(f"{os.cpu_count()} cores; {args.workers} workers; {args.items} items; demo LM ttft {args.latency} s")
    print(f"{'figure':<26}{'local':>12}{'ray':>12}{'ray/local':>12}")
    for name in figures["local"]:
        local, ray = figures["local"][name], figures["ray"][name]
        print(f"{name:<26}{local:>12.2f}{ray:>12.2f}{ray / local:>11.2f}x")


if __name__ == "__main__":
    main()
