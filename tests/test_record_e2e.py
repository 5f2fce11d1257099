"""``gputel record`` end to end: the real command on simulated GPUs and a fake sysfs.

Covers the recorder wiring in-process (run-directory files, allocation tagging and statistics),
then real subprocesses: SIGKILL mid-run leaves no partial line, SIGTERM exits 0, standalone
serves /metrics, the real logrotate rotates without losing or duplicating a row, and a full
filesystem costs counted rows while sampling carries on.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from fakesysfs import add_hwmon_chip, add_rapl_zone
from gputel import runtime
from gputel.schema import GPU_CSV_COLUMNS, HOST_CSV_COLUMNS
from gputel.settings import load_settings
from gputel.sources.sim import SimGpuSource
from gputel.telemetry.recorder import Recorder

INTERVAL = "0.05"


# ------------------------------------------------------------------------------- helpers
def fake_sysfs(root: Path) -> Path:
    add_rapl_zone(root, "intel-rapl:0", "package-0", energy_uj=1_000_000)
    add_hwmon_chip(root, "hwmon0", "coretemp", {1: (45000, "Package id 0")})
    return root


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def csv_files(log_dir: Path, kind: str) -> list[Path]:
    """Current and rotated files of a kind (logrotate renames x.csv to x.csv.1)."""
    return sorted(p for p in log_dir.iterdir() if p.name.startswith(f"{kind}-"))


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), f"partial last line in {path.name}"
    lines = text.splitlines()
    header = lines[0].split(",") if lines else []
    with open(path, newline="") as fh:
        return header, list(csv.DictReader(fh))


class Record:
    """A running ``gputel record`` subprocess."""

    def __init__(self, tmp: Path, *args: str, log_dir: Path | None = None) -> None:
        self.log_dir = log_dir or tmp / "log"
        self.run_dir = tmp / "run"
        sysfs = fake_sysfs(tmp / "sys")
        cmd = [
            sys.executable, "-m", "gputel", "record",
            "--backend", "sim", "--sim-gpus", "2", "--sim-pattern", "0:0.5,90:60",
            "--interval", INTERVAL, "--log-dir", str(self.log_dir),
            "--run-dir", str(self.run_dir), "--sysfs-root", str(sysfs),
            *args,
        ]  # fmt: skip
        self.stderr_path = tmp / "stderr.txt"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._stderr)

    def state(self) -> dict | None:
        return runtime.read_json(self.run_dir / runtime.RECORDER_STATE_FILE)

    def ticks(self) -> int:
        st = self.state()
        return int(st["tick"]) if st else 0

    def wait_ticks(self, n: int, timeout: float = 15.0) -> None:
        wait_for(lambda: self.ticks() >= n or self.proc.poll() is not None, timeout)
        assert self.proc.poll() is None, self.stderr()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=10)
        self._stderr.close()
        return rc


@pytest.fixture
def recorders() -> Iterator[list[Record]]:
    started: list[Record] = []
    yield started
    for r in started:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()
        r._stderr.close()


def check_gpu_files(files: list[Path], gpus: int = 2) -> list[str]:
    """Every file has the header; one row per GPU per tick; returns the tick timestamps."""
    stamps: list[str] = []
    for path in files:
        header, rows = read_rows(path)
        assert header == list(GPU_CSV_COLUMNS), path.name
        assert len(rows) % gpus == 0, path.name
        energy: dict[str, float] = {}
        for k in range(0, len(rows), gpus):
            tick = rows[k : k + gpus]
            assert [r["gpu"] for r in tick] == [str(i) for i in range(gpus)]
            assert len({r["timestamp"] for r in tick}) == 1
            stamps.append(tick[0]["timestamp"])
            for r in tick:
                e = float(r["energy_j"])
                assert e >= energy.get(r["gpu"], 0.0)
                energy[r["gpu"]] = e
                assert r["fan_speed_pct"] == ""  # unsupported on the simulated board
        if rows:
            assert all(float(r["energy_j"]) == 0.0 for r in rows[:gpus])
    return stamps


# ---------------------------------------------------------------------------- in-process
def test_tick_publishes_state_and_tags_allocations(tmp_path: Path) -> None:
    settings = load_settings(
        env={},
        overrides={
            "log_dir": str(tmp_path / "log"),
            "run_dir": str(tmp_path / "run"),
            "interval_s": "1",
        },
    )
    runtime.ensure_run_dir(settings.run_dir)
    clock = [100.0]
    wall = [datetime(2026, 11, 22, 3, 45, 12, tzinfo=timezone.utc)]
    gpu = SimGpuSource(3, "0:1,50:10;100:10", None, epoch=99.0, clock=lambda: clock[0])
    rec = Recorder(
        settings,
        gpu,
        [],
        clock=lambda: clock[0],
        wallclock=lambda: wall[0],
        hostname="node01",
    )

    def step() -> None:
        rec.tick()
        clock[0] += 1.0
        wall[0] += timedelta(seconds=1)

    step()
    start = "2026-11-22T03:45:13.000Z"
    runtime.atomic_write_json(
        settings.run_dir / runtime.ALLOCATIONS_FILE,
        {
            "version": 1,
            "allocations": [
                {"id": "job-1", "gpus": [1], "pid": None, "start": start, "start_energy_j": {}},
                {
                    "id": "job-all",
                    "gpus": None,
                    "pid": None,
                    "start": start,
                    "start_energy_j": {},
                },
            ],
        },
    )
    step()
    step()
    rec.close()
    state = json.loads((settings.run_dir / runtime.RECORDER_STATE_FILE).read_text())
    assert state["pid"] == os.getpid() and state["tick"] == 3
    assert state["monotonic"] == 102.0
    assert state["timestamp"] == "2026-11-22T03:45:14.000Z"
    assert state["files"]["gpu"].endswith("gpu-20261122T034512Z-node01.csv")
    assert state["rows_failed"] == 0 and state["ticks_missed"] == 0
    stats = state["allocation_stats"]
    job1_energy = stats["job-1"].pop("energy_j")
    assert stats["job-1"] == {
        "samples": 2,
        "util_readings": 2,
        "util_mean_pct": 100.0,
        "util_max_pct": 100.0,
        "temperature_max_c": stats["job-1"]["temperature_max_c"],
        "memory_max_mib": stats["job-1"]["memory_max_mib"],
        # The simulated GPU at 100 % reports SM activity and its power cap active.
        "sm_readings": 2,
        "sm_active_mean_pct": stats["job-1"]["sm_active_mean_pct"],
        "throttled_s": 2 * settings.interval_s,
    }
    assert stats["job-1"]["sm_active_mean_pct"] > 50
    assert stats["job-all"]["samples"] == 2
    assert stats["job-all"]["util_mean_pct"] == pytest.approx((50 + 100 + 100) * 2 / 6)
    metrics = (settings.run_dir / runtime.METRICS_FILE).read_text()
    assert "gputel_recorder_ticks_total 3.0" in metrics
    assert "gputel_telemetry_active" not in metrics
    _, rows = read_rows(Path(state["files"]["gpu"]))
    assert [r["allocations"] for r in rows] == [
        "", "", "",
        "job-all", "job-1;job-all", "job-all",
        "job-all", "job-1;job-all", "job-all",
    ]  # fmt: skip
    # The one allocation energy rule: the rise of GPU 1's energy_j over its tagged rows, each
    # from the row before it (gputel report counts the same).
    assert job1_energy == pytest.approx(float(rows[7]["energy_j"]) - float(rows[1]["energy_j"]))

    # A restarted recorder (a crashed child) goes on with the statistics of open allocations.
    rec = Recorder(
        settings, gpu, [], clock=lambda: clock[0], wallclock=lambda: wall[0], hostname="node01"
    )
    step()
    rec.close()
    stats = json.loads((settings.run_dir / runtime.RECORDER_STATE_FILE).read_text())[
        "allocation_stats"
    ]
    assert stats["job-1"]["samples"] == 3 and stats["job-1"]["util_readings"] == 3
    assert stats["job-all"]["samples"] == 3
    assert stats["job-all"]["util_mean_pct"] == pytest.approx((50 + 100 + 100) * 3 / 9)


def test_restarted_recorder_ignores_stats_of_an_earlier_allocation(tmp_path: Path) -> None:
    settings = load_settings(
        env={}, overrides={"log_dir": str(tmp_path / "log"), "run_dir": str(tmp_path / "run")}
    )
    runtime.ensure_run_dir(settings.run_dir)
    old = {"samples": 40, "util_readings": 40, "util_mean_pct": 90.0, "util_max_pct": 90.0}
    runtime.atomic_write_json(
        settings.run_dir / runtime.RECORDER_STATE_FILE,
        {"timestamp": "2026-11-22T03:00:00.000Z", "allocation_stats": {"job": old}},
    )
    runtime.atomic_write_json(
        settings.run_dir / runtime.ALLOCATIONS_FILE,
        {
            "version": 1,
            "allocations": [  # the same id, begun after that recorder last wrote
                {"id": "job", "gpus": None, "pid": None, "start": "2026-11-22T03:45:00.000Z"}
            ],
        },
    )
    wall = datetime(2026, 11, 22, 3, 45, 12, tzinfo=timezone.utc)
    rec = Recorder(settings, SimGpuSource(1, "50:10", None, epoch=0.0), [], wallclock=lambda: wall)
    rec.tick()
    rec.close()
    state = json.loads((settings.run_dir / runtime.RECORDER_STATE_FILE).read_text())
    assert state["allocation_stats"]["job"]["samples"] == 1


# ---------------------------------------------------------------------------- subprocess
def test_sigkill_mid_run_leaves_whole_rows(tmp_path: Path, recorders: list[Record]) -> None:
    r = Record(tmp_path, "--child")
    recorders.append(r)
    r.wait_ticks(20)
    r.stop(signal.SIGKILL)
    gpu_files = csv_files(r.log_dir, "gpu")
    host_files = csv_files(r.log_dir, "host")
    assert len(gpu_files) == 1 and len(host_files) == 1
    stamps = check_gpu_files(gpu_files)
    assert len(stamps) >= 20
    assert stamps == sorted(set(stamps))  # strictly increasing
    header, hrows = read_rows(host_files[0])
    assert header == list(HOST_CSV_COLUMNS)
    hstamps = [row["timestamp"] for row in hrows]
    assert hstamps == sorted(set(hstamps))
    assert hrows[-1]["cpu_package_power_w"] == "0.00"  # the fake RAPL counter never moves
    assert hrows[-1]["cpu_temperature_c"] == "45.00"
    # child mode: metrics.prom and a heartbeat, no server
    assert (r.run_dir / runtime.METRICS_FILE).exists()


def test_sigterm_exits_zero_and_heartbeat_moves(tmp_path: Path, recorders: list[Record]) -> None:
    r = Record(tmp_path, "--child")
    recorders.append(r)
    r.wait_ticks(3)
    first = r.state()
    r.wait_ticks(first["tick"] + 3)
    second = r.state()
    assert second["monotonic"] > first["monotonic"]
    assert r.stop(signal.SIGTERM) == 0
    stderr = r.stderr()
    assert "stopped after" in stderr and "Traceback" not in stderr
    stamps = check_gpu_files(csv_files(r.log_dir, "gpu"))
    assert len(stamps) >= second["tick"]


def test_standalone_serves_metrics(tmp_path: Path, recorders: list[Record]) -> None:
    port = free_port()
    r = Record(tmp_path, "--exporter-addr", "127.0.0.1", "--exporter-port", str(port))
    recorders.append(r)

    def scrape() -> tuple[bytes, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                return resp.read(), resp.headers["Content-Type"]
        except OSError:
            return b"", ""

    def ticked() -> bool:
        text = scrape()[0].decode()
        return (
            any(
                line.startswith("gputel_recorder_ticks_total ") and float(line.split()[1]) >= 2
                for line in text.splitlines()
            )
            or r.proc.poll() is not None
        )

    wait_for(ticked, 15)
    assert r.proc.poll() is None, r.stderr()
    body, content_type = scrape()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    # A standalone recorder publishes nothing into the run directory: that is the agent's.
    assert not (r.run_dir / runtime.RECORDER_STATE_FILE).exists()
    assert not (r.run_dir / runtime.METRICS_FILE).exists()
    text = body.decode()
    assert "gputel_telemetry_active 1" in text
    assert 'gputel_gpu_utilization_ratio{gpu="1"' in text
    assert 'gputel_source_up{source="sim"} 1.0' in text
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        assert resp.status == 200
    if shutil.which("promtool"):
        res = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
        assert res.returncode == 0, res.stdout + res.stderr
    assert r.stop() == 0


@pytest.mark.skipif(not Path("/usr/sbin/logrotate").exists(), reason="logrotate not installed")
def test_logrotate_loses_and_duplicates_no_row(tmp_path: Path, recorders: list[Record]) -> None:
    r = Record(tmp_path, "--child")
    recorders.append(r)
    r.wait_ticks(5)
    conf = tmp_path / "gputel.logrotate"
    conf.write_text(
        f"""{r.log_dir}/*.csv {{
    rotate 100
    missingok
    notifempty
    nocompress
    nocopytruncate
    sharedscripts
    postrotate
        kill -HUP {r.proc.pid}
    endscript
}}
"""
    )
    for _ in range(3):
        before = r.ticks()
        res = subprocess.run(
            ["/usr/sbin/logrotate", "-f", "-s", str(tmp_path / "state"), str(conf)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 0, res.stderr
        r.wait_ticks(before + 4)
    assert r.stop() == 0
    gpu_files = csv_files(r.log_dir, "gpu")
    assert any(p.name.endswith(".csv.1") for p in gpu_files)
    assert len(gpu_files) >= 4
    stamps = check_gpu_files(gpu_files)
    assert len(stamps) == len(set(stamps)), "a tick was written twice"
    state_ticks = r.state()["tick"]
    assert len(stamps) == state_ticks, "a tick is missing"
    host_stamps: list[str] = []
    for p in csv_files(r.log_dir, "host"):
        header, rows = read_rows(p)
        assert header == list(HOST_CSV_COLUMNS)
        host_stamps += [row["timestamp"] for row in rows]
    assert sorted(host_stamps) == sorted(set(stamps))


def shipped_session_policy(log_dir: Path, pid: int) -> str:
    """The installed policy's session-file stanza, pointed at ``log_dir`` and this recorder."""
    text = (Path(__file__).resolve().parents[1] / "logrotate" / "gputel").read_text()
    stanza = text[text.index("/var/log/gputel/gpu-*.csv") :]
    stanza = stanza[: stanza.index("}\n") + 2]
    stanza = stanza.replace("/var/log/gputel", str(log_dir))
    lines = [ln for ln in stanza.splitlines() if not ln.strip().startswith(("su ", "#"))]
    body = "\n".join(lines)
    start = body.index("postrotate") + len("postrotate")
    end = body.index("endscript")
    return body[:start] + f"\n        kill -HUP {pid}; sleep 0.2\n    " + body[end:] + "\n"


@pytest.mark.skipif(not Path("/usr/sbin/logrotate").exists(), reason="logrotate not installed")
def test_forced_rotations_within_one_second_lose_no_file(
    tmp_path: Path, recorders: list[Record]
) -> None:
    """The shipped policy (rotate 1, compress) forced again and again: every tick survives.

    A name reused within one second would be rotated onto its predecessor's ``.1.gz`` and
    ``rotate 1`` would delete that older copy with its rows.
    """
    r = Record(tmp_path, "--child")
    recorders.append(r)
    r.wait_ticks(3)
    conf = tmp_path / "gputel.logrotate"
    conf.write_text(shipped_session_policy(r.log_dir, r.proc.pid))
    for _ in range(8):
        if any("_00" in p.name for p in csv_files(r.log_dir, "gpu")):
            break  # two files began within one second and both are kept
        res = subprocess.run(
            ["/usr/sbin/logrotate", "-f", "-s", str(tmp_path / "state"), str(conf)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 0, res.stderr
        # A row in the new file (recorder.json, published about once a second at this
        # interval, would space the rotations too far apart).
        wait_for(
            lambda: any(
                p.name.endswith(".csv") and p.read_bytes().count(b"\n") >= 2
                for p in csv_files(r.log_dir, "gpu")
            )
        )
    assert r.stop() == 0
    files = csv_files(r.log_dir, "gpu")
    plain: list[Path] = []
    for p in files:
        if p.name.endswith(".gz"):
            out = tmp_path / "unzipped" / p.name[: -len(".gz")]
            out.parent.mkdir(exist_ok=True)
            out.write_bytes(gzip.decompress(p.read_bytes()))
            plain.append(out)
        else:
            plain.append(p)
    stamps = check_gpu_files(plain)
    assert len(stamps) == len(set(stamps)), "a tick was written twice"
    assert len(stamps) == r.state()["tick"], "a rotated file was deleted with its rows"
    assert any("_00" in p.name for p in files), "no two files began within one second"


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


@pytest.mark.root
def test_disk_full_counts_rows_and_resumes(tmp_path: Path, recorders: list[Record]) -> None:
    with tiny_tmpfs(tmp_path / "small", "64k") as log_dir:
        filler = log_dir / "filler"
        # Busy from the first tick: two simulated processes per GPU on every tick.
        r = Record(tmp_path, "--child", "--sim-pattern", "90:60", log_dir=log_dir)
        recorders.append(r)
        r.wait_ticks(3)
        # Fill every remaining block.
        with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as fh:
            while True:
                fh.write(b"\0" * 4096)
        wait_for(lambda: r.state()["rows_failed"] > 0)
        ticks = r.ticks()
        r.wait_ticks(ticks + 5)  # sampling carries on
        metrics = (r.run_dir / runtime.METRICS_FILE).read_text()
        assert metric(metrics, "gputel_csv_rows_failed_total") > 0
        failed = r.state()["rows_failed"]
        filler.unlink()
        assert failed > 0
        r.wait_ticks(r.ticks() + 2)
        settled = r.state()["rows_failed"]
        r.wait_ticks(r.ticks() + 5)
        assert r.state()["rows_failed"] == settled  # writing resumed
        assert r.stop() == 0
        stamps = check_gpu_files(csv_files(log_dir, "gpu"))
        assert stamps == sorted(set(stamps))
        host_rows = sum(len(read_rows(p)[1]) for p in csv_files(log_dir, "host"))
        final = r.state()
        proc_rows = sum(len(read_rows(p)[1]) for p in csv_files(log_dir, "processes"))
        # every row of every tick (2 GPUs, host, 4 processes) is in a file or counted as failed
        written = 2 * len(stamps) + host_rows + proc_rows
        assert written + final["rows_failed"] == 7 * final["tick"]
        stderr = r.stderr()
        assert stderr.count("cannot write CSV rows") == 1
        assert stderr.count("recovered") == 1


def test_bad_gpu_selection_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A GPU index the node does not have is a bad setting: exit 2, one line, nothing written."""
    cmd = [
        sys.executable, "-m", "gputel", "record", "--backend", "sim", "--sim-gpus", "2",
        "--gpus", "5", "--log-dir", str(tmp_path / "log"), "--run-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "GPUTEL_GPUS" in res.stderr
    assert not (tmp_path / "log").exists()


def test_child_stops_when_its_agent_is_gone(tmp_path: Path) -> None:
    """A --child recorder whose parent was SIGKILLed stops by itself, leaving whole rows."""
    env = {
        **os.environ,
        "GPUTEL_BACKEND": "sim",
        "GPUTEL_SIM_GPUS": "1",
        "GPUTEL_INTERVAL": "0.05",
        "GPUTEL_LOG_DIR": str(tmp_path / "log"),
        "GPUTEL_RUN_DIR": str(tmp_path / "run"),
        "GPUTEL_SYSFS_ROOT": str(tmp_path),  # no RAPL, no hwmon
    }
    parent_code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-m', 'gputel', 'record', '--child'])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], env=env, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    state = tmp_path / "run" / "recorder.json"
    deadline = time.monotonic() + 15
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.exists(), "child never wrote its heartbeat"
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        # The orphan is reparented to init (or a subreaper) and reaped there.
        try:
            with open(f"/proc/{child_pid}/stat") as fh:
                if fh.read().split(")")[-1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        os.kill(child_pid, 9)
        raise AssertionError("orphaned child kept running")
    for f in (tmp_path / "log").glob("gpu-*.csv"):
        assert f.read_bytes().endswith(b"\n")
