"""The batch journal on its own, the rate limiter, and the journal through the magics."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

from dspex_nb import Pool
from dspex_nb.journal import Journal, JournalWarning, digest
from dspex_nb.worker.limits import RateLimiter


def test_journal_keeps_results_across_connections(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    assert journal.open_batch("b1", "predict q -> a") == {}
    journal.record("b1", digest("x"), {"a": "1"})
    journal.record("b1", digest({"q": "y"}), {"a": "2"})
    journal.close()
    again = Journal(path)
    assert again.open_batch("b1", "predict q -> a") == {digest("x"): {"a": "1"}, digest({"q": "y"}): {"a": "2"}}
    [batch] = again.batches()
    assert (batch["key"], batch["description"], batch["items"]) == ("b1", "predict q -> a", 2)
    again.open_batch("b2", "other")
    assert again.clear("b1") == 1
    assert [b["key"] for b in again.batches()] == ["b2"]
    assert again.clear() == 1 and again.batches() == []


def test_clear_takes_a_key_prefix_as_it_is(tmp_path: Path) -> None:
    """``_`` and ``%`` in a key are characters, not SQL LIKE's wildcards: clear("_") forgot every batch."""
    journal = Journal(tmp_path / "j.sqlite3")
    for key in (digest("one"), digest("two"), "ab_c%"):
        journal.open_batch(key, "predict q -> a")
        journal.record(key, digest("x"), {"a": "1"})
    assert journal.clear("_") == 0 and journal.clear("%") == 0 and journal.clear("a_") == 0
    assert len(journal.batches()) == 3
    assert journal.clear("ab_c%") == 1 and journal.clear(digest("one")[:6]) == 1
    assert [b["key"] for b in journal.batches()] == [digest("two")]
    assert journal.open_batch(digest("two"), "predict q -> a") == {digest("x"): {"a": "1"}}
    journal.close()


def test_digest_is_stable_and_order_free() -> None:
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest("x") != digest("y")


def test_a_batch_rerun_takes_finished_items_from_the_journal(tmp_path: Path) -> None:
    with Pool(workers=2, journal=tmp_path / "j.sqlite3") as pool:
        items = [f"journal {i}?" for i in range(30)]
        first = pool.batch(items, "question -> answer")
        out = first.result()
        calls = sum(pool.describe(w)["counters"]["lm_calls"] for w in ("w0", "w1"))
        assert calls == 30 and first.from_journal == 0
        second = pool.batch(items + ["one more?"], "question -> answer")
        assert second.result()[:30] == out
        assert second.from_journal == 30
        assert sum(pool.describe(w)["counters"]["lm_calls"] for w in ("w0", "w1")) == 31
        other_program = pool.batch(items, "question -> answer", module="chain_of_thought")
        assert other_program.result() and other_program.from_journal == 0  # another program, another key
        not_journaled = pool.batch(items, "question -> answer", journal=False)
        assert not_journaled.result() == out and not_journaled.from_journal == 0


CLAIMER = """
import sys
from dspex_nb.journal import Journal
Journal(sys.argv[1]).claim("b1", ["k1", "k2"], "their-run", lease=600)
print("claimed", flush=True)
sys.stdin.read()  # holds its claims (a live kernel) until told to end
"""


