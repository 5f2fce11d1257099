"""``gputel hook allocate | release | list``: exit codes, output, and the real agent behind it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_doubles import ServedAgent
from gputel.control.client import agent_answers, request
from test_hooks import GPUTEL, env_for, running_agent, stop_agent


def hook(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GPUTEL, "hook", *args],
        env=env_for(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[ServedAgent]:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    with ServedAgent(run, tmp_path / "log", [0, 1]) as agent:
        yield agent


@pytest.fixture
def real_agent(tmp_path: Path) -> Iterator[Path]:
    with running_agent(tmp_path) as run:
        yield run


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "args",
    [
        ["allocate", "bad id"],
        ["allocate", "a/b"],
        ["allocate", "x" * 129],
        ["allocate", "ok", "--gpus", "0,x"],
        ["allocate", "ok", "--gpus", "0,0"],
        ["allocate", "ok", "--gpus", "-1"],
        ["allocate", "ok", "--pid", "0"],
        ["release", "bad;id"],
    ],
)
def test_bad_input_exits_2_one_line_writes_nothing(
    tmp_path: Path, fake: ServedAgent, args: list[str]
) -> None:
    out = hook(tmp_path, *args)
    assert out.returncode == 2, out
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("gputel: ")
    assert fake.requests == []
    assert not (fake.run_dir / "allocations.json").exists()
    assert not (tmp_path / "log" / "allocations.csv").exists()


def test_nonexistent_gpu_refused_by_agent_exit_2(tmp_path: Path, fake: ServedAgent) -> None:
    out = hook(tmp_path, "allocate", "job", "--gpus", "0,7")
    assert out.returncode == 2
    assert "GPU 7 not present" in out.stderr and len(out.stderr.splitlines()) == 1
    assert not (fake.run_dir / "allocations.json").exists()


def test_gpus_flag_is_the_allocations_not_the_setting(tmp_path: Path, fake: ServedAgent) -> None:
    out = hook(tmp_path, "allocate", "job", "--gpus", "1", GPUTEL_GPUS="0")
    assert out.returncode == 0, out.stderr
    assert fake.store.list()[0]["gpus"] == [1]


# ---------------------------------------------------------------------------------- happy path
def test_allocate_list_release(tmp_path: Path, fake: ServedAgent) -> None:
    fake.energy = {0: 10.0, 1: 20.0}
    out = hook(tmp_path, "allocate", "job-1", "--gpus", "0,1", "--pid", str(os.getpid()))
    assert out.returncode == 0, out.stderr
    assert "job-1" in out.stdout
    again = hook(tmp_path, "allocate", "job-1")
    assert again.returncode == 0 and "already open" in again.stdout
    listed = hook(tmp_path, "list", "--json")
    assert listed.returncode == 0
    (alloc,) = json.loads(listed.stdout)["allocations"]
    assert alloc["id"] == "job-1" and alloc["gpus"] == [0, 1] and alloc["pid"] == os.getpid()
    table = hook(tmp_path, "list")
    assert "job-1" in table.stdout and "0,1" in table.stdout
    fake.energy = {0: 110.0, 1: 70.5}
    rel = hook(tmp_path, "release", "job-1")
    assert rel.returncode == 0, rel.stderr
    assert "released job-1" in rel.stdout and "150.5 J" in rel.stdout
    assert hook(tmp_path, "release", "job-1").stdout.strip() == "allocation job-1 was not open"
    assert hook(tmp_path, "list").stdout.strip() == "no open allocations"
    rel_json = hook(tmp_path, "release", "nope", "--json")
    assert json.loads(rel_json.stdout) == {"ok": True, "released": False, "summary": None}


def test_quiet(tmp_path: Path, fake: ServedAgent) -> None:
    assert hook(tmp_path, "allocate", "q", "-q").stdout == ""
    assert hook(tmp_path, "release", "q", "--quiet").stdout == ""


# ---------------------------------------------------------------------------------- no agent
def test_release_and_list_without_agent_exit_1(tmp_path: Path) -> None:
    for args in (["release", "job"], ["list"], ["list", "--json"]):
        out = hook(tmp_path, *args)
        assert out.returncode == 1
        assert "agent not running" in out.stderr and len(out.stderr.splitlines()) == 1


def test_allocate_starts_the_agent(tmp_path: Path) -> None:
    run = tmp_path / "run"
    try:
        out = hook(tmp_path, "allocate", "first", "--gpus", "1", "--wait", "15")
        assert out.returncode == 0, out.stderr + (
            (run / "agent.log").read_text() if (run / "agent.log").exists() else ""
        )
        assert "started a local agent" in out.stderr or "already running" in out.stderr
        status = request(run, {"op": "status"})
        assert [a["id"] for a in status["allocations"]] == ["first"]
        assert status["telemetry_active"] is True
        rel = hook(tmp_path, "release", "first")
        assert rel.returncode == 0 and "released first" in rel.stdout
    finally:
        stop_agent(run)


# ---------------------------------------------------------------------------------- real agent
def test_owner_death_releases_through_real_agent(tmp_path: Path, real_agent: Path) -> None:
    # The owner lives until its stdin closes: not a sleep that a loaded machine may outrun.
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    out = hook(tmp_path, "allocate", "owned", "--gpus", "0", "--pid", str(owner.pid))
    assert out.returncode == 0, out.stderr
    assert hook(tmp_path, "allocate", "unowned").returncode == 0
    # At least one recorded tick of the allocation, so its summary has energy.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(
        "owned" in line
        for f in (tmp_path / "log").glob("gpu-*.csv")
        for line in f.read_text().splitlines()[1:]
    ):
        time.sleep(0.1)
    assert owner.stdin is not None
    owner.stdin.close()
    owner.wait()
    path = tmp_path / "log" / "allocations.csv"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not path.exists():
        time.sleep(0.1)
    with open(path, newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["id"] == "owned" and row["gpus"] == "0"
    assert row["release_reason"] == f"owner pid {owner.pid} exited"
    assert row["energy_j"] != ""
    listed = json.loads(hook(tmp_path, "list", "--json").stdout)
    assert [a["id"] for a in listed["allocations"]] == ["unowned"]


def test_allocations_survive_agent_restart(tmp_path: Path) -> None:
    run = tmp_path / "run"
    try:
        assert hook(tmp_path, "allocate", "persist", "--wait", "15").returncode == 0
        stop_agent(run)
        assert not agent_answers(run, timeout=0.5)
        assert hook(tmp_path, "allocate", "other", "--wait", "15").returncode == 0
        listed = json.loads(hook(tmp_path, "list", "--json").stdout)
        assert [a["id"] for a in listed["allocations"]] == ["persist", "other"]
    finally:
        stop_agent(run)


def test_release_summary_names_the_xids_that_hit_the_allocation(tmp_path: Path) -> None:
    """Xids on the allocation's GPU while it is open are in its summary and allocations.csv;
    one on another GPU is not."""
    events = "0:79@8,1:13@8,0:31@9,0:79@9"
    with running_agent(tmp_path, GPUTEL_SIM_EVENTS=events) as run:
        out = hook(tmp_path, "allocate", "xjob", "--gpus", "0")
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 30
        while len(request(run, {"op": "status"}).get("events") or []) < 4:
            assert time.monotonic() < deadline, "the simulated Xids never came"
            time.sleep(0.2)
        out = hook(tmp_path, "release", "xjob", "--json")
        assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)["summary"]
    assert summary["xids"] == [79, 31]
    with open(tmp_path / "log" / "allocations.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["xids"] == "79;31"
