"""dspex_nb against the peers a user would pick instead, in one run, as ratios.

Run ``python bench/peers.py [--workers N] [--items M]`` (peers in the ``bench`` extra: ipyparallel). It writes
``bench/RESULTS.md`` (machine, versions, date, each figure as a median with its spread, and the ratios).

Peers, each doing the same work on the same machine in the same run:

- **ipyparallel** (a local cluster of the same size): cluster start, ``apply_sync`` round trip, and a
  load-balanced ``map`` of the same DSPy program over the items (chunks of items, each run with
  ``Module.batch`` on an engine);
- **in-kernel DSPy**: ``Module.batch(num_threads=...)`` at the same total concurrency, and ``dspy.streamify``
  for the time to the first token;
- **multiprocessing** (a forkserver pool): ``apply`` round trip;
- the **ideal** batch rate of a fixed-latency LM: ``concurrency / latency``.

Every LM is the demo LM with a fixed time to first token (``--latency``), so the figures measure the
machinery, not a provider. Every process started here is ended before the script exits.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import dspy

from dspex_nb import Pool, demo_lm

HERE = Path(__file__).resolve().parent
SIGNATURE = "question -> answer"


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    """Wall seconds of ``repeat`` calls of ``fn``."""
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def summary(values: list[float]) -> tuple[float, float, float]:
    """Median and the interquartile range."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return statistics.median(values), q[0], q[2]


def _one() -> int:
    return 1


def _engine_batch(questions: list[str], latency: float, threads: int) -> list[str]:
    """On an ipyparallel engine: the same program as the pool runs, with Module.batch."""
    import dspy as engine_dspy

    from dspex_nb import demo_lm as engine_lm

    examples = [engine_dspy.Example(question=q).with_inputs("question") for q in questions]
    with engine_dspy.context(lm=engine_lm(ttft=latency)):
        results = engine_dspy.Predict("question -> answer").batch(examples, num_threads=threads,
                                                                 disable_progress_bar=True)
    return [r.answer for r in results]


