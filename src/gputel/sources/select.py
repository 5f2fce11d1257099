"""Choosing the GPU source (``GPUTEL_BACKEND``) and building the host sources.

``auto`` must never stop a node agent from starting: NVML first, then ``nvidia-smi`` when the
binding cannot load NVML but nvidia-smi runs; a node without a driver, or with a broken one,
still gets host telemetry, and the operator gets one line saying why there are no GPUs and how
to get simulated ones. An explicit ``nvml`` is a promise that there is a GPU, so its failure
propagates. ``gputel.sources.nvml`` is imported only when NVML is wanted, so a missing or broken
``pynvml`` can never break ``sim`` or ``none``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping

from gputel.formats import error_line, one_line
from gputel.runtime import SIM_EPOCH_ENV
from gputel.settings import Settings
from gputel.sources.base import GpuSelectionError, GpuSource, GpuSourceError, HostSource
from gputel.sources.host import ProcfsHostSource
from gputel.sources.hwmon import HwmonSource
from gputel.sources.rapl import RaplSource
from gputel.sources.sim import NoneGpuSource, SimGpuSource
from gputel.sources.simevents import parse_sim_events

__all__ = [
    "NoneGpuSource",
    "auto_fallback_notice",
    "open_gpu_source",
    "open_host_sources",
    "sim_epoch_from_env",
]

NVML_BINDINGS_MISSING = "the NVML Python bindings are not installed (pip install nvidia-ml-py)"


def auto_fallback_notice(reason: str) -> str:
    """The one line an operator sees when ``auto`` found no usable GPU."""
    return (
        f"no GPU telemetry: {reason}; recording host telemetry only "
        "(set GPUTEL_BACKEND=sim for simulated GPUs)"
    )


def _open_nvml(settings: Settings) -> tuple[GpuSource, str | None]:
    """The NVML source and its notice: the GPUs it left out or cannot fully measure."""
    try:
        from gputel.sources.nvml import open_nvml
    except ImportError as exc:
        if getattr(exc, "name", None) in ("pynvml", "gputel.sources.nvml"):
            raise GpuSourceError(NVML_BINDINGS_MISSING) from exc
        raise GpuSourceError(f"cannot load the NVML source: {one_line(exc)}") from exc
    source = open_nvml(settings.gpus, proc_root=settings.proc_root)
    return source, "; ".join(getattr(source, "notices", ())) or None


def sim_epoch_from_env(
    env: Mapping[str, str], clock: Callable[[], float] = time.monotonic
) -> tuple[float | None, str | None]:
    """The inherited timeline epoch, or ``(None, notice)`` when the variable is unusable.

    An epoch in the future cannot come from a parent on this machine (CLOCK_MONOTONIC is
    system-wide), so it is refused rather than producing a timeline that has not started.
    """
    text = env.get(SIM_EPOCH_ENV)
    if text is None or not text.strip():
        return None, None
    try:
        epoch = float(text)
    except ValueError:
        epoch = math.nan
    if not math.isfinite(epoch) or epoch < 0 or epoch > clock():
        return None, (
            f"ignoring {SIM_EPOCH_ENV}={text!r} (not a past CLOCK_MONOTONIC value); "
            "the simulated timeline starts now"
        )
    return epoch, None


def open_gpu_source(
    settings: Settings,
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[GpuSource, str | None]:
    """The GPU source for ``settings.backend`` and an optional one-line notice for the log.

    Raises GpuSourceError for ``nvml`` without a usable NVML, and for selected GPUs that do not
    exist (with ``sim`` or ``nvml``).
    """
    env = os.environ if env is None else env
    backend = settings.backend
    if backend == "sim":
        epoch, notice = sim_epoch_from_env(env, clock)
        source = SimGpuSource(
            settings.sim_gpus,
            settings.sim_pattern,
            settings.gpus,
            epoch=epoch,
            clock=clock,
            events=parse_sim_events(settings.sim_events),
        )
        return source, notice
    if backend == "none":
        return NoneGpuSource(), None
    if backend == "nvml":
        return _open_nvml(settings)
    if backend == "smi":
        return _open_smi(settings)
    if backend != "auto":
        raise GpuSourceError(f"unknown GPUTEL_BACKEND {backend!r}")
    try:
        return _open_nvml(settings)
    except GpuSelectionError:
        raise  # a typo in GPUTEL_GPUS on a GPU node must not silently record no GPUs
    except GpuSourceError as exc:
        reason = one_line(exc)
    except Exception as exc:
        reason = f"NVML failed unexpectedly ({error_line(exc)})"
    # The binding cannot load NVML, yet nvidia-smi (which links the driver's own library) may
    # still work: "NVML library not found" while nvidia-smi runs.
    try:
        smi, smi_notice = _open_smi(settings)
    except GpuSelectionError:
        raise
    except GpuSourceError:
        return NoneGpuSource(), auto_fallback_notice(reason)
    fallback = f"NVML unavailable ({reason}); reading the GPUs through nvidia-smi instead"
    return smi, "; ".join(n for n in (fallback, smi_notice) if n)


def _open_smi(settings: Settings) -> tuple[GpuSource, str | None]:
    from gputel.sources.smi import open_smi

    source = open_smi(settings.gpus)
    return source, "; ".join(source.notices) or None


def open_host_sources(settings: Settings) -> list[HostSource]:
    """procfs (CPU, memory, disk, network), RAPL and hwmon; each reports None where its
    hardware is absent. GPUTEL_SYSFS_ROOT applies to RAPL and hwmon; the disk list comes from
    the real /sys/block so it always matches the real /proc/diskstats it filters."""
    return [
        ProcfsHostSource(),
        RaplSource(settings.sysfs_root),
        HwmonSource(settings.sysfs_root),
    ]
