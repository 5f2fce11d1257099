"""What every source promises, so the sampler, the agent and the CLI can use any of them.

A GPU source (nvml, sim, none) answers for the selected GPUs; a host source (host, rapl, hwmon)
returns a partial ``HostReading`` as a dict. Sources fail alone: a host source that raises costs
its own fields for that tick, never the sample; a GPU source reports a lost GPU in its reading and
keeps reporting the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gputel.schema import GpuReading


class GpuSourceError(RuntimeError):
    """A GPU source could not start. ``str()`` is one line with the likely fix."""


class GpuSelectionError(GpuSourceError):
    """``GPUTEL_GPUS`` names a GPU that does not exist: a configuration error, never a fallback."""


#: What :meth:`GpuSource.read_light` fills: utilization (read every tick anyway), GPM's SM
#: activity where the GPU has it (the ``sm`` activity signal), and the fields a driver answers
#: from values it keeps (no bus sampling, no per-process walk). They make the pre-trigger rows
#: at the head of a session's ``gpu-*.csv``; every other column stays empty.
LIGHT_FIELDS: tuple[str, ...] = (
    "utilization_gpu_pct",
    "sm_active_pct",
    "memory_used_mib",
    "temperature_c",
    "power_w",
    "energy_j",
    "sm_clock_mhz",
)


@dataclass(frozen=True, slots=True)
class GpuIdentity:
    index: int
    uuid: str
    name: str
    gpm: str | None = None
    """GPM on this GPU as the source found it at open: ``available``, ``not supported`` or
    ``refused: <why>; <fix>`` (None: the source cannot tell)."""
    pci_bus_id: str = ""
    """NVML's ``busId`` (``00000000:3B:00.0``); empty where the source has none (sim, a GPU
    lost at start). It ties the kernel log's Xid lines to the GPU (``sources/kernel_xid.py``)."""


class GpuSource(Protocol):
    """A set of GPUs, already filtered to ``GPUTEL_GPUS``."""

    #: "nvml", "sim" or "none": the ``source`` label of its gputel_source_* series.
    name: str

    def devices(self) -> list[GpuIdentity]:
        """The selected GPUs, by index; static for the life of the source."""
        ...

    def read_utilization(self) -> dict[int, float | None]:
        """The light read the agent makes every tick: GPU utilization % per selected GPU (a MIG
        GPU, which has none: its busiest GPU instance's SM activity, ``gputel.activity``)."""
        ...

    def read_light(self) -> list[GpuReading]:
        """The agent's read while it keeps a pre-trigger or uses the ``sm`` activity signal: one
        reading per selected GPU with only :data:`LIGHT_FIELDS` set, and a MIG GPU's devices
        with their SM activity (a lost GPU: ``lost`` and no values). ``energy_j`` is the same
        cumulative counter :meth:`read` gives, or None where the GPU has no counter."""
        ...

    def read(self) -> list[GpuReading]:
        """The full read the recorder makes every tick, one reading per selected GPU."""
        ...

    def read_energy_j(self) -> dict[int, float | None]:
        """Cumulative energy per selected GPU in joules (for per-allocation energy)."""
        ...

    def close(self) -> None: ...


class PerGpuSource(GpuSource, Protocol):
    """A GPU source whose GPUs can be read one at a time, each while another is hung (NVML), so
    that ``gputel.gpu_readers`` gives each GPU its own budget. The whole-source reads above are
    these per GPU, in index order."""

    def read_gpu(self, index: int) -> GpuReading: ...

    def read_gpu_utilization(self, index: int) -> float | None: ...

    def read_gpu_light(self, index: int) -> GpuReading: ...

    def read_gpu_energy_j(self, index: int) -> float | None: ...


#: Where a listener hands each GPU event: (GPU index, event name, Xid or None). The names are
#: those of ``gputel.supervisor.events`` (``xid``, ``ecc_sbe``...). Called on the listener's own
#: thread.
EventSink = Callable[[int, str, "int | None"], None]


class EventListener(Protocol):
    """Waits for GPU events on a daemon thread of its own, for as long as the agent runs.

    A source that can report events (nvml, sim) gives one from ``event_listener()``. The agent
    never waits for the thread: a driver call that blocks costs that thread only.
    """

    def start(self, deliver: EventSink) -> None:
        """Start listening; returns at once."""
        ...

    def stop(self) -> None:
        """Ask the thread to end; returns at once (the thread may be inside a driver call)."""
        ...

    @property
    def notice(self) -> str | None:
        """One line when events cannot be (fully) received, for the log and ``gputel status``."""
        ...


class HostSource(Protocol):
    #: "host", "rapl" or "hwmon".
    name: str

    def read(self) -> dict[str, Any]:
        """HostReading attribute -> value for the fields this source provides."""
        ...
