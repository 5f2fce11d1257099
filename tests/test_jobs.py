"""Detected jobs (``telemetry/jobs.py``): opened when seen, summarised when gone, energy only
for a job that had its GPUs to itself."""

from __future__ import annotations

import dataclasses
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from fakeproc import add_kthreadd, add_process
from gputel.schema import GpuProcess, GpuReading, HostReading, ProcessRecord, Sample
from gputel.telemetry.csv_sink import CsvSink
from gputel.telemetry.jobs import JOB_LEFT, DetectedJobs, ProcessAttribution, merge_ids

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


class Summaries:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def append(self, summary: dict[str, Any]) -> None:
        self.rows.append(summary)


def tick(
    k: int,
    jobs: dict[int, list[str | None]],
    energy: dict[int, float | None] | None = None,
    unlisted: tuple[int, ...] = (),
    power_w: float | None = None,
) -> Sample:
    """Tick ``k`` of two GPUs: ``jobs`` per GPU (None: a process of unknown owner)."""
    energy = energy or {0: 1000.0 + 10 * k, 1: 2000.0 + 20 * k}
    gpus = [
        GpuReading(
            i, f"GPU-{i}", "g", utilization_gpu_pct=50.0, energy_j=energy.get(i), power_w=power_w
        )
        for i in (0, 1)
    ]
    for g in gpus:
        g.processes = None if g.index in unlisted else ()
    records = [
        ProcessRecord(gpu, 100 + n, None, None, job, 1.0, 1.0)
        for gpu, owners in jobs.items()
        for n, job in enumerate(owners)
    ]
    return Sample(T0 + timedelta(seconds=k), float(k), gpus, HostReading(), [], processes=records)


def run(
    detected: DetectedJobs,
    ticks: list[Sample],
    announced: dict[int, tuple[str, ...]] | None = None,
) -> list[dict[str, Any]]:
    """Each tick as the recorder takes it: jobs found, the row written, its energy shares."""
    ended: list[dict[str, Any]] = []
    announced = announced or {}
    ids = {i for group in announced.values() for i in group}
    with tempfile.TemporaryDirectory() as log_dir:
        sink = CsvSink(Path(log_dir), host="n")
        for sample in ticks:
            ended += detected.update(sample, announced, ids)[1]
            sink.write(sample)
            detected.add_energy(sink.tick_energy)
        sink.close()
    return ended


def test_a_job_alone_on_its_gpu_gets_its_energy() -> None:
    summaries = Summaries()
    detected = DetectedJobs(summaries)
    ended = run(detected, [tick(k, {0: ["slurm-1"]}) for k in range(4)] + [tick(4, {})])
    (s,) = ended
    assert s == summaries.rows[0]
    assert (s["id"], s["gpus"], s["release_reason"], s["shared"]) == ("slurm-1", [0], JOB_LEFT, 0)
    assert s["energy_j"] == 30.0  # three intervals of 10 J between its four ticks
    assert s["duration_s"] == 4.0 and s["samples"] == 4
    assert s["util_mean_pct"] == 50.0


def test_sharing_a_gpu_empties_energy_and_marks_shared() -> None:
    detected = DetectedJobs()
    ticks = [tick(0, {0: ["a"]}), tick(1, {0: ["a", "b"]}), tick(2, {0: ["a"]}), tick(3, {})]
    by_id = {s["id"]: s for s in run(detected, ticks)}
    assert by_id["a"]["shared"] == 1 and by_id["a"]["energy_j"] is None
    assert by_id["b"]["shared"] == 1 and by_id["b"]["energy_j"] is None


def test_a_process_of_unknown_owner_or_an_announced_allocation_is_sharing() -> None:
    unknown = run(DetectedJobs(), [tick(0, {0: ["a", None]}), tick(1, {})])
    assert unknown[0]["shared"] == 1
    announced = run(DetectedJobs(), [tick(0, {0: ["a"]}), tick(1, {})], {0: ("job-9",)})
    assert announced[0]["shared"] == 1


