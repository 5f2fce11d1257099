"""NVIDIA GPUs through NVML: the GPU source that puts one reading per GPU together.

The work is shared between small modules, each with one job:

- ``nvml_binding``: the only module that imports ``pynvml``; starts NVML once per process, names
  the fix when it cannot start, and resolves every NVML function gputel calls once at open;
- ``nvml_direct``: the thin layer over the binding for the calls of every tick (C functions
  looked up once, plain structures);
- ``nvml_gpu``: one GPU's record (handle, what it answered, its lock);
- ``nvml_calls``: the one rule for every call on a GPU: unsupported (never asked again),
  transient (this tick's cell), lost (left alone, re-probed once a minute);
- ``nvml_fields``, ``nvml_gpm``, ``nvml_processes``: the device fields, the GPM metrics and MIG
  devices, the compute processes;
- ``nvml_pcie``: PCIe throughput samples on a thread of their own, for GPUs without GPM or
  PCIe byte counters;
- ``nvml_events``: the event listener on its own thread;
- this module: :class:`NvmlGpuSource` (the ``GpuSource`` contract of ``sources/base.py``) and
  :func:`open_nvml`.

Further rules that live here: a GPU whose handle NVML refuses (``NO_PERMISSION``: hidden by the
cgroup or the container's device list) is left out with one notice naming it, the others are
read; a GPU in MIG mode gives no device utilization: it is not asked; where GPM works its
activity is its busiest GPU instance's SM activity, elsewhere a notice says that activity cannot
be measured there.

No thread, timeout or retry of a failed call lives here: NVML calls can block in the kernel and
only the caller (``gputel.gpu_readers``, for the recorder and the agent alike) can decide what
waiting too long means. Every read has a per-GPU form (``read_gpu``, ``read_gpu_light``...) so
the caller can give each GPU its own budget. Reads of one GPU are serialised by that GPU's lock,
so a caller that gave up on a hung read and asks again waits for it instead of piling more calls
onto a wedged GPU, while the other GPUs stay readable (:meth:`NvmlGpuSource.read_gpu`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gputel.activity import busiest_instance_pct
from gputel.formats import one_line
from gputel.schema import GpuReading
from gputel.sources import nvml_binding as b
from gputel.sources.base import EventListener, GpuIdentity, GpuSelectionError
from gputel.sources.nvml_binding import NvmlApi, reset_nvml_state
from gputel.sources.nvml_calls import LOST_CODES, REPROBE_S, NvmlCalls
from gputel.sources.nvml_events import NvmlEventListener
from gputel.sources.nvml_fields import SLOW_EVERY, FieldReader
from gputel.sources.nvml_gpm import (
    GpmReader,
    profiling_admin_only,
    refusal_notice,
    refusal_reason,
)
from gputel.sources.nvml_gpu import GpuLost, NvmlGpu, text
from gputel.sources.nvml_pcie import PcieSampler
from gputel.sources.nvml_processes import NvmlProcessReader

__all__ = ["NvmlGpuSource", "open_nvml", "reset_nvml_state"]

log = logging.getLogger("gputel.nvml")

_MIG_ENABLED = 1


class NvmlGpuSource:
    """The selected NVIDIA GPUs; build with :func:`open_nvml`."""

    name = "nvml"

    def __init__(
        self,
        api: NvmlApi,
        gpus: list[NvmlGpu],
        clock: Callable[[], float],
        admin_only: bool | None = None,
    ) -> None:
        self._api = api
        self._gpus = gpus
        self._by_index = {g.index: g for g in gpus}
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        self.notices: list[str] = []
        """One line per GPU left out or not fully measurable, for the log and ``gputel status``."""
        self.calls = NvmlCalls(api, clock)
        self.fields = FieldReader(self.calls)
        self.gpm = GpmReader(self.calls, clock, admin_only)
        self._processes = NvmlProcessReader(self.calls)
        self._pcie = PcieSampler(api, clock)

    def _fill(self, gpu: NvmlGpu, r: GpuReading) -> None:
        f = self.fields
        r.utilization_gpu_pct, r.utilization_memory_pct = f.utilization(gpu)
        self.gpm.fill(gpu, r)
        r.memory_used_mib, r.memory_total_mib = f.memory(gpu)
        r.temperature_c = f.temperature(gpu)
        r.power_w = f.power_w(gpu)
        now = self._clock()
        slow = gpu.slow_due_in <= 0
        # GPM's PCIe metrics, else the driver's byte counters, else the ~20 ms throughput calls.
        pcie_from_gpm = self.gpm.gives_pcie(gpu)
        failures = gpu.failures
        batch = f.batch_values(gpu, slow=slow, pcie=not pcie_from_gpm)
        if slow:
            gpu.carried = f.slow_fields(gpu, batch)
            # A slow field that failed this time is asked again on the next read, not in ten.
            gpu.slow_due_in = SLOW_EVERY if gpu.failures == failures else 1
        gpu.slow_due_in -= 1
        for attr, value in gpu.carried.items():
            setattr(r, attr, value)
        r.energy_j = f.energy_j(gpu, batch, r.power_w, now)
        r.sm_clock_mhz = f.sm_clock_mhz(gpu)
        r.memory_clock_mhz = f.memory_clock_mhz(gpu)
        r.fan_speed_pct = f.fan_speed_pct(gpu)
        r.performance_state = f.performance_state(gpu)
        r.clock_event_reasons = f.clock_event_reasons(gpu)
        if not pcie_from_gpm and not f.pcie_counters(gpu, r, batch):
            for attr, value in self._pcie.latest(gpu).items():  # sampled off this path
                setattr(r, attr, value)
        r.processes = self._processes.read(gpu)

    # --------------------------------------------------------------------------- GpuSource
    def devices(self) -> list[GpuIdentity]:
        return [
            GpuIdentity(g.index, g.uuid, g.name, gpm=self.gpm.status(g), pci_bus_id=g.pci_bus_id)
            for g in self._gpus
        ]

    def read_utilization(self) -> dict[int, float | None]:
        return {g.index: self.read_gpu_utilization(g.index) for g in self._gpus}

    def read_gpu_utilization(self, index: int) -> float | None:
        """One call: the agent polls this every tick, busy or idle. A MIG GPU, which has no
        utilization, gives its busiest GPU instance's SM activity where GPM works
        (``gputel.activity``).

        A failed call is this tick's ``None``; only GPU_IS_LOST loses the GPU here (one call is
        too little to apply the every-read-failed rule to).
        """
        gpu = self._by_index[index]
        with gpu.lock:
            try:
                if not self.calls.answers(gpu):
                    return None
                if gpu.mig and self.gpm.supported(gpu):
                    return busiest_instance_pct(self.gpm.mig_readings(gpu, memory=False))
                return self.fields.utilization(gpu)[0]
            except GpuLost:
                return None

    def read_light(self) -> list[GpuReading]:
        return [self.read_gpu_light(g.index) for g in self._gpus]

    def read_gpu_light(self, index: int) -> GpuReading:
        """Utilization plus the cheap fields (``LIGHT_FIELDS``) for the agent's pre-trigger.

        Six calls that the driver answers from values it keeps; none of the ~20 ms PCIe
        samples, the per-process walk or the field-value batch of :meth:`read`. Energy is the
        driver's counter only (no power integral between two ticks of another process).
        """
        gpu = self._by_index[index]
        with gpu.lock:
            reading = GpuReading(gpu.index, gpu.uuid, gpu.name)
            try:
                if not self.calls.answers(gpu):
                    raise GpuLost
                reading.utilization_gpu_pct = self.fields.utilization(gpu)[0]
                self.gpm.fill_light(gpu, reading)
                reading.memory_used_mib = self.fields.memory(gpu)[0]
                reading.temperature_c = self.fields.temperature(gpu)
                reading.power_w = self.fields.power_w(gpu)
                reading.energy_j = self.fields.energy_counter_j(gpu)
                reading.sm_clock_mhz = self.fields.sm_clock_mhz(gpu)
            except GpuLost:
                reading = GpuReading(gpu.index, gpu.uuid, gpu.name, lost=True)
        return reading

    def read(self) -> list[GpuReading]:
        return [self.read_gpu(gpu.index) for gpu in self._gpus]

    def read_gpu(self, index: int) -> GpuReading:
        """The full read of one GPU; other GPUs' reads may run at the same time."""
        gpu = self._by_index[index]
        with gpu.lock:
            try:
                if not self.calls.answers(gpu):
                    raise GpuLost
                reading = GpuReading(index=gpu.index, uuid=gpu.uuid, name=gpu.name)
                gpu.reads = gpu.failures = 0
                self._fill(gpu, reading)
                if gpu.reads and gpu.failures == gpu.reads:
                    self.calls.lose(gpu, f"all {gpu.reads} reads of it failed")
                    raise GpuLost
                reading.field_errors = dict(gpu.field_errors)
            except GpuLost:
                # Values read before the loss are dropped: they belong to a GPU now gone.
                reading = GpuReading(gpu.index, gpu.uuid, gpu.name, lost=True)
                reading.field_errors = dict(gpu.field_errors)
        return reading

    def read_energy_j(self) -> dict[int, float | None]:
        return {g.index: self.read_gpu_energy_j(g.index) for g in self._gpus}

    def read_gpu_energy_j(self, index: int) -> float | None:
        """The driver's energy counter; None where it has none or the GPU is lost.

        Unlike :meth:`read`, no power integration stands in for a missing counter: this is read
        only at a few moments (open, allocate, release), and an integral over two samples would
        put an invented number in allocations.csv where an empty cell is promised.
        """
        gpu = self._by_index[index]
        with gpu.lock:
            try:
                return self.fields.energy_counter_j(gpu) if self.calls.answers(gpu) else None
            except GpuLost:
                return None

    def event_listener(self) -> EventListener:
        """The NVML event listener over these GPUs (``gputel.sources.nvml_events``)."""
        return NvmlEventListener(self.calls, self._gpus)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pcie.stop()
        for gpu in self._gpus:
            # A read hung in the driver may hold a sample: leave its samples to the process exit.
            if gpu.lock.acquire(blocking=False):
                try:
                    self.gpm.close(gpu)
                finally:
                    gpu.lock.release()
        b.release(self._api)


