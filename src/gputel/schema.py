"""The one table that describes every telemetry field, and the plain data that carries them.

Each field is described once: its attribute (unit in the name), CSV column, Prometheus metric and
help, the factor to the metric's base unit, the source that provides it, and its CSV precision.
The CSV header and cells, the exposition and ``docs/csv.md`` all follow these tuples, so a field
cannot be added to one sink and forgotten in another. A value the hardware does not give is
``None`` - never ``0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field, fields
from datetime import datetime
from typing import Any, Literal

MetricType = Literal["gauge", "counter"]


@dataclass(frozen=True, slots=True)
class Field:
    attr: str
    """Attribute on the reading, with its unit in the name (``power_w``)."""
    csv: str
    """CSV column name; equal to ``attr`` unless there is a reason."""
    type: type
    unit: str
    help: str
    source: str
    """Which source provides it: ``gpu`` (nvml or sim), ``host``, ``rapl``, ``hwmon``."""
    metric: str | None = None
    """Prometheus metric name in base units, or None when the field is a label or CSV-only."""
    metric_type: MetricType = "gauge"
    scale: float = 1.0
    """Multiply the field's value by this to get the metric's base unit."""
    _: KW_ONLY
    decimals: int
    """Digits after the point in CSV cells (0: a whole number): the source's resolution or the
    sensor's meaningful digits, whichever is coarser; counters keep their full resolution."""

    @property
    def precision(self) -> str:
        """The smallest step a CSV cell shows, as written in ``docs/csv.md`` (``1``, ``0.01``)."""
        return "1" if self.decimals == 0 else f"0.{'0' * (self.decimals - 1)}1"


# Bits of nvmlDeviceGetCurrentClocksEventReasons, named as operators know them. The CSV keeps the
# raw bitmask (column ``clock_event_reasons``); the exposition gives one 0/1 series per reason.
CLOCK_EVENT_REASONS: tuple[tuple[int, str], ...] = (
    (0x0000000000000001, "gpu_idle"),
    (0x0000000000000002, "applications_clocks_setting"),
    (0x0000000000000004, "sw_power_cap"),
    (0x0000000000000008, "hw_slowdown"),
    (0x0000000000000010, "sync_boost"),
    (0x0000000000000020, "sw_thermal_slowdown"),
    (0x0000000000000040, "hw_thermal_slowdown"),
    (0x0000000000000080, "hw_power_brake_slowdown"),
    (0x0000000000000100, "display_clock_setting"),
)

#: The reasons that mean a real slowdown under load (power cap, thermal, hardware), not an idle
#: GPU or clocks held by a setting: what "throttled" counts in the report, the plot and the fleet.
THROTTLE_MASK = 0x4 | 0x8 | 0x20 | 0x40 | 0x80


def clock_event_names(mask: int | None) -> tuple[str, ...] | None:
    """The names of the reasons set in ``mask`` (table order); None when the mask is unknown.

    Bits the table does not name are left out: a newer driver's reason is not guessed at.
    """
    if mask is None:
        return None
    return tuple(name for bit, name in CLOCK_EVENT_REASONS if mask & bit)


MIB = 1024 * 1024

