"""The allocation store: validation, persistence, idempotence, owner death, summaries."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest

from gputel.control.allocations import (
    SUMMARY_COLUMNS,
    AllocationError,
    AllocationStore,
    parse_gpus_text,
    read_open_ids,
    validate_gpus,
    validate_id,
)
from gputel.formats import process_alive, process_start_time
from gputel.runtime import atomic_write_json


class Clock:
    def __init__(self) -> None:
        self.t = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    run, logs = tmp_path / "run", tmp_path / "log"
    run.mkdir()
    return run, logs


def make_store(dirs: tuple[Path, Path], clock: Clock | None = None) -> AllocationStore:
    run, logs = dirs
    return AllocationStore(run, logs, [0, 1, 2, 3], now=clock or Clock())


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------- ids
@pytest.mark.parametrize(
    "ident", ["a", "slurm-42", "job_1.2:x@host", "A" * 128, "a-", "..", "k8s:ns:pod"]
)
def test_good_ids(ident: str) -> None:
    assert validate_id(ident) == ident


@pytest.mark.parametrize(
    "ident",
    [
        "",
        "A" * 129,
        "a b",
        "../etc/passwd",
        "a/b",
        "a\nb",
        "a,b",
        "a;b",
        "é",
        "a\x00",
        'a"b',
        None,
        42,
        ["x"],
    ],
)
def test_bad_ids(ident: object) -> None:
    with pytest.raises(AllocationError):
        validate_id(ident)


def test_bad_id_message_names_the_problem() -> None:
    with pytest.raises(AllocationError, match="contains '/'"):
        validate_id("a/b")
    with pytest.raises(AllocationError, match="at most 128"):
        validate_id("x" * 200)


# ---------------------------------------------------------------------------------- GPU lists
def test_gpu_text() -> None:
    assert parse_gpus_text(None) is None
    assert parse_gpus_text("") is None
    assert parse_gpus_text("all") is None
    assert parse_gpus_text("0, 2") == [0, 2]
    for bad in ("x", "0,0", "-1", "0;1", "1.5", "0,,1"):
        with pytest.raises(AllocationError):
            parse_gpus_text(bad)


def test_gpu_list_validation() -> None:
    assert validate_gpus(None, [0]) is None
    assert validate_gpus([1, 0], [0, 1]) == [1, 0]
    with pytest.raises(AllocationError, match=r"GPU 7 not present .*0,1"):
        validate_gpus([0, 7], [0, 1])
    for bad in ([], [True], [0, 0], [-1], ["0"], "0,1", [1.0]):
        with pytest.raises(AllocationError):
            validate_gpus(bad, [0, 1])


# ---------------------------------------------------------------------------------- store
def test_allocate_persists_in_documented_format(dirs: tuple[Path, Path]) -> None:
    store = make_store(dirs)
    reply = store.allocate("job-1", [0, 1], None, {0: 10.0, 1: 20.0, 2: 30.0})
    assert reply["created"] is True
    alloc = reply["allocation"]
    assert alloc["id"] == "job-1" and alloc["gpus"] == [0, 1] and alloc["pid"] is None
    assert alloc["start"] == "2026-01-02T03:04:05.678Z"
    assert alloc["start_energy_j"] == {"0": 10.0, "1": 20.0}
    data = json.loads((dirs[0] / "allocations.json").read_text())
    assert data["version"] == 1
    assert [a["id"] for a in data["allocations"]] == ["job-1"]
    assert read_open_ids(dirs[0]) == ["job-1"]
    assert store.open_count() == 1


def test_allocate_is_idempotent(dirs: tuple[Path, Path]) -> None:
    store = make_store(dirs)
    first = store.allocate("job-1", [0], None, {0: 1.0})
    again = store.allocate("job-1", [1], None, {0: 5.0, 1: 5.0})
    assert again["created"] is False
    assert again["allocation"] == first["allocation"]
    assert store.open_count() == 1


def test_release_unknown_is_harmless(dirs: tuple[Path, Path]) -> None:
    store = make_store(dirs)
    assert store.release("nope", {}) == {"released": False, "summary": None}
    assert not (dirs[1] / "allocations.csv").exists()


def test_release_twice(dirs: tuple[Path, Path]) -> None:
    store = make_store(dirs)
    store.allocate("a", None, None, {})
    assert store.release("a", {})["released"] is True
    assert store.release("a", {})["released"] is False
    assert len(rows(dirs[1] / "allocations.csv")) == 1


def test_restart_restores_allocations(dirs: tuple[Path, Path]) -> None:
    clock = Clock()
    store = make_store(dirs, clock)
    store.allocate("a", [2], None, {2: 100.0})
    store.allocate("b", None, None, {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0})
    clock.advance(10)
    again = make_store(dirs, clock)
    assert [a["id"] for a in again.list()] == ["a", "b"]
    summary = again.release("a", {2: 150.5})["summary"]
    assert summary["energy_j"] == 50.5
    assert summary["duration_s"] == 10.0


def test_corrupt_store_is_moved_aside(
    dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    path = dirs[0] / "allocations.json"
    path.write_text("{not json")
    store = make_store(dirs)
    assert store.list() == []
    aside = list(dirs[0].glob("allocations.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == "{not json"
    assert "moved it to" in caplog.text
    store.allocate("x", None, None, {})
    assert read_open_ids(dirs[0]) == ["x"]


def test_malformed_entries_are_skipped(dirs: tuple[Path, Path]) -> None:
    good = {"id": "ok", "gpus": None, "pid": None, "start": "2026-01-01T00:00:00.000Z"}
    bad = [{"id": "../x", "gpus": None, "start": "2026-01-01T00:00:00.000Z"}, "junk", {"id": "n"}]
    atomic_write_json(dirs[0] / "allocations.json", {"version": 1, "allocations": [*bad, good]})
    assert [a["id"] for a in make_store(dirs).list()] == ["ok"]


@pytest.mark.parametrize(
    ("ident", "gpus", "pid"),
    [
        ("bad id", None, None),
        ("../../etc/x", None, None),
        ("", None, None),
        ("ok", [9], None),
        ("ok", [0, 0], None),
        ("ok", [], None),
        ("ok", [-1], None),
        ("ok", None, 0),
        ("ok", None, 2**30),
    ],
)
def test_refusals_write_nothing(
    dirs: tuple[Path, Path], ident: str, gpus: list[int] | None, pid: int | None
) -> None:
    store = make_store(dirs)
    store.allocate("keep", [0], None, {0: 1.0})
    before = (dirs[0] / "allocations.json").read_bytes()
    with pytest.raises(AllocationError):
        store.allocate(ident, gpus, pid, {0: 1.0})
    assert (dirs[0] / "allocations.json").read_bytes() == before
    assert not (dirs[1] / "allocations.csv").exists()
    assert sorted(p.name for p in dirs[0].iterdir()) == ["allocations.json"]
    with pytest.raises(AllocationError):
        store.release("bad/id", {0: 2.0})
    assert (dirs[0] / "allocations.json").read_bytes() == before
    assert not (dirs[1] / "allocations.csv").exists()


def test_nonexistent_gpu_reason(dirs: tuple[Path, Path]) -> None:
    with pytest.raises(AllocationError, match=r"GPU 9 not present on this node"):
        make_store(dirs).allocate("a", [9], None, {})


# ---------------------------------------------------------------------------------- summaries
def test_summary_energy_exact_and_csv(dirs: tuple[Path, Path]) -> None:
    clock = Clock()
    store = make_store(dirs, clock)
    store.allocate("job-7", [1, 3], None, {0: 5.0, 1: 1000.25, 3: 2000.0})
    clock.advance(12.5)
    summary = store.release("job-7", {0: 99.0, 1: 1500.75, 3: 2100.125})["summary"]
    assert summary["energy_j"] == 500.5 + 100.125
    assert summary["gpus"] == [1, 3]
    assert summary["start"] == "2026-01-02T03:04:05.678Z"
    assert summary["end"] == "2026-01-02T03:04:18.178Z"
    assert summary["duration_s"] == 12.5
    assert summary["release_reason"] == "released"
    assert summary["util_mean_pct"] is None
    path = dirs[1] / "allocations.csv"
    with open(path, newline="") as fh:
        header = next(csv.reader(fh))
    assert tuple(header) == SUMMARY_COLUMNS
    (row,) = rows(path)
    assert row["id"] == "job-7"
    assert row["gpus"] == "1;3"
    assert float(row["energy_j"]) == 600.625
    assert row["duration_s"] == "12.5"
    assert row["util_mean_pct"] == "" and row["memory_max_mib"] == ""
    assert row["release_reason"] == "released"


def test_summary_all_gpus_and_missing_counter(dirs: tuple[Path, Path]) -> None:
    store = make_store(dirs)
    store.allocate("all", None, None, {0: 1.0, 1: 1.0, 2: None, 3: 1.0})
    summary = store.release("all", {0: 2.0, 1: 2.0, 2: 2.0, 3: 2.0})["summary"]
    assert summary["gpus"] == [0, 1, 2, 3]
    assert summary["energy_j"] is None
    store.allocate("end-missing", [0], None, {0: 1.0})
    assert store.release("end-missing", {})["summary"]["energy_j"] is None
    (_, row) = rows(dirs[1] / "allocations.csv")
    assert row["energy_j"] == ""
    assert rows(dirs[1] / "allocations.csv")[0]["gpus"] == "0;1;2;3"


def test_summary_uses_recorder_stats(dirs: tuple[Path, Path]) -> None:
    store = make_store(dirs)
    store.allocate("j", [0], None, {0: 0.0})
    atomic_write_json(
        dirs[0] / "recorder.json",
        {
            "pid": 1,
            "tick": 3,
            "allocation_stats": {
                "j": {
                    "samples": 3,
                    "util_mean_pct": 42.5,
                    "util_max_pct": 90.0,
                    "temperature_max_c": 71.0,
                    "memory_max_mib": 2048.0,
                },
                "other": {"samples": 1, "util_mean_pct": 1.0},
            },
        },
    )
    summary = store.release("j", {0: 10.0})["summary"]
    assert summary["util_mean_pct"] == 42.5
    assert summary["util_max_pct"] == 90.0
    assert summary["temperature_max_c"] == 71.0
    assert summary["memory_max_mib"] == 2048.0
    (row,) = rows(dirs[1] / "allocations.csv")
    assert row["util_mean_pct"] == "42.5" and row["memory_max_mib"] == "2048"


def test_stale_recorder_stats_ignored(dirs: tuple[Path, Path]) -> None:
    clock = Clock()
    store = make_store(dirs, clock)
    atomic_write_json(
        dirs[0] / "recorder.json",
        {
            "timestamp": "2026-01-02T03:00:00.000Z",
            "allocation_stats": {"j": {"samples": 9, "util_mean_pct": 50.0}},
        },
    )
    store.allocate("j", [0], None, {0: 0.0})
    assert store.release("j", {0: 1.0})["summary"]["util_mean_pct"] is None


def _stats(samples: int, util: float) -> dict[str, object]:
    return {"samples": samples, "util_mean_pct": util, "util_readings": samples}


def test_release_takes_the_recorders_final_stats(dirs: tuple[Path, Path]) -> None:
    """The recorder's entry for an allocation it saw end wins over the open one, and one with
    another start (an earlier allocation of the same id) is not taken for it."""
    store = make_store(dirs)
    start = store.allocate("j", [0], None, {0: 0.0})["allocation"]["start"]
    state = {
        "allocation_stats": {"j": _stats(3, 10.0)},
        "ended_allocations": {"j": {"start": "2020-01-01T00:00:00.000Z", **_stats(9, 99.0)}},
    }
    atomic_write_json(dirs[0] / "recorder.json", state)
    assert store.release("j", {0: 1.0})["summary"]["util_mean_pct"] == 10.0
    store.allocate("k", [0], None, {0: 0.0})
    start = store.list()[0]["start"]
    state["ended_allocations"] = {"k": {"start": start, **_stats(4, 42.0)}}
    state["allocation_stats"] = {"k": _stats(3, 10.0)}
    atomic_write_json(dirs[0] / "recorder.json", state)
    assert store.release("k", {0: 1.0})["summary"]["util_mean_pct"] == 42.0


def test_release_asks_the_recorder_and_waits_for_the_end(dirs: tuple[Path, Path]) -> None:
    """Where the recorder publishes less often than it ticks, a release asks it to publish and
    waits (as long as the agent says) for the ended allocation's entry: every tick it was open,
    no more; a recorder that does not answer leaves the open entry as last published."""
    run, logs = dirs
    t = [0.0]
    asked: list[float] = []
    path = run / "recorder.json"
    answers = [True]

    def sleep(seconds: float) -> None:
        t[0] += seconds
        if answers[0] and t[0] >= 0.03:  # the recorder handles the request
            ended = {"j": {"start": start, **_stats(7, 55.0)}}
            atomic_write_json(path, {"ended_allocations": ended})

    def ask() -> float:
        asked.append(t[0])
        return 0.8

    store = AllocationStore(
        run, logs, [0], now=Clock(), ask_recorder=ask, monotonic=lambda: t[0], sleep=sleep
    )
    start = store.allocate("j", [0], None, {0: 0.0})["allocation"]["start"]
    atomic_write_json(path, {"allocation_stats": {"j": _stats(5, 50.0)}})
    assert store.release("j", {0: 1.0})["summary"]["util_mean_pct"] == 55.0
    assert asked == [0.0] and 0.03 <= t[0] < 0.05
    answers[0] = False
    start = store.allocate("k", [0], None, {0: 0.0})["allocation"]["start"]
    atomic_write_json(path, {"allocation_stats": {"k": _stats(5, 50.0)}})
    t[0] = 0.0
    assert store.release("k", {0: 1.0})["summary"]["util_mean_pct"] == 50.0
    assert 0.8 <= t[0] < 0.82


def test_csv_header_once_and_unwritable_log_dir(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    store = make_store(dirs)
    for name in ("a", "b", "c"):
        store.allocate(name, None, None, {})
        store.release(name, {})
    lines = (dirs[1] / "allocations.csv").read_text().splitlines()
    assert lines[0].startswith("id,gpus,start,end,duration_s,energy_j")
    assert len(lines) == 4
    blocker = tmp_path / "file"
    blocker.write_text("")
    broken = AllocationStore(dirs[0], blocker / "logs", [0])
    broken.allocate("z", None, None, {})
    assert broken.release("z", {})["released"] is True


# ---------------------------------------------------------------------------------- owners
def test_owner_pid_death_releases(dirs: tuple[Path, Path]) -> None:
    store = make_store(dirs)
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        store.allocate("owned", [0], owner.pid, {0: 1.0})
        store.allocate("free", None, None, {})
        assert store.reap_dead_owners({0: 2.0}) == []
        assert process_alive(owner.pid, process_start_time(owner.pid))
    finally:
        owner.stdin.close()  # type: ignore[union-attr]
        owner.wait()
    released = store.reap_dead_owners({0: 3.0})
    assert [s["id"] for s in released] == ["owned"]
    assert released[0]["release_reason"] == f"owner pid {owner.pid} exited"
    assert released[0]["energy_j"] == 2.0
    assert [a["id"] for a in store.list()] == ["free"]
    assert rows(dirs[1] / "allocations.csv")[0]["release_reason"].startswith("owner pid")


def test_zombie_owner_counts_as_dead(dirs: tuple[Path, Path]) -> None:
    store = make_store(dirs)
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    store.allocate("z", None, owner.pid, {})
    owner.stdin.close()  # type: ignore[union-attr]
    # Not reaped yet: the pid is a zombie until wait(); it must still count as dead.
    for _ in range(200):
        if psutil.Process(owner.pid).status() == psutil.STATUS_ZOMBIE:
            break
        threading.Event().wait(0.01)
    assert [s["id"] for s in store.reap_dead_owners({})] == ["z"]
    owner.wait()


def test_reused_pid_counts_as_dead(dirs: tuple[Path, Path]) -> None:
    import os

    store = make_store(dirs)
    store.allocate("me", None, os.getpid(), {})
    assert store.reap_dead_owners({}) == []
    data = json.loads((dirs[0] / "allocations.json").read_text())
    data["allocations"][0]["pid_start_time"] -= 3600
    atomic_write_json(dirs[0] / "allocations.json", data)
    again = make_store(dirs)
    assert [s["id"] for s in again.reap_dead_owners({})] == ["me"]


def test_dead_owner_refused_at_allocate(dirs: tuple[Path, Path]) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    store = make_store(dirs)
    with pytest.raises(AllocationError, match="not running"):
        store.allocate("late", None, proc.pid, {})
    assert not (dirs[0] / "allocations.json").exists()


def test_threads_leave_consistent_state(dirs: tuple[Path, Path]) -> None:
    store = make_store(dirs)

    def worker(n: int) -> None:
        for i in range(20):
            ident = f"t{n}-{i}"
            store.allocate(ident, [n % 4], None, {n % 4: float(i)})
            if i % 2:
                store.release(ident, {n % 4: float(i) + 1})

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = {f"t{n}-{i}" for n in range(8) for i in range(0, 20, 2)}
    assert {a["id"] for a in store.list()} == expected
    assert set(read_open_ids(dirs[0])) == expected
    assert len(rows(dirs[1] / "allocations.csv")) == 80