def open_nvml(
    selected: tuple[int, ...] | None,
    clock: Callable[[], float] = time.monotonic,
    proc_root: Path = Path("/proc"),
) -> NvmlGpuSource:
    """Start NVML (once per process) and open the selected GPUs (all when ``None``).

    Raises GpuSourceError with one line naming the likely fix when NVML cannot start, finds no
    GPU, or a selected index does not exist. A GPU that is already lost is opened as lost, and its
    uuid and name are filled in if it answers a later re-probe. ``proc_root``: where the
    driver's params file is read (``GPUTEL_PROC_ROOT``), to name why GPM is refused.
    """
    api = b.acquire()
    try:
        return _open(api, selected, clock, profiling_admin_only(proc_root))
    except BaseException:
        b.release(api)
        raise


def _open(
    api: NvmlApi,
    selected: tuple[int, ...] | None,
    clock: Callable[[], float],
    admin_only: bool | None,
) -> NvmlGpuSource:
    try:
        count = int(api.call("nvmlDeviceGetCount"))
    except Exception as exc:
        raise b.init_error(exc) from None
    if count == 0:
        raise b.no_gpu_error()
    indices = list(range(count)) if selected is None else sorted(set(selected))
    missing = [i for i in indices if i >= count]
    if missing:
        names = ", ".join(str(i) for i in missing)
        raise GpuSelectionError(
            f"GPUTEL_GPUS selects GPU {names}, but this node has {count} GPU(s) "
            f"(indices 0-{count - 1}): fix GPUTEL_GPUS, or if the GPU was there before, check "
            "whether it fell off the bus (dmesg | grep -i xid; nvidia-smi)"
        )
    gpus: list[NvmlGpu] = []
    notices: list[str] = []
    refused: BaseException | None = None
    for index in indices:
        try:
            handle = api.call("nvmlDeviceGetHandleByIndex", index)
        except api.error as exc:
            if b.error_code(exc) not in LOST_CODES:
                refused = refused or exc
                notices.append(_refused_notice(index, exc))
                continue
            log.warning(
                "GPU %d is lost at start (%s): reporting it as lost, re-checking it every %d s",
                index,
                one_line(exc),
                REPROBE_S,
            )
            gpus.append(NvmlGpu(index, None, lost=True, lost_checked=clock()))
            continue
        gpus.append(NvmlGpu(index, handle))
    if not gpus and refused is not None:
        raise b.init_error(refused) from None
    source = NvmlGpuSource(api, gpus, clock, admin_only=admin_only)
    ask, fn = source.calls.ask, api.fn
    for gpu in gpus:
        try:
            gpu.uuid = text(ask(gpu, "uuid", fn("nvmlDeviceGetUUID")))
            gpu.name = text(ask(gpu, "name", fn("nvmlDeviceGetName")))
            pci = ask(gpu, "pci", fn("nvmlDeviceGetPciInfo"))
            gpu.pci_bus_id = text(getattr(pci, "busId", None))
            mode = ask(gpu, "mig_mode", fn("nvmlDeviceGetMigMode"))
            gpu.mig = mode is not None and int(mode[0]) == _MIG_ENABLED
            source.gpm.probe(gpu)
            # A MIG GPU's activity comes from its GPU instances' SM activity, where GPM works.
            mig_unmeasured = gpu.mig and not source.gpm.supported(gpu)
        except GpuLost:
            continue
        if mig_unmeasured:
            notices.append(
                f"GPU {gpu.index} ({gpu.uuid}) is in MIG mode: NVML gives no utilization for it, "
                "so its activity cannot be measured and only allocations and the operator mode "
                "(gputel start) start telemetry for it"
            )
    gpm_refused = [g.index for g in gpus if source.gpm.refused(g)]
    if gpm_refused:
        notices.append(refusal_notice(gpm_refused, refusal_reason(admin_only)))
    source.notices = notices
    return source


def _refused_notice(index: int, exc: BaseException) -> str:
    """The one line for a GPU NVML will not open; the cause is nearly always its device node."""
    return (
        f"GPU {index} is unavailable: NVML refused its handle ({one_line(exc)}); it is "
        "probably hidden from this process by the cgroup device list or the container's "
        "device list (its /dev/nvidia* node), recording the other GPUs without it"
    )