GPU_FIELDS: tuple[Field, ...] = (
    Field(
        "utilization_gpu_pct",
        "utilization_gpu_pct",
        float,
        "%",
        "Fraction of time a kernel was running on the GPU over the driver's sample period.",
        "gpu",
        "gputel_gpu_utilization_ratio",
        scale=0.01,
        decimals=1,
    ),
    Field(
        "utilization_memory_pct",
        "utilization_memory_pct",
        float,
        "%",
        "Fraction of time device memory was being read or written.",
        "gpu",
        "gputel_gpu_memory_utilization_ratio",
        scale=0.01,
        decimals=1,
    ),
    Field(
        "sm_active_pct",
        "sm_active_pct",
        float,
        "%",
        "GPM: share of SMs busy over the tick (empty without GPM).",
        "gpu",
        "gputel_gpu_sm_active_ratio",
        scale=0.01,
        decimals=1,
    ),
    Field(
        "sm_occupancy_pct",
        "sm_occupancy_pct",
        float,
        "%",
        "GPM: resident warps as a share of the SMs' maximum.",
        "gpu",
        "gputel_gpu_sm_occupancy_ratio",
        scale=0.01,
        decimals=1,
    ),
    Field(
        "tensor_active_pct",
        "tensor_active_pct",
        float,
        "%",
        "GPM: share of time the SMs ran any tensor-core instruction.",
        "gpu",
        "gputel_gpu_tensor_active_ratio",
        scale=0.01,
        decimals=1,
    ),
    Field(
        "dram_active_pct",
        "dram_active_pct",
        float,
        "%",
        "GPM: device memory bandwidth used as a share of the maximum.",
        "gpu",
        "gputel_gpu_dram_active_ratio",
        scale=0.01,
        decimals=1,
    ),
    Field(
        "fp16_active_pct",
        "fp16_active_pct",
        float,
        "%",
        "GPM: share of time the SMs ran non-tensor FP16 math.",
        "gpu",
        "gputel_gpu_fp16_active_ratio",
        scale=0.01,
        decimals=1,
    ),
    Field(
        "fp32_active_pct",
        "fp32_active_pct",
        float,
        "%",
        "GPM: share of time the SMs ran non-tensor FP32 math.",
        "gpu",
        "gputel_gpu_fp32_active_ratio",
        scale=0.01,
        decimals=1,
    ),
    Field(
        "fp64_active_pct",
        "fp64_active_pct",
        float,
        "%",
        "GPM: share of time the SMs ran non-tensor FP64 math.",
        "gpu",
        "gputel_gpu_fp64_active_ratio",
        scale=0.01,
        decimals=1,
    ),
    Field(
        "nvlink_rx_bytes_per_s",
        "nvlink_rx_bytes_per_s",
        float,
        "B/s",
        "GPM: NVLink receive throughput over all links.",
        "gpu",
        "gputel_gpu_nvlink_rx_bytes_per_second",
        decimals=0,
    ),
    Field(
        "nvlink_tx_bytes_per_s",
        "nvlink_tx_bytes_per_s",
        float,
        "B/s",
        "GPM: NVLink transmit throughput over all links.",
        "gpu",
        "gputel_gpu_nvlink_tx_bytes_per_second",
        decimals=0,
    ),
    Field(
        "memory_used_mib",
        "memory_used_mib",
        float,
        "MiB",
        "Device memory in use.",
        "gpu",
        "gputel_gpu_memory_used_bytes",
        scale=MIB,
        decimals=0,
    ),
    Field(
        "memory_total_mib",
        "memory_total_mib",
        float,
        "MiB",
        "Device memory installed.",
        "gpu",
        "gputel_gpu_memory_total_bytes",
        scale=MIB,
        decimals=0,
    ),
    Field(
        "temperature_c",
        "temperature_c",
        float,
        "°C",
        "GPU core temperature.",
        "gpu",
        "gputel_gpu_temperature_celsius",
        decimals=2,
    ),
    Field(
        "power_w",
        "power_w",
        float,
        "W",
        "Power draw of the GPU board.",
        "gpu",
        "gputel_gpu_power_watts",
        decimals=2,
    ),
    Field(
        "power_limit_w",
        "power_limit_w",
        float,
        "W",
        "Enforced power limit.",
        "gpu",
        "gputel_gpu_power_limit_watts",
        decimals=2,
    ),
    Field(
        "energy_j",
        "energy_j",
        float,
        "J",
        "Energy consumed; in CSV joules since the file began, in Prometheus a counter.",
        "gpu",
        "gputel_gpu_energy_joules_total",
        "counter",
        decimals=3,
    ),
    Field(
        "sm_clock_mhz",
        "sm_clock_mhz",
        float,
        "MHz",
        "Streaming multiprocessor clock.",
        "gpu",
        "gputel_gpu_sm_clock_hertz",
        scale=1e6,
        decimals=0,
    ),
    Field(
        "memory_clock_mhz",
        "memory_clock_mhz",
        float,
        "MHz",
        "Memory clock.",
        "gpu",
        "gputel_gpu_memory_clock_hertz",
        scale=1e6,
        decimals=0,
    ),
    Field(
        "fan_speed_pct",
        "fan_speed_pct",
        float,
        "%",
        "Intended fan speed (empty for passively cooled boards).",
        "gpu",
        "gputel_gpu_fan_speed_ratio",
        scale=0.01,
        decimals=1,
    ),
    Field(
        "performance_state",
        "performance_state",
        int,
        "P-state",
        "Performance state, 0 (maximum) to 15 (minimum).",
        "gpu",
        "gputel_gpu_performance_state",
        decimals=0,
    ),
    Field(
        "clock_event_reasons",
        "clock_event_reasons",
        int,
        "bitmask",
        "Active clock event (throttle) reasons as NVML's bitmask; see CLOCK_EVENT_REASONS.",
        "gpu",
        None,
        decimals=0,
    ),
    Field(
        "pcie_rx_bytes_per_s",
        "pcie_rx_bytes_per_s",
        float,
        "B/s",
        "PCIe receive throughput: GPM over the tick, else the driver's 20 ms sample.",
        "gpu",
        "gputel_gpu_pcie_rx_bytes_per_second",
        decimals=0,
    ),
    Field(
        "pcie_tx_bytes_per_s",
        "pcie_tx_bytes_per_s",
        float,
        "B/s",
        "PCIe transmit throughput: GPM over the tick, else the driver's 20 ms sample.",
        "gpu",
        "gputel_gpu_pcie_tx_bytes_per_second",
        decimals=0,
    ),
    Field(
        "ecc_corrected_volatile",
        "ecc_corrected_volatile",
        int,
        "errors",
        "Corrected ECC errors since the driver loaded.",
        "gpu",
        "gputel_gpu_ecc_corrected_errors_total",
        "counter",
        decimals=0,
    ),
    Field(
        "ecc_uncorrected_volatile",
        "ecc_uncorrected_volatile",
        int,
        "errors",
        "Uncorrected ECC errors since the driver loaded.",
        "gpu",
        "gputel_gpu_ecc_uncorrected_errors_total",
        "counter",
        decimals=0,
    ),
    Field(
        "remapped_rows_correctable",
        "remapped_rows_correctable",
        int,
        "rows",
        "Memory rows remapped after correctable errors (kept by the GPU across reboots).",
        "gpu",
        "gputel_gpu_remapped_rows_correctable",
        decimals=0,
    ),
    Field(
        "remapped_rows_uncorrectable",
        "remapped_rows_uncorrectable",
        int,
        "rows",
        "Memory rows remapped after uncorrectable errors (kept by the GPU across reboots).",
        "gpu",
        "gputel_gpu_remapped_rows_uncorrectable",
        decimals=0,
    ),
    Field(
        "remapped_rows_pending",
        "remapped_rows_pending",
        int,
        "0/1",
        "1 while a row remapping waits for a GPU reset to take effect.",
        "gpu",
        "gputel_gpu_remapped_rows_pending",
        decimals=0,
    ),
    Field(
        "remapped_rows_failure",
        "remapped_rows_failure",
        int,
        "0/1",
        "1 when a row remapping failed (no spare row left): the board needs service.",
        "gpu",
        "gputel_gpu_remapped_rows_failure",
        decimals=0,
    ),
    Field(
        "recovery_action",
        "recovery_action",
        int,
        "code",
        "Recovery the driver asks for: 0 none, 1 GPU reset, 2 node reboot, 3 drain P2P, "
        "4 drain and reset (NVML_FI_DEV_GET_GPU_RECOVERY_ACTION).",
        "gpu",
        "gputel_gpu_recovery_action",
        decimals=0,
    ),
)

