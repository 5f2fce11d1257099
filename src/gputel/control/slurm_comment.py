"""A job's gputel summary in Slurm's accounting database: the ``gputel=`` part of AdminComment.

Operators read job records with ``sacct``; the node's ``allocations.csv`` is not where they look.
The Slurm epilog (``gputel hook release slurm-N --slurm-comment``) writes the allocation's
summary into the job's ``AdminComment`` with ``sacctmgr`` (from an epilog, ``scontrol update``
is refused: the job has already finished), and ``gputel job`` reads it back.

The text must survive the trip: ``sacctmgr`` lowercases the whole value and slurmdbd stores each
``"`` as a backtick. So the summary is one whitespace-free, lowercase, quote-free token,
``gputel=gpus=0+1,duration_s=12.5,energy_j=4410.2,...``, which reads as is in
``sacct -j N -o AdminComment%500``. Whatever else the comment holds (another tool's text) is
kept: only an earlier ``gputel=`` token is replaced.

Both external calls are bounded (``timeout``) and never raise: a summary that cannot be stored
costs one log line, never the job.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MARKER = "gputel="
#: (summary key, comment key, kind): the comment keys are short so the token fits in a column.
FIELDS: tuple[tuple[str, str, str], ...] = (
    ("gpus", "gpus", "ints"),
    ("duration_s", "duration_s", "num"),
    ("energy_j", "energy_j", "num"),
    ("util_mean_pct", "util_mean_pct", "num"),
    ("sm_active_mean_pct", "sm_mean_pct", "num"),
    ("memory_max_mib", "mem_max_mib", "num"),
    ("throttled_s", "throttled_s", "num"),
    ("xids", "xids", "ints"),
)
_BY_COMMENT_KEY = {c: (s, kind) for s, c, kind in FIELDS}
_TOKEN = re.compile(r"(?:^|(?<=\s))gputel=(\S*)")
_JOB_ID = re.compile(r"\d{1,12}")
#: Seconds each sacct/sacctmgr call may take before it is abandoned.
CALL_TIMEOUT_S = 3.0


def _number(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):
        return None
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _ints(value: object) -> str | None:
    if not isinstance(value, (list, tuple)) or not value:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return None
    return "+".join(str(v) for v in value)


def encode(summary: Mapping[str, Any]) -> str:
    """The ``gputel=`` token of a release summary; fields the summary lacks are left out (an
    absent field is unknown, never 0)."""
    parts: list[str] = []
    for key, name, kind in FIELDS:
        text = _ints(summary.get(key)) if kind == "ints" else _number(summary.get(key))
        if text is not None:
            parts.append(f"{name}={text}")
    return MARKER + ",".join(parts)


def decode(comment: str | None) -> dict[str, Any] | None:
    """The summary fields of the ``gputel=`` token in an AdminComment; None when there is none.

    The token has nothing Slurm changes (no capitals, no quotes); other tools' text around it
    is skipped, and a field that does not parse is left out.
    """
    if not comment:
        return None
    found = _TOKEN.search(comment)
    if found is None:
        return None
    out: dict[str, Any] = {}
    for pair in found.group(1).split(","):
        name, sep, text = pair.partition("=")
        spec = _BY_COMMENT_KEY.get(name.strip().lower())
        if not sep or spec is None:
            continue
        key, kind = spec
        try:
            if kind == "ints":
                out[key] = [int(v) for v in text.split("+") if v]
            else:
                number = float(text)
                if math.isfinite(number):
                    out[key] = number
        except ValueError:
            continue
    return out


def merge(existing: str | None, token: str) -> str:
    """``existing`` with its ``gputel=`` token replaced by ``token`` (appended if it had none)."""
    text = (existing or "").strip()
    if _TOKEN.search(text):
        return _TOKEN.sub(lambda _: token, text, count=1)
    return f"{text} {token}" if text else token


def slurm_job_id(allocation_id: str) -> str | None:
    """``slurm-1234`` → ``1234``; None for any other allocation id."""
    prefix, _, rest = allocation_id.partition("-")
    return rest if prefix == "slurm" and _JOB_ID.fullmatch(rest) else None


@dataclass(frozen=True)
class Stored:
    """What became of one attempt to store a summary: ``ok`` and the one line that says so."""

    ok: bool
    line: str


def run_slurm_command(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str] | str:
    """One Slurm command (``sacct``, ``sacctmgr``, ``scontrol``) bounded in time: the finished
    call, or the one-line reason it could not run or finish. Never raises: Slurm being slow or
    absent must never fail a job's prolog, epilog or the agent."""
    if shutil.which(argv[0]) is None:
        return f"{argv[0]} not found on PATH"
    try:
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=max(0.1, timeout),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"{argv[0]} did not answer within {timeout:.1f}s"
    except OSError as exc:
        return f"{argv[0]} could not run: {exc}"


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def failure_line(done: subprocess.CompletedProcess[str]) -> str:
    """Why a Slurm command failed, in one line: the first line it wrote (error output first),
    else its exit status."""
    return _first_line(done.stderr) or _first_line(done.stdout) or f"exit {done.returncode}"


