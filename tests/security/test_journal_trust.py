"""The journal never costs a result and keeps what it holds private: a full disk, a corrupt file or a
damaged row is reported (naming the file) and the batch goes on; the file is 0600, its directory 0700."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sqlite3
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from dspex_nb import Pool
from dspex_nb.journal import Journal, JournalWarning


def full(journal: Journal, pages: int = 8) -> Journal:
    """A journal whose disk is full after a few pages (SQLite's own cap gives the same SQLITE_FULL error)."""
    journal._db.execute(f"PRAGMA max_page_count = {pages}")
    return journal


def test_a_batch_on_a_full_disk_keeps_every_result_and_says_so(tmp_path: Path) -> None:
    journal = full(Journal(tmp_path / "journal.sqlite3"))
    items = [f"a long question number {i} " + "x" * 500 for i in range(60)]
    with Pool(workers=2, journal=journal) as pool, pytest.warns(JournalWarning, match="database or disk is full"):
        batch = pool.batch(items, "question -> answer")
        results = batch.result(120)
    assert batch.ok == 60 and batch.failed == 0
    assert all(r["answer"].startswith(f"Demo LM answer to 'a long question number {i} ") for i, r in enumerate(results))
    assert "database or disk is full" in batch.warning and str(journal.path) in batch.warning


def test_a_full_disk_under_a_filter_that_makes_warnings_errors_costs_no_result(tmp_path: Path) -> None:
    # pytest's -W error, or warnings.simplefilter("error") in the kernel: the journal's warning was raised in the
    # batch thread keeping an item, which lost that item and left result() waiting for it for ever
    journal = Journal(tmp_path / "journal.sqlite3")

    def disk_full_from_now(record: dict[str, object]) -> None:  # after the first item is kept
        journal._db.execute(f"PRAGMA max_page_count = {journal._db.execute('PRAGMA page_count').fetchone()[0]}")

    items = [f"question {i} " + "x" * 500 for i in range(30)]
    with Pool(workers=1, journal=journal) as pool, warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = pool.batch(items, "question -> answer", on_item=disk_full_from_now)
        results = batch.result(30)
    assert batch.ok == 30 and all(r["answer"].startswith(f"Demo LM answer to 'question {i} ")
                                  for i, r in enumerate(results))
    assert "database or disk is full" in batch.warning


def test_journal_files_are_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal(tmp_path / "mine.sqlite3")
    journal.record("b", "i", {"answer": "secret"})
    assert stat.S_IMODE(os.stat(journal.path).st_mode) == 0o600
    for suffix in ("-wal", "-shm"):
        side = journal.path.with_name(journal.path.name + suffix)
        if side.exists():
            assert stat.S_IMODE(os.stat(side).st_mode) & 0o077 == 0
    journal.close()

    monkeypatch.delenv("DSPEX_JOURNAL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    default = Journal()
    assert default.path == tmp_path / "home" / ".cache" / "dspex_nb" / "journal.sqlite3"
    assert stat.S_IMODE(os.stat(default.path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(default.path).st_mode) == 0o600
    default.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_journal_is_moved_aside_and_a_new_one_started(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "journal.sqlite3"
    if damage == "garbage":
        path.write_bytes(b"this is not a database at all" * 100)
    else:
        journal = Journal(path)
        for i in range(200):
            journal.record("b", str(i), {"answer": "x" * 200})
        journal._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        journal.close()
        path.write_bytes(path.read_bytes()[:4096 + 100])
    with pytest.warns(JournalWarning, match=f"{path}.*moved to .*corrupt"):
        journal = Journal(path)
    assert journal.open_batch("b", "again") == {} and journal.record("b", "i", {"answer": "ok"})
    assert list(tmp_path.glob("journal.sqlite3.corrupt-*"))


def test_a_damaged_row_is_skipped_with_a_warning(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.open_batch("b", "desc")
    journal.record("b", "good", {"answer": "kept"})
    raw = sqlite3.connect(journal.path)
    raw.execute("INSERT INTO items VALUES ('b', 'bad', '{not json', 0)")
    raw.execute("INSERT INTO items VALUES ('b', 'null', 'null', 0)")  # JSON, but not a result
    raw.execute("INSERT INTO items VALUES ('b', 'deep', ?, 0)", ("[" * 100_000 + "]" * 100_000,))  # was: RecursionError
    raw.commit()
    raw.close()
    with pytest.warns(JournalWarning, match=str(journal.path)):
        kept = journal.open_batch("b", "desc")
    assert kept == {"good": {"answer": "kept"}}


def test_a_journal_where_another_user_could_read_or_change_it_is_refused(tmp_path: Path) -> None:
    # SQLite uses a -wal / -shm file it finds beside the journal: one another user made first (mode 0666)
    # would get every item and answer, and could forge rows
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # as /tmp, /dev/shm
    with pytest.raises(PermissionError, match="which every user may write to"):
        Journal(shared / "journal.sqlite3")
    assert not (shared / "journal.sqlite3").exists()

    group = tmp_path / "group"
    group.mkdir()
    os.chmod(group, 0o2775)  # a project directory its group may write to
    victim = tmp_path / "notes.txt"
    victim.write_text("precious")
    (group / "journal.sqlite3-wal").symlink_to(victim)
    with pytest.raises(PermissionError, match="journal.sqlite3-wal is a link or another user's"):
        Journal(group / "journal.sqlite3")
    assert victim.read_text() == "precious" and not list(group.glob("*.corrupt-*"))  # not moved aside as corrupt
    if os.getuid() == 0:  # a file of another user needs root to make (chown)
        (group / "journal.sqlite3-wal").unlink()
        (group / "journal.sqlite3-shm").touch(mode=0o666)
        os.chown(group / "journal.sqlite3-shm", 65534, 65534)
        with pytest.raises(PermissionError, match="journal.sqlite3-shm is a link or another user's"):
            Journal(group / "journal.sqlite3")


@contextlib.contextmanager
def no_room_to_write() -> Iterator[None]:
    """No file of this process may grow (as on a full disk): RLIMIT_FSIZE 0, its signal ignored."""
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_when_opening_does_not_move_a_good_journal_aside(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.record("batch", "item", {"answer": "paid for"})
    journal.close()
    with no_room_to_write(), pytest.raises(sqlite3.OperationalError):  # SQLite cannot make the -shm file
        Journal(path)
    assert not list(tmp_path.glob("*.corrupt-*"))  # was: moved aside as corrupt, so a re-run paid again
    assert Journal(path).results("batch", {"item"}) == {"item": {"answer": "paid for"}}


def test_a_journal_that_cannot_be_opened_costs_no_batch(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")  # as an unwritable or missing directory: the journal cannot be made
    items = ["a", "b", "c"]
    with Pool(workers=1, journal=blocked / "journal.sqlite3") as pool, \
            pytest.warns(JournalWarning, match="could not open the batch journal"):
        batch = pool.batch(items, "question -> answer")  # was: NotADirectoryError, and no batch ran
        results = batch.result(60)
        again = pool.batch(items, "question -> answer")
        assert again.result(60) == results and again.from_journal == 3  # kept in memory for this kernel
    assert all(r["answer"].startswith(f"Demo LM answer to '{q}'") for r, q in zip(results, items, strict=True))
    assert str(blocked) in batch.warning and "kept in memory" in batch.warning


@pytest.mark.parametrize("given", [".", "/"])
def test_a_journal_path_naming_a_directory_costs_no_batch(given: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # was: ValueError "PosixPath('.') has an empty name" from every batch (DSPEX_JOURNAL=.), where another path
    # that cannot be a journal gives a journal in memory
    monkeypatch.setenv("DSPEX_JOURNAL", given)
    with pytest.warns(JournalWarning, match="a directory, not a file: give the journal a file's path"):
        journal = Pool(workers=1).journal
    assert journal is not None and "kept in memory" in str(journal.problem)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_journal_path_that_is_not_a_file_is_refused_untouched(tmp_path: Path, kind: str) -> None:
    # DSPEX_JOURNAL=/dev/null, to turn the journal off: as root, it was made 0600 (every other user's writes to
    # /dev/null failed) and SQLite put a /dev/null-journal beside it
    path = tmp_path / "null"
    if kind == "fifo":
        os.mkfifo(path, 0o666)
    elif os.getuid() == 0:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # the same device as /dev/null
    else:
        pytest.skip("making a device node needs root")
    os.chmod(path, 0o666)
    with pytest.raises(PermissionError, match="is not a file"):
        Journal(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 and os.listdir(tmp_path) == ["null"]
    with pytest.warns(JournalWarning, match="is not a file"):  # a batch runs with a journal in memory instead
        assert Pool(workers=1, journal=path).journal is not None


def test_another_applications_sqlite_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as app:
        app.execute("CREATE TABLE users (name TEXT)")
        app.commit()
    os.chmod(path, 0o644)
    before = path.read_bytes()
    with pytest.raises(PermissionError, match=r"is another SQLite database \(its tables: \['users'\]\)"):
        Journal(path)
    assert path.read_bytes() == before and stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]  # no -wal, -shm, nor a file moved aside
