"""Whether the Slurm job behind a ``slurm-<jobid>`` allocation is gone, from Slurm's own view.

The prolog opens the allocation with no process to watch; the epilog closes it. An epilog that
never runs (removed from slurm.conf, killed, a node rebooted into a new agent) would leave
telemetry on for ever, so the agent asks Slurm itself: ``scontrol -o show job N`` says the job's
state, or that Slurm no longer knows the id (purged after ``MinJobAge``). Slurm's view is
chosen over the job's cgroup or processes because it is the same on every proctrack and cgroup
setup, and a job between steps (no process yet, none any more) is still running to Slurm.

Asking costs a round trip to slurmctld, so each job is asked at most once per ``interval_s``,
on a thread of its own with a ``timeout_s`` bound: the agent's loop never waits for Slurm. A
job is gone only on Slurm's word (a finished state or an unknown id); no answer, a missing
``scontrol`` or an unreadable reply leaves the allocation open and is logged once.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterable

from gputel.control.slurm_comment import failure_line, run_slurm_command, slurm_job_id

log = logging.getLogger(__name__)

#: ``release_reason`` of an allocation closed because its Slurm job is gone.
JOB_GONE = "job-gone"
#: Seconds between two questions about the same job: an allocation ends within about this
#: (plus Slurm's own epilog-free completion) after its job.
DEFAULT_INTERVAL_S = 15.0
DEFAULT_TIMEOUT_S = 5.0
#: Job states after which no process of the job runs on the node (squeue(1) "JOB STATE CODES").
FINISHED_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)
_STATE = re.compile(r"(?:^|\s)JobState=([A-Z_]+)")

Runner = Callable[[list[str], float], "subprocess.CompletedProcess[str] | str"]


def job_verdict(returncode: int, stdout: str, stderr: str) -> bool | None:
    """From one ``scontrol -o show job N`` call: True (gone), False (still there), None (the
    reply says neither)."""
    if returncode != 0:
        return True if "invalid job id" in stderr.lower() else None
    found = _STATE.search(stdout)
    if found is None:
        return None
    return found.group(1) in FINISHED_STATES


class SlurmJobWatch:
    """The ``slurm-N`` allocations whose jobs Slurm says are gone; see the module docstring."""

    def __init__(
        self,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        runner: Runner = run_slurm_command,
    ) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._runner = runner
        self._lock = threading.Lock()
        self._asked: dict[str, float] = {}
        self._gone: set[str] = set()
        self._busy: threading.Thread | None = None
        self._complained: set[str] = set()

    def gone(self, allocation_ids: Iterable[str]) -> list[str]:
        """Of ``allocation_ids``, those whose job the last finished check found gone; starts
        the next check in the background when one is due. Never blocks on Slurm."""
        jobs = {i: j for i in allocation_ids if (j := slurm_job_id(i)) is not None}
        now = self._clock()
        with self._lock:
            for ident in list(self._asked):
                if ident not in jobs:
                    del self._asked[ident]
                    self._gone.discard(ident)
            found = [i for i in jobs if i in self._gone]
            due = [
                i
                for i in jobs
                if i not in self._gone and now - self._asked.get(i, -1e18) >= self.interval_s
            ]
            if due and (self._busy is None or not self._busy.is_alive()):
                for ident in due:
                    self._asked[ident] = now
                self._busy = threading.Thread(
                    target=self._check,
                    args=([(i, jobs[i]) for i in due],),
                    name="slurm-job-watch",
                    daemon=True,
                )
                self._busy.start()
        return found

    def wait_idle(self, timeout: float) -> bool:
        """Whether no check is running (tests; the agent never waits)."""
        busy = self._busy
        if busy is not None:
            busy.join(timeout)
            return not busy.is_alive()
        return True

    def _check(self, jobs: list[tuple[str, str]]) -> None:
        for ident, job in jobs:
            done = self._runner(["scontrol", "-o", "show", "job", job], self.timeout_s)
            if isinstance(done, str):
                self._complain(done, f"cannot ask Slurm whether job {job} is gone: {done}")
                continue
            verdict = job_verdict(done.returncode, done.stdout, done.stderr)
            if verdict is None:
                self._complain(
                    "unreadable",
                    f"cannot tell from scontrol whether job {job} is gone: {failure_line(done)}",
                )
            elif verdict:
                with self._lock:
                    if ident in self._asked:
                        self._gone.add(ident)

    def _complain(self, key: str, line: str) -> None:
        """Log a reason once per kind: a node without Slurm would otherwise repeat it forever."""
        if key not in self._complained:
            self._complained.add(key)
            log.warning("%s; its allocation stays open until the epilog releases it", line)
