"""When the recorder publishes ``recorder.json`` and ``metrics.prom``: every tick at intervals of
a second or more, about once a second below that, and at once when the open allocations change
or the recorder stops; an ended allocation's statistics stay for the agent's release summary."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from gputel import runtime
from gputel.settings import load_settings
from gputel.sources.select import open_gpu_source
from gputel.telemetry.recorder import ENDED_KEPT_S, Recorder

T0 = datetime(2026, 12, 7, 12, 0, 0, tzinfo=timezone.utc)


class Clocks:
    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def wall(self) -> datetime:
        return T0 + timedelta(seconds=self.t - 1000.0)


def make(tmp_path: Path, interval: str) -> tuple[Recorder, Clocks]:
    settings = load_settings(
        {
            "GPUTEL_BACKEND": "sim",
            "GPUTEL_SIM_GPUS": "2",
            "GPUTEL_SIM_PATTERN": "90:600",
            "GPUTEL_INTERVAL": interval,
            "GPUTEL_LOG_DIR": str(tmp_path / "log"),
            "GPUTEL_RUN_DIR": str(tmp_path / "run"),
            "GPUTEL_PROC_ROOT": str(tmp_path / "proc"),
        }
    )
    runtime.ensure_run_dir(settings.run_dir)
    clocks = Clocks()
    source, _ = open_gpu_source(settings, {}, clocks.monotonic)
    rec = Recorder(
        settings, source, (), clock=clocks.monotonic, wallclock=clocks.wall, hostname="node"
    )
    return rec, clocks


def published_tick(rec: Recorder) -> int | None:
    state = runtime.read_json(rec.run_dir / runtime.RECORDER_STATE_FILE)
    return state["tick"] if isinstance(state, dict) else None


def ticks(rec: Recorder, clocks: Clocks, n: int, step: float) -> list[int | None]:
    """The published tick after each of ``n`` ticks ``step`` seconds apart."""
    out = []
    for _ in range(n):
        clocks.t += step
        rec.tick()
        out.append(published_tick(rec))
    return out


def test_sub_second_ticks_publish_about_once_a_second(tmp_path: Path) -> None:
    rec, clocks = make(tmp_path, "0.1")
    seen = ticks(rec, clocks, 25, 0.1)
    # The first tick at once, then every tenth: 1, 11, 21.
    assert seen == [1] * 10 + [11] * 10 + [21] * 5
    metrics = (rec.run_dir / runtime.METRICS_FILE).read_bytes()
    assert b"gputel_recorder_ticks_total 21.0\n" in metrics
    # Every tick is in the CSV all the same.
    assert len(rec.sink.gpu_path.read_text().splitlines()) == 1 + 25 * 2  # type: ignore[union-attr]
    # A stop publishes the ticks since the last publication.
    rec.close()
    assert published_tick(rec) == 25


def test_intervals_of_a_second_publish_every_tick(tmp_path: Path) -> None:
    rec, clocks = make(tmp_path, "1")
    assert ticks(rec, clocks, 4, 1.0) == [1, 2, 3, 4]
    rec.close()


def test_a_late_tick_does_not_skip_a_publication(tmp_path: Path) -> None:
    """Half a tick of slack: ticks that come a little early still publish on the tenth."""
    rec, clocks = make(tmp_path, "0.1")
    seen = ticks(rec, clocks, 12, 0.097)
    assert seen[10] == 11
    rec.close()


def open_allocations(rec: Recorder, *items: tuple[str, str]) -> None:
    runtime.atomic_write_json(
        rec.run_dir / runtime.ALLOCATIONS_FILE,
        {"allocations": [{"id": i, "gpus": [0], "start": start} for i, start in items]},
    )


def test_allocation_changes_publish_at_once_and_ended_stats_stay(tmp_path: Path) -> None:
    rec, clocks = make(tmp_path, "0.1")
    ticks(rec, clocks, 3, 0.1)
    open_allocations(rec, ("job-1", "2026-12-07T12:00:00.300Z"))
    assert ticks(rec, clocks, 1, 0.1) == [4]
    state = runtime.read_json(rec.run_dir / runtime.RECORDER_STATE_FILE)
    assert state["allocation_stats"]["job-1"]["samples"] == 1
    ticks(rec, clocks, 5, 0.1)
    open_allocations(rec)
    assert ticks(rec, clocks, 1, 0.1) == [10]
    state = runtime.read_json(rec.run_dir / runtime.RECORDER_STATE_FILE)
    assert state["allocation_stats"] == {}
    ended = state["ended_allocations"]["job-1"]
    # Six ticks open (the one that saw it and five more); not the one that saw it gone.
    assert ended["samples"] == 6 and ended["start"] == "2026-12-07T12:00:00.300Z"
    assert ended["util_mean_pct"] == pytest.approx(90.0)
    # A successor keeps them: a release waiting for them finds them across a restart.
    rec.close()
    successor, _ = make(tmp_path, "0.1")
    ticks(successor, clocks, 1, 0.1)
    state = runtime.read_json(rec.run_dir / runtime.RECORDER_STATE_FILE)
    assert state["ended_allocations"]["job-1"]["samples"] == 6
    successor.close()


def test_an_ended_allocation_leaves_the_state_after_its_time(tmp_path: Path) -> None:
    """Dropped ``ENDED_KEPT_S`` after it ended even when no allocation changes after it."""
    rec, clocks = make(tmp_path, "1")
    open_allocations(rec, ("job-1", "2026-12-07T12:00:00.000Z"))
    ticks(rec, clocks, 2, 1.0)
    open_allocations(rec)
    ticks(rec, clocks, int(ENDED_KEPT_S), 1.0)
    state = runtime.read_json(rec.run_dir / runtime.RECORDER_STATE_FILE)
    assert "job-1" in state["ended_allocations"]
    ticks(rec, clocks, 2, 1.0)
    state = runtime.read_json(rec.run_dir / runtime.RECORDER_STATE_FILE)
    assert state["ended_allocations"] == {}
    rec.close()


def test_an_id_opened_again_is_a_new_allocation(tmp_path: Path) -> None:
    rec, clocks = make(tmp_path, "0.1")
    open_allocations(rec, ("job-1", "2026-12-07T12:00:00.000Z"))
    ticks(rec, clocks, 3, 0.1)
    open_allocations(rec, ("job-1", "2026-12-07T12:00:00.300Z"))
    ticks(rec, clocks, 2, 0.1)
    state = runtime.read_json(rec.run_dir / runtime.RECORDER_STATE_FILE)
    assert state["ended_allocations"]["job-1"]["samples"] == 3
    assert state["allocation_stats"]["job-1"]["samples"] == 1  # published at the change
    rec.close()


def test_a_request_publishes_between_ticks(tmp_path: Path) -> None:
    """SIGUSR1 (the agent, releasing an allocation): the allocation's end is published at
    once, with the ticks it was open and without a tick of its own."""
    rec, clocks = make(tmp_path, "0.1")
    open_allocations(rec, ("job-1", "2026-12-07T12:00:00.000Z"))
    ticks(rec, clocks, 4, 0.1)
    open_allocations(rec)
    rec.request_publish()
    assert rec._publish_asked
    rec.publish_now()
    state = runtime.read_json(rec.run_dir / runtime.RECORDER_STATE_FILE)
    assert state["tick"] == 4 and state["ended_allocations"]["job-1"]["samples"] == 4
    assert state["allocation_stats"] == {}
    rec.close()
