"""The batch journal: every finished item of a batch, written to SQLite (WAL) as it arrives.

A batch is keyed by what determines its answers: the program (signature or defined module, with
its source) and the LM with its settings; an item by its content. Re-running the same batch —
after a cancel, a worker crash, a kernel restart or a SIGKILLed kernel — takes the finished items
from here without calling the LM and runs only the rest. Only successful items are kept: a failed
item runs again next time.

Location: ``Journal(path)``, else ``$DSPEX_JOURNAL``, else ``~/.cache/dspex_nb/journal.sqlite3``.
The file is private (0600; its default directory 0700): it holds the items and the answers. A place where
another user could read or change it (a directory anyone may write to, their -wal file) is refused.

The journal never costs a result: a write that fails (a full disk, a read-only file) is reported once
(``Journal.problem``, shown by the batch) and the batch goes on with every result in memory; a file
that is not a journal (corrupt, truncated) is moved aside, with a warning naming both files, and a
fresh one started, at open or when a later use finds it so (``Journal._using``); a row that cannot be read is
skipped (that item runs again).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dspex_nb.errors import warn_kept
from dspex_nb.wire import owner_gone, owner_spec

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch_key TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    batch_key TEXT NOT NULL,
    item_key TEXT NOT NULL,
    owner TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (batch_key, item_key)
);
CREATE TABLE IF NOT EXISTS items (
    batch_key TEXT NOT NULL,
    item_key TEXT NOT NULL,
    result TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (batch_key, item_key)
);
"""


SQLITE_MAGIC = b"SQLite format 3\x00"  # how a database file starts
WAL_MAGIC = (b"\x37\x7f\x06\x82", b"\x37\x7f\x06\x83")  # and its -wal file
JOURNAL_TABLES = {"batches", "claims", "items"}
NOT_A_JOURNAL = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}  # errors that say the file itself is damaged
FAILURES = (sqlite3.Error, OSError)  # a use's: SQLite's, or the file's when it is opened again or moved aside


def _layout(db: sqlite3.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """The columns of each journal table in ``db`` (SQLite's table_info rows; none for a table not there)."""
    return {table: db.execute(f"PRAGMA table_info({table})").fetchall() for table in sorted(JOURNAL_TABLES)}


def _schema_layout() -> dict[str, list[tuple[Any, ...]]]:
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.executescript(SCHEMA)
        return _layout(db)


T = TypeVar("T")
LAYOUT = _schema_layout()  # what a journal's tables must be: another layout is another version's journal


def _damaged(exc: sqlite3.DatabaseError) -> bool:
    """Whether ``exc`` says the file itself is not a journal (corrupt, garbage), not a full disk or an I/O error."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in NOT_A_JOURNAL  # none: a closed one's ProgrammingError


_held_lock = threading.Lock()
_held: dict[tuple[int, int], list[int]] = {}  # a journal file this process uses, (device, inode) -> [its users, fds]


def _hold(fd: int) -> tuple[int, int]:
    """Keep ``fd``, a journal file this process just opened, open while a journal of this process uses that file
    (``_let_go``): closing any descriptor of a file drops every POSIX lock the process holds on it, SQLite's too (the
    shared lock that tells another process closing its connection to the journal that this one still uses the -wal:
    without it, that process deletes the -wal as the file's last user, and this one's later rows with it)."""
    info = os.fstat(fd)
    file = (info.st_dev, info.st_ino)
    with _held_lock:
        held = _held.setdefault(file, [0])
        held[0] += 1
        held.append(fd)
    return file


def _let_go(file: tuple[int, int]) -> None:
    """A journal of this process no longer uses ``file`` (its connection is closed): once none does, its
    descriptors are closed."""
    with _held_lock:
        held = _held[file]
        held[0] -= 1
        if not held[0]:
            del _held[file]
            for fd in held[1:]:
                os.close(fd)


def default_path() -> Path:
    return Path(os.environ.get("DSPEX_JOURNAL") or Path.home() / ".cache" / "dspex_nb" / "journal.sqlite3")


def digest(value: Any) -> str:
    """A stable key for a JSON-able value (dict keys sorted)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]  # a lone surrogate is data too


class JournalWarning(UserWarning):
    """The journal could not keep something (the batch's results are not affected)."""


