"""Process owners from fake /proc trees: every cgroup form, vanished PIDs, unreadable files,
the per-PID cache (counted reads) and PID reuse, and the host-PID-namespace check."""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest

from fakeproc import add_kthreadd, add_process, patch_os_open, stat_line
from gputel.sources import owners
from gputel.sources.owners import (
    COMMAND_MAX_CHARS,
    OwnerResolver,
    ProcessOwner,
    host_pids_hidden,
    parse_cgroup,
    read_owner,
    short_command,
    slurm_job_from_environ,
    start_ticks,
)

C1 = "4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970"
C2 = "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d"
POD = "1d4a5b6c-7e8f-4a0b-9c1d-2e3f4a5b6c7d"
POD_ESC = POD.replace("-", "_")


def unknown_uid() -> int:
    uid = 3_999_999
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def owner_of(tmp_path: Path, pid: int = 4242, **kwargs: object) -> ProcessOwner:
    add_process(tmp_path, pid, **kwargs)  # type: ignore[arg-type]
    started, owner = read_owner(tmp_path, pid)
    assert started is not None and owner is not None
    return owner


# ------------------------------------------------------------------------------------ formats
SLURM_V1 = [
    "12:pids:/system.slice/slurmd.service",
    "11:memory:/slurm/uid_1000/job_4242/step_0/task_0",
    "10:devices:/slurm/uid_1000/job_4242/step_0",
    "9:freezer:/slurm/uid_1000/job_4242/step_0",
    "8:cpuset:/slurm/uid_1000/job_4242/step_0",
    "7:cpu,cpuacct:/slurm/uid_1000/job_4242/step_0/task_0",
    "1:name=systemd:/system.slice/slurmd.service",
]