HOST_FIELDS: tuple[Field, ...] = (
    Field(
        "cpu_util_pct",
        "cpu_util_pct",
        float,
        "%",
        "CPU utilization over all cores.",
        "host",
        "gputel_host_cpu_utilization_ratio",
        scale=0.01,
        decimals=1,
    ),
    Field(
        "load_1m",
        "load_1m",
        float,
        "",
        "Load average over 1 minute.",
        "host",
        "gputel_host_load1",
        decimals=2,
    ),
    Field(
        "load_5m",
        "load_5m",
        float,
        "",
        "Load average over 5 minutes.",
        "host",
        "gputel_host_load5",
        decimals=2,
    ),
    Field(
        "load_15m",
        "load_15m",
        float,
        "",
        "Load average over 15 minutes.",
        "host",
        "gputel_host_load15",
        decimals=2,
    ),
    Field(
        "memory_used_mib",
        "memory_used_mib",
        float,
        "MiB",
        "Host memory in use.",
        "host",
        "gputel_host_memory_used_bytes",
        scale=MIB,
        decimals=0,
    ),
    Field(
        "memory_available_mib",
        "memory_available_mib",
        float,
        "MiB",
        "Host memory available for new work.",
        "host",
        "gputel_host_memory_available_bytes",
        scale=MIB,
        decimals=0,
    ),
    Field(
        "swap_used_mib",
        "swap_used_mib",
        float,
        "MiB",
        "Swap in use.",
        "host",
        "gputel_host_swap_used_bytes",
        scale=MIB,
        decimals=0,
    ),
    Field(
        "disk_read_bytes",
        "disk_read_bytes",
        int,
        "B",
        "Bytes read from all disks since boot.",
        "host",
        "gputel_host_disk_read_bytes_total",
        "counter",
        decimals=0,
    ),
    Field(
        "disk_write_bytes",
        "disk_write_bytes",
        int,
        "B",
        "Bytes written to all disks since boot.",
        "host",
        "gputel_host_disk_written_bytes_total",
        "counter",
        decimals=0,
    ),
    Field(
        "net_rx_bytes",
        "net_rx_bytes",
        int,
        "B",
        "Bytes received on all non-loopback interfaces since boot.",
        "host",
        "gputel_host_network_receive_bytes_total",
        "counter",
        decimals=0,
    ),
    Field(
        "net_tx_bytes",
        "net_tx_bytes",
        int,
        "B",
        "Bytes sent on all non-loopback interfaces since boot.",
        "host",
        "gputel_host_network_transmit_bytes_total",
        "counter",
        decimals=0,
    ),
    Field(
        "cpu_package_power_w",
        "cpu_package_power_w",
        float,
        "W",
        "CPU package power from RAPL, summed over packages (empty when RAPL is unreadable).",
        "rapl",
        "gputel_host_cpu_package_power_watts",
        decimals=2,
    ),
    Field(
        "cpu_package_energy_j",
        "cpu_package_energy_j",
        float,
        "J",
        "CPU package energy from RAPL since the recorder started, summed over packages.",
        "rapl",
        "gputel_host_cpu_package_energy_joules_total",
        "counter",
        decimals=6,
    ),
    Field(
        "dram_power_w",
        "dram_power_w",
        float,
        "W",
        "DRAM power from RAPL where the platform exposes it.",
        "rapl",
        "gputel_host_dram_power_watts",
        decimals=2,
    ),
    Field(
        "cpu_temperature_c",
        "cpu_temperature_c",
        float,
        "°C",
        "Hottest CPU package sensor from hwmon (coretemp, k10temp, zenpower).",
        "hwmon",
        "gputel_host_cpu_temperature_celsius",
        decimals=2,
    ),
)

