"""Simulated GPUs: deterministic telemetry that follows ``GPUTEL_SIM_PATTERN``.

The simulation exists so the whole agent (state machine, recorder, sinks, hooks, demo) can be
exercised on machines without a GPU, and so tests can predict every value. Hence:

- no randomness: every field is a pure function of the pattern, the GPU index and the time since
  the epoch, so two processes given the same epoch (the agent and its recorder child, via
  ``_GPUTEL_SIM_EPOCH``) report the same values at the same moment;
- utilization is exactly the pattern's value, because the state machine's thresholds are tested
  against it;
- power is a pure function of utilization, so energy is the exact integral of power, computed
  per segment in closed form rather than accumulated from samples (sampling would make energy
  depend on the tick rate, and the agent and the child would disagree);
- the board is modelled on an H100 SXM: passively cooled, so the fan is ``None`` (unsupported),
  not ``0``; ECC is supported and genuinely zero; GPM's counters are there, with SM activity a
  per-GPU share of utilization and tensor, occupancy and the FP pipes shares of SM activity.

Temperature follows a first-order lag toward an equilibrium set by utilization, also in closed
form per segment, so it too is independent of how often it is read.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from gputel.schema import GpuProcess, GpuReading
from gputel.sources.base import EventListener, GpuIdentity, GpuSelectionError, GpuSourceError
from gputel.sources.simevents import SimEvent, SimEventListener, SimEventSchedule
from gputel.sources.simpattern import PatternError, Timeline, parse_pattern, timeline_for_gpu

SIM_GPU_NAME = "Simulated H100 80GB HBM3"
#: Simulated GPU processes get PIDs from here up: above Linux's PID_MAX_LIMIT (2**22), so no
#: real process can have one and they are recorded without owner (no user, command or job).
SIM_PID_BASE = 2**22 + 1
#: A busy simulated GPU runs two processes (a trainer and a helper, say) sharing its job memory
#: and SM time in these proportions.
SIM_PROCESS_SHARES = (0.75, 0.25)
MEMORY_TOTAL_MIB = 81559.0
POWER_LIMIT_W = 700.0
SM_CLOCK_IDLE_MHZ = 345.0
SM_CLOCK_BOOST_MHZ = 1980.0
SM_CLOCK_POWER_CAPPED_MHZ = 1755.0
MEMORY_CLOCK_MHZ = 2619.0
#: Seconds for the die temperature to close 63 % of the gap to its new equilibrium.
THERMAL_TIME_CONSTANT_S = 25.0
#: Power at or above this share of the limit counts as held by the software power cap.
POWER_CAP_SHARE = 0.95
#: Host↔device bytes per second at 100 % utilization (a busy PCIe Gen5 x16 link).
PCIE_RX_BYTES_PER_S_AT_FULL = 12.0e9
PCIE_TX_BYTES_PER_S_AT_FULL = 4.0e9
#: NVLink bytes per second each way at 100 % utilization (an all-reduce-heavy job).
NVLINK_BYTES_PER_S_AT_FULL = 150.0e9
#: What nvidia-smi shows on an idle H100 with no process: driver reservations only.
MEMORY_IDLE_MIB = 4.0

_GPU_IDLE = 0x1
_SW_POWER_CAP = 0x4
_P0 = 0
_P8 = 8


def sim_uuid(index: int) -> str:
    """A stable, recognisably fake UUID, so sim rows can never be mistaken for a real board."""
    return f"GPU-sim-00000000-0000-0000-0000-{index:012d}"


@dataclass(frozen=True, slots=True)
class BoardModel:
    """Per-GPU constants: small, deterministic differences so GPUs are not identical copies."""

    idle_power_w: float
    peak_power_w: float
    idle_temperature_c: float
    temperature_per_pct_c: float
    memory_util_share: float
    job_memory_base_share: float
    sm_share: float
    """SM activity per point of utilization: below 1, because "a kernel ran" (utilization) is
    not "every SM was busy" (GPM's SM activity)."""

    @classmethod
    def for_index(cls, index: int) -> BoardModel:
        return cls(
            idle_power_w=68.0 + (index * 7) % 5,
            peak_power_w=POWER_LIMIT_W - 6.0 * ((index * 3) % 4),
            idle_temperature_c=30.0 + (index * 5) % 4,
            temperature_per_pct_c=0.42 + 0.01 * ((index * 2) % 5),
            memory_util_share=0.50 + 0.05 * (index % 3),
            job_memory_base_share=0.30 + 0.04 * (index % 4),
            sm_share=0.70 + 0.05 * (index % 4),
        )

    def sm_active_pct(self, util_pct: float) -> float:
        return round(util_pct * self.sm_share, 1)

    def power_w(self, util_pct: float) -> float:
        return self.idle_power_w + (self.peak_power_w - self.idle_power_w) * util_pct / 100.0

    def equilibrium_temperature_c(self, util_pct: float) -> float:
        return self.idle_temperature_c + self.temperature_per_pct_c * util_pct

    def memory_used_mib(self, util_pct: float) -> float:
        if util_pct <= 0:
            return MEMORY_IDLE_MIB
        share = self.job_memory_base_share + 0.55 * util_pct / 100.0
        return float(round(MEMORY_IDLE_MIB + (MEMORY_TOTAL_MIB - MEMORY_IDLE_MIB) * share))


def _sm_clock_mhz(util_pct: float, power_w: float) -> float:
    if util_pct <= 0:
        return SM_CLOCK_IDLE_MHZ
    if power_w >= POWER_CAP_SHARE * POWER_LIMIT_W:
        return SM_CLOCK_POWER_CAPPED_MHZ
    return SM_CLOCK_BOOST_MHZ


class _SimGpu:
    """One GPU's timeline with energy and temperature precomputed at each segment start."""

    def __init__(self, index: int, timeline: Timeline) -> None:
        self.index = index
        self.uuid = sim_uuid(index)
        self.model = BoardModel.for_index(index)
        self.timeline = timeline
        bounds = timeline.boundaries()
        self._starts = [start for start, _end, _util in bounds]
        self._ends = [end for _start, end, _util in bounds]
        self._utils = [util for _start, _end, util in bounds]
        self._energy_at_start: list[float] = []
        self._temp_at_start: list[float] = []
        energy = 0.0
        temp = self.model.equilibrium_temperature_c(self._utils[0])
        for start, end, util in bounds:
            self._energy_at_start.append(energy)
            self._temp_at_start.append(temp)
            if math.isinf(end):
                break
            energy += self.model.power_w(util) * (end - start)
            temp = self._lag(temp, util, end - start)

    def _lag(self, temp_c: float, util_pct: float, dt_s: float) -> float:
        target = self.model.equilibrium_temperature_c(util_pct)
        return target + (temp_c - target) * math.exp(-dt_s / THERMAL_TIME_CONSTANT_S)

    def _segment(self, t: float) -> int:
        # Segment k covers [start_k, end_k); this matches Timeline.util_at's strict "t < end".
        return min(bisect.bisect_right(self._ends, t), len(self._ends) - 1)

    def util_at(self, t: float) -> float:
        return self._utils[self._segment(t)]

    def energy_at(self, t: float) -> float:
        k = self._segment(t)
        return self._energy_at_start[k] + self.model.power_w(self._utils[k]) * (t - self._starts[k])

    def light_reading_at(self, t: float) -> GpuReading:
        """Only the fields of ``LIGHT_FIELDS``, equal to those of :meth:`reading_at`."""
        k = self._segment(t)
        util = self._utils[k]
        model = self.model
        power = model.power_w(util)
        return GpuReading(
            index=self.index,
            uuid=self.uuid,
            name=SIM_GPU_NAME,
            utilization_gpu_pct=util,
            memory_used_mib=model.memory_used_mib(util),
            temperature_c=round(self._lag(self._temp_at_start[k], util, t - self._starts[k]), 2),
            power_w=power,
            energy_j=self._energy_at_start[k] + power * (t - self._starts[k]),
            sm_clock_mhz=_sm_clock_mhz(util, power),
            sm_active_pct=model.sm_active_pct(util),
            has_gpm=True,
        )

    def reading_at(self, t: float) -> GpuReading:
        k = self._segment(t)
        util = self._utils[k]
        model = self.model
        power = model.power_w(util)
        capped = power >= POWER_CAP_SHARE * POWER_LIMIT_W
        reasons = (_GPU_IDLE if util <= 0 else 0) | (_SW_POWER_CAP if capped else 0)
        sm_clock = _sm_clock_mhz(util, power)
        sm_active = model.sm_active_pct(util)
        # A transformer-training mix: tensor cores most of the SMs' busy time, some FP32
        # (norms, softmax), little FP16 outside the tensor cores, next to no FP64.
        return GpuReading(
            index=self.index,
            uuid=self.uuid,
            name=SIM_GPU_NAME,
            utilization_gpu_pct=util,
            utilization_memory_pct=round(util * model.memory_util_share, 1),
            sm_active_pct=sm_active,
            has_gpm=True,
            sm_occupancy_pct=round(sm_active * 0.45, 1),
            tensor_active_pct=round(sm_active * 0.6, 1),
            dram_active_pct=round(util * model.memory_util_share * 0.9, 1),
            fp16_active_pct=round(sm_active * 0.05, 1),
            fp32_active_pct=round(sm_active * 0.15, 1),
            fp64_active_pct=round(sm_active * 0.01, 1),
            nvlink_rx_bytes_per_s=NVLINK_BYTES_PER_S_AT_FULL * util / 100.0,
            nvlink_tx_bytes_per_s=NVLINK_BYTES_PER_S_AT_FULL * util / 100.0,
            memory_used_mib=model.memory_used_mib(util),
            memory_total_mib=MEMORY_TOTAL_MIB,
            temperature_c=round(self._lag(self._temp_at_start[k], util, t - self._starts[k]), 2),
            power_w=power,
            power_limit_w=POWER_LIMIT_W,
            energy_j=self._energy_at_start[k] + power * (t - self._starts[k]),
            sm_clock_mhz=sm_clock,
            memory_clock_mhz=MEMORY_CLOCK_MHZ,
            fan_speed_pct=None,
            performance_state=_P0 if util > 0 else _P8,
            clock_event_reasons=reasons,
            pcie_rx_bytes_per_s=PCIE_RX_BYTES_PER_S_AT_FULL * util / 100.0,
            pcie_tx_bytes_per_s=PCIE_TX_BYTES_PER_S_AT_FULL * util / 100.0,
            ecc_corrected_volatile=0,
            ecc_uncorrected_volatile=0,
            remapped_rows_correctable=0,
            remapped_rows_uncorrectable=0,
            remapped_rows_pending=0,
            remapped_rows_failure=0,
            recovery_action=0,
            processes=self._processes(util),
        )

    def _processes(self, util: float) -> tuple[GpuProcess, ...]:
        """Two processes on a busy GPU (none on an idle one), with fake PIDs (SIM_PID_BASE)."""
        if util <= 0:
            return ()
        job_mib = self.model.memory_used_mib(util) - MEMORY_IDLE_MIB
        return tuple(
            GpuProcess(
                self.index,
                SIM_PID_BASE + 2 * self.index + n,
                float(round(job_mib * share)),
                float(round(util * share)),
            )
            for n, share in enumerate(SIM_PROCESS_SHARES)
        )


class SimGpuSource:
    """``count`` simulated GPUs on one timeline starting at ``epoch`` (a ``clock()`` value).

    GPU i follows pattern i of ``pattern`` (the last pattern repeats), whichever GPUs are
    selected, so selecting ``1`` alone shows the same GPU 1 as selecting all. Times before the
    epoch (an epoch from a clock that ran ahead) count as the epoch itself, so energy never runs
    backwards.
    """

    name = "sim"

    def __init__(
        self,
        count: int,
        pattern: str,
        selected: tuple[int, ...] | None,
        epoch: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        events: tuple[SimEvent, ...] = (),
    ) -> None:
        if count < 1:
            raise GpuSourceError(f"GPUTEL_SIM_GPUS={count}: at least one simulated GPU is needed")
        try:
            timelines = parse_pattern(pattern)
        except PatternError as exc:
            raise GpuSourceError(f"invalid GPUTEL_SIM_PATTERN: {exc}") from None
        if selected is None:
            indices = list(range(count))
        else:
            missing = [i for i in selected if i >= count or i < 0]
            if missing:
                raise GpuSelectionError(
                    f"GPUTEL_GPUS selects GPU {missing[0]} but only {count} simulated GPUs "
                    f"exist (0-{count - 1}); raise GPUTEL_SIM_GPUS or fix GPUTEL_GPUS"
                )
            indices = sorted(set(selected))
        self._clock = clock
        self.epoch: float = clock() if epoch is None else epoch
        """The timeline's origin on ``clock``; pass it to a child in ``_GPUTEL_SIM_EPOCH``."""
        self._gpus = [_SimGpu(i, timeline_for_gpu(timelines, i)) for i in indices]
        self._events = events

    def _now(self) -> float:
        return max(0.0, self._clock() - self.epoch)

    def devices(self) -> list[GpuIdentity]:
        return [GpuIdentity(g.index, g.uuid, SIM_GPU_NAME) for g in self._gpus]

    def read_utilization(self) -> dict[int, float | None]:
        t = self._now()
        return {g.index: g.util_at(t) for g in self._gpus}

    def read_light(self) -> list[GpuReading]:
        t = self._now()
        return [g.light_reading_at(t) for g in self._gpus]

    def read(self) -> list[GpuReading]:
        t = self._now()
        return [g.reading_at(t) for g in self._gpus]

    def read_energy_j(self) -> dict[int, float | None]:
        t = self._now()
        return {g.index: g.energy_at(t) for g in self._gpus}

    def event_listener(self) -> EventListener:
        """``GPUTEL_SIM_EVENTS`` on this timeline, for the selected GPUs only."""
        schedule = SimEventSchedule(self._events, [g.index for g in self._gpus])
        return SimEventListener(schedule, self.epoch, self._clock)

    def close(self) -> None:
        """Nothing to release; present for the protocol."""


class NoneGpuSource:
    """No GPUs: the recorder still records the host, and the agent sees nothing busy."""

    name = "none"

    def devices(self) -> list[GpuIdentity]:
        return []

    def read_utilization(self) -> dict[int, float | None]:
        return {}

    def read_light(self) -> list[GpuReading]:
        return []

    def read(self) -> list[GpuReading]:
        return []

    def read_energy_j(self) -> dict[int, float | None]:
        return {}

    def close(self) -> None:
        """Nothing to release; present for the protocol."""
