"""``gputel job``: one allocation's figures, words, JSON and self-contained page."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from rich.console import Console

from gputel.analysis.filter import UnknownAllocation
from gputel.analysis.job import build_job, verdict
from gputel.cli.demo import DEMO_JOB, run_demo
from gputel.schema import PROCESS_CSV_COLUMNS
from test_analysis import T0, iso, power_of, write_gpu_csv

pytest.importorskip("duckdb")

JOB = "slurm-123"
EVENT_COLUMNS = ("timestamp", "gpu", "uuid", "event", "xid", "detail", "allocations")


def _gputel(*args: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gputel", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": str(columns)},
    )


def _write_rows(path: Path, columns: tuple[str, ...], rows: list[dict[str, object]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow(row)


def _at(k: float) -> str:
    return iso(T0 + timedelta(seconds=k))


def recorded(tmp: Path) -> Path:
    """120 ticks on two GPUs; the job holds both from tick 10 to 109. GPU 0 works (under the
    power cap, with low SM activity: busy but stalled) from 20 to 99, GPU 1 idles throughout.
    One process per GPU, an Xid on GPU 0 during the job, another before it, one on GPU 1 after."""
    write_gpu_csv(
        tmp / "gpu-20261122T100000Z-n.csv",
        T0,
        120,
        lambda k, g: 90.0 if g == 0 and 20 <= k < 100 else 0.0,
        allocations=lambda k: JOB if 10 <= k < 110 else "",
        sm=lambda k, g: 10.0,
    )
    procs = [
        {
            "timestamp": _at(k),
            "gpu": g,
            "pid": 4000 + g,
            "user": "alice" if g == 0 else "bob",
            "command": "python train.py" if g == 0 else "python =cmd|idle",
            "job": JOB,
            "memory_used_mib": 2000 + k,
            "sm_util_pct": 40,
        }
        for k in range(5, 115)
        for g in (0, 1)
    ]
    _write_rows(tmp / "processes-20261122T100000Z-n.csv", PROCESS_CSV_COLUMNS, procs)
    events = [
        {"timestamp": _at(3), "gpu": 0, "event": "xid", "xid": "31", "detail": "before"},
        {"timestamp": _at(50), "gpu": 0, "event": "xid", "xid": "79", "detail": "fell off"},
        {"timestamp": _at(115), "gpu": 1, "event": "xid", "xid": "48", "detail": "after"},
    ]
    _write_rows(tmp / "events.csv", EVENT_COLUMNS, events)
    return tmp


def test_one_job_per_gpu_with_processes_events_and_a_verdict(tmp_path: Path) -> None:
    job = build_job([recorded(tmp_path)], JOB)
    assert job.start == _at(10) and job.end == _at(109)
    assert job.duration_s == 100.0
    assert job.gpus == [0, 1] and job.nodes == ["n"]
    # Energy by the report's rule over the tagged rows (no allocations.csv here).
    assert job.energy_source == "recorded rows"
    busy, idle = power_of(90), power_of(0)
    assert job.energy_j == pytest.approx(80 * busy + 20 * idle + 100 * idle)
    g0, g1 = job.per_gpu
    assert (g0["gpu"], g0["name"], g1["gpu"]) == (0, "Test GPU", 1)
    assert g0["util_mean_pct"] == pytest.approx(72.0)
    assert g0["util_p95_pct"] == 90.0
    assert g0["idle_s"] == 20.0 and g1["idle_s"] == 100.0
    assert g0["stalled_s"] == 80.0 and g1["stalled_s"] == 0.0
    assert g0["throttle_s"] == {"sw_power_cap": 80.0}
    assert g0["memory_peak_mib"] == 1900.0 and g0["temperature_max_c"] == 80.0
    assert g0["temperature_mean_c"] == pytest.approx(35 + 72.0 / 2)
    assert g0["energy_j"] == pytest.approx(80 * busy + 20 * idle)
    assert g1["energy_j"] == pytest.approx(100 * idle)
    assert [(p["gpu"], p["user"], p["command"]) for p in job.processes] == [
        (0, "alice", "python train.py"),
        (1, "bob", "python =cmd|idle"),
    ]
    assert job.processes[0]["first"] == _at(10) and job.processes[0]["last"] == _at(109)
    assert job.processes[0]["memory_peak_mib"] == 2109.0
    assert job.users == ["alice", "bob"]
    assert [(e["gpu"], e["xid"]) for e in job.events] == [(0, "79")]
    assert job.verdict == [
        "GPU 0 throttled by power cap 80 % of the time",
        "GPU 0 busy but stalled 80 % of the time (utilization ≥ 50 % with SM activity < 20 %)",
        "GPU 1 idle 100 % of the job",
        "Xid 79 once on GPU 0",
    ]
    # Another source's figures (a Slurm summary) join under their own name.
    job.merge("slurm", {"state": "COMPLETED", "elapsed_s": 100})
    assert job.to_dict()["sources"] == {"slurm": {"state": "COMPLETED", "elapsed_s": 100}}


def test_the_summary_row_gives_the_span_and_energy(tmp_path: Path) -> None:
    recorded(tmp_path)
    row = {
        "id": JOB,
        "gpus": "0;1",
        "start": _at(9.5),
        "end": _at(109.2),
        "duration_s": "99.7",
        "energy_j": "12345.6",
    }
    _write_rows(tmp_path / "allocations.csv", tuple(row), [row])
    job = build_job([tmp_path], JOB)
    assert (job.start, job.end, job.duration_s) == (_at(9.5), _at(109.2), 99.7)
    assert (job.energy_j, job.energy_source) == (12345.6, "allocations.csv")
    assert job.summary == [row]
    assert job.recorded is not None and job.recorded["energy_j"] > 12345.6


def test_unknown_id_names_the_closest(tmp_path: Path) -> None:
    recorded(tmp_path)
    with pytest.raises(UnknownAllocation) as err:
        build_job([tmp_path], "slurm-12")
    assert err.value.closest == [JOB]
    res = _gputel("job", "slurm-12", str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"gputel: no allocation 'slurm-12' in the given files (closest: {JOB})"
    ]
    assert res.stdout == ""
    far = _gputel("job", "k8s-0f3a", str(tmp_path))
    assert far.returncode == 2 and "'k8s-0f3a'" in far.stderr and "none close" in far.stderr


def test_cli_text_fits_80_columns_and_json_has_everything(tmp_path: Path) -> None:
    recorded(tmp_path)
    res = _gputel("job", JOB, str(tmp_path), columns=80)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert text.startswith(f"job {JOB}\n")
    assert f"when: {_at(10)} → {_at(109)}" in text
    assert "where: n, GPU 0, 1" in text
    assert "  - GPU 1 idle 100 % of the job" in text
    assert "throttled: power cap 80 s" in text
    assert "python train.py" in text and "Xid 79 fell off" in text
    assert all(len(line) <= 80 for line in text.splitlines()), text
    data = json.loads(_gputel("job", JOB, str(tmp_path), "--json").stdout)
    assert data["id"] == JOB and len(data["per_gpu"]) == 2
    assert data["per_gpu"][1]["idle_s"] == 100.0
    assert data["events"][0]["timestamp"] == _at(50)
    assert data["sources"] == {}


def _non_blank(png: Path) -> float:
    """The share of pixels that are not the page's white background."""
    from PIL import Image

    with Image.open(png) as img:
        counts = img.convert("L").histogram()
    return sum(counts[:240]) / sum(counts)