# (cgroup lines, job, kind, container id, unit)
CASES: dict[str, tuple[str | list[str], str | None, str, str | None, str | None]] = {
    "slurm v1": (SLURM_V1, "slurm-4242", "slurm", None, "slurmd.service"),
    "slurm v1, several slurmd": (
        ["4:memory:/slurm_node01/uid_1000/job_77/step_batch/task_0", "1:name=systemd:/"],
        "slurm-77",
        "slurm",
        None,
        None,
    ),
    "slurm v2 task": (
        "0::/system.slice/slurmstepd.scope/job_4243/step_0/user/task_0",
        "slurm-4243",
        "slurm",
        None,
        "slurmstepd.scope",
    ),
    "slurm v2 batch step": (
        "0::/system.slice/slurmstepd.scope/job_9/step_batch/user/task_0",
        "slurm-9",
        "slurm",
        None,
        "slurmstepd.scope",
    ),
    "slurm v2 extern step (ssh adopted)": (
        "0::/system.slice/slurmstepd.scope/job_10/step_extern/user/task_special",
        "slurm-10",
        "slurm",
        None,
        "slurmstepd.scope",
    ),
    "slurm v2, several slurmd": (
        "0::/system.slice/node01_slurmstepd.scope/job_5/step_interactive/user/task_0",
        "slurm-5",
        "slurm",
        None,
        "node01_slurmstepd.scope",
    ),
    "k8s systemd burstable + containerd": (
        "0::/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{POD_ESC}.slice/cri-containerd-{C1}.scope",
        f"k8s-{POD}",
        "k8s",
        C1,
        None,
    ),
    "k8s systemd besteffort + cri-o": (
        "0::/kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{POD_ESC}.slice/crio-{C1}.scope",
        f"k8s-{POD}",
        "k8s",
        C1,
        None,
    ),
    "k8s systemd guaranteed + docker, cgroup v1": (
        [
            f"11:memory:/kubepods.slice/kubepods-pod{POD_ESC}.slice/docker-{C1}.scope",
            f"1:name=systemd:/kubepods.slice/kubepods-pod{POD_ESC}.slice/docker-{C1}.scope",
        ],
        f"k8s-{POD}",
        "k8s",
        C1,
        None,
    ),
    "k8s systemd, upper-case and static-pod uid": (
        "0::/kubepods.slice/kubepods-burstable.slice/"
        "kubepods-burstable-pod6E1C5A0BB43F9C2D7E8F9A0B1C2D3E4F.slice/"
        f"cri-containerd-{C1}.scope",
        "k8s-6e1c5a0bb43f9c2d7e8f9a0b1c2d3e4f",
        "k8s",
        C1,
        None,
    ),
    "k8s cgroupfs burstable, v1": (
        [
            f"11:devices:/kubepods/burstable/pod{POD}/{C1}",
            f"9:memory:/kubepods/burstable/pod{POD}/{C1}",
            f"1:name=systemd:/kubepods/burstable/pod{POD}/{C1}",
        ],
        f"k8s-{POD}",
        "k8s",
        C1,
        None,
    ),
    "k8s cgroupfs besteffort, v2": (
        f"0::/kubepods/besteffort/pod{POD}/{C1}",
        f"k8s-{POD}",
        "k8s",
        C1,
        None,
    ),
    "k8s cgroupfs guaranteed": (
        f"0::/kubepods/pod{POD}/{C1}",
        f"k8s-{POD}",
        "k8s",
        C1,
        None,
    ),
    "docker, systemd driver": (
        f"0::/system.slice/docker-{C2}.scope",
        f"container-{C2[:12]}",
        "container",
        C2,
        None,
    ),
    "docker, cgroupfs driver v1": (
        [f"9:memory:/docker/{C2}", f"1:name=systemd:/docker/{C2}"],
        f"container-{C2[:12]}",
        "container",
        C2,
        None,
    ),
    "containerd, systemd driver": (
        f"0::/system.slice/cri-containerd-{C2}.scope",
        f"container-{C2[:12]}",
        "container",
        C2,
        None,
    ),
    "cri-o": (
        f"0::/machine.slice/crio-{C2}.scope",
        f"container-{C2[:12]}",
        "container",
        C2,
        None,
    ),
    "podman rootful": (
        f"0::/machine.slice/libpod-{C2}.scope/container",
        f"container-{C2[:12]}",
        "container",
        C2,
        None,
    ),
    "podman rootless": (
        f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{C2}.scope/container",
        f"container-{C2[:12]}",
        "container",
        C2,
        "user@1000.service",
    ),
    "systemd service": (
        "0::/system.slice/vllm.service",
        "unit-vllm.service",
        "unit",
        None,
        "vllm.service",
    ),
    "systemd template instance, v1 systemd hierarchy": (
        ["5:memory:/system.slice", "1:name=systemd:/system.slice/jupyter@alice.service"],
        "unit-jupyter@alice.service",
        "unit",
        None,
        "jupyter@alice.service",
    ),
    "transient scope (systemd-run --scope)": (
        "0::/system.slice/run-r1b2c3.scope",
        "unit-run-r1b2c3.scope",
        "unit",
        None,
        "run-r1b2c3.scope",
    ),
    "user session": (
        "0::/user.slice/user-1000.slice/session-3.scope",
        "user-USER",
        "user",
        None,
        "session-3.scope",
    ),
    "user's own service": (
        "0::/user.slice/user-1000.slice/user@1000.service/app.slice/jupyter.service",
        "user-USER",
        "user",
        None,
        "jupyter.service",
    ),
    "plain process, no systemd": ("0::/", "user-USER", "user", None, None),
    # gputel in a container with the host's PID namespace but its own cgroup namespace sees
    # other processes' paths relative to its own cgroup.
    "seen from another cgroup namespace": (
        "0::/../../system.slice/slurmstepd.scope/job_3/step_0/user/task_0",
        "slurm-3",
        "slurm",
        None,
        "slurmstepd.scope",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_owner_from_each_cgroup_form(tmp_path: Path, case: str) -> None:
    cgroup, job, kind, container_id, unit = CASES[case]
    owner = owner_of(tmp_path, cgroup=cgroup, uid=0)
    assert owner.job == (job.replace("USER", "root") if job else None)
    assert owner.kind == kind
    assert owner.container_id == container_id
    assert owner.unit == unit
    assert (owner.pid, owner.uid, owner.user, owner.command) == (4242, 0, "root", "python train.py")


def test_parse_cgroup_orders_unified_and_systemd_paths_first() -> None:
    text = "\n".join([*SLURM_V1, "0::/system.slice/other.service"])
    facts = parse_cgroup(text)
    assert facts.slurm_job == "4242"
    assert facts.unit == "other.service"  # the unified hierarchy first
    assert owners.cgroup_paths(text)[:3] == [
        "/system.slice/other.service",
        "/system.slice/slurmd.service",  # name=systemd, ahead of the controllers
        "/slurm/uid_1000/job_4242/step_0/task_0",
    ]


def test_parse_cgroup_ignores_malformed_lines() -> None:
    facts = parse_cgroup("garbage\n\n3:cpu\n0::\n4:memory:/slurm/uid_1/job_12/step_0\n")
    assert facts.slurm_job == "12"


def test_conmon_scopes_are_not_containers() -> None:
    facts = parse_cgroup(f"0::/machine.slice/libpod-conmon-{C2}.scope")
    assert facts.container_id is None
    assert facts.unit == f"libpod-conmon-{C2}.scope"


def test_unit_name_outside_the_id_alphabet_has_no_job(tmp_path: Path) -> None:
    owner = owner_of(tmp_path, cgroup="0::/system.slice/my\\x2dapp.service")
    assert (owner.kind, owner.unit, owner.job) == ("unit", "my\\x2dapp.service", None)


# ------------------------------------------------------------------------------------ Slurm env
@pytest.mark.parametrize(
    "cgroup",
    [
        "0::/system.slice/slurmd.service",  # no cgroup plugin: steps stay in slurmd's unit
        "0::/system.slice/slurmstepd.scope/jobset_x1/step_0/user/task_0",  # job dir renamed
        "4:memory:/slurm/uid_1000/alloc_7/step_0",
    ],
)
def test_slurm_job_from_environ_where_the_path_has_none(tmp_path: Path, cgroup: str) -> None:
    env = {"PATH": "/bin", "SLURM_JOB_ID": "31337", "SLURM_ARRAY_JOB_ID": "31300"}
    owner = owner_of(tmp_path, cgroup=cgroup, environ=env)
    assert (owner.job, owner.kind) == ("slurm-31337", "slurm")


def test_environ_is_read_only_for_slurm_paths_without_a_job(tmp_path: Path) -> None:
    env = {"SLURM_JOB_ID": "5"}  # stale in a user's shell: not evidence of a job
    owner = owner_of(tmp_path, cgroup="0::/user.slice/user-1000.slice/session-1.scope", environ=env)
    assert owner.kind == "user"
    owner = owner_of(
        tmp_path, cgroup="0::/system.slice/slurmstepd.scope/job_6/step_0/user/task_0", environ=env
    )
    assert owner.job == "slurm-6"


def test_unreadable_environ_is_unknown_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def deny_environ(name: str) -> None:
        if name == "environ":
            raise PermissionError(13, "Permission denied", name)

    patch_os_open(monkeypatch, owners, deny_environ)
    owner = owner_of(
        tmp_path, cgroup="0::/system.slice/slurmd.service", environ={"SLURM_JOB_ID": "8"}
    )
    # No job id to be had: the process is recorded under its unit, with user and command.
    assert (owner.kind, owner.job, owner.unit) == ("unit", "unit-slurmd.service", "slurmd.service")
    assert owner.command == "python train.py"


def test_slurm_environ_parsing() -> None:
    assert slurm_job_from_environ(b"A=1\0SLURM_JOB_ID=42\0") == "42"
    assert slurm_job_from_environ(b"SLURM_JOBID=43\0") == "43"
    assert slurm_job_from_environ(b"SLURM_JOBID=43\0SLURM_JOB_ID=44\0") == "44"
    assert slurm_job_from_environ(b"SLURM_JOB_ID=4 2\0") is None
    assert slurm_job_from_environ(b"SLURM_JOB_ID=\0") is None
    assert slurm_job_from_environ(b"XSLURM_JOB_ID=9\0") is None
    assert slurm_job_from_environ(b"") is None


# ------------------------------------------------------------------------------------ fields
def test_user_is_the_real_uid_and_a_number_when_unknown(tmp_path: Path) -> None:
    owner = owner_of(tmp_path, uid=(0, 1000))
    assert (owner.uid, owner.user, owner.job) == (0, "root", "user-root")
    stranger = unknown_uid()
    owner = owner_of(tmp_path, uid=stranger)
    assert (owner.uid, owner.user, owner.job) == (stranger, str(stranger), f"user-{stranger}")


def test_command_forms() -> None:
    assert short_command(b"python\0-m\0torch.distributed.run\0", None) == (
        "python -m torch.distributed.run"
    )
    assert short_command(b"python\0-c\0import x\nx.go()\0", None) == "python -c import x x.go()"
    assert short_command(b"a" * 5000, None) == "a" * COMMAND_MAX_CHARS
    assert short_command(b"", b"kworker/0:1\n") == "kworker/0:1"
    assert short_command(None, b"python\n") == "python"
    assert short_command(b"\xffbad\0", None) == "\ufffdbad"
    assert short_command(b"\0\0", b"\n") is None
    assert short_command(None, None) is None


def test_setproctitle_padding_is_trimmed(tmp_path: Path) -> None:
    owner = owner_of(tmp_path, cmdline=b"ray::Worker.train()" + b" " * 40 + b"\0" * 20)
    assert owner.command == "ray::Worker.train()"


def test_empty_cmdline_falls_back_to_comm(tmp_path: Path) -> None:
    owner = owner_of(tmp_path, cmdline=b"", comm="pt_main_thread")
    assert owner.command == "pt_main_thread"


def test_start_ticks_with_a_command_name_holding_parentheses_and_spaces() -> None:
    line = stat_line(77, "a) b (c", 98765).encode()
    assert start_ticks(line) == 98765
    assert start_ticks(b"77 (x) S 1") is None
    assert start_ticks(b"") is None


# ------------------------------------------------------------------------------------ failures
def test_vanished_pid_has_no_owner(tmp_path: Path) -> None:
    assert read_owner(tmp_path, 999) == (None, None)
    assert OwnerResolver(tmp_path).resolve([999]) == {999: None}


def test_pid_that_exits_while_being_read_has_no_owner(tmp_path: Path) -> None:
    path = add_process(tmp_path, 4242)
    (path / "stat").unlink()  # the directory is still there, its files are gone (ESRCH/ENOENT)
    assert read_owner(tmp_path, 4242) == (None, None)


def test_missing_proc_root_is_not_an_error(tmp_path: Path) -> None:
    assert OwnerResolver(tmp_path / "absent").resolve([1, 2]) == {1: None, 2: None}


def test_unreadable_files_leave_their_fields_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def deny(name: str) -> None:
        if name in ("cgroup", "cmdline", "comm"):
            raise PermissionError(13, "Permission denied", name)

    patch_os_open(monkeypatch, owners, deny)
    owner = owner_of(tmp_path, cgroup="0::/system.slice/slurmstepd.scope/job_1/step_0", uid=0)
    assert owner == ProcessOwner(
        pid=4242,
        uid=0,
        user="root",
        command=None,
        job="user-root",
        kind="user",
        container_id=None,
        unit=None,
    )


def test_no_status_means_no_user_and_no_job_without_a_cgroup_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def deny(name: str) -> None:
        if name == "status":
            raise PermissionError(13, "Permission denied", name)

    patch_os_open(monkeypatch, owners, deny)
    owner = owner_of(tmp_path, cgroup="0::/")
    assert (owner.uid, owner.user, owner.job, owner.kind) == (None, None, None, None)
    assert owner_of(tmp_path, cgroup=f"0::/docker/{C1}").job == f"container-{C1[:12]}"


# ------------------------------------------------------------------------------------ cache
class OpenCounter:
    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.names: list[str] = []

    def __call__(self, name: str) -> None:
        self.names.append(name)


@pytest.fixture
def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OpenCounter:
    counter = OpenCounter(tmp_path)
    patch_os_open(monkeypatch, owners, counter)
    return counter


def add_gpu_processes(root: Path, count: int) -> list[int]:
    pids = list(range(1000, 1000 + count))
    for pid in pids:
        add_process(
            root, pid, cgroup=f"0::/system.slice/slurmstepd.scope/job_{pid}/step_0/user/task_0"
        )
    return pids


def test_steady_state_reads_nothing(tmp_path: Path, counted: OpenCounter) -> None:
    pids = add_gpu_processes(tmp_path, 8)
    resolver = OwnerResolver(tmp_path)
    first = resolver.resolve(pids + pids[:3])  # a process on two GPUs is read once
    # Per process: its directory, stat, cgroup, status, cmdline.
    assert len(counted.names) == 5 * len(pids)
    assert {pid: o.job for pid, o in first.items() if o} == {p: f"slurm-{p}" for p in pids}
    counted.names.clear()
    for _ in range(5):
        again = resolver.resolve(pids)
        assert again == first
    assert counted.names == []


def test_a_vanished_pid_still_reported_is_not_read_again(
    tmp_path: Path, counted: OpenCounter
) -> None:
    resolver = OwnerResolver(tmp_path)
    assert resolver.resolve([31]) == {31: None}
    counted.names.clear()
    assert resolver.resolve([31]) == {31: None}
    assert counted.names == []


def test_returning_pid_costs_one_start_time_read(tmp_path: Path, counted: OpenCounter) -> None:
    pids = add_gpu_processes(tmp_path, 2)
    resolver = OwnerResolver(tmp_path)
    first = resolver.resolve(pids)
    resolver.resolve(pids[:1])  # the second process leaves the GPUs for a tick
    counted.names.clear()
    assert resolver.resolve(pids) == first
    assert counted.names == [str(tmp_path / str(pids[1]) / "stat")]


def test_reused_pid_is_read_afresh(tmp_path: Path) -> None:
    add_process(tmp_path, 500, cgroup="0::/system.slice/slurmstepd.scope/job_1/step_0", uid=0)
    resolver = OwnerResolver(tmp_path)
    before = resolver.resolve([500])[500]
    assert before is not None and before.job == "slurm-1"
    resolver.resolve([])  # the job ends; its PID is reported no more
    add_process(
        tmp_path,
        500,
        cgroup=f"0::/system.slice/docker-{C1}.scope",
        cmdline=("serve",),
        start_ticks=9_000_000,
    )
    after = resolver.resolve([500])[500]
    assert after is not None
    assert (after.job, after.command) == (f"container-{C1[:12]}", "serve")


def test_pid_that_came_back_to_life_is_read(tmp_path: Path) -> None:
    resolver = OwnerResolver(tmp_path)
    assert resolver.resolve([600]) == {600: None}
    resolver.resolve([])
    add_process(tmp_path, 600)
    owner = resolver.resolve([600])[600]
    assert owner is not None and owner.command == "python train.py"


def test_cache_is_bounded_by_the_ticks_a_pid_stays_away(tmp_path: Path) -> None:
    pids = add_gpu_processes(tmp_path, 4)
    resolver = OwnerResolver(tmp_path, keep_ticks=3)
    resolver.resolve(pids)
    assert len(resolver) == 4
    for _ in range(3):
        resolver.resolve(pids[:1])
    assert len(resolver) == 4
    resolver.resolve(pids[:1])
    assert len(resolver) == 1
    with pytest.raises(ValueError):
        OwnerResolver(tmp_path, keep_ticks=0)


# ------------------------------------------------------------------------------------ namespace
def test_host_proc_root_shows_kthreadd(tmp_path: Path) -> None:
    add_kthreadd(tmp_path)
    assert host_pids_hidden(tmp_path) is None


def test_container_proc_root_has_no_kernel_threads(tmp_path: Path) -> None:
    reason = host_pids_hidden(tmp_path)
    assert reason is not None and "host PID namespace" in reason
    assert "GPUTEL_PROC_ROOT" in reason and "\n" not in reason
    # PID 2 in a container is an ordinary process (here one entered with docker exec, whose
    # parent is outside the namespace).
    add_process(tmp_path, 2, comm="bash")
    assert host_pids_hidden(tmp_path) is not None


def test_unreadable_pid_2_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    add_kthreadd(tmp_path)
    real_open = builtins.open
    denied = str(tmp_path / "2" / "stat")

    def guarded(file: object, *args: object, **kwargs: object) -> object:
        if str(file) == denied:
            raise PermissionError(13, "Permission denied", denied)
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(owners, "open", guarded, raising=False)
    reason = host_pids_hidden(tmp_path)
    assert reason is not None and "hidepid" in reason