def measure(workers: int, items: int, latency: float, concurrency: int, calls: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    questions = [f"peer question {i}?" for i in range(items)]
    ideal = workers * concurrency / latency

    started = time.perf_counter()
    with Pool(workers=workers, lm_kwargs={"ttft": latency}, journal=False, concurrency=concurrency,
              max_in_flight=max(8, concurrency)) as pool:
        ready = time.perf_counter() - started
        pool.execute("echo", {"x": 1})
        ours_unary = timed(lambda: pool.execute("echo", {"x": 1}), calls)
        program = dspy.Predict(SIGNATURE)
        pool.map(program, questions[:workers * 4], journal=False).result(120)  # shipped and warm
        ours_batch = timed(lambda: pool.map(program, questions, journal=False).result(600), 3)
        first = []
        for i in range(20):  # from the call to its first token, the LM's own latency included on both sides
            start = time.perf_counter()
            run = pool.run_stream(program, question=f"first token {i}?")
            next(c for c in run if c.kind == "token")
            first.append(time.perf_counter() - start)
            run.result(60)

    # in-kernel DSPy at the same total concurrency
    examples = [dspy.Example(question=q).with_inputs("question") for q in questions]
    with dspy.context(lm=demo_lm(ttft=latency)):
        kernel_batch = timed(lambda: dspy.Predict(SIGNATURE).batch(examples, num_threads=workers * concurrency,
                                                                   disable_progress_bar=True), 3)
    kernel_first = []
    with dspy.context(lm=demo_lm(ttft=latency)):
        for i in range(20):
            streamed = dspy.streamify(dspy.Predict(SIGNATURE), async_streaming=False,  # listeners keep state
                                      stream_listeners=[dspy.streaming.StreamListener(signature_field_name="answer")])
            start = time.perf_counter()
            values = streamed(question=f"first token {i}?")
            next(v for v in values if isinstance(v, dspy.streaming.StreamResponse))
            kernel_first.append(time.perf_counter() - start)
            for _ in values:
                pass

    # multiprocessing, forkserver
    with multiprocessing.get_context("forkserver").Pool(workers) as mp:
        mp.apply(_one)
        mp_unary = timed(lambda: mp.apply(_one), calls)

    # ipyparallel, a local cluster of the same size
    ipp_rows: dict[str, list[float]] = {}
    try:
        import ipyparallel as ipp
    except ImportError:
        print("ipyparallel is not installed (pip install 'ipyparallel>=9'): its figures are skipped",
              file=sys.stderr)
    else:
        start = time.perf_counter()
        cluster = ipp.Cluster(n=workers, log_level=40)
        client = cluster.start_and_connect_sync()
        try:
            client.wait_for_engines(workers, timeout=120)
            ipp_rows["ready"] = [time.perf_counter() - start]
            direct = client[0]
            direct.apply_sync(_one)
            ipp_rows["unary"] = timed(lambda: direct.apply_sync(_one), calls)
            view = client.load_balanced_view()
            chunk = 50
            chunks = [questions[i:i + chunk] for i in range(0, len(questions), chunk)]
            view.map_sync(_engine_batch, chunks[:workers], [latency] * workers, [concurrency] * workers)
            ipp_rows["batch"] = timed(lambda: view.map_sync(_engine_batch, chunks, [latency] * len(chunks),
                                                            [concurrency] * len(chunks)), 3)
        finally:
            client.close()
            cluster.stop_cluster_sync()

    def row(figure: str, ours: list[float], peer_name: str, peer: list[float] | None, unit: str,
            scale: Callable[[float], float] = lambda v: v, better: str = "lower") -> None:
        rows.append({"figure": figure, "ours": summary([scale(v) for v in ours]), "peer_name": peer_name,
                     "peer": summary([scale(v) for v in peer]) if peer else None, "unit": unit, "better": better})

    rate = lambda v: items / v  # noqa: E731
    row("pool ready", [ready], "ipyparallel cluster ready", ipp_rows.get("ready"), "s")
    row("unary round trip", ours_unary, "ipyparallel apply_sync", ipp_rows.get("unary"), "ms", lambda v: v * 1e3)
    row("unary round trip", ours_unary, "multiprocessing forkserver apply", mp_unary, "ms", lambda v: v * 1e3)
    row(f"batch of {items}, {latency * 1e3:.0f} ms LM", ours_batch, "ipyparallel map + Module.batch",
        ipp_rows.get("batch"), "items/s", rate, "higher")
    row(f"batch of {items}, {latency * 1e3:.0f} ms LM", ours_batch,
        f"in-kernel Module.batch({workers * concurrency} threads)", kernel_batch, "items/s", rate, "higher")
    rows.append({"figure": f"batch of {items}, {latency * 1e3:.0f} ms LM",
                 "ours": summary([rate(v) for v in ours_batch]), "peer_name": "ideal (concurrency / latency)",
                 "peer": (ideal, ideal, ideal), "unit": "items/s", "better": "higher"})
    row("time to first token", first, "in-kernel dspy.streamify", kernel_first, "ms", lambda v: v * 1e3)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| figure | dspex_nb (median, IQR) | peer | peer (median, IQR) | ratio |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        ours = "{:.3g} ({:.3g}–{:.3g}) {}".format(*r["ours"], r["unit"])
        if r["peer"] is None:
            lines.append(f"| {r['figure']} | {ours} | {r['peer_name']} | not measured | |")
            continue
        peer = "{:.3g} ({:.3g}–{:.3g}) {}".format(*r["peer"], r["unit"])
        lines.append(f"| {r['figure']} | {ours} | {r['peer_name']} | {peer} | {r['ours'][0] / r['peer'][0]:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 2))
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--latency", type=float, default=0.02, help="the demo LM's time to first token, seconds")
    parser.add_argument("--concurrency", type=int, default=8, help="items at a time per worker")
    parser.add_argument("--calls", type=int, default=300, help="round trips per unary figure")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    rows = measure(args.workers, args.items, args.latency, args.concurrency, args.calls)
    versions = ", ".join(f"{d} {metadata.version(d)}" for d in ("dspex_nb", "dspy", "grpcio", "ipyparallel")
                         if _installed(d))
    text = "\n".join([
        "# dspex_nb against its peers", "",
        f"Measured {datetime.date.today()} by `python bench/peers.py --workers {args.workers} --items {args.items} "
        f"--latency {args.latency} --concurrency {args.concurrency}` on {platform.platform()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()} ({versions}).", "",
        "A ratio is dspex_nb's median over the peer's: below 1 is faster for times, above 1 is faster for "
        "rates. IQR: the interquartile range of the repeats.", "", table(rows), ""])
    args.out.write_text(text)
    print(text)
    return 0


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
