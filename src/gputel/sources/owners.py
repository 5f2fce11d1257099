"""Who owns a GPU process: its user, its command and the job it belongs to, read from procfs.

NVML names the processes on a GPU by PID (a PID of the host's PID namespace) and nothing else.
The job behind a PID is written in its cgroup path, which the scheduler or container runtime
chose when it started the process: ``/proc/PID/cgroup`` names the Slurm job, the Kubernetes pod,
the container, the systemd unit or the user session. ``docs/attribution.md`` lists the forms
and which job id each owner gets.

Everything here reads files under a proc root (a setting, so tests run against fake trees) and
nothing raises for a process that is gone or a file we may not read: a vanished PID has no
owner (None), an unreadable file leaves its fields None.

Cost: a PID's cgroup does not change for the life of the process, so :class:`OwnerResolver`
reads a PID's files once and keeps the answer while NVML keeps reporting the PID on every tick;
the steady state reads nothing. A PID that comes back after an absence is checked against its
start time (``/proc/PID/stat`` field 22), so a reused PID is read afresh.
"""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gputel.control.allocations import AllocationError, validate_id

DEFAULT_PROC_ROOT = Path("/proc")

#: ``command`` keeps at most this many characters: enough to tell ``python train.py --cfg x``
#: from another run, short enough for a CSV cell and a status table.
COMMAND_MAX_CHARS = 128
#: ``cmdline`` is read up to this many bytes (the command is trimmed far below it anyway).
_CMDLINE_READ_BYTES = 4096
#: ``stat`` is one line of about 300 bytes (the command name in it is at most 64).
_STAT_READ_BYTES = 1024
#: ``Uid:`` is the ninth line of ``status``, well inside its first kilobyte; one read of a
#: limit saves the read that would find the end of the (1.5 KiB and longer) file.
_STATUS_READ_BYTES = 1024
#: Entries of PIDs not reported for this many ticks are dropped.
DEFAULT_KEEP_TICKS = 30
#: The uid → user name cache is emptied when it grows past this (it only grows with new uids).
_USER_CACHE_MAX = 4096

#: ``PF_KTHREAD`` in ``/proc/PID/stat`` field 9 (flags): set only on kernel threads.
PF_KTHREAD = 0x00200000

OwnerKind = Literal["slurm", "k8s", "container", "unit", "user"]

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_SLURM_V1_ROOT = re.compile(r"slurm(?:_[^/]+)?")  # /slurm, or /slurm_<node> with multiple slurmd
_SLURM_V2_SCOPE = re.compile(r"(?:[^/]+_)?slurmstepd\.scope")  # or <node>_slurmstepd.scope
_SLURM_JOB_DIR = re.compile(r"job_(\d+)")
_SLURM_DAEMON_UNIT = "slurmd.service"
_KUBE_SYSTEMD_POD = re.compile(
    r"kubepods(?:-(?:besteffort|burstable|guaranteed))?-pod([0-9a-fA-F_]+)\.slice"
)
_KUBE_CGROUPFS_ROOT = re.compile(r"kubepods")
_KUBE_CGROUPFS_POD = re.compile(r"pod([0-9a-fA-F-]+)")
_CONTAINER_SCOPE = re.compile(r"(?:docker|cri-containerd|crio|libpod)-([0-9a-f]{64})\.scope")
_CONTAINER_DIR = re.compile(r"[0-9a-f]{64}")
_USER_SLICE = re.compile(r"user-(\d+)\.slice")
_UNIT = re.compile(r".+\.(?:service|scope)")
_JOB_ID_DIGITS = re.compile(r"\d+")
#: A container's short id, as ``docker ps`` and ``podman ps`` print it.
_SHORT_ID_CHARS = 12


@dataclass(frozen=True)
class ProcessOwner:
    """The owner of one process. Every field the files did not give is None.

    ``job`` is the allocation id the process's work is recorded under (``slurm-<jobid>``,
    ``k8s-<pod uid>``, ``container-<short id>``, ``unit-<unit>``, ``user-<user>``); ``kind``
    says which of these rules named it.
    """

    pid: int
    uid: int | None
    user: str | None
    command: str | None
    job: str | None
    kind: OwnerKind | None
    container_id: str | None
    unit: str | None


@dataclass(frozen=True)
class CgroupFacts:
    """What a ``/proc/PID/cgroup`` text says about its process (plain data, no I/O)."""

    slurm_job: str | None = None
    #: The path is Slurm's (a slurmstepd or slurmd cgroup) but names no ``job_N``: the job id
    #: must come from the process's environment.
    slurm_without_job: bool = False
    pod_uid: str | None = None
    container_id: str | None = None
    unit: str | None = None
    #: The uid of a ``user-UID.slice`` (a login session or a user's own services).
    session_uid: int | None = None


