"""Stale cleanup touches only what this user provably owns: forged, linked, shared or foreign pool
directories that point at a live pool's workers never cost that pool a worker."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import pid_alive, wait_until

from dspex_nb import Pool
from dspex_nb.errors import WorkerStartError
from dspex_nb.pool import stale


def forged_record(pool: Pool, **changes: object) -> dict:
    """A pool.json that names ``pool``'s live workers, its run id and their start times, from a dead owner."""
    pids = [row["pid"] for row in pool.status()]
    record = {"owner_pid": 2**22 + 1, "owner_start": "0", "run_id": pool.run_id,
              "workers": [{"pid": pid, "start": stale.start_time(pid)} for pid in pids]}
    record.update(changes)
    return record


def write(directory: Path, record: dict, mode: int = 0o600, dir_mode: int = 0o700) -> Path:
    directory.mkdir()
    (directory / stale.OWNER_FILE).write_text(json.dumps(record))
    os.chmod(directory / stale.OWNER_FILE, mode)
    os.chmod(directory, dir_mode)
    return directory


def linked(root: Path, pool: Pool) -> None:
    target = write(root / "elsewhere", forged_record(pool), dir_mode=0o777)
    (root / "dspex-evil").symlink_to(target)


def shared_dir(root: Path, pool: Pool) -> None:
    write(root / "dspex-shared", forged_record(pool), dir_mode=0o755)


def readable_file(root: Path, pool: Pool) -> None:
    write(root / "dspex-readable", forged_record(pool), mode=0o644)


def empty_run_id(root: Path, pool: Pool) -> None:
    write(root / "dspex-empty", forged_record(pool, run_id=""))


def wrong_start_times(root: Path, pool: Pool) -> None:
    record = forged_record(pool)
    record["workers"] = [{"pid": w["pid"], "start": "1"} for w in record["workers"]]
    write(root / "dspex-reused", record)


def bare_pids(root: Path, pool: Pool) -> None:  # the old format: pids without start times
    write(root / "dspex-old", forged_record(pool, workers=[row["pid"] for row in pool.status()]))


def other_users_dir(root: Path, pool: Pool) -> None:
    if os.getuid() != 0:
        pytest.skip("a directory of another user needs root to make (chown)")
    directory = write(root / "dspex-other", forged_record(pool))
    os.chown(directory / stale.OWNER_FILE, 65534, 65534)
    os.chown(directory, 65534, 65534)


@pytest.mark.parametrize("forge", [linked, shared_dir, readable_file, empty_run_id, wrong_start_times, bare_pids,
                                   other_users_dir])
def test_a_forged_pool_directory_cannot_end_a_live_pool(forge: Callable[[Path, Pool], None], pool: Pool,
                                                        tmp_path: Path) -> None:
    root = tmp_path / "runtime"
    root.mkdir(mode=0o1777)
    forge(root, pool)
    pids = [row["pid"] for row in pool.status()]
    stale.cleanup(root)
    assert all(pid_alive(pid) for pid in pids)
    assert [row["pid"] for row in pool.status()] == pids and pool.execute("echo", {"ok": 1}) == {"ok": 1}
    assert (root / "elsewhere").exists() or forge is not linked  # nothing behind a link is removed


def test_a_pool_of_another_host_or_pid_namespace_is_left_alone(pool: Pool, tmp_path: Path) -> None:
    # a runtime directory shared with a container (a pod's shared /tmp) or another host (a network file system):
    # its owner's pid is no process here, or another one. Was: the directory was removed, and the live pool's
    # calls then failed ("no worker had room"), its sockets gone
    root = tmp_path / "runtime"
    root.mkdir(mode=0o700)
    directory = write(root / "dspex-elsewhere", forged_record(pool, pid_space="another-host pid:[4026532000]"))
    pids = [row["pid"] for row in pool.status()]  # as pids there that happen to be in use here
    assert stale.cleanup(root) == []
    assert (directory / stale.OWNER_FILE).exists() and all(pid_alive(pid) for pid in pids)
    assert json.loads((pool.backend.dir / stale.OWNER_FILE).read_text())["pid_space"] == stale.pid_space()


DAMAGED_RECORDS = {  # a pool.json of this user that is JSON, but not one that cleanup can read
    "pid_of_1e999": '{"owner_pid": 1e999, "owner_start": "1", "run_id": "0123456789ab", "workers": []}',
    "nested_too_deep": '{"owner_pid": ' + "[" * 100_000 + "]" * 100_000 + "}",
}


