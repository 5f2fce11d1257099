"""The shipped Slurm prolog/epilog: called directly, and under a real single-node Slurm.

The real-Slurm test starts munged, slurmctld and slurmd on loopback with a ``slurm.conf`` of its
own in a temporary directory, runs a gputel agent on idle simulated GPUs, submits a batch job and
checks that the prolog turned telemetry on, rows carry the job's allocation id, the epilog turned
telemetry off, ``allocations.csv`` has the job, and the node is not drained.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gputel.control.client import request
from test_hooks import GPUTEL, env_for, running_agent

REPO = Path(__file__).resolve().parents[1]
PROLOG = REPO / "contrib" / "slurm" / "prolog.sh"
EPILOG = REPO / "contrib" / "slurm" / "epilog.sh"
LIBRARY = REPO / "contrib" / "slurm" / "gputel-slurm.sh"

FAKE_GPUTEL = """#!/bin/sh
printf '%s\\n' "$*" >> "$CALLS"
printf 'env GPUTEL_RUN_DIR=%s GPUTEL_LOG_DIR=%s\\n' "$GPUTEL_RUN_DIR" "$GPUTEL_LOG_DIR" >> "$CALLS"
[ -n "$FAKE_SLEEP" ] && sleep "$FAKE_SLEEP"
echo "fake failure" >&2
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    path = tmp_path / "fake-gputel"
    path.write_text(FAKE_GPUTEL)
    path.chmod(0o755)
    return path


def run_script(
    script: Path, tmp_path: Path, shell: str = "sh", **env: str
) -> tuple[subprocess.CompletedProcess[str], float, list[str]]:
    calls = tmp_path / "calls"
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CALLS": str(calls)}
    base.update(GPUTEL_DEFAULTS_FILE=str(tmp_path / "no-defaults"))
    base.update(env)
    t0 = time.monotonic()
    out = subprocess.run([shell, str(script)], env=base, capture_output=True, text=True, timeout=30)
    took = time.monotonic() - t0
    lines = calls.read_text().splitlines() if calls.exists() else []
    with contextlib.suppress(FileNotFoundError):
        calls.unlink()
    return out, took, lines


# ---------------------------------------------------------------------------------- scripts
@pytest.mark.parametrize("script", [PROLOG, EPILOG, LIBRARY])
def test_scripts_parse(script: Path) -> None:
    for shell in ("sh", "bash", "dash"):
        if shutil.which(shell):
            subprocess.run([shell, "-n", str(script)], check=True)
    if script is not LIBRARY:
        assert os.access(script, os.X_OK)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-x", "-s", "sh", str(script)], check=True, cwd=script.parent)


def test_scripts_exit_0_without_their_library(tmp_path: Path) -> None:
    """A prolog copied without gputel-slurm.sh beside it still never fails the job."""
    for script in (PROLOG, EPILOG):
        alone = tmp_path / script.name
        shutil.copy(script, alone)
        out = subprocess.run(
            ["sh", str(alone)],
            env={"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "7"},
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert out.returncode == 0
        assert "gputel-slurm.sh is missing" in out.stderr


@pytest.mark.parametrize("shell", ["sh", "bash"])
@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        ("0,1", "hook allocate slurm-42 --gpus 0,1 --quiet"),
        ("3", "hook allocate slurm-42 --gpus 3 --quiet"),
        ("0,2-4", "hook allocate slurm-42 --gpus 0,2,3,4 --quiet"),
        ("", "hook allocate slurm-42 --quiet"),
        ("0;reboot", "hook allocate slurm-42 --quiet"),
        ("*", "hook allocate slurm-42 --quiet"),
    ],
)
def test_prolog_calls_allocate(
    tmp_path: Path, fake_bin: Path, shell: str, gpus: str, expected: str
) -> None:
    out, _, calls = run_script(
        PROLOG, tmp_path, shell, SLURM_JOB_ID="42", SLURM_JOB_GPUS=gpus, GPUTEL_BIN=str(fake_bin)
    )
    assert out.returncode == 0
    assert calls[0] == expected


