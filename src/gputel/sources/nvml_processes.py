"""The compute processes on each GPU, with their memory and SM utilization, through NVML.

Read once per GPU in the recorder's full read (never in the agent's light reads): two calls per
GPU, one to list the processes (``nvmlDeviceGetComputeRunningProcesses``, which the binding
maps to ``_v3`` or ``_v2``) and, only when some are listed, one for their SM utilization
(``nvmlDeviceGetProcessesUtilizationInfo``, or ``nvmlDeviceGetProcessUtilization`` where the
driver or binding lacks it). Every call goes through the one asking rule
(``sources/nvml_calls.py``), so an unsupported call is never asked again, a failed one costs this
tick's values and a lost GPU is lost here as everywhere.

NVML answers per-process utilization with the samples taken since a timestamp the caller
passes. Each GPU keeps the newest timestamp it was given, so each tick sees the samples of its
own interval; the newest sample per PID gives the process's ``sm_util_pct``. A process with no
sample in the interval (or a driver that answers "not found": nothing ran) has no SM value:
empty, never 0.

The owners of the PIDs (user, command, job) are not read here: they come from procfs, in the
recorder (``gputel.sources.owners``).
"""

from __future__ import annotations

from gputel.schema import MIB, GpuProcess
from gputel.sources.nvml_calls import NvmlCalls
from gputel.sources.nvml_gpu import NvmlGpu

#: nvmlReturn_t values that mean "no sample", not a failure: NOT_FOUND is what the driver says
#: when no process ran since the timestamp; SUCCESS is what the binding raises when the count
#: call finds nothing to fetch (it expects INSUFFICIENT_SIZE).
_NO_SAMPLES = frozenset({0, 6})

#: (key for the unsupported set, binding function): the first supported one is used.
_UTILIZATION_CALLS = (
    ("process_utilization", "nvmlDeviceGetProcessesUtilizationInfo"),
    ("process_utilization_legacy", "nvmlDeviceGetProcessUtilization"),
)


class NvmlProcessReader:
    """Per-GPU process lists for the full read, over the asking rule.

    Calls for one GPU run under that GPU's lock; GPUs are read concurrently, each touching only
    its own timestamp.
    """

    def __init__(self, calls: NvmlCalls) -> None:
        self._calls = calls
        self._list_fn = calls.api.fn("nvmlDeviceGetComputeRunningProcesses")
        self._utilization = [(key, calls.api.fn(name)) for key, name in _UTILIZATION_CALLS]
        self._last_seen: dict[int, int] = {}
        """Per GPU index: the newest utilization sample timestamp (µs) seen so far."""

    def read(self, gpu: NvmlGpu) -> tuple[GpuProcess, ...] | None:
        """The GPU's compute processes (empty: none); None when NVML cannot list them."""
        infos = self._calls.ask(gpu, "processes", self._list_fn)
        if infos is None:
            return None
        if not infos:
            return ()
        memory: dict[int, float | None] = {}
        for info in infos:
            pid = int(info.pid)
            used = getattr(info, "usedGpuMemory", None)
            mib = None if used is None else int(used) / MIB
            if pid in memory:
                # One process in several MIG instances (or listed twice): its memory adds up.
                before = memory[pid]
                memory[pid] = None if before is None or mib is None else before + mib
            else:
                memory[pid] = mib
        sm = self._sm_util(gpu)
        index = gpu.index
        if not sm:
            return tuple([GpuProcess(index, pid, mib, None) for pid, mib in memory.items()])
        get = sm.get
        return tuple([GpuProcess(index, pid, mib, get(pid)) for pid, mib in memory.items()])

    def _sm_util(self, gpu: NvmlGpu) -> dict[int, float]:
        """PID → SM utilization % from the samples since the GPU's last seen timestamp."""
        since = self._last_seen.get(gpu.index, 0)
        unsupported = gpu.unsupported
        samples = None
        # The first way the GPU supports (``NvmlCalls.first``, without its per-call options).
        for key, fn in self._utilization:
            if key in unsupported:
                continue
            samples = self._calls.ask(gpu, key, fn, since, quiet=_NO_SAMPLES)
            if samples is not None or key not in unsupported:
                break
        if not samples:
            return {}
        newest: dict[int, tuple[int, float]] = {}
        latest = since
        for s in samples:
            stamp = int(s.timeStamp)
            if stamp > latest:
                latest = stamp
            pid = int(s.pid)
            seen = newest.get(pid)
            if seen is None or stamp >= seen[0]:
                newest[pid] = (stamp, float(s.smUtil))
        self._last_seen[gpu.index] = latest
        return {pid: util for pid, (_, util) in newest.items()}