@pytest.mark.parametrize("damaged", DAMAGED_RECORDS)
def test_a_damaged_pool_json_is_left_and_the_pool_starts(damaged: str, tmp_path: Path) -> None:
    # was: OverflowError / RecursionError out of cleanup(), so that every Pool().start() of this user failed until
    # they found and removed the directory
    root = tmp_path / "runtime"
    root.mkdir(mode=0o700)
    directory = root / "dspex-damaged"
    directory.mkdir(mode=0o700)
    (directory / stale.OWNER_FILE).write_text(DAMAGED_RECORDS[damaged])
    os.chmod(directory / stale.OWNER_FILE, 0o600)
    assert stale.cleanup(root) == []
    assert (directory / stale.OWNER_FILE).exists()


def test_pool_json_is_private(pool: Pool) -> None:
    assert pool.backend.dir is not None
    assert oct(os.stat(pool.backend.dir / stale.OWNER_FILE).st_mode & 0o777) == oct(0o600)


def test_a_dspy_cache_another_user_could_change_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # DSPy loads its disk cache's entries as pickles, for every cached LM call: another user who could put a file
    # there (a directory everyone may write to, or one of theirs) ran code in every worker of the pool, as this user
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # sticky, as /tmp is: still, others could make its shard directories first
    monkeypatch.setenv("DSPY_CACHEDIR", str(shared))
    with pytest.raises(PermissionError, match=f"DSPy's cache directory {shared} .*may be written to by others"):
        Pool(workers=1, journal=False).start()
    assert not list(shared.iterdir())  # no worker made its cache there
    monkeypatch.setenv("DSPY_CACHEDIR", str(shared / "cache"))  # one DSPy makes in a sticky directory is its own
    stale.check_dspy_cache()
    if os.getuid() == 0:  # a directory of another user needs root to make (chown)
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 65534, 65534)
        for cache in (theirs, theirs / "cache"):
            monkeypatch.setenv("DSPY_CACHEDIR", str(cache))
            with pytest.raises(PermissionError, match="belongs to another user"):
                stale.check_dspy_cache()
        # a home of another uid (a container that runs the notebook as a random uid, as OpenShift does; an NFS home
        # of `nobody`) was refused, and with it every pool: whoever may change the home may change its startup files
        monkeypatch.setenv("HOME", str(theirs))
        monkeypatch.delenv("DSPY_CACHEDIR")
        stale.check_dspy_cache()
        (theirs / ".dspy_cache").mkdir(mode=0o700)
        stale.check_dspy_cache()
        os.chmod(theirs / ".dspy_cache", 0o777)  # the cache itself still may not be others'
        with pytest.raises(PermissionError, match="may be written to by others"):
            stale.check_dspy_cache()


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_a_runtime_dir_where_others_could_replace_sockets_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     mode: int) -> None:
    # there another user could move a pool's directory away and put sockets of their own in its place: the
    # kernel would send them its programs, inputs and LM keys
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    if mode & 0o020:  # writable by a group of other users
        if os.getuid() != 0:
            pytest.skip("a directory of another group needs root to make (chown)")
        os.chown(shared, -1, 65534)
    monkeypatch.setenv(stale.RUNTIME_DIR_ENV, str(shared))
    with pytest.raises(PermissionError, match=f"runtime directory {shared} .* may be written to by others but is not "
                                              "sticky"):
        Pool(workers=1, journal=False).start()
    assert not list(shared.iterdir())  # no socket directory made, no worker started
    os.chmod(shared, 0o1777)  # sticky, as /tmp is: others cannot move what is not theirs
    assert stale.runtime_dir() == shared
    if os.getuid() == 0:  # a directory of another user needs root to make (chown)
        os.chmod(shared, 0o755)
        os.chown(shared, 65534, 65534)
        with pytest.raises(PermissionError, match="belongs to another user"):
            stale.runtime_dir()


@pytest.fixture()
def short_path() -> Iterator[Path]:
    """A directory of this test whose path leaves room for sockets (a pytest ``tmp_path`` may be too long)."""
    base = Path(tempfile.mkdtemp(prefix="dx-", dir=os.environ[stale.RUNTIME_DIR_ENV]))
    yield base
    shutil.rmtree(base)