# ---------------------------------------------------------------------------------- parsing
def cgroup_paths(text: str) -> list[str]:
    """The distinct cgroup paths of a ``/proc/PID/cgroup`` text, the most telling first.

    Each line is ``ID:CONTROLLERS:PATH``. The unified hierarchy (``0::``), then systemd's own
    (``name=systemd``) come first: they carry the unit and session names; the v1 controller
    hierarchies follow (Slurm's v1 cgroups live only there).
    """
    unified: list[str] = []
    systemd: list[str] = []
    controllers: list[str] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2]:
            continue
        names, path = parts[1], parts[2]
        if names == "":
            unified.append(path)
        elif names == "name=systemd":
            systemd.append(path)
        else:
            controllers.append(path)
    return list(dict.fromkeys(unified + systemd + controllers))


def _slurm_job(parts: list[str]) -> tuple[str | None, bool]:
    """(job id, whether the path is Slurm's) for one path's components."""
    for i, part in enumerate(parts):
        if _SLURM_V2_SCOPE.fullmatch(part):
            # v2: <slurmstepd.scope>/job_N/step_S/{user/task_T,slurm}
            m = _SLURM_JOB_DIR.fullmatch(parts[i + 1]) if i + 1 < len(parts) else None
            return (m.group(1) if m else None), True
        if _SLURM_V1_ROOT.fullmatch(part):
            # v1: /slurm/uid_U/job_N/step_S/task_T in each controller's hierarchy
            for later in parts[i + 1 : i + 3]:
                m = _SLURM_JOB_DIR.fullmatch(later)
                if m:
                    return m.group(1), True
            return None, True
        if part == _SLURM_DAEMON_UNIT:
            # No cgroup plugin: steps stay in slurmd's own unit.
            return None, True
    return None, False


def _pod_uid(parts: list[str]) -> str | None:
    """The pod UID in its canonical (API server) form: lower case, dashes as written there."""
    for part in parts:
        m = _KUBE_SYSTEMD_POD.fullmatch(part)
        if m:
            # The systemd driver escapes the UID's dashes as underscores (a dash means
            # nesting in a slice name): kubepods-burstable-pod1d4a_..._0242.slice.
            return m.group(1).replace("_", "-").lower()
    for i, part in enumerate(parts):
        if _KUBE_CGROUPFS_ROOT.fullmatch(part):
            # cgroupfs driver: /kubepods/<qos>/pod<uid>/<container> or /kubepods/pod<uid>/...
            for later in parts[i + 1 : i + 3]:
                m = _KUBE_CGROUPFS_POD.fullmatch(later)
                if m:
                    return m.group(1).lower()
    return None


def _container_id(parts: list[str]) -> str | None:
    """The deepest container id: a runtime's scope (systemd driver) or a bare id (cgroupfs)."""
    for part in reversed(parts):
        m = _CONTAINER_SCOPE.fullmatch(part)
        if m:
            return m.group(1)
        if _CONTAINER_DIR.fullmatch(part):
            return part
    return None


def _unit(parts: list[str]) -> str | None:
    """The innermost systemd unit that is not a container's scope."""
    for part in reversed(parts):
        if _UNIT.fullmatch(part) and not _CONTAINER_SCOPE.fullmatch(part):
            return part
    return None


def parse_cgroup(text: str) -> CgroupFacts:
    """Read the Slurm job, pod, container, unit and session out of a ``/proc/PID/cgroup``."""
    slurm_job: str | None = None
    slurm_seen = False
    pod_uid = container_id = unit = None
    session_uid: int | None = None
    for path in cgroup_paths(text):
        parts = [p for p in path.split("/") if p]
        job, is_slurm = _slurm_job(parts)
        slurm_job = slurm_job or job
        slurm_seen = slurm_seen or is_slurm
        pod_uid = pod_uid or _pod_uid(parts)
        container_id = container_id or _container_id(parts)
        unit = unit or _unit(parts)
        if session_uid is None:
            for part in parts:
                m = _USER_SLICE.fullmatch(part)
                if m:
                    session_uid = int(m.group(1))
                    break
    return CgroupFacts(
        slurm_job=slurm_job,
        slurm_without_job=slurm_seen and slurm_job is None,
        pod_uid=pod_uid,
        container_id=container_id,
        unit=unit,
        session_uid=session_uid,
    )