def test_epilog_calls_release(tmp_path: Path, fake_bin: Path) -> None:
    out, _, calls = run_script(EPILOG, tmp_path, SLURM_JOB_ID="42", GPUTEL_BIN=str(fake_bin))
    assert out.returncode == 0
    assert calls[0] == "hook release slurm-42 --quiet"


def test_defaults_file_is_read_not_executed(tmp_path: Path, fake_bin: Path) -> None:
    marker = tmp_path / "executed"
    defaults = tmp_path / "defaults"
    defaults.write_text(
        "# comment\n"
        'GPUTEL_RUN_DIR="/tmp/run dir"\n'
        "  export GPUTEL_LOG_DIR='/tmp/logs'\n"
        f"GPUTEL_X=$(touch {marker})\n"
        f"touch {marker}\n"
        "OTHER=1\n"
    )
    out, _, calls = run_script(
        PROLOG,
        tmp_path,
        SLURM_JOB_ID="7",
        GPUTEL_BIN=str(fake_bin),
        GPUTEL_DEFAULTS_FILE=str(defaults),
    )
    assert out.returncode == 0
    assert calls[1] == "env GPUTEL_RUN_DIR=/tmp/run dir GPUTEL_LOG_DIR=/tmp/logs"
    assert not marker.exists()


@pytest.mark.parametrize("script", [PROLOG, EPILOG])
def test_always_exit_0(tmp_path: Path, fake_bin: Path, script: Path) -> None:
    # gputel fails
    out, _, calls = run_script(
        script, tmp_path, SLURM_JOB_ID="9", GPUTEL_BIN=str(fake_bin), FAKE_RC="3"
    )
    assert out.returncode == 0 and calls
    assert "exit 3" in out.stderr and "fake failure" in out.stderr
    # gputel hangs: cut off by the timeout
    out, took, _ = run_script(
        script,
        tmp_path,
        SLURM_JOB_ID="9",
        GPUTEL_BIN=str(fake_bin),
        FAKE_SLEEP="30",
        GPUTEL_HOOK_TIMEOUT="1",
    )
    assert out.returncode == 0 and took < 5
    # gputel missing, no job id, junk job id
    for env in (
        {"SLURM_JOB_ID": "9", "GPUTEL_BIN": str(tmp_path / "missing")},
        {"GPUTEL_BIN": str(fake_bin)},
        {"SLURM_JOB_ID": "9; rm -rf /", "GPUTEL_BIN": str(fake_bin)},
    ):
        out, took, calls = run_script(script, tmp_path, **env)
        assert out.returncode == 0 and took < 5
        if "SLURM_JOB_ID" not in env or not env["SLURM_JOB_ID"].isdigit():
            assert calls == []


