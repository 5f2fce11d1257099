"""Who is on each GPU, end to end: ``gputel record`` and ``gputel agent`` over the fake driver's
process API, with the owners read from a fake ``/proc`` tree (``GPUTEL_PROC_ROOT``)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fakedriver import MIB, FakeDriver
from fakeproc import add_kthreadd, add_process
from test_agent_e2e import AgentProc, pid_alive, promtool_ok, wait_for
from test_slurm import Daemons, _wait, slurm

__all__ = ["slurm"]  # the real single-node Slurm fixture

POD_UID = "1d4a2b3c-5e6f-4a1b-8c9d-0242ac120002"
SLURM_PID, POD_PID, USER_PID, GONE_PID = 4242, 4343, 4444, 4545


def rows(log_dir: Path, pattern: str) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for path in sorted(log_dir.glob(pattern)):
        with open(path, newline="") as fh:
            out.extend(csv.DictReader(fh))
    return out


def metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in the exposition")


def fake_proc(root: Path) -> Path:
    """A host procfs: a Slurm step (cgroup v2), a pod's container (systemd driver), a root
    shell's process; GONE_PID is not there (it exited between the NVML and the /proc read)."""
    add_kthreadd(root)
    add_process(
        root,
        SLURM_PID,
        cgroup="0::/system.slice/slurmstepd.scope/job_77/step_0/user/task_0",
        cmdline=("python", "train.py", "--epochs", "3"),
        uid=0,
    )
    add_process(
        root,
        POD_PID,
        cgroup=(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"{POD_UID.replace('-', '_')}.slice/cri-containerd-{'ab' * 32}.scope"
        ),
        cmdline=("python", "serve.py"),
        uid=0,
    )
    add_process(
        root, USER_PID, cgroup="0::/user.slice/user-0.slice/session-3.scope", uid=0, comm="bench"
    )
    return root


def processes(gpu0: str, gpu1: str) -> dict[str, object]:
    return {"gpu.0.processes": gpu0, "gpu.1.processes": gpu1}


