"""pf.checkpoint: sequence numbers, atomic framed files, the newest valid one loaded, damaged
ones skipped, removal on success; and through real runs on the sequential and local backends."""

from __future__ import annotations

from pathlib import Path

import checkpoint_lib as C
import pytest

import pipefarm as pf
from pipefarm.execute import checkpoint as ck


@pytest.fixture
def in_task(tmp_path: Path):
    """A task context (task 7, attempt 1) in a fresh run directory; its checkpoint dir."""
    ck.begin(str(tmp_path), 7, 1)
    yield Path(tmp_path) / "checkpoints" / "7"
    ck.end(succeeded=False, keep=True)


def names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_outside_a_task_is_a_clear_error() -> None:
    with pytest.raises(ck.CheckpointError, match="inside a pipefarm task"):
        pf.checkpoint.save(1)
    with pytest.raises(pf.PipefarmError):
        pf.checkpoint.load()


def test_numbers_increase_the_newest_two_are_kept_and_load_takes_the_newest(in_task: Path) -> None:
    assert ck.load(default="none") == "none"
    seqs = [ck.save({"step": i}) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert names(in_task) == ["000000000004.ckpt", "000000000005.ckpt"]
    assert ck.load() == {"step": 4}
    # the next attempt of the same task goes on numbering after the highest file
    ck.end(succeeded=False, keep=False)
    ck.begin(str(in_task.parent.parent), 7, 2)
    assert ck.load() == {"step": 4}
    assert ck.save("again") == 6


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_newest_is_skipped_for_the_one_before(in_task: Path, damage: str) -> None:
    ck.save("older")
    ck.save("newer")
    newest = in_task / "000000000002.ckpt"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(bytes(data[: len(data) - 3]))
    else:
        data[-2] ^= 0x40
        newest.write_bytes(bytes(data))
    ck.end(succeeded=False, keep=True)
    ck.begin(str(in_task.parent.parent), 7, 2)
    assert ck.load() == "older"
    # moved aside (reported once), its number never used again
    assert names(in_task) == ["000000000001.ckpt", "000000000002.ckpt.corrupt"]
    assert ck.save("next") == 3
    note = ck.end(succeeded=False, keep=True)
    assert note is not None and "000000000002.ckpt skipped" in note
    ck.begin(str(in_task.parent.parent), 7, 3)
    assert ck.load() == "next"


def test_removed_on_success_unless_kept(in_task: Path) -> None:
    ck.save(1)
    ck.end(succeeded=True, keep=True)
    assert in_task.is_dir()
    ck.begin(str(in_task.parent.parent), 7, 2)
    ck.end(succeeded=False, keep=False)
    assert in_task.is_dir(), "a failed attempt keeps them for the next one"
    ck.begin(str(in_task.parent.parent), 7, 3)
    ck.end(succeeded=True, keep=False)
    assert not in_task.exists()


def test_without_a_run_directory_nothing_is_kept() -> None:
    ck.begin(None, 3, 1)
    try:
        assert ck.save("x") is None
        assert ck.load(default=5) == 5
        assert ck.directory() is None
    finally:
        ck.end(succeeded=True, keep=False)


def test_an_unpicklable_checkpoint_is_refused_and_the_previous_kept(in_task: Path) -> None:
    import threading

    ck.save("good")
    with pytest.raises(TypeError, match="cannot be pickled"):
        ck.save(threading.Lock())
    assert ck.load() == "good"
    assert not [n for n in names(in_task) if ".tmp" in n]


@pytest.mark.parametrize("backend", ["sequential", "local"])
def test_a_failed_attempt_is_resumed_by_the_retry(tmp_path: Path, backend: str) -> None:
    log, flag = str(tmp_path / "log"), str(tmp_path / "flag")
    run = pf.Run.create(tmp_path / "run")
    t = run.submit_task(C.count_to, (10, log), {"fail_at": 6, "flag": flag}, retries=1,
                        backoff=0)
    summary = run.execute(backend=backend, workers=1, progress=False)
    assert summary.ok, summary
    assert run.result(t) == 10
    assert C.attempts_in(log) == [(0, [1, 2, 3, 4, 5]), (5, [6, 7, 8, 9, 10])]
    assert [a.outcome for a in run.attempts(t)] == ["failed", "succeeded"]
    assert not (tmp_path / "run" / "checkpoints" / str(t)).exists(), "removed on success"


def test_keep_checkpoints_keeps_them_after_success(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    run = pf.Run.create(tmp_path / "run")
    t = run.submit_task(C.count_to, (3, log), keep_checkpoints=True)
    assert run.execute(backend="sequential", progress=False).ok
    d = tmp_path / "run" / "checkpoints" / str(t)
    assert names(d) == ["000000000002.ckpt", "000000000003.ckpt"]


def test_a_torn_checkpoint_is_skipped_by_the_next_attempt_and_noted(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    run = pf.Run.create(tmp_path / "run")
    t = run.submit_task(C.count_to, (8, log))
    # an earlier attempt saved 1..4 (as a task does: in its context), then 4 was torn
    ck.begin(str(tmp_path / "run"), t, 1)
    for i in range(1, 5):
        ck.save(i)
    ck.end(succeeded=False, keep=True)
    newest = tmp_path / "run" / "checkpoints" / str(t) / "000000000004.ckpt"
    newest.write_bytes(newest.read_bytes()[:-1])
    assert run.execute(backend="sequential", progress=False).ok
    assert C.attempts_in(log) == [(3, [4, 5, 6, 7, 8])]
    (a,) = run.attempts(t)
    assert "000000000004.ckpt skipped" in (a.note or "")


@pytest.mark.parametrize("keep", [False, True])
def test_a_command_gets_its_directory_absolute_from_any_cwd(tmp_path: Path, monkeypatch,
                                                             keep: bool) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    run = pf.Run.create("run")  # a relative run directory
    script = ('case "$PIPEFARM_CHECKPOINT_DIR" in /*) ;; *) exit 9 ;; esac; '
              'test -d "$PIPEFARM_CHECKPOINT_DIR" && echo 1 > "$PIPEFARM_CHECKPOINT_DIR/state"')
    from pipefarm.execute.template import Command

    (t,) = run.submit_cmd(Command(argv=["sh", "-c", script], cwd=str(tmp_path / "elsewhere")),
                          keep_checkpoints=keep, checkpoint_dir=True)
    # without checkpoint_dir a command gets neither the variable nor a directory
    (u,) = run.submit_cmd(["sh", "-c", 'test -z "${PIPEFARM_CHECKPOINT_DIR+set}"'])
    assert run.execute(backend="sequential", progress=False).ok
    d = tmp_path / "run" / "checkpoints" / str(t)
    assert (d / "state").exists() == keep
    assert not (tmp_path / "run" / "checkpoints" / str(u)).exists()
