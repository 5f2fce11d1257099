"""An event storm: the journal gets a few lines and one summary per interval, while events.csv
rows and the counters stay exact."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gputel.supervisor import events as events_mod
from gputel.supervisor.events import EventRecorder, LineLimiter, make_event


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_storm_is_summarised_while_rows_and_counters_stay_exact(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=events_mod.log.name)
    clock = Clock()
    rec = EventRecorder(tmp_path, clock=clock)
    for n in range(2000):
        clock.t += 0.01  # 2000 events in 20 s
        rec.record(make_event(1.8e9 + n, n % 2, f"GPU-{n % 2}", "xid", 79))
    clock.t += 60.0
    rec.lines.flush()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) <= 2 * LineLimiter.BURST + 2, messages
    summaries = [m for m in messages if "suppressed" in m]
    assert len(summaries) == 1, messages
    assert f"{2000 - 2 * LineLimiter.BURST} " in summaries[0]
    assert "Xid 79 on GPU 0" in summaries[0] and "Xid 79 on GPU 1" in summaries[0]
    rows = (tmp_path / "events.csv").read_text().splitlines()
    assert len(rows) == 1 + 2000
    assert sum(rec.counters.xid_counts().values()) == 2000


def test_quiet_intervals_log_every_line_and_no_summary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=events_mod.log.name)
    clock = Clock()
    rec = EventRecorder(tmp_path, clock=clock)
    for n in range(10):
        clock.t += 61.0
        rec.record(make_event(1.8e9 + n, 0, "GPU-0", "xid", 13))
        rec.lines.flush()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 10 and not any("suppressed" in m for m in messages)


def test_limiter_summarises_at_the_next_line_after_the_interval_too() -> None:
    seen: list[str] = []

    class Sink(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger("gputel.test.limiter")
    logger.propagate = False
    logger.addHandler(Sink())
    logger.setLevel(logging.INFO)
    clock = Clock()
    lim = LineLimiter(logger, interval_s=10.0, clock=clock)
    for _ in range(LineLimiter.BURST + 3):
        lim.log("k", logging.INFO, "line %s", "x")
    clock.t += 11
    lim.log("k", logging.INFO, "line %s", "y")
    assert seen[-2].startswith("3 ") and "suppressed" in seen[-2]
    assert seen[-1] == "line y"