@pytest.fixture
def recorder(
    fake_driver: FakeDriver, tmp_path: Path
) -> Iterator[Callable[[], subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        proc = fake_driver.popen_gputel(
            "record",
            "--child",
            env={
                "GPUTEL_BACKEND": "nvml",
                "GPUTEL_INTERVAL": "0.1",
                "GPUTEL_LOG_DIR": str(tmp_path / "log"),
                "GPUTEL_RUN_DIR": str(tmp_path / "run"),
                "GPUTEL_PROC_ROOT": str(tmp_path / "proc"),
                "GPUTEL_POD_LOGS_DIR": str(tmp_path / "pods"),
            },
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=20)


def test_record_names_each_process_job_and_summarises_jobs(
    fake_driver: FakeDriver, tmp_path: Path, recorder: Callable[[], subprocess.Popen[str]]
) -> None:
    fake_proc(tmp_path / "proc")
    # The kubelet's pod log tree: the pod's directory, another pod's, and names to ignore.
    for entry in (f"ml-team_trainer-7f9c_{POD_UID}", "kube-system_dns-1_0a0b", "junk", "a_b"):
        (tmp_path / "pods" / entry).mkdir(parents=True)
    log_dir, run_dir = tmp_path / "log", tmp_path / "run"
    fake_driver.set(
        processes(
            f"{SLURM_PID}:{4096 * MIB}:60",
            f"{POD_PID}:{1024 * MIB}:20,{USER_PID}:{512 * MIB}:5,{GONE_PID}:{256 * MIB}:1",
        )
    )
    proc = recorder()
    wait_for(lambda: len(rows(log_dir, "processes-*.csv")) >= 12, 20, "three ticks of processes")

    # processes-*.csv: one row per process per tick, owner and job named.
    procs = rows(log_dir, "processes-*.csv")
    assert list(procs[0]) == [
        "timestamp",
        "gpu",
        "pid",
        "user",
        "command",
        "job",
        "memory_used_mib",
        "sm_util_pct",
    ]
    by_pid = {int(r["pid"]): r for r in procs}
    assert by_pid[SLURM_PID]["job"] == "slurm-77" and by_pid[SLURM_PID]["gpu"] == "0"
    assert by_pid[SLURM_PID]["command"] == "python train.py --epochs 3"
    assert by_pid[SLURM_PID]["memory_used_mib"] == "4096"
    assert by_pid[SLURM_PID]["sm_util_pct"] == "60"
    assert by_pid[POD_PID]["job"] == f"k8s-{POD_UID}"
    assert by_pid[USER_PID]["job"] == "user-root" and by_pid[USER_PID]["user"] == "root"
    gone = by_pid[GONE_PID]
    assert (gone["user"], gone["command"], gone["job"]) == ("", "", "")
    assert gone["memory_used_mib"] == "256"

    # GPU rows carry the detected jobs of their GPU.
    gpu = rows(log_dir, "gpu-*.csv")
    assert {r["allocations"] for r in gpu if r["gpu"] == "0"} == {"slurm-77"}
    assert {r["allocations"] for r in gpu if r["gpu"] == "1"} == {f"k8s-{POD_UID};user-root"}

    # Metrics by allocation, never by PID (and never a "job" label: Prometheus owns it); the
    # unknown owner's process under allocation="".
    metrics = (run_dir / "metrics.prom").read_text()
    promtool_ok(metrics)
    uuid0 = "GPU-fake-0000-0000-0000-0000-000000000000"
    labels = f'{{allocation="slurm-77",gpu="0",uuid="{uuid0}"}}'
    assert metric(metrics, "gputel_gpu_allocation_memory_used_bytes" + labels) == 4096 * MIB
    assert metric(metrics, "gputel_gpu_allocation_sm_util_ratio" + labels) == 0.6
    assert 'allocation="user-root"' in metrics and 'allocation=""' in metrics
    assert not re.search(r'[{,](pid|job)="', metrics)
    # One info series per open allocation: the pod's names from the pod log tree.
    info = {
        line.split("{", 1)[1].split("}", 1)[0]
        for line in metrics.splitlines()
        if line.startswith("gputel_allocation_info{")
    }
    assert info == {
        'allocation="slurm-77",kind="slurm",namespace="",pod="",slurm_job="77",user="root"',
        f'allocation="k8s-{POD_UID}",kind="k8s",namespace="ml-team",pod="trainer-7f9c",'
        'slurm_job="",user="root"',
        'allocation="user-root",kind="user",namespace="",pod="",slurm_job="",user="root"',
    }

    # recorder.json reports what the agent shows, the pod's names beside its process.
    state = json.loads((run_dir / "recorder.json").read_text())
    by_job = {p["job"]: p for p in state["processes"]}
    assert (by_job[f"k8s-{POD_UID}"]["namespace"], by_job[f"k8s-{POD_UID}"]["pod"]) == (
        "ml-team",
        "trainer-7f9c",
    )
    assert "pod" not in by_job["slurm-77"]
    assert {d["id"]: d["gpus"] for d in state["detected"]} == {
        "slurm-77": [0],
        f"k8s-{POD_UID}": [1],
        "user-root": [1],
    }
    assert state["processes_notice"] is None

    # The Slurm job leaves GPU 0: one summary row; it had GPU 0 to itself, so it has energy.
    fake_driver.set(processes("", f"{POD_PID}:{1024 * MIB}:20,{USER_PID}:{512 * MIB}:5"))
    summaries = tmp_path / "log" / "allocations.csv"
    wait_for(lambda: summaries.exists() and rows(log_dir, "allocations.csv"), 20, "a summary")
    (slurm,) = rows(log_dir, "allocations.csv")
    assert slurm["id"] == "slurm-77" and slurm["gpus"] == "0"
    assert slurm["release_reason"] == "job left the GPUs" and slurm["shared"] == "0"
    assert float(slurm["energy_j"]) >= 0 and float(slurm["duration_s"]) > 0

    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    # Jobs still on the GPUs when recording stops are summarised too; GPU 1 was shared.
    ended = {r["id"]: r for r in rows(log_dir, "allocations.csv")}
    assert set(ended) == {"slurm-77", f"k8s-{POD_UID}", "user-root"}
    pod = ended[f"k8s-{POD_UID}"]
    assert pod["release_reason"] == "recording stopped"
    assert pod["shared"] == "1" and pod["energy_j"] == ""


def test_pids_of_another_namespace_are_recorded_without_owners(
    fake_driver: FakeDriver, tmp_path: Path, recorder: Callable[[], subprocess.Popen[str]]
) -> None:
    """A container's own /proc (no kernel threads): said once, processes without owners."""
    root = tmp_path / "proc"
    add_process(root, SLURM_PID, cgroup="0::/system.slice/slurmstepd.scope/job_77/step_0")
    fake_driver.set(processes(f"{SLURM_PID}:{MIB}:3", ""))
    proc = recorder()
    log_dir, run_dir = tmp_path / "log", tmp_path / "run"
    wait_for(lambda: len(rows(log_dir, "processes-*.csv")) >= 3, 20, "process rows")
    assert {(r["user"], r["job"]) for r in rows(log_dir, "processes-*.csv")} == {("", "")}
    assert {r["allocations"] for r in rows(log_dir, "gpu-*.csv")} == {""}
    state = json.loads((run_dir / "recorder.json").read_text())
    assert "not the host's PID namespace" in state["processes_notice"]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert err.count("not the host's PID namespace") == 1, err


@pytest.fixture
def agent(fake_driver: FakeDriver, tmp_path: Path) -> Iterator[AgentProc]:
    env = fake_driver.env(
        {},
        GPUTEL_BACKEND="nvml",
        GPUTEL_INTERVAL="0.1",
        GPUTEL_START_UTIL="20",
        GPUTEL_START_SECONDS="0.3",
        GPUTEL_STOP_UTIL="10",
        GPUTEL_STOP_SECONDS="0.6",
        GPUTEL_PRETRIGGER_SECONDS="0",
        GPUTEL_PROC_ROOT=str(tmp_path / "proc"),
    )
    # The procfs root must exist at start; the test fills it in.
    (tmp_path / "proc").mkdir(exist_ok=True)
    a = AgentProc(tmp_path / "agent", env)
    yield a
    hb = None
    with contextlib.suppress(OSError, ValueError):
        hb = json.loads((a.run_dir / "recorder.json").read_text())
    a.kill()
    child = hb.get("pid") if isinstance(hb, dict) else None
    if isinstance(child, int) and pid_alive(child):
        os.kill(child, signal.SIGKILL)


def test_agent_detected_jobs_tag_and_summarise_but_never_start_telemetry(
    fake_driver: FakeDriver, tmp_path: Path, agent: AgentProc
) -> None:
    fake_proc(tmp_path / "proc")
    # A notebook holds memory on an idle GPU: its job is seen only while recording.
    fake_driver.set(processes(f"{SLURM_PID}:{2048 * MIB}:0", ""))
    wait_for(lambda: agent.status()["utilization_pct"] is not None, 10, "a utilization poll")
    st = agent.status()
    assert st["telemetry_active"] is False and st["allocations"] == [] and st["processes"] == []
    assert not list(agent.log_dir.glob("processes-*.csv"))

    # Busy: telemetry starts on activity; the job is detected and shown.
    fake_driver.set({"gpu.0.utilization.gpu_pct": 90})
    wait_for(lambda: agent.status()["processes"], 20, "processes in status")
    st = agent.status()
    assert st["telemetry_active"] is True
    (p,) = st["processes"]
    assert (p["gpu"], p["pid"], p["job"], p["user"]) == (0, SLURM_PID, "slurm-77", "root")
    assert p["memory_used_mib"] == 2048.0
    assert [(a["id"], a["gpus"], a["detected"]) for a in st["allocations"]] == [
        ("slurm-77", [0], True)
    ]
    metrics = agent.metrics()
    assert 'gputel_gpu_allocation_memory_used_bytes{allocation="slurm-77",gpu="0"' in metrics
    promtool_ok(metrics)
    wait_for(
        lambda: any(r["allocations"] == "slurm-77" for r in rows(agent.log_dir, "gpu-*.csv")),
        10,
        "a tagged GPU row",
    )

    # The prolog announces the same job: one allocation, listed once, the announced one.
    assert agent.ask({"op": "allocate", "id": "slurm-77", "gpus": [0]})["ok"]
    wait_for(
        lambda: [a["detected"] for a in agent.status()["allocations"]] == [False],
        10,
        "one allocation",
    )
    # ... and the recorder has handed its detected job over to it.
    wait_for(
        lambda: json.loads((agent.run_dir / "recorder.json").read_text())["detected"] == [],
        10,
        "the recorder to hand the job over",
    )
    # The job ends, then its epilog releases it; quiet again, telemetry stops.
    fake_driver.set({"gpu.0.processes": "", "gpu.0.utilization.gpu_pct": 0})
    wait_for(lambda: agent.status()["processes"] == [], 10, "the process gone")
    assert agent.ask({"op": "release", "id": "slurm-77"})["ok"]
    wait_for(lambda: agent.status()["telemetry_active"] is False, 20, "telemetry off")
    # One summary of the one allocation: the store's, never a second one from detection.
    (summary,) = rows(agent.log_dir, "allocations.csv")
    assert (summary["id"], summary["release_reason"], summary["shared"]) == (
        "slurm-77",
        "released",
        "",
    )


def test_status_without_agent_lists_processes(fake_driver: FakeDriver, tmp_path: Path) -> None:
    fake_proc(tmp_path / "proc")
    fake_driver.set(processes(f"{SLURM_PID}:{MIB}:7", f"{GONE_PID}:{MIB}:1"))
    env = {
        "GPUTEL_BACKEND": "nvml",
        "GPUTEL_RUN_DIR": str(tmp_path / "run"),
        "GPUTEL_PROC_ROOT": str(tmp_path / "proc"),
    }
    result = fake_driver.run_gputel("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert [(p["gpu"], p["pid"], p["job"]) for p in status["processes"]] == [
        (0, SLURM_PID, "slurm-77"),
        (1, GONE_PID, None),
    ]
    assert "processes" not in status["gpus"][0]
    human = fake_driver.run_gputel("status", env=env)
    assert human.returncode == 0, human.stderr
    assert "slurm-77" in human.stdout and "python train.py" in human.stdout


# ---------------------------------------------------------------------------------- real Slurm
def copy_process(real: int, root: Path, cgroup: str) -> None:
    """``root/<real>`` from the live ``/proc/<real>``, with ``cgroup`` as its cgroup text."""
    d = root / str(real)
    d.mkdir(parents=True)
    for name in ("stat", "status", "cmdline", "comm", "environ"):
        (d / name).write_bytes(Path(f"/proc/{real}/{name}").read_bytes())
    (d / "cgroup").write_text(cgroup)


@pytest.mark.xdist_group("slurm")  # one real Slurm at a time on the node
@pytest.mark.root
@pytest.mark.parametrize("slurm", [False], indirect=True)
def test_real_slurm_job_on_a_gpu_is_tagged_without_the_prolog(
    fake_driver: FakeDriver,
    tmp_path: Path,
    slurm: tuple[Path, dict[str, str], Daemons],
) -> None:
    """A real batch job (no gputel prolog) whose process appears on a GPU of the fake driver.

    The suite's Slurm runs without a cgroup plugin (``proctrack/linuxproc``, ``task/none``) and
    its slurmd is started by the test, not by systemd, so the job's real cgroup names no Slurm
    cgroup at all. The job's process is real and so is its environment (``SLURM_JOB_ID``, set
    by slurmstepd); the fake /proc copies them and gives the process the cgroup such a node has
    under systemd (the step in ``slurmd.service``), whose job id comes from the environment.
    """
    base, env, daemons = slurm
    root = tmp_path / "proc"
    add_kthreadd(root)
    a = AgentProc(
        tmp_path / "agent",
        fake_driver.env(
            {},
            GPUTEL_BACKEND="nvml",
            GPUTEL_INTERVAL="0.1",
            GPUTEL_START_UTIL="20",
            GPUTEL_START_SECONDS="0.2",
            GPUTEL_STOP_SECONDS="0.5",
            GPUTEL_PRETRIGGER_SECONDS="0",
            GPUTEL_PROC_ROOT=str(root),
        ),
    )
    pid_file = base / "job.pid"
    try:
        out = subprocess.run(
            ["sbatch", "--parsable", "-o", str(base / "job.out"), "--wrap",
             f"echo $$ > {pid_file}; exec sleep 60"],
            env=env, capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
        job = out.stdout.strip().split(";")[0]
        _wait("the job's process", lambda: pid_file.exists() and pid_file.read_text(), 30, daemons)
        pid = int(pid_file.read_text())
        real_cgroup = Path(f"/proc/{pid}/cgroup").read_text()
        cgroup = real_cgroup if f"job_{job}" in real_cgroup else "0::/system.slice/slurmd.service\n"
        copy_process(pid, root, cgroup)
        assert f"SLURM_JOB_ID={job}".encode() in (root / str(pid) / "environ").read_bytes()

        fake_driver.set(
            {"gpu.1.processes": f"{pid}:{2048 * MIB}:70", "gpu.1.utilization.gpu_pct": 80}
        )
        ident = f"slurm-{job}"

        def tagged() -> bool:
            return any(r["allocations"] == ident for r in rows(a.log_dir, "gpu-*.csv"))

        _wait(f"GPU rows tagged {ident}", tagged, 30, daemons)
        gpu_rows = rows(a.log_dir, "gpu-*.csv")
        assert {r["allocations"] for r in gpu_rows if r["gpu"] == "0"} == {""}
        (proc_row, *_) = rows(a.log_dir, "processes-*.csv")
        assert (proc_row["pid"], proc_row["job"]) == (str(pid), ident)
        assert "sleep 60" in proc_row["command"]
        # The agent shows the recorder's latest heartbeat, which may be a tick behind the rows.
        _wait(
            "status to list the job",
            lambda: [x["id"] for x in a.status()["allocations"]] == [ident],
            10,
            daemons,
        )

        subprocess.run(["scancel", job], env=env, timeout=20, check=True)
        fake_driver.set({"gpu.1.processes": "", "gpu.1.utilization.gpu_pct": 0})
        _wait(
            "the job's summary",
            lambda: (
                (a.log_dir / "allocations.csv").exists()
                and ident in (a.log_dir / "allocations.csv").read_text()
            ),
            30,
            daemons,
        )
        (summary,) = rows(a.log_dir, "allocations.csv")
        assert (summary["id"], summary["gpus"], summary["shared"]) == (ident, "1", "0")
        assert summary["release_reason"] == "job left the GPUs"
    finally:
        a.kill()