_OUTSIDE = re.compile(r"(?:src|href|action|poster|data)\s*=\s*[\"']?\s*(?:https?:)?//", re.I)


def assert_self_contained(page: str) -> None:
    # Namespace names (xmlns="http://www.w3.org/2000/svg") are identifiers, never fetched.
    without_ns = re.sub(r'xmlns(?::\w+)?="[^"]*"', "", page)
    assert not re.search(r"https?://", without_ns), re.findall(r".{40}https?://.{40}", without_ns)
    assert not _OUTSIDE.search(page)
    assert "@import" not in page and "<script" not in page.lower()
    # Only references inside the page: url(#clip-path-id).
    assert not re.search(r"url\(\s*[\"']?(?!#)", page)


def screenshot(page: Path, out: Path) -> Path:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (scripts/setup-dev.sh installs it)")
    res = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            # Nothing may come from the network: every outside request would fail.
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--user-data-dir={out.parent / 'chromium-profile'}",
            f"--screenshot={out}",
            "--window-size=1280,1600",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and out.exists(), res.stderr[-2000:]
    return out


def test_job_on_a_recorded_demo_session(tmp_path: Path) -> None:
    """The real agent's files (the demo opens and releases a job through the hook API): text,
    JSON and a page that headless Chromium renders."""
    pytest.importorskip("matplotlib")
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    demo = run_demo(
        console,
        directory=tmp_path / "demo",
        pattern="0:1,85:2.5,0:30",
        interval_s=0.2,
        start_s=0.5,
        stop_s=1.0,
        events="0:94@2.5",
        max_seconds=30,
        poll_s=0.1,
    )
    assert demo.ok and demo.job == DEMO_JOB, console.file.getvalue()  # type: ignore[attr-defined]
    log = str(demo.log_dir)
    text = _gputel("job", DEMO_JOB, log, columns=80)
    assert text.returncode == 0, text.stderr
    assert "verdict:" in text.stdout and "GPU 0 Simulated" in text.stdout
    data = json.loads(_gputel("job", DEMO_JOB, log, "--json").stdout)
    assert data["gpus"] == [0, 1] and data["energy_source"] == "allocations.csv"
    assert data["energy_j"] > 0 and data["duration_s"] > 0
    assert data["recorded"]["energy_j"] == pytest.approx(data["energy_j"], rel=0.25)
    assert [g["gpu"] for g in data["per_gpu"]] == [0, 1]
    assert data["per_gpu"][0]["util_max_pct"] == 85.0
    assert any(e["xid"] == "94" for e in data["events"])
    assert any("Xid 94" in v for v in data["verdict"])
    page = tmp_path / "job.html"
    res = _gputel("job", DEMO_JOB, log, "--html", str(page))
    assert res.returncode == 0, res.stderr
    assert res.stdout.rstrip().endswith(f"wrote {page}")
    html = page.read_text()
    assert_self_contained(html)
    assert html.count("<svg") == 1 and f"Job {DEMO_JOB}" in html
    assert "Xid 94" in html
    shot = screenshot(page, tmp_path / "job.png")
    assert _non_blank(shot) > 0.02