class Journal:
    """One SQLite file of batch results, safe to use from several threads of one process and from
    several processes at once (WAL)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self._start(path)
        if not self.path.name:  # "/", "." (DSPEX_JOURNAL=.): a directory, whose -wal file has no name to go beside
            raise IsADirectoryError(errno.EISDIR, "a directory, not a file: give the journal a file's path "
                                                  "(Pool(journal=path) or DSPEX_JOURNAL)", str(self.path))
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # one made here: private, as the file
        if path is None and not os.environ.get("DSPEX_JOURNAL"):
            os.chmod(self.path.parent, 0o700)  # our own directory, made private where it was made otherwise
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:  # not a journal: keep it aside for the user, start afresh
            if not _damaged(exc):  # a full disk, an I/O error: the file may be fine
                raise
            self._db = self._renewed(exc, stacklevel=3)

    def _renewed(self, exc: sqlite3.DatabaseError, stacklevel: int) -> sqlite3.Connection:
        """A new journal in place of the file ``exc`` found damaged, which is moved aside (with its -wal and -shm
        files) for the user, saying so."""
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        self.path.replace(aside)
        for suffix in ("-wal", "-shm"):  # a new journal must not read the damaged one's log
            with contextlib.suppress(FileNotFoundError):
                self.path.with_name(self.path.name + suffix).replace(aside.with_name(aside.name + suffix))
        warn_kept(f"the batch journal {self.path} could not be read ({exc}); it was moved to {aside} and a new "
                  "journal started", JournalWarning, stacklevel=stacklevel)
        return self._open()

    def _using(self, action: Callable[[sqlite3.Connection], T]) -> T:
        """``action(db)`` under the lock, on the file at the journal's path now. SQLite goes on writing through its
        open files and its cache where the file was written over or replaced while the session used it, so those
        writes would reach no later session: a file replaced is opened again, and one found damaged (here, or by
        ``action``) is moved aside and a new journal started, as at open, so that the batches after it are kept."""
        with self._lock:
            if self._file is not None and not self._intact():
                self._reopen(None)
            try:
                return action(self._db)
            except sqlite3.DatabaseError as exc:
                if not _damaged(exc):
                    raise
                self._reopen(exc)
                return action(self._db)

    def _intact(self) -> bool:
        """Whether the file at the journal's path is still the one it opened, and reads as SQLite's (its -wal too).
        The file is read through the descriptor kept for it (``_hold``): one opened and closed here would drop
        SQLite's locks on it."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:  # removed (to start afresh): rows written to it would reach no later session
            return False
        if (info.st_dev, info.st_ino) != self._file:
            return False
        if os.pread(_held[self._file][1], len(SQLITE_MAGIC), 0) not in (SQLITE_MAGIC, b""):
            return False
        try:
            with open(self.path.with_name(self.path.name + "-wal"), "rb") as wal:
                return wal.read(4) in (*WAL_MAGIC, b"")
        except FileNotFoundError:  # checkpointed and removed: SQLite makes it again
            return True

    def _reopen(self, damage: sqlite3.DatabaseError | None) -> None:
        """Open the file at the journal's path again; one that ``damage`` (or the opening) finds damaged is moved
        aside and a new journal started, saying so, once."""
        self._close()
        if damage is None:
            try:
                self._db = self._open()
                return
            except sqlite3.DatabaseError as exc:
                if not _damaged(exc):
                    raise
                damage = exc
        self._db = self._renewed(damage, stacklevel=5)

    def _start(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.problem: str | None = None  # the first write that failed, if one did
        self._file: tuple[int, int] | None = None  # (device, inode) of the file opened (None: in memory)
        self._lock = threading.Lock()

    @classmethod
    def in_memory(cls, path: str | Path | None, reason: Exception) -> Journal:
        """A journal in memory standing in for ``path``, which could not be opened (``reason``, reported once as
        its ``problem``): batches run, and a re-run in this process takes their results from it."""
        journal = cls.__new__(cls)
        journal._start(path)
        journal._db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        journal._db.executescript(SCHEMA)
        journal.problem = (f"could not open the batch journal {journal.path} ({type(reason).__name__}: {reason}); "
                           "batch results are kept in memory: a re-run in this kernel takes them, a later one cannot")
        warn_kept(journal.problem, JournalWarning, stacklevel=3)
        return journal

    def _check_place(self) -> None:
        """Refuse a place where another user could read or change the journal: a directory anyone may write to
        (they could make its -wal or -shm file first, which SQLite would then use: world-readable, theirs), or
        such a file already there that is a link or another user's."""
        advice = "use a directory of your own (Pool(journal=path) or DSPEX_JOURNAL)"
        if os.stat(self.path.parent).st_mode & stat.S_IWOTH:
            raise PermissionError(f"the batch journal {self.path} is in {self.path.parent}, which every user may "
                                  f"write to: another user could read or change it there; {advice}")
        for suffix in ("-wal", "-shm", "-journal"):
            side = self.path.with_name(self.path.name + suffix)
            try:
                info = os.lstat(side)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                raise PermissionError(f"the batch journal's file {side} is a link or another user's: refusing to "
                                      f"use the journal; {advice}")

    def _open(self) -> sqlite3.Connection:
        # private from the start (WAL files follow); never through a link, never a file of another user, nor a
        # database of another application
        self._check_place()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)  # a FIFO: no wait
        self._file, db = _hold(fd), None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):  # /dev/null: made 0600 (root may), every other user's writes failed
                raise PermissionError(f"the batch journal {self.path} is not a file (a device, a pipe, a socket): "
                                      "refusing to use it (Pool(journal=False) keeps no journal)")
            if info.st_uid != os.getuid():
                raise PermissionError(f"the batch journal {self.path} belongs to another user: refusing to use it "
                                      "(Pool(journal=path) or DSPEX_JOURNAL with a file of your own)")
            db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if {t for t in tables if not t.startswith("sqlite_")} - JOURNAL_TABLES:  # sqlite_stat1: ANALYZE's own
                raise PermissionError(f"the batch journal {self.path} is another SQLite database (its tables: "
                                      f"{sorted(tables)}): refusing to change it; give the journal a file of its own")
            other = sorted(t for t, columns in _layout(db).items() if columns and columns != LAYOUT[t])
            if other:  # rows written in another layout, or ours written into it, could be read as wrong results
                raise PermissionError(f"the batch journal {self.path} has tables {other} of another layout (a "
                                      "journal of another dspex_nb version?): refusing to use it; give the journal "
                                      "a file of its own (Pool(journal=path) or DSPEX_JOURNAL), or move it aside")
            os.fchmod(fd, 0o600)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed row survives a process kill
            db.executescript(SCHEMA)
            db.execute("SELECT COUNT(*) FROM items").fetchone()
        except BaseException:
            if db is not None:
                db.close()
            _let_go(self._file)
            self._file = None
            raise
        return db

    def open_batch(self, key: str, description: str) -> dict[str, dict[str, Any]]:
        """Register batch ``key``; return its finished results by item key (none when the journal fails)."""
        now = time.time()
        try:
            self._using(lambda db: db.execute("INSERT INTO batches VALUES (?, ?, ?, ?) ON CONFLICT(batch_key) DO "
                                              "UPDATE SET updated = excluded.updated", (key, description, now, now)))
        except FAILURES as exc:
            self._failed("read", exc)
            return {}
        return self._finished(key)

    def _finished(self, batch_key: str) -> dict[str, dict[str, Any]]:
        """The results kept for a batch, by item key; a damaged row is skipped (that item runs again)."""
        try:
            rows = self._using(lambda db: db.execute("SELECT item_key, result FROM items WHERE batch_key = ?",
                                                     (batch_key,)).fetchall())
        except FAILURES as exc:
            self._failed("read", exc)
            return {}
        kept = {}
        for item_key, result in rows:
            try:
                kept[item_key] = json.loads(result)
            except (ValueError, RecursionError):  # nested deeper than the parser recurses: not one of our rows
                self._failed("read a row of", ValueError(f"item {item_key} is not JSON"))
                continue
            if not isinstance(kept[item_key], dict):  # every result we keep is a dict: another shape is damage
                self._failed("read a row of", ValueError(f"item {item_key} is not a result"))
                del kept[item_key]
        return kept

    def record(self, batch_key: str, item_key: str, result: dict[str, Any]) -> bool:
        """Keep one finished item (committed at once); False (and ``problem`` set) when it could not."""
        try:
            row = (batch_key, item_key, json.dumps(result), time.time())
            self._using(lambda db: db.execute("INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?)", row))
        except FAILURES as exc:
            self._failed("write to", exc)
            return False
        return True

    def _failed(self, what: str, exc: Exception) -> None:
        """Report the first failure once; the batch keeps its results in memory and goes on."""
        with self._lock:
            first = self.problem is None
            if first:
                self.problem = (f"could not {what} the batch journal {self.path} ({type(exc).__name__}: {exc}); "
                                "results are kept in memory (batch.records), but a re-run cannot take them from it")
        if first:
            warn_kept(self.problem, JournalWarning, stacklevel=3)

    def claim(self, batch_key: str, item_keys: list[str], owner: str, lease: float) -> set[str]:
        """Claim the items no other live run of this batch holds (for ``lease`` seconds; renew by claiming
        again); return the keys that are ``owner``'s now. Two kernels running the same batch on one journal
        so pay for each item once: the other waits for its result here. The claims of a run whose kernel is
        gone (a process of this machine that ended) lapse at once; those of a run elsewhere, when its lease ends.
        On a journal error: all of them."""
        now, owner = time.time(), _claimant(owner)

        def claim(db: sqlite3.Connection) -> list[tuple[str]]:
            db.execute("BEGIN IMMEDIATE")
            try:
                others = db.execute("SELECT DISTINCT owner FROM claims WHERE batch_key = ? AND owner != ? "
                                    "AND expires >= ?", (batch_key, owner, now)).fetchall()
                db.executemany("DELETE FROM claims WHERE batch_key = ? AND owner = ?",
                               [(batch_key, other) for (other,) in others if _claimant_gone(other)])
                db.executemany(
                    "INSERT INTO claims VALUES (?, ?, ?, ?) ON CONFLICT(batch_key, item_key) DO UPDATE SET "
                    "owner = excluded.owner, expires = excluded.expires "
                    "WHERE claims.owner = excluded.owner OR claims.expires < ?",
                    [(batch_key, key, owner, now + lease, now) for key in set(item_keys)])
                rows = db.execute("SELECT item_key FROM claims WHERE batch_key = ? AND owner = ?",
                                  (batch_key, owner)).fetchall()
            except sqlite3.Error:
                if db.in_transaction:  # SQLite may have rolled back already (a full disk)
                    with contextlib.suppress(sqlite3.Error):  # a damaged file may refuse that too
                        db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return rows

        try:
            rows = self._using(claim)
        except FAILURES as exc:
            self._failed("claim items in", exc)
            return set(item_keys)
        return {key for (key,) in rows} & set(item_keys)

    def release(self, batch_key: str, owner: str) -> None:
        """Give up ``owner``'s claims (its run ended)."""
        try:
            self._using(lambda db: db.execute("DELETE FROM claims WHERE batch_key = ? AND owner = ?",
                                              (batch_key, _claimant(owner))))
        except FAILURES as exc:
            self._failed("release claims in", exc)

    def results(self, batch_key: str, item_keys: set[str]) -> dict[str, dict[str, Any]]:
        """The finished results of these items (another run's, as they arrive)."""
        return {key: value for key, value in self._finished(batch_key).items() if key in item_keys}

    def batches(self) -> list[dict[str, Any]]:
        """Every journaled batch: key, description, items kept, created, updated."""
        rows = self._using(lambda db: db.execute(
            "SELECT b.batch_key, b.description, COUNT(i.item_key), b.created, b.updated FROM batches b "
            "LEFT JOIN items i ON i.batch_key = b.batch_key GROUP BY b.batch_key ORDER BY b.updated").fetchall())
        return [{"key": k, "description": d, "items": n, "created": c, "updated": u} for k, d, n, c, u in rows]

    def clear(self, key: str | None = None) -> int:
        """Forget one batch (by key or key prefix, compared as it is: ``_`` and ``%`` are no wildcards here), or
        every batch (no key); returns how many were removed."""
        where = (len(key or ""), key or "")

        def clear(db: sqlite3.Connection) -> int:
            removed = db.execute("DELETE FROM batches WHERE substr(batch_key, 1, ?) = ?", where).rowcount
            db.execute("DELETE FROM items WHERE substr(batch_key, 1, ?) = ?", where)
            return removed

        return self._using(clear)

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        """Close the connection, then let go of its file (``_hold``)."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        if self._file is not None:
            _let_go(self._file)
            self._file = None


def _claimant(run: str) -> str:
    """A run's name in the claims: ``run`` (its id) and the kernel that makes it (``wire.owner_spec``)."""
    return f"{run} {owner_spec()}"


def _claimant_gone(claimant: str) -> bool:
    """The kernel of this claimant has ended (``wire.owner_gone``)."""
    return owner_gone(claimant.partition(" ")[2])