#: Labelled series with no CSV column (variable per node): hwmon sensors keyed (chip, sensor).
HWMON_METRIC = "gputel_host_hwmon_temperature_celsius"
HWMON_HELP = "Temperature of each hwmon sensor."


@dataclass(slots=True)
class GpuProcess:
    """One compute process on one GPU at one tick, as the driver names it: by host PID.

    Not frozen, like :class:`ProcessRecord`: every tick makes one per process, and a frozen
    dataclass's ``__init__`` (``object.__setattr__`` per field) costs four times as much.

    ``sm_util_pct`` is the process's share of SM time over the driver's last sample period;
    None when the driver gives no per-process utilization (or did not sample the process).
    """

    gpu: int
    pid: int
    memory_used_mib: float | None
    sm_util_pct: float | None


@dataclass(slots=True)
class ProcessRecord:
    """A :class:`GpuProcess` with its owner from procfs: one row of ``processes-*.csv``.

    ``user``, ``command`` and ``job`` are None when the owner is unknown (the process exited
    before it was looked up, or the host's PIDs are not visible to gputel).
    """

    gpu: int
    pid: int
    user: str | None
    command: str | None
    job: str | None
    memory_used_mib: float | None
    sm_util_pct: float | None

    def to_json(self) -> dict[str, Any]:
        """Its fields by name (``recorder.json``, ``gputel status``): written every tick for
        every process, where ``dataclasses.asdict`` cost ten times as much."""
        return {
            "gpu": self.gpu,
            "pid": self.pid,
            "user": self.user,
            "command": self.command,
            "job": self.job,
            "memory_used_mib": self.memory_used_mib,
            "sm_util_pct": self.sm_util_pct,
        }


