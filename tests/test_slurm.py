"""The shipped Slurm prolog/epilog: called directly, and under a real single-node Slurm.

The real-Slurm test starts munged, slurmctld and slurmd on loopback with a ``slurm.conf`` of its
own in a temporary directory, runs a gputel agent on idle simulated GPUs, submits a batch job and
checks that the prolog turned telemetry on, rows carry the job's allocation id, the epilog turned
telemetry off, ``allocations.csv`` has the job, and the node is not drained. With slurmdbd on
MariaDB (started by the test on loopback) the epilog's summary reaches the job's AdminComment;
without the epilog the job's allocation ends ``job-gone``.
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


@pytest.mark.parametrize("gpus", ["0;reboot", "*", "3-1", "a,b"])
def test_prolog_refuses_an_unreadable_gpu_list(tmp_path: Path, fake_bin: Path, gpus: str) -> None:
    """Never all GPUs instead: one line says why, and no allocation is opened."""
    out, _, calls = run_script(
        PROLOG, tmp_path, SLURM_JOB_ID="42", SLURM_JOB_GPUS=gpus, GPUTEL_BIN=str(fake_bin)
    )
    assert out.returncode == 0 and calls == []
    (line,) = out.stderr.splitlines()
    assert f"cannot read SLURM_JOB_GPUS='{gpus}'" in line
    assert "no allocation opened for job 42" in line


def test_epilog_calls_release(tmp_path: Path, fake_bin: Path) -> None:
    out, _, calls = run_script(EPILOG, tmp_path, SLURM_JOB_ID="42", GPUTEL_BIN=str(fake_bin))
    assert out.returncode == 0
    assert calls[0] == "hook release slurm-42 --quiet --slurm-comment"


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
        GPUTEL_RUN_DIR="/tmp/gputel-run",
    )
    assert out.returncode == 0 and took < 5
    assert "timed out after 1 s talking to the agent at /tmp/gputel-run/control.sock" in (
        out.stderr
    ), out.stderr
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
        # A GPU the agent does not watch: one line naming the GPUs it knows, nothing opened.
        out, _, _ = run_script(PROLOG, tmp_path, SLURM_JOB_GPUS="7", **env)
        assert out.returncode == 0
        (line,) = out.stderr.splitlines()
        assert "gputel hook allocate slurm-1234 failed (exit 2: " in line, line
        assert "GPU 7 not present on this node (GPUs known to the agent: 0,1)" in line, line
        assert request(run, {"op": "status"})["allocations"] == []
        out, took, _ = run_script(PROLOG, tmp_path, SLURM_JOB_GPUS="1", **env)
        assert out.returncode == 0 and took < 6, out.stderr
        status = request(run, {"op": "status"})
        assert [(a["id"], a["gpus"]) for a in status["allocations"]] == [("slurm-1234", [1])]
        assert status["telemetry_active"] is True
        out, took, _ = run_script(EPILOG, tmp_path, **env)
        assert out.returncode == 0 and took < 11, out.stderr
        # No Slurm accounting here: one line says why nothing went to the job's AdminComment.
        assert "nothing stored in Slurm for job 1234: " in out.stderr, out.stderr
        assert request(run, {"op": "status"})["allocations"] == []
    with open(tmp_path / "log" / "allocations.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["id"] == "slurm-1234" and row["gpus"] == "1"


# ---------------------------------------------------------------------------------- real Slurm
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue")
ACCOUNTING_BINARIES = ("slurmdbd", "sacct", "sacctmgr", "mariadbd", "mariadb-install-db", "mariadb")


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


def _start_accounting(
    base: Path, env: dict[str, str], daemons: Daemons, munge: Path
) -> tuple[int, float]:
    """MariaDB (own datadir, loopback only) and slurmdbd for one test; their port and start-up
    seconds. Registers nothing: the cluster is added once slurm.conf exists."""
    missing = [b for b in ACCOUNTING_BINARIES if not shutil.which(b)]
    if missing:
        pytest.skip(f"slurmdbd/MariaDB not installed: {', '.join(missing)} missing")
    t0 = time.monotonic()
    data = base / "mysql"
    out = subprocess.run(
        [
            "mariadb-install-db",
            "--no-defaults",
            f"--datadir={data}",
            "--user=root",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if out.returncode != 0:
        pytest.fail(f"mariadb-install-db failed: {out.stdout[-1000:]}{out.stderr[-1000:]}")
    db_port = _free_port()
    sock = base / "mysql.sock"
    daemons.start(
        "mariadbd",
        [
            "mariadbd",
            "--no-defaults",
            f"--datadir={data}",
            f"--socket={sock}",
            "--bind-address=127.0.0.1",
            f"--port={db_port}",
            "--user=root",
            f"--pid-file={base}/mysql.pid",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=16M",
            "--innodb-log-file-size=8M",
        ],
        env,
    )
    password = os.urandom(8).hex()
    grant = (
        f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}';"
        "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    )

    def granted() -> bool:
        done = subprocess.run(
            ["mariadb", "--no-defaults", "-S", str(sock), "-u", "root", "-e", grant],
            capture_output=True,
            timeout=10,
            check=False,
        )
        return done.returncode == 0

    _wait("MariaDB to take the grant", granted, 60, daemons)
    dbd_port = _free_port()
    conf = base / "slurmdbd.conf"
    conf.write_text(
        f"""AuthType=auth/munge