def test_scripts_against_the_real_agent(tmp_path: Path) -> None:
    """Prolog and epilog called as slurmd would, with SLURM_JOB_GPUS set (global indices)."""
    defaults = tmp_path / "defaults"
    defaults.write_text(
        "".join(f"{k}={v}\n" for k, v in env_for(tmp_path).items() if k.startswith("GPUTEL_"))
    )
    env = {"GPUTEL_BIN": GPUTEL, "GPUTEL_DEFAULTS_FILE": str(defaults), "SLURM_JOB_ID": "1234"}
    with running_agent(tmp_path) as run:
        out, took, _ = run_script(PROLOG, tmp_path, SLURM_JOB_GPUS="1", **env)
        assert out.returncode == 0 and took < 6, out.stderr
        status = request(run, {"op": "status"})
        assert [(a["id"], a["gpus"]) for a in status["allocations"]] == [("slurm-1234", [1])]
        assert status["telemetry_active"] is True
        out, took, _ = run_script(EPILOG, tmp_path, **env)
        assert out.returncode == 0 and took < 6, out.stderr
        assert request(run, {"op": "status"})["allocations"] == []
    with open(tmp_path / "log" / "allocations.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["id"] == "slurm-1234" and row["gpus"] == "1"


# ---------------------------------------------------------------------------------- real Slurm
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemons:
    """munged, slurmctld and slurmd of one test, stopped by pid in reverse order."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.base / f"{name}.out"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT
            )
        self.procs.append((name, proc, log))
        return proc

    def check_alive(self) -> None:
        for name, proc, log in self.procs:
            if proc.poll() is not None:
                pytest.skip(f"{name} exited ({proc.returncode}): {self.tail(log)}")

    @staticmethod
    def tail(log: Path, n: int = 2000) -> str:
        try:
            return log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.tail(log)}" for name, _, log in self.procs)

    def stop(self) -> None:
        for _, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for _, proc, _ in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait(what: str, predicate: object, timeout: float, daemons: Daemons) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        daemons.check_alive()
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}\n{daemons.logs()}")


@pytest.fixture
def slurm(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Path, dict[str, str], Daemons]]:
    """A single-node Slurm; with ``indirect`` parameter False, without gputel's prolog/epilog."""
    with_prolog = getattr(request, "param", True)
    missing = [b for b in SLURM_BINARIES if not shutil.which(b)]
    if missing:
        pytest.skip(f"Slurm/munge not installed: {', '.join(missing)} missing")
    # Sockets and spool files want short paths and a traversable parent.
    base = Path(tempfile.mkdtemp(prefix="gputel-slurm-"))
    base.chmod(0o755)
    daemons = Daemons(base)
    try:
        munge = base / "munge"
        munge.mkdir(mode=0o755)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for d in ("state", "spool"):
            (base / d).mkdir(mode=0o755)
        env = dict(os.environ, SLURM_CONF=str(base / "slurm.conf"))
        for k in list(env):
            if k.startswith(("SLURM_", "SBATCH_", "SQUEUE_", "SINFO_")) and k != "SLURM_CONF":
                del env[k]

        defaults = base / "gputel.defaults"
        defaults.write_text(
            "".join(f"{k}={v}\n" for k, v in env_for(tmp_path).items() if k.startswith("GPUTEL_"))
        )
        for name, script in (("prolog", PROLOG), ("epilog", EPILOG)):
            wrapper = base / f"{name}.sh"
            wrapper.write_text(
                "#!/bin/sh\n"
                f"GPUTEL_BIN={GPUTEL}\nGPUTEL_DEFAULTS_FILE={defaults}\n"
                "export GPUTEL_BIN GPUTEL_DEFAULTS_FILE\n"
                f'exec {script} "$@" 2>>{base}/{name}.log\n'
            )
            wrapper.chmod(0o755)

        cpus = os.cpu_count() or 1
        prolog = f"Prolog={base}/prolog.sh\nEpilog={base}/epilog.sh\n" if with_prolog else ""
        conf = f"""
ClusterName=gputeltest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge}/sock
CredType=cred/munge
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/linear
SchedulerType=sched/builtin
{prolog}PrologFlags=Alloc
MailProg=/bin/true
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
        (base / "slurm.conf").write_text(conf)

        daemons.start(
            "munged",
            [
                "munged",
                "-F",
                "-f",
                f"--socket={munge}/sock",
                f"--key-file={key}",
                f"--log-file={munge}/log",
                f"--pid-file={munge}/pid",
                f"--seed-file={munge}/seed",
            ],
            env,
        )
        deadline = time.monotonic() + 10
        while not (munge / "sock").exists():
            daemons.check_alive()
            if time.monotonic() > deadline:
                pytest.skip(f"munged did not create its socket: {daemons.logs()}")
            time.sleep(0.05)
        daemons.start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(base / "slurm.conf")], env)
        daemons.start(
            "slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(base / "slurm.conf")], env
        )

        def node_state() -> str:
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=10
            )
            return out.stdout.strip() if out.returncode == 0 else ""

        deadline = time.monotonic() + 20
        while node_state() != "idle":
            daemons.check_alive()
            if time.monotonic() > deadline:
                pytest.skip(f"Slurm node never became idle ({node_state()!r}):\n{daemons.logs()}")
            time.sleep(0.2)
        yield base, env, daemons
    finally:
        daemons.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.xdist_group("slurm")  # one real Slurm at a time on the node
@pytest.mark.root
def test_real_slurm_job_turns_telemetry_on_and_off(
    tmp_path: Path, slurm: tuple[Path, dict[str, str], Daemons]
) -> None:
    base, env, daemons = slurm
    log_dir = tmp_path / "log"
    with running_agent(tmp_path) as run:
        assert request(run, {"op": "status"})["telemetry_active"] is False
        out = subprocess.run(
            ["sbatch", "--parsable", "-o", str(base / "job.out"), "--wrap", "sleep 2"],
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        job = out.stdout.strip().split(";")[0]
        ident = f"slurm-{job}"
        seen: dict[str, object] = {}

        def running_with_telemetry() -> bool:
            status = request(run, {"op": "status"})
            if ident in [a["id"] for a in status["allocations"]]:
                seen["active"] = status["telemetry_active"]
                return True
            return False

        _wait(f"the prolog to open {ident}", running_with_telemetry, 20, daemons)
        assert seen["active"] is True

        summary_path = log_dir / "allocations.csv"

        def released() -> bool:
            return summary_path.exists() and ident in summary_path.read_text()

        _wait(f"the epilog to release {ident}", released, 30, daemons)
        _wait(
            "telemetry to stop",
            lambda: request(run, {"op": "status"})["telemetry_active"] is False,
            10,
            daemons,
        )
        status = request(run, {"op": "status"})
        assert status["allocations"] == []

    with open(summary_path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["id"] == ident]
    assert len(rows) == 1
    assert rows[0]["gpus"] == "0;1"  # no GPUs in this Slurm: the allocation covers all
    assert float(rows[0]["duration_s"]) > 0
    assert rows[0]["energy_j"] != ""
    assert rows[0]["util_max_pct"] != "" and rows[0]["temperature_max_c"] != ""

    tagged = []
    for path in sorted(log_dir.glob("gpu-*.csv")):
        with open(path, newline="") as fh:
            tagged += [r for r in csv.DictReader(fh) if ident in r["allocations"].split(";")]
    assert tagged, "no GPU row carries the job's allocation id"

    with open(log_dir / "transitions.csv", newline="") as fh:
        transitions = list(csv.DictReader(fh))
    assert any("allocation" in t["reason"] for t in transitions), transitions
    assert transitions[-1]["to_state"].endswith("off"), transitions

    state = subprocess.run(
        ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=10
    ).stdout.strip()
    assert state == "idle", f"node state {state!r}\n{daemons.logs()}"
    prolog_log = (base / "prolog.log").read_text()
    assert f"allocation {ident} opened" in prolog_log
    assert f"allocation {ident} released" in (base / "epilog.log").read_text()
    print(json.dumps({"job": job, "rows": len(tagged)}), file=sys.stderr)


def test_scripts_find_their_library_through_a_symlink(tmp_path: Path) -> None:
    """Linked into a prolog.d/ directory, the prolog still finds gputel-slurm.sh."""
    link = tmp_path / "prolog.d" / "50-gputel.sh"
    link.parent.mkdir()
    link.symlink_to(PROLOG)
    out = subprocess.run(
        ["sh", str(link)],
        env={
            "PATH": "/usr/bin:/bin",
            "SLURM_JOB_ID": "7",
            "GPUTEL_BIN": "/nonexistent/gputel",
            "GPUTEL_DEFAULTS_FILE": str(tmp_path / "none"),
        },
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.returncode == 0
    assert "is missing" not in out.stderr
    assert "gputel not found" in out.stderr or "failed" in out.stderr, out.stderr