@dataclass(slots=True)
class MigReading:
    """One MIG device (a compute instance of a GPU instance) of a GPU at one tick.

    SM activity is measured per GPU instance (GPM has no finer view), so the compute instances
    of one GPU instance show the same value; memory belongs to the GPU instance too.
    """

    gi: int
    ci: int | None
    mig_uuid: str
    sm_active_pct: float | None = None
    memory_used_mib: float | None = None
    memory_total_mib: float | None = None


MIG_FIELDS: tuple[Field, ...] = (
    Field(
        "sm_active_pct",
        "sm_active_pct",
        float,
        "%",
        "GPM: share of the GPU instance's SMs busy over the tick.",
        "gpu",
        "gputel_mig_sm_active_ratio",
        scale=0.01,
        decimals=1,
    ),
    Field(
        "memory_used_mib",
        "memory_used_mib",
        float,
        "MiB",
        "Memory in use in the GPU instance.",
        "gpu",
        "gputel_mig_memory_used_bytes",
        scale=MIB,
        decimals=0,
    ),
    Field(
        "memory_total_mib",
        "memory_total_mib",
        float,
        "MiB",
        "Memory of the GPU instance.",
        "gpu",
        "gputel_mig_memory_total_bytes",
        scale=MIB,
        decimals=0,
    ),
)


@dataclass(slots=True)
class GpuReading:
    """One GPU at one tick. Identity fields are always set; every measurement may be None."""

    index: int
    uuid: str
    name: str
    lost: bool = False
    utilization_gpu_pct: float | None = None
    utilization_memory_pct: float | None = None
    sm_active_pct: float | None = None
    sm_occupancy_pct: float | None = None
    tensor_active_pct: float | None = None
    dram_active_pct: float | None = None
    fp16_active_pct: float | None = None
    fp32_active_pct: float | None = None
    fp64_active_pct: float | None = None
    nvlink_rx_bytes_per_s: float | None = None
    nvlink_tx_bytes_per_s: float | None = None
    memory_used_mib: float | None = None
    memory_total_mib: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    energy_j: float | None = None
    """Cumulative joules from an arbitrary origin (driver load for NVML); sinks take deltas."""
    sm_clock_mhz: float | None = None
    memory_clock_mhz: float | None = None
    fan_speed_pct: float | None = None
    performance_state: int | None = None
    clock_event_reasons: int | None = None
    pcie_rx_bytes_per_s: float | None = None
    pcie_tx_bytes_per_s: float | None = None
    ecc_corrected_volatile: int | None = None
    ecc_uncorrected_volatile: int | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    remapped_rows_pending: int | None = None
    remapped_rows_failure: int | None = None
    recovery_action: int | None = None
    has_gpm: bool = False
    """The GPU has GPM: an empty ``sm_active_pct`` is unknown (first tick, failed sample), not a
    reason to judge its activity by utilization under ``GPUTEL_ACTIVITY=sm``."""
    mig: tuple[MigReading, ...] = ()
    """The GPU's MIG devices (MIG mode only): ``mig-*.csv`` rows and the ``gputel_mig_*`` series."""
    stuck: bool = False
    """The GPU's read did not return within the tick's deadline (a hung call); values empty."""
    field_errors: dict[str, int] = field(default_factory=dict)
    """Failed reads per field since the source opened (``gputel_gpu_field_errors_total``)."""
    processes: tuple[GpuProcess, ...] | None = None
    """The compute processes on the GPU (empty: none); None when the source cannot list them."""