AuthInfo=socket={munge}/sock
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={dbd_port}
SlurmUser=root
PidFile={base}/slurmdbd.pid
LogFile={base}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=slurm
StoragePass={password}
StorageLoc=slurm_acct_db
"""
    )
    conf.chmod(0o600)
    daemons.start("slurmdbd", ["slurmdbd", "-D"], env)
    return dbd_port, t0


@pytest.fixture
def slurm(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Path, dict[str, str], Daemons]]:
    """A single-node Slurm. ``indirect`` parameter: False for no gputel prolog/epilog, or a
    dict with ``prolog``, ``epilog`` and ``accounting`` (slurmdbd on MariaDB) flags."""
    param = getattr(request, "param", True)
    flags = param if isinstance(param, dict) else {"prolog": param, "epilog": param}
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
                f"SLURM_CONF={base}/slurm.conf\n"
                "export GPUTEL_BIN GPUTEL_DEFAULTS_FILE SLURM_CONF\n"
                f'exec {script} "$@" 2>>{base}/{name}.log\n'
            )
            wrapper.chmod(0o755)

        cpus = os.cpu_count() or 1
        prolog = f"Prolog={base}/prolog.sh\n" if flags.get("prolog") else ""
        prolog += f"Epilog={base}/epilog.sh\n" if flags.get("epilog") else ""
        accounting = "AccountingStorageType=accounting_storage/none\n"
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
{accounting}MpiDefault=none
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
        if flags.get("accounting"):
            dbd_port, t0 = _start_accounting(base, env, daemons, munge)
            conf = conf.replace(
                accounting,
                "AccountingStorageType=accounting_storage/slurmdbd\n"
                f"AccountingStorageHost=localhost\nAccountingStoragePort={dbd_port}\n"
                # The munge socket for slurmdbd connections (sacct, sacctmgr, slurmctld).
                f"AccountingStoragePass={munge}/sock\n",
            )
            (base / "slurm.conf").write_text(conf)

            def cluster_added() -> bool:
                done = subprocess.run(
                    ["sacctmgr", "-i", "add", "cluster", "gputeltest"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=10,
                    check=False,
                )
                return done.returncode == 0 or "already exists" in done.stdout + done.stderr

            _wait("slurmdbd to register the cluster", cluster_added, 60, daemons)
            print(f"accounting up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
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
    epilog_log = (base / "epilog.log").read_text()
    assert f"allocation {ident} released" in epilog_log
    print(epilog_log, file=sys.stderr)
    assert f"nothing stored in Slurm for job {job}: sacct cannot read" in epilog_log, epilog_log
    print(json.dumps({"job": job, "rows": len(tagged)}), file=sys.stderr)


def _submit(env: dict[str, str], base: Path, command: str) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", "-o", str(base / "job.out"), "--wrap", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    return out.stdout.strip().split(";")[0]


def _summary_rows(log_dir: Path, ident: str) -> list[dict[str, str]]:
    path = log_dir / "allocations.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["id"] == ident]


@pytest.mark.xdist_group("slurm")
@pytest.mark.root
@pytest.mark.parametrize(
    "slurm", [{"prolog": True, "epilog": True, "accounting": True}], indirect=True
)
def test_real_slurm_epilog_stores_the_summary_in_admin_comment(
    tmp_path: Path, slurm: tuple[Path, dict[str, str], Daemons], monkeypatch: pytest.MonkeyPatch
) -> None:
    """slurmdbd on MariaDB: after the job, ``sacct`` shows ``gputel=`` with the job's energy,
    another tool's text in the comment is kept, and the decoder reads the summary back."""
    from gputel.control.slurm_comment import encode, read_slurm_summary

    base, env, daemons = slurm
    with running_agent(tmp_path, SLURM_CONF=env["SLURM_CONF"]):
        job = _submit(env, base, "sleep 3")
        ident = f"slurm-{job}"
        # Another tool's text, set while the job runs: the epilog must keep it.
        _wait(
            "the job to run",
            lambda: (
                subprocess.run(
                    ["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True
                ).stdout.strip()
                == "RUNNING"
            ),
            20,
            daemons,
        )
        subprocess.run(
            ["scontrol", "update", f"JobId={job}", "AdminComment=Site:Keep-Me"],
            env=env,
            check=True,
            timeout=10,
        )
        _wait(
            f"the epilog to release {ident}",
            lambda: _summary_rows(tmp_path / "log", ident),
            30,
            daemons,
        )

        def comment() -> str:
            out = subprocess.run(
                ["sacct", "-n", "-X", "-j", job, "-o", "AdminComment%500"],
                env=env,
                capture_output=True,
                text=True,
                timeout=10,
            )
            return out.stdout.strip()

        _wait("sacct to show the gputel summary", lambda: "gputel=" in comment(), 30, daemons)
    (row,) = _summary_rows(tmp_path / "log", ident)
    shown = comment()
    print(f"AdminComment: {shown}", file=sys.stderr)
    assert "site:keep-me" in shown.lower(), shown
    energy = float(row["energy_j"])
    assert encode({"energy_j": energy}).removeprefix("gputel=") in shown, (shown, row)
    monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])
    back = read_slurm_summary(job)
    assert back is not None, shown
    assert back["energy_j"] == pytest.approx(energy, abs=0.05)
    assert back["gpus"] == [int(g) for g in row["gpus"].split(";")]
    assert back["duration_s"] == pytest.approx(float(row["duration_s"]), abs=0.05)
    for key in ("util_mean_pct", "memory_max_mib", "sm_active_mean_pct", "throttled_s"):
        assert back[key] == pytest.approx(float(row[key]), abs=0.05), key
    epilog_log = (base / "epilog.log").read_text()
    assert f"summary stored in Slurm job {job}" in epilog_log, epilog_log
    # gputel job shows Slurm's copy beside the recorded figures.
    shown_job = subprocess.run(
        [GPUTEL, "job", ident, str(tmp_path / "log"), "--json"],
        env=dict(env_for(tmp_path), SLURM_CONF=env["SLURM_CONF"]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown_job.returncode == 0, shown_job.stderr
    slurm_copy = json.loads(shown_job.stdout)["sources"]["slurm"]
    assert slurm_copy["energy_j"] == pytest.approx(energy, abs=0.05)
    assert slurm_copy == back


@pytest.mark.xdist_group("slurm")
@pytest.mark.root
@pytest.mark.parametrize("slurm", [{"prolog": True, "epilog": False}], indirect=True)
def test_real_slurm_allocation_ends_job_gone_without_epilog(
    tmp_path: Path, slurm: tuple[Path, dict[str, str], Daemons]
) -> None:
    """No epilog: the agent sees from Slurm that the job ended and closes its allocation."""
    base, env, daemons = slurm
    with running_agent(tmp_path, SLURM_CONF=env["SLURM_CONF"]) as run:
        job = _submit(env, base, "sleep 1")
        ident = f"slurm-{job}"

        def opened() -> bool:
            return ident in [a["id"] for a in request(run, {"op": "status"})["allocations"]]

        _wait(f"the prolog to open {ident}", opened, 20, daemons)
        t0 = time.monotonic()
        _wait(
            f"{ident} to end by itself", lambda: _summary_rows(tmp_path / "log", ident), 60, daemons
        )
        took = time.monotonic() - t0
        assert request(run, {"op": "status"})["allocations"] == []
    (row,) = _summary_rows(tmp_path / "log", ident)
    assert row["release_reason"] == "job-gone"
    print(json.dumps({"job_gone_after_s": round(took, 1)}), file=sys.stderr)


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