def slurm_job_from_environ(data: bytes) -> str | None:
    """``SLURM_JOB_ID`` (or the older ``SLURM_JOBID``) from a NUL-separated environment."""
    found: dict[bytes, bytes] = {}
    for entry in data.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep and key in (b"SLURM_JOB_ID", b"SLURM_JOBID"):
            found[key] = value
    for name in (b"SLURM_JOB_ID", b"SLURM_JOBID"):
        text = found.get(name, b"").decode("ascii", "replace")
        if _JOB_ID_DIGITS.fullmatch(text):
            return text
    return None


def start_ticks(stat: bytes) -> int | None:
    """Field 22 of ``/proc/PID/stat``: the start time in clock ticks since boot.

    The command name (field 2) may hold spaces and parentheses, so fields are counted after
    its last ``)``.
    """
    fields = stat.rpartition(b")")[2].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def real_uid(status: bytes) -> int | None:
    """The real uid (first number of ``Uid:``) of a ``/proc/PID/status`` text."""
    for line in status.splitlines():
        if line.startswith(b"Uid:"):
            fields = line.split()
            try:
                return int(fields[1])
            except (IndexError, ValueError):
                return None
    return None


def short_command(cmdline: bytes | None, comm: bytes | None) -> str | None:
    """The command line with its NULs as spaces, at most COMMAND_MAX_CHARS; else ``comm``.

    Control characters (an argument may hold a newline) become spaces too, so a command is
    always one line in a CSV cell or a table.
    """
    for raw in (cmdline, comm):
        if raw:
            text = _CONTROL_CHARS.sub(" ", raw.decode("utf-8", "replace")).strip()
            if text:
                return text[:COMMAND_MAX_CHARS]
    return None


def _valid_id(candidate: str) -> str | None:
    try:
        return validate_id(candidate)
    except AllocationError:
        return None


def job_for(
    facts: CgroupFacts, environ_job: str | None, uid: int | None, user: str | None
) -> tuple[str | None, OwnerKind | None]:
    """(job id, kind) by the first rule that applies: Slurm, pod, container, session, unit,
    user. The rule and the forms are documented in ``docs/attribution.md``."""
    slurm = facts.slurm_job or environ_job
    if slurm is not None:
        return f"slurm-{slurm}", "slurm"
    if facts.pod_uid is not None:
        return _valid_id(f"k8s-{facts.pod_uid}"), "k8s"
    if facts.container_id is not None:
        return f"container-{facts.container_id[:_SHORT_ID_CHARS]}", "container"
    if facts.unit is not None and facts.session_uid is None:
        return _valid_id(f"unit-{facts.unit}"), "unit"
    if uid is None:
        return None, None
    # A name outside the id alphabet (a domain account with a backslash) falls back to the uid.
    return (_valid_id(f"user-{user}") if user else None) or f"user-{uid}", "user"