@dataclass(slots=True)
class HostReading:
    """The host at one tick; every value may be None when its source could not read it."""

    cpu_util_pct: float | None = None
    load_1m: float | None = None
    load_5m: float | None = None
    load_15m: float | None = None
    memory_used_mib: float | None = None
    memory_available_mib: float | None = None
    swap_used_mib: float | None = None
    disk_read_bytes: int | None = None
    disk_write_bytes: int | None = None
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None
    cpu_package_power_w: float | None = None
    cpu_package_energy_j: float | None = None
    dram_power_w: float | None = None
    cpu_temperature_c: float | None = None
    hwmon_temperatures_c: dict[tuple[str, str], float] = field(default_factory=dict)
    """(chip, sensor label) -> °C, for the labelled exposition series only."""

    def merge(self, values: Mapping[str, Any]) -> list[str]:
        """Take one host source's readings; returns the names this reading has no field for.

        Sources own disjoint fields, so the order they are merged in does not matter.
        """
        unknown: list[str] = []
        for name, value in values.items():
            if name in _HOST_READING_FIELDS:
                setattr(self, name, value)
            else:
                unknown.append(name)
        return unknown


_HOST_READING_FIELDS = frozenset(f.name for f in fields(HostReading))


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """How one source fared this tick; exported as gputel_source_up / _duration_seconds."""

    name: str
    up: bool
    duration_s: float
    error: str | None = None


@dataclass(slots=True)
class Sample:
    """Everything read in one tick, handed unchanged to every sink."""

    timestamp: datetime
    """Wall clock, UTC, when the tick's reads began."""
    monotonic: float
    gpus: list[GpuReading]
    host: HostReading
    sources: list[SourceStatus]
    allocations: tuple[str, ...] = ()
    """Ids of the allocations open at this tick (tags every GPU row)."""
    gpu_allocations: dict[int, tuple[str, ...]] = field(default_factory=dict)
    """Per GPU index, the open allocations that claim it; GPUs absent here use ``allocations``."""
    processes: list[ProcessRecord] = field(default_factory=list)
    """Every GPU process of this tick with its owner (``processes-*.csv``, the job metrics)."""


GPU_CSV_COLUMNS: tuple[str, ...] = (
    "timestamp",
    "gpu",
    "uuid",
    "name",
    "lost",
    *(f.csv for f in GPU_FIELDS),
    "allocations",
    "pretrigger",
)
HOST_CSV_COLUMNS: tuple[str, ...] = ("timestamp", *(f.csv for f in HOST_FIELDS))
MIG_CSV_COLUMNS: tuple[str, ...] = (
    "timestamp",
    "gpu",
    "uuid",
    "gi",
    "ci",
    "mig_uuid",
    *(f.csv for f in MIG_FIELDS),
    "allocations",
)
PROCESS_CSV_COLUMNS: tuple[str, ...] = (
    "timestamp",
    "gpu",
    "pid",
    "user",
    "command",
    "job",
    "memory_used_mib",
    "sm_util_pct",
)
#: CSV precision of the process columns: memory as ``gpu-*.csv``'s ``memory_used_mib``, SM
#: utilization in whole percent (the driver's resolution).
PROCESS_DECIMALS = {
    "memory_used_mib": next(f.decimals for f in GPU_FIELDS if f.attr == "memory_used_mib"),
    "sm_util_pct": 0,
}


def _check_table() -> None:
    """Fail at import if the table and the dataclasses disagree (cheap, runs once)."""
    gpu_attrs = {f.name for f in fields(GpuReading)}
    host_attrs = {f.name for f in fields(HostReading)}
    for f in GPU_FIELDS:
        assert f.attr in gpu_attrs, f.attr
    for f in HOST_FIELDS:
        assert f.attr in host_attrs, f.attr
    mig_attrs = {f.name for f in fields(MigReading)}
    for f in MIG_FIELDS:
        assert f.attr in mig_attrs, f.attr


_check_table()