def test_a_job_with_an_announced_id_is_that_allocation() -> None:
    """The prolog's slurm-7 and the detected slurm-7 are one allocation: never tracked here."""
    detected = DetectedJobs()
    per_gpu, ended = detected.update(tick(0, {1: ["slurm-7"]}), {0: ("slurm-7",)}, {"slurm-7"})
    assert per_gpu == {1: ("slurm-7",)} and ended == [] and detected.open() == []
    # Detected first, announced later: dropped without a summary of its own.
    detected.update(tick(1, {0: ["slurm-8"]}), {}, set())
    assert [j["id"] for j in detected.open()] == ["slurm-8"]
    _, ended = detected.update(tick(2, {0: ["slurm-8"]}), {0: ("slurm-8",)}, {"slurm-8"})
    assert ended == [] and detected.open() == []
    assert merge_ids(("slurm-8",), ("slurm-8", "user-x")) == ("slurm-8", "user-x")


def test_a_gpu_that_could_not_be_listed_ends_nobody_but_loses_the_energy() -> None:
    detected = DetectedJobs()
    ended = run(
        detected,
        [tick(0, {0: ["a"]}), tick(1, {}, unlisted=(0,)), tick(2, {0: ["a"]}), tick(3, {})],
    )
    (s,) = ended
    assert s["duration_s"] == 3.0 and s["energy_j"] is None and s["shared"] == 0


def test_a_counter_that_restarted_counts_that_tick_power_times_the_interval() -> None:
    ticks = [
        tick(0, {0: ["a"]}, {0: 500.0}, power_w=200.0),
        tick(1, {0: ["a"]}, {0: 100.0}, power_w=250.0),
        tick(2, {0: ["a"]}, {0: 130.0}, power_w=200.0),
        tick(3, {}),
    ]
    assert run(DetectedJobs(), ticks)[0]["energy_j"] == 250.0 + 30.0


def test_a_job_on_gpus_without_energy_or_power_has_empty_energy_not_zero() -> None:
    no_energy: dict[int, float | None] = {0: None, 1: None}
    ended = run(
        DetectedJobs(), [tick(k, {0: ["slurm-1"]}, no_energy) for k in range(3)] + [tick(3, {})]
    )
    (s,) = ended
    assert s["samples"] == 3 and s["shared"] == 0
    assert s["energy_j"] is None  # the hardware gave nothing to count: unknown, never 0 J


def test_jobs_still_open_are_summarised_when_recording_stops() -> None:
    detected = DetectedJobs()
    run(detected, [tick(0, {0: ["a"], 1: ["b"]})])
    assert {s["id"]: s["release_reason"] for s in detected.close_all(T0)} == {
        "a": "recording stopped",
        "b": "recording stopped",
    }
    assert detected.open() == []


def test_attribution_names_owners_and_survives_a_vanished_pid(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    add_kthreadd(root)
    add_process(root, 10, cgroup="1:name=systemd:/slurm/uid_0/job_5/step_0/task_0", uid=0)
    attribution = ProcessAttribution(root)
    assert attribution.notice is None
    gpu = GpuReading(0, "GPU-0", "g")
    gpu.processes = (GpuProcess(0, 10, 5.0, 1.0), GpuProcess(0, 11, 2.0, None))
    first, gone = attribution.records([gpu])
    assert (first.user, first.job, first.command) == ("root", "slurm-5", "python train.py")
    assert (gone.pid, gone.user, gone.job, gone.memory_used_mib) == (11, None, None, 2.0)
    # The next tick reads nothing again for the PID it knows.
    (root / "10" / "cgroup").unlink()
    assert attribution.records([gpu])[0].job == "slurm-5"


def test_a_pid_back_after_ticks_without_processes_is_checked_again(tmp_path: Path) -> None:
    """Ticks with no GPU process still count: a PID reused meanwhile is read afresh."""
    root = tmp_path / "proc"
    add_kthreadd(root)
    add_process(root, 10, cgroup="0::/system.slice/slurmstepd.scope/job_5/step_0", uid=0)
    attribution = ProcessAttribution(root)
    gpu = GpuReading(0, "GPU-0", "g", processes=(GpuProcess(0, 10, 5.0, 1.0),))
    idle = GpuReading(0, "GPU-0", "g", processes=())
    assert attribution.records([gpu])[0].job == "slurm-5"
    assert attribution.records([idle]) == []
    # PID 10 exited and was reused by another job's process (another start time).
    add_process(
        root, 10, cgroup="0::/system.slice/slurmstepd.scope/job_6/step_0", start_ticks=9_000_000
    )
    assert attribution.records([gpu])[0].job == "slurm-6"


def test_a_process_record_as_json_is_every_field() -> None:
    record = ProcessRecord(1, 4242, "alice", "python train.py", "slurm-7", 1024.0, None)
    assert record.to_json() == dataclasses.asdict(record)