def read_comment(job_id: str, timeout: float = CALL_TIMEOUT_S) -> str | Stored | None:
    """The job's AdminComment from the accounting database ('' when empty), or a failed
    :class:`Stored` saying why it could not be read."""
    argv = ["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "AdminComment"]
    done = run_slurm_command(argv, timeout)
    if isinstance(done, str):
        return Stored(False, done)
    if done.returncode != 0:
        return Stored(False, f"sacct cannot read the accounting database ({failure_line(done)})")
    lines = done.stdout.splitlines()
    return lines[0].strip() if lines else None


def read_slurm_summary(job_id: str | int, timeout: float = CALL_TIMEOUT_S) -> dict[str, Any] | None:
    """The gputel summary stored in Slurm job ``job_id``'s AdminComment; None when there is
    none or Slurm's accounting cannot be asked (bounded by ``timeout``)."""
    job = str(job_id)
    if not _JOB_ID.fullmatch(job):
        return None
    comment = read_comment(job, timeout)
    if not isinstance(comment, str):
        return None
    return decode(comment)


def store_summary(job_id: str, summary: Mapping[str, Any], timeout: float = 4.0) -> Stored:
    """Write ``summary`` into job ``job_id``'s AdminComment, keeping the rest of the comment.

    Bounded by ``timeout`` in all; never raises. A job not yet in the database (slurmctld sends
    job records to slurmdbd asynchronously) is retried until the time is up.
    """
    deadline = time.monotonic() + timeout
    if not _JOB_ID.fullmatch(job_id):
        return Stored(False, f"job id {job_id[:40]!r} is not a Slurm job id")
    token = encode(summary)
    while True:
        existing = read_comment(job_id, deadline - time.monotonic())
        if isinstance(existing, Stored):
            return Stored(False, f"nothing stored in Slurm for job {job_id}: {existing.line}")
        argv = [
            "sacctmgr",
            "-i",
            "update",
            "job",
            "where",
            f"jobid={job_id}",
            "set",
            f"AdminComment={merge(existing, token)}",
        ]
        done = run_slurm_command(argv, deadline - time.monotonic())
        if isinstance(done, str):
            return Stored(False, f"nothing stored in Slurm for job {job_id}: {done}")
        said = f"{done.stdout}\n{done.stderr}"
        if done.returncode == 0 and "nothing modified" not in said.lower():
            return Stored(True, f"summary stored in Slurm job {job_id}'s AdminComment: {token}")
        if time.monotonic() + 1.0 >= deadline:
            why = failure_line(done)
            return Stored(False, f"nothing stored in Slurm for job {job_id}: sacctmgr: {why}")
        time.sleep(0.5)