def test_page_escapes_what_users_wrote(tmp_path: Path) -> None:
    recorded(tmp_path)
    procs = tmp_path / "processes-20261122T100000Z-n.csv"
    procs.write_text(procs.read_text().replace("python train.py", "<script>x()</script>"))
    page = tmp_path / "job.html"
    res = _gputel("job", JOB, str(tmp_path), "--html", str(page), "--json")
    assert res.returncode == 0, res.stderr
    html = page.read_text()
    assert "&lt;script&gt;x()&lt;/script&gt;" in html
    assert_self_contained(html)
    bad = _gputel("job", JOB, str(tmp_path), "--html", str(tmp_path / "job.txt"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_a_job_known_only_from_its_summary_row(tmp_path: Path) -> None:
    """Telemetry was off (operator) the whole time: the summary row still answers."""
    row = {"id": "k8s-abc", "gpus": "2", "start": _at(0), "end": _at(30), "duration_s": "30.0"}
    _write_rows(tmp_path / "allocations.csv", (*row, "energy_j"), [{**row, "energy_j": ""}])
    job = build_job([tmp_path], "k8s-abc")
    assert (job.gpus, job.duration_s, job.energy_j, job.per_gpu) == ([2], 30.0, None, [])
    assert job.verdict == []
    page = tmp_path / "job.html"
    res = _gputel("job", "k8s-abc", str(tmp_path), "--html", str(page))
    assert res.returncode == 0, res.stderr
    assert "energy: –" in res.stdout and "no recorded rows for this allocation" in res.stdout
    assert "no plot" in page.read_text()


def test_verdict_names_gpus_with_one_finding_together() -> None:
    def gpu(n: int, idle: float, cap: float, node: str = "n") -> dict[str, object]:
        return {
            "node": node,
            "gpu": n,
            "duration_s": 100.0,
            "idle_s": idle,
            "stalled_s": None,
            "throttle_s": {"sw_power_cap": cap, "gpu_idle": 90.0},
            "util_mean_pct": 50.0,
        }

    assert verdict([gpu(0, 10, 20), gpu(1, 84, 22), gpu(2, 0, 5)], []) == [
        "GPUs 0, 1 throttled by power cap 20–22 % of the time",
        "GPU 1 idle 84 % of the job",
    ]
    events = [{"node": "a", "gpu": 3, "event": "xid", "xid": "79"}] * 2
    assert verdict([gpu(3, 0, 0, "a"), gpu(3, 60, 0, "b")], events) == [
        "GPU b:3 idle 60 % of the job",
        "Xid 79 2× on GPU a:3",
    ]
    assert verdict([gpu(0, 0, 0)], []) == [
        "mean utilization 50 %, no idle GPU, no throttling, no GPU events"
    ]


def test_a_damaged_process_file_is_one_line_naming_it(tmp_path: Path) -> None:
    recorded(tmp_path)
    procs = tmp_path / "processes-20261122T100000Z-n.csv"
    lines = procs.read_text().splitlines()
    lines[30] = lines[30].replace(_at(19), "yesterday")
    procs.write_text("\n".join(lines) + "\n")
    res = _gputel("job", JOB, str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"gputel: {procs}: line 31: bad timestamp 'yesterday'"
    ]
    procs.write_text("\n".join([*lines[:5], "1,2", *lines[5:]]) + "\n")
    res = _gputel("job", JOB, str(tmp_path))
    assert res.returncode == 2 and "line 6 has 2 cells, expected 8" in res.stderr


def test_a_detected_job_that_shared_its_gpu_has_no_energy(tmp_path: Path) -> None:
    recorded(tmp_path)
    row = {"id": JOB, "gpus": "0;1", "start": _at(10), "end": _at(109), "energy_j": ""}
    _write_rows(tmp_path / "allocations.csv", (*row, "shared"), [{**row, "shared": "1"}])
    job = build_job([tmp_path], JOB)
    assert job.energy_j is None and job.energy_source is not None
    assert "shared" in job.energy_source
    res = _gputel("job", JOB, str(tmp_path))
    assert "energy: – (none: a GPU was shared with another job)" in res.stdout