def test_a_runtime_dir_given_as_a_link_is_used_where_the_link_led_at_the_start(short_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A link another user made in /tmp before the user's $DSPEX_RUNTIME_DIR was (to /dev/shm, sticky: it passed the
    # checks) is theirs to repoint. Was: the pool kept the link in its paths, so a worker started after the link
    # was pointed at the other user's directory logged there (a planted w0-1.log link truncated ~/.profile) and the
    # kernel sent its calls, shipped programs and their LM keys to that user's socket there
    led, elsewhere = short_path / "led", short_path / "elsewhere"
    led.mkdir(mode=0o700)
    elsewhere.mkdir(mode=0o777)
    link = short_path / "run"
    link.symlink_to(led)
    monkeypatch.setenv(stale.RUNTIME_DIR_ENV, str(link))
    with Pool(workers=1, journal=False) as pool:
        first = pool.workers[0].process.pid
        link.unlink()
        link.symlink_to(elsewhere)  # "repointed by its owner"
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: pool.status()[0]["pid"] != first and pool.status()[0]["state"] == "ready",
                   what="the killed worker to be replaced")
        assert pool.execute("echo", {"x": 1}) == {"x": 1}
        assert pool.workers[0].process.log_path.parent.parent == led
    assert not list(elsewhere.iterdir())


@pytest.mark.parametrize("owner", ["others may write", "another user"])
def test_a_runtime_dir_under_a_directory_others_could_change_is_refused(short_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         owner: str) -> None:
    # who may rename a directory above the runtime directory may put one of their own, with their sockets, there
    above = short_path / "above"
    above.mkdir(mode=0o755)
    (above / "run").mkdir(mode=0o700)
    if owner == "another user":
        if os.getuid() != 0:
            pytest.skip("a directory of another user needs root to make (chown)")
        os.chown(above, 65534, 65534)
        why = "belongs to another user"
    else:
        os.chmod(above, 0o777)
        why = "may be written to by others but is not sticky"
    monkeypatch.setenv(stale.RUNTIME_DIR_ENV, str(above / "run"))
    with pytest.raises(PermissionError, match=f"is under {above}, which {why}"):
        Pool(workers=1, journal=False).start()
    assert not list((above / "run").iterdir())


def test_a_runtime_dir_writable_by_the_users_own_group_is_theirs(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Debian, Ubuntu, Fedora: each user has a group of their own, and umask 002 makes directories 0775
    user = pwd.getpwuid(os.getuid())
    if grp.getgrgid(user.pw_gid).gr_name != user.pw_name:
        pytest.skip("this user has no group of their own")
    own = tmp_path / "own"
    own.mkdir()
    os.chown(own, -1, user.pw_gid)
    os.chmod(own, 0o775)
    monkeypatch.setenv(stale.RUNTIME_DIR_ENV, str(own))
    assert stale.runtime_dir() == own



def _dir_of_length(base: Path, length: int) -> Path:
    """A private directory under ``base`` whose path is ``length`` bytes long."""
    path = base / ("d" * (length - len(os.fsencode(base)) - 1))
    path.mkdir(mode=0o700)
    assert len(os.fsencode(path)) == length
    return path


@pytest.mark.parametrize("length", [75, 81])
def test_a_runtime_dir_too_long_for_socket_paths_is_refused_by_name(monkeypatch: pytest.MonkeyPatch,
                                                                    length: int) -> None:
    # A Unix socket's path holds at most 107 bytes, and a worker's grows with its restarts (w0-10.health.sock): in a
    # directory of 75 bytes the first sockets just fit, and the eleventh restart of a worker could never bind its
    # socket; at 81 bytes the first worker fails with gRPC's message, which does not say what to change.
    base = Path(tempfile.mkdtemp(prefix="dx-", dir=os.environ[stale.RUNTIME_DIR_ENV]))
    try:
        too_long = _dir_of_length(base, length)
        monkeypatch.setenv(stale.RUNTIME_DIR_ENV, str(too_long))
        with pytest.raises(WorkerStartError, match=r"\$DSPEX_RUNTIME_DIR.* at most 69 bytes"):
            Pool(workers=1, journal=False).start()
        assert not list(too_long.iterdir())  # no socket directory made, no worker started
        longest = _dir_of_length(base, 69)  # room for 1,000 workers and 100,000 restarts of each
        monkeypatch.setenv(stale.RUNTIME_DIR_ENV, str(longest))
        with Pool(workers=1, journal=False) as pool:
            assert pool.execute("echo", {"x": 1}) == {"x": 1}
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_runtime_dir_that_is_not_a_directory_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        kind: str) -> None:
    path = tmp_path / "runtime"
    if kind == "file":
        path.write_text("")
    monkeypatch.setenv(stale.RUNTIME_DIR_ENV, str(path))
    with pytest.raises(OSError, match=rf"runtime directory {path} \(\$DSPEX_RUNTIME_DIR.* set \$DSPEX_RUNTIME_DIR"):
        Pool(workers=1, journal=False).start()