def test_a_dead_kernels_claims_lapse_at_once_a_live_ones_hold(tmp_path: Path) -> None:
    """Was: a batch re-run after its kernel was killed waited out the dead run's 30 s lease before starting."""
    path = tmp_path / "j.sqlite3"
    other = subprocess.Popen([sys.executable, "-c", CLAIMER, str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "claimed\n"  # type: ignore[union-attr]
        journal = Journal(path)
        assert journal.claim("b1", ["k1", "k2", "k3"], "our-run", lease=600) == {"k3"}  # alive: its items wait
    finally:
        other.communicate("")
    assert journal.claim("b1", ["k1", "k2", "k3"], "our-run", lease=600) == {"k1", "k2", "k3"}
    journal.close()


def test_rate_limiter_spreads_acquisitions() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(120, clock=lambda: now[0], sleep=sleep)  # one every 0.5 s
    waits = [limiter.acquire() for _ in range(5)]
    assert waits == [0.0, 0.5, 0.5, 0.5, 0.5]
    now[0] += 10  # idle time does not pile up into a burst
    assert [limiter.acquire() for _ in range(2)] == [0.0, 0.5]
    with pytest.raises(ValueError, match="rate_limit must be > 0"):
        RateLimiter(0)


def test_pool_rate_limit_is_split_over_workers(tmp_path: Path) -> None:
    with Pool(workers=2, rate_limit=6000, journal=False) as pool:
        assert [pool.describe(w)["rate_limit"] for w in ("w0", "w1")] == [3000.0, 3000.0]
        assert pool.batch(["a?", "b?", "c?"], "question -> answer").result()[2]["answer"].startswith(
            "Demo LM answer to 'c?'")
    with pytest.raises(ValueError, match=r"rate_limit=...\) must be a finite number > 0"):
        Pool(rate_limit=-1)


def test_the_claims_watcher_does_nothing_for_each_item_that_arrives(
        pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread that renews a batch's claims woke for every item that arrived, and each time renewed the claims
    of every item still pending and scanned all the records: a 100,000-item ``pool.map`` took 102 s instead of 8 s.
    It wakes to renew (here: never, with a lease of 0 renewed at each wake) and once when the last item arrives."""
    from dspex_nb import batch

    monkeypatch.setattr(batch, "CLAIM_POLL", 3600.0)  # no timed wake in this test: only those the batch makes
    monkeypatch.setattr(batch, "CLAIM_LEASE", 0.0)  # every wake renews the claims: the renewals count the wakes
    renewals = []
    claim = pool.journal.claim
    monkeypatch.setattr(pool.journal, "claim", lambda *args: renewals.append(len(args[1])) or claim(*args))
    items = [f"watched {i}?" for i in range(300)]
    run = pool.batch(items, "question -> answer")
    assert len(run.result(timeout=120)) == 300 and run.ok == 300
    assert renewals[0] == 300 and len(renewals) <= 2, renewals  # the first claim; the wake at the end


GATED = '''
import os, time
class Gated(dspy.Module):
    def forward(self, question):
        deadline = time.monotonic() + 60
        while question.startswith("late") and not os.path.exists({gate!r}) and time.monotonic() < deadline:
            time.sleep(0.01)
        return dspy.Prediction(answer={version!r} + question)
'''


def test_a_redefinition_while_a_batch_runs_is_not_journaled_as_the_old_version(pool: Pool, tmp_path: Path) -> None:
    """The shards sent after ``define`` of a new version run it; their items were journaled under the batch's key,
    that of the old version: redefining the old one again and re-running took the new one's answers."""
    gate = tmp_path / "gate"
    items = [f"early {i}" for i in range(4)] + [f"late {i}" for i in range(8)]
    pool.define("Gated", GATED.format(gate=str(gate), version="v1:"))
    # concurrency 2: a worker runs both shards it holds (with 1, a late one could take the slot from an early one)
    batch = pool.batch(items, module="Gated", shard_size=1, concurrency=2)
    wait_until(lambda: batch.ok == 4, what="the early items")  # the late ones wait at the gate, with v1's code
    pool.define("Gated", GATED.format(gate=str(gate), version="v2:"))
    gate.touch()
    versions = [r["answer"][:2] for r in batch.result(timeout=60)]
    assert versions.count("v2") == batch.other_version > 0 and "redefined while the batch ran" in batch.warning
    pool.define("Gated", GATED.format(gate=str(gate), version="v1:"))
    again = pool.batch(items, module="Gated")
    assert [r["answer"] for r in again.result(timeout=60)] == [f"v1:{item}" for item in items]
    assert again.from_journal == versions.count("v1") and again.warning is None


@pytest.mark.parametrize("items", [
    "batch_key TEXT NOT NULL, item_key TEXT NOT NULL, result TEXT NOT NULL, created REAL NOT NULL, model TEXT, "
    "PRIMARY KEY (batch_key, item_key)",  # a newer version's column: each write failed
    "batch_key TEXT NOT NULL, item_key TEXT NOT NULL, created REAL NOT NULL, result TEXT NOT NULL, "
    "PRIMARY KEY (batch_key, item_key)",  # the same columns, in another order: each answer went into `created`
    "batch_key TEXT, item_key TEXT, result, created REAL, PRIMARY KEY (batch_key, item_key)",  # an untyped result:
])  # a number there raised TypeError from pool.batch
def test_a_journal_of_another_layout_is_refused_untouched(tmp_path: Path, items: str) -> None:
    path = tmp_path / "journal.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as other:
        other.execute(f"CREATE TABLE items ({items})")
        other.execute("INSERT INTO items (batch_key, item_key, result, created) VALUES ('b', 'i', 5, 0)")
        other.commit()
    before = path.read_bytes()
    with pytest.raises(PermissionError, match=r"has tables \['items'\] of another layout"):
        Journal(path)
    assert path.read_bytes() == before
    with pytest.warns(JournalWarning, match="of another layout"):  # a batch runs with a journal in memory instead
        assert Pool(workers=1, journal=path).journal is not None


def test_a_journal_written_over_mid_session_is_moved_aside_and_later_batches_are_kept(tmp_path: Path) -> None:
    # Was: SQLite went on writing through its open files and cache, so the session's later batches seemed kept, but a
    # later session found the file damaged, moved it aside (moving it aside happened only at open) and paid for every
    # item again
    path = tmp_path / "journal.sqlite3"

    def damage(record: dict[str, Any]) -> None:
        if record["index"] == 0:
            for file in (path, path.with_name(path.name + "-wal")):
                file.write_bytes(os.urandom(file.stat().st_size or 4096))

    later = [f"later {i}?" for i in range(4)]
    with Pool(workers=1, journal=path) as pool:
        pool.batch(["before?"], "question -> answer").result(60)
        with pytest.warns(JournalWarning, match=f"{path}.*moved to .*corrupt"):
            damaged = pool.batch([f"during {i}?" for i in range(4)], "question -> answer", on_item=damage)
            assert len(damaged.result(60)) == 4
        assert pool.batch(later, "question -> answer").result(60)
    assert list(tmp_path.glob("journal.sqlite3.corrupt-*"))
    with Pool(workers=1, journal=path) as next_session:
        again = next_session.batch(later, "question -> answer")
        again.result(60)
        assert again.from_journal == 4 and next_session.journal is not None and next_session.journal.problem is None


ANOTHER_SESSION = """
import sys
from dspex_nb.journal import Journal
journal = Journal(sys.argv[1])
journal.record("b", sys.argv[2], {"a": sys.argv[2]})
journal.close()
"""


def test_rows_written_after_another_session_closed_the_journal_are_kept(tmp_path: Path) -> None:
    # Was: the journal opened (and, on each use, read) its file by a descriptor of its own and closed it, which drops
    # every POSIX lock of the process on the file, SQLite's shared one too: another kernel closing its journal then
    # took itself for the last user and deleted the -wal, and every row this session wrote after it was lost (its
    # next session paid for those items again); a second journal of this process closing did the same
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.record("b", "first", {"a": "first"})
    subprocess.run([sys.executable, "-c", ANOTHER_SESSION, str(path), "other"], check=True)
    Journal(path).close()  # a second pool of this kernel, shut down
    journal.record("b", "after", {"a": "after"})
    found = subprocess.run([sys.executable, "-c", "import sqlite3, sys; print(sorted(k for (k,) in sqlite3.connect("
                            "sys.argv[1]).execute('SELECT item_key FROM items')))", str(path)],
                           check=True, capture_output=True, text=True).stdout
    journal.close()
    assert found == "['after', 'first', 'other']\n"


def test_rows_written_after_the_journal_was_removed_mid_session_are_kept(tmp_path: Path) -> None:
    # Was: a journal whose file was removed while a kernel used it (rm, to start afresh) went on writing to the
    # removed file, and the next session found none of the rows written since
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.record("b", "first", {"a": "first"})
    for file in tmp_path.iterdir():
        file.unlink()
    journal.record("b", "after", {"a": "after"})
    journal.close()
    assert Journal(path).open_batch("b", "") == {"after": {"a": "after"}}


def test_a_journal_that_cannot_be_opened_again_mid_session_costs_no_result(tmp_path: Path) -> None:
    # Was: a journal replaced mid-session by what it refuses to open (a link) raised OSError out of record(), and
    # the batch lost the item it was keeping, where the journal's failures are reported and cost no result
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    assert journal.record("b", "first", {"a": "first"})
    (tmp_path / "elsewhere.sqlite3").write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere.sqlite3")
    with pytest.warns(JournalWarning, match="could not write to the batch journal"):
        assert journal.record("b", "after", {"a": "after"}) is False
    assert journal.open_batch("b", "") == {} and journal.claim("b", ["x"], "run", 30.0) == {"x"}
    journal.release("b", "run")