# ---------------------------------------------------------------------------------- reading
def _read_at(dir_fd: int, name: str, limit: int | None = None) -> bytes | None:
    """A whole file (or its first ``limit`` bytes) relative to an open ``/proc/PID``; None when
    it cannot be read (gone, EACCES for another user's ``environ``, hidepid)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if limit is not None:
            return os.read(fd, limit)
        chunks: list[bytes] = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_start_ticks(proc_root: Path, pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot), or None when it does not exist."""
    try:
        fd = os.open(proc_root / str(pid) / "stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return start_ticks(os.read(fd, _STAT_READ_BYTES))
    except OSError:
        return None
    finally:
        os.close(fd)


class _UserNames:
    """uid → user name through the password database (NSS), looked up once per uid."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    def __call__(self, uid: int) -> str:
        name = self._names.get(uid)
        if name is None:
            try:
                name = pwd.getpwuid(uid).pw_name
            except KeyError:
                name = str(uid)
            if len(self._names) >= _USER_CACHE_MAX:
                self._names.clear()
            self._names[uid] = name
        return name


def read_owner(
    proc_root: Path, pid: int, user_names: _UserNames | None = None
) -> tuple[int | None, ProcessOwner | None]:
    """(start ticks, owner) of ``pid``, read now; (None, None) when the PID does not exist.

    Every file is opened relative to one open ``/proc/PID`` directory: if the process exits
    and its PID is reused while we read, the reads fail instead of mixing two processes.
    """
    try:
        dir_fd = os.open(proc_root / str(pid), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None, None
    try:
        stat = _read_at(dir_fd, "stat", _STAT_READ_BYTES)
        started = start_ticks(stat) if stat else None
        if started is None:
            return None, None
        cgroup = _read_at(dir_fd, "cgroup")
        facts = parse_cgroup(cgroup.decode("utf-8", "replace")) if cgroup else CgroupFacts()
        environ_job = None
        if facts.slurm_without_job:
            environ = _read_at(dir_fd, "environ")
            environ_job = slurm_job_from_environ(environ) if environ else None
        status = _read_at(dir_fd, "status", _STATUS_READ_BYTES)
        uid = real_uid(status) if status else None
        user = (user_names or _UserNames())(uid) if uid is not None else None
        cmdline = _read_at(dir_fd, "cmdline", _CMDLINE_READ_BYTES)
        comm = None if cmdline else _read_at(dir_fd, "comm")
    finally:
        os.close(dir_fd)
    job, kind = job_for(facts, environ_job, uid, user)
    return started, ProcessOwner(
        pid=pid,
        uid=uid,
        user=user,
        command=short_command(cmdline, comm),
        job=job,
        kind=kind,
        container_id=facts.container_id,
        unit=facts.unit,
    )


@dataclass
class _Entry:
    started: int | None
    owner: ProcessOwner | None
    last_tick: int


class OwnerResolver:
    """Owners of the PIDs on the GPUs, tick after tick, reading each process's files once.

    Call :meth:`resolve` once per tick with every PID NVML reported in that tick. A PID that
    was also reported in the previous tick is the same process: for another process to get
    its PID in between, the old one must exit and the kernel hand out every other PID before
    reusing it (PIDs are allocated cyclically up to ``pid_max``), and the new process must open
    a GPU context, all within one tick. So a continuously reported PID costs nothing. A PID
    seen before but absent in the previous tick has its start time read and compared; a
    different start time (a reused PID) or none (gone) reads it afresh. PIDs not reported for
    ``keep_ticks`` ticks are forgotten, so the cache holds at most the PIDs of that window.
    """

    def __init__(
        self, proc_root: Path = DEFAULT_PROC_ROOT, keep_ticks: int = DEFAULT_KEEP_TICKS
    ) -> None:
        if keep_ticks < 1:
            raise ValueError("keep_ticks must be at least 1")
        self.proc_root = proc_root
        self.keep_ticks = keep_ticks
        self._entries: dict[int, _Entry] = {}
        self._tick = 0
        self._user_names = _UserNames()

    def __len__(self) -> int:
        return len(self._entries)

    def resolve(self, pids: Iterable[int]) -> dict[int, ProcessOwner | None]:
        """Each PID's owner (None for a PID that does not exist under the proc root)."""
        self._tick += 1
        tick = self._tick
        result: dict[int, ProcessOwner | None] = {}
        for pid in pids:
            if pid in result:
                continue
            entry = self._entries.get(pid)
            if entry is not None and entry.last_tick < tick - 1:
                started = read_start_ticks(self.proc_root, pid)
                if started is None or started != entry.started:
                    entry = None
            if entry is None:
                started, owner = read_owner(self.proc_root, pid, self._user_names)
                entry = _Entry(started, owner, tick)
                self._entries[pid] = entry
            entry.last_tick = tick
            result[pid] = entry.owner
        oldest = tick - self.keep_ticks
        stale = [pid for pid, e in self._entries.items() if e.last_tick < oldest]
        for pid in stale:
            del self._entries[pid]
        return result


# ---------------------------------------------------------------------------------- containers
def host_pids_hidden(proc_root: Path = DEFAULT_PROC_ROOT) -> str | None:
    """Why the host's PIDs (the ones NVML reports) cannot be looked up under ``proc_root``, or
    None when they can.

    The rule: PID 2 under the proc root must be a kernel thread (``kthreadd``, with
    ``PF_KTHREAD`` in its flags). Kernel threads belong to the initial PID namespace and are
    visible only in a procfs of that namespace, so this holds for the host's ``/proc`` (also
    when it is mounted into a container and named by ``GPUTEL_PROC_ROOT``) and fails for a
    container's own ``/proc``. It needs no privilege, unlike comparing ``ns/pid`` links of
    other processes, and no GPU process to test with. A ``/proc`` mounted with ``hidepid``
    fails it too, rightly: other users' processes are hidden there as well.
    """
    try:
        with open(proc_root / "2" / "stat", "rb") as fh:
            stat = fh.read()
    except PermissionError:
        return (
            f"{proc_root}/2/stat is not readable (procfs mounted with hidepid?): "
            "GPU processes are recorded without owners"
        )
    except OSError:
        stat = b""
    fields = stat.rpartition(b")")[2].split()
    try:
        is_kthread = bool(int(fields[6]) & PF_KTHREAD)
    except (IndexError, ValueError):
        is_kthread = False
    if is_kthread:
        return None
    return (
        f"{proc_root} is not the host's PID namespace (no kernel threads; gputel runs in a "
        "container without the host PID namespace, or procfs hides other users' processes): "
        "GPU processes are recorded without owners; run with the host PID namespace "
        "(docker --pid=host, Kubernetes hostPID: true) or mount the host's /proc and set "
        "GPUTEL_PROC_ROOT to it"
    )
