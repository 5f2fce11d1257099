"""The Parquet export of what a real agent recorded: every kind, every column, every row, and
``--incremental`` adding exactly what is new, while recording and after."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from exportcheck import assert_dataset_equals_csvs, csv_rows, parquet_utc_flags
from test_agent_e2e import AgentProc, wait_for

#: Busy simulated GPUs (so the sim lists processes), one Xid half a second in.
AGENT_ENV = {
    "GPUTEL_SIM_PATTERN": "90:600",
    "GPUTEL_SIM_EVENTS": "0:79@0.5",
    "GPUTEL_START_SECONDS": "0.2",
    "GPUTEL_EXPORTER_PORT": "0",
}


def gputel(env: dict[str, str] | None, *args: str) -> subprocess.CompletedProcess[str]:
    """A gputel command (``env`` None: this environment without gputel's settings)."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUTEL_")}
    return subprocess.run(
        [sys.executable, "-m", "gputel", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def rows_of(log: Path, kind: str) -> int:
    return sum(csv_rows([log])[kind][1].values())


def record_session(tmp: Path, job: str, **env: str) -> AgentProc:
    """An agent session with an allocation (opened and released by ``gputel hook``), an Xid
    and GPU processes; returns the agent, still running."""
    agent = AgentProc(tmp, {**AGENT_ENV, **env})
    try:
        opened = gputel(agent.env, "hook", "allocate", job, "--gpus", "0")
        assert opened.returncode == 0, opened.stderr
        wait_for(lambda: rows_of(agent.log_dir, "gpu") >= 20, 30, "GPU rows")
        wait_for(lambda: rows_of(agent.log_dir, "processes") >= 4, 30, "process rows")
        wait_for(lambda: rows_of(agent.log_dir, "events") >= 1, 30, "the Xid")
    except BaseException:
        agent.kill()
        raise
    return agent


def finish(agent: AgentProc, job: str) -> None:
    released = gputel(agent.env, "hook", "release", job)
    assert released.returncode == 0, released.stderr
    assert agent.terminate() == 0


def export(env: dict[str, str] | None, out: Path, log: Path, *flags: str) -> dict[str, int]:
    res = gputel(env, "export", "--parquet", str(out), *flags, str(log))
    assert res.returncode == 0, res.stderr
    added = {}
    for line in res.stdout.splitlines():
        if line.startswith("wrote "):
            kind = Path(line.split()[1]).name
            added[kind] = int(line.split("(")[1].split()[0].replace(",", ""))
    return added


def test_export_holds_every_row_and_incremental_adds_exactly_the_new(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    agent = record_session(tmp_path / "node", "job-1")
    log = agent.log_dir
    try:
        # While the recorder writes: whatever is whole now goes out.
        first = export(agent.env, out, log)
        assert first["gpu"] > 0 and first["processes"] > 0 and first["events"] == 1
    finally:
        finish(agent, "job-1")
    before = {k: sum(v[1].values()) for k, v in csv_rows([log]).items()}
    # The same files, finished: the rest of each is picked up where the first run stopped.
    more = export(agent.env, out, log, "--incremental")
    counts = assert_dataset_equals_csvs(out, [log])
    assert counts == before
    assert more["allocations"] == 1
    assert all(counts[k] == first.get(k, 0) + more.get(k, 0) for k in counts)
    assert {"mig"} >= {k for k, n in counts.items() if n == 0}
    assert parquet_utc_flags(out) and all("isAdjustedToUTC=1" in f for f in parquet_utc_flags(out))

    # A rerun over unchanged data adds nothing and touches no file.
    files = sorted(p.relative_to(out) for p in out.rglob("*.parquet"))
    again = gputel(agent.env, "export", "--parquet", str(out), "--incremental", str(log))
    assert again.returncode == 0 and "nothing new" in again.stdout
    assert sorted(p.relative_to(out) for p in out.rglob("*.parquet")) == files

    # A second agent session in the same directory: new session files, rows appended to the
    # logs; exactly those go out.
    agent = record_session(tmp_path / "node", "job-2")
    finish(agent, "job-2")
    after = {k: sum(v[1].values()) for k, v in csv_rows([log]).items()}
    added = export(agent.env, out, log, "--incremental")
    assert {k: n for k, n in added.items() if n} == {
        k: after[k] - before[k] for k in after if after[k] != before[k]
    }
    assert assert_dataset_equals_csvs(out, [log]) == after


def test_non_empty_out_is_refused_in_one_line(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.mkdir()
    (log / "events.csv").write_text(
        "timestamp,gpu,uuid,event,xid,detail,allocations\n2026-11-22T10:00:00.000Z,0,U,xid,79,d,\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    env = None
    for flags in ([], ["--incremental"], ["--incremental", "--overwrite"]):
        res = gputel(env, "export", "--parquet", str(out), *flags, str(log))
        assert res.returncode == 2, (flags, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
