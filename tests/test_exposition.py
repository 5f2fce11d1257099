"""The exposition: golden output for a fixed sim pattern and fake sysfs, promtool, HTTP serving."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from fakesysfs import add_hwmon_chip, add_rapl_zone, set_energy
from gputel.schema import MIB, GpuReading, HostReading, MigReading, Sample, SourceStatus
from gputel.sources.hwmon import HwmonSource
from gputel.sources.rapl import RaplSource
from gputel.sources.sim import SimGpuSource
from gputel.telemetry.exposition import ALL_FAMILIES, Exposition
from gputel.telemetry.metrics_http import MetricsServer
from gputel.telemetry.promtext import CONTENT_TYPE, telemetry_active_text
from gputel.telemetry.sampler import Sampler

# Read at import: the suite's autouse fixture clears GPUTEL_* before each test runs.
REGEN = os.environ.get("GPUTEL_REGEN_GOLDEN") == "1"
GOLDEN = Path(__file__).parent / "golden" / "metrics.prom"
T_WALL = datetime(2026, 11, 22, 3, 45, 12, tzinfo=timezone.utc)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FixedHost:
    name = "host"

    def read(self) -> dict[str, Any]:
        return {
            "cpu_util_pct": 12.5,
            "load_1m": 0.5,
            "load_5m": 0.25,
            "load_15m": 0.125,
            "memory_used_mib": 2048.0,
            "memory_available_mib": 6144.0,
            "swap_used_mib": 0.0,
            "disk_read_bytes": 1000,
            "disk_write_bytes": 2000,
            "net_rx_bytes": 3000,
            "net_tx_bytes": 4000,
        }


def render_fixed(root: Path) -> bytes:
    zone = add_rapl_zone(root, "intel-rapl:0", "package-0", energy_uj=1_000_000)
    add_hwmon_chip(root, "hwmon0", "coretemp", {1: (45000, "Package id 0"), 2: (43000, "Core 0")})
    clock = Clock(1000.0)
    gpu = SimGpuSource(3, "0:5,80:20,0:30;100:60;50:60", None, epoch=990.0, clock=clock)
    sampler = Sampler(
        gpu,
        [FixedHost(), RaplSource(root, clock=clock), HwmonSource(root, clock=clock)],
        clock=clock,
        wallclock=lambda: T_WALL,
        timer=iter(float(i) / 1000 for i in range(1000)).__next__,
    )
    sampler.sample()
    clock.t += 1.0
    set_energy(zone, 1_000_000 + 42_500_000)
    sample = sampler.sample()
    return Exposition().update(sample, ticks_missed=2, rows_failed=3, ticks_total=7)


def test_golden_metrics(tmp_path: Path) -> None:
    data = render_fixed(tmp_path)
    if REGEN:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_bytes(data)
    assert GOLDEN.exists(), "run with GPUTEL_REGEN_GOLDEN=1 to create the golden file"
    assert data.decode() == GOLDEN.read_text(), (
        "exposition changed; if intended, regenerate with GPUTEL_REGEN_GOLDEN=1"
    )


def test_golden_has_the_contract_series() -> None:
    text = GOLDEN.read_text()
    for name in (
        "gputel_gpu_utilization_ratio",
        "gputel_gpu_memory_used_bytes",
        "gputel_gpu_temperature_celsius",
        "gputel_gpu_power_watts",
        "gputel_gpu_energy_joules_total",
        "gputel_host_cpu_package_power_watts",
        "gputel_host_hwmon_temperature_celsius",
        "gputel_source_up",
    ):
        assert f"\n{name}{{" in text or f"\n{name} " in text, name
    assert 'gputel_gpu_utilization_ratio{gpu="1",name=' in text
    assert "gputel_telemetry_active" not in text
    assert 'gputel_source_up{source="rapl"} 1.0' in text
    assert "gputel_gpu_fan_speed_ratio" not in text  # sim boards are passively cooled: None
    for name in ("sm_active", "sm_occupancy", "tensor_active", "dram_active"):
        assert f"\ngputel_gpu_{name}_ratio{{" in text, name  # simulated GPM


def test_fast_render_is_byte_identical_to_generate_latest(tmp_path: Path) -> None:
    render_fixed(tmp_path)
    odd = GpuReading(7, 'GPU-"q"', "back\\slash\nnew", lost=True, power_w=1e-7, energy_j=1e21)
    host = HostReading(hwmon_temperatures_c={("nvme", 'Sensor "1"'): -5.5})
    s = Sample(T_WALL, 1.0, [odd], host, [SourceStatus("nvml", True, 0.25)])
    exp = Exposition()
    for sample in (None, s):
        fast = exp.update(sample, ticks_missed=1, rows_failed=2, ticks_total=3)
        assert fast == exp.render_reference()


def mig_sample() -> Sample:
    g = GpuReading(
        0,
        "GPU-m",
        "H100",
        sm_active_pct=None,
        mig=(
            MigReading(1, 0, "MIG-a", sm_active_pct=61.5, memory_used_mib=1024.0),
            MigReading(2, None, "MIG-b", sm_active_pct=None, memory_total_mib=20480.0),
        ),
    )
    gpm = GpuReading(1, "GPU-g", "H100", sm_active_pct=40.0, nvlink_rx_bytes_per_s=2.5e9)
    return Sample(T_WALL, 1.0, [g, gpm], HostReading(), [])


def test_gpm_and_mig_series() -> None:
    exp = Exposition()
    text = exp.update(mig_sample()).decode()
    assert exp.update(mig_sample()) == exp.render_reference()
    assert 'gputel_gpu_sm_active_ratio{gpu="1",name="H100",uuid="GPU-g"} 0.4\n' in text
    assert 'gputel_gpu_nvlink_rx_bytes_per_second{gpu="1",name="H100",uuid="GPU-g"} 2.5e+09' in text
    assert 'gputel_gpu_sm_active_ratio{gpu="0"' not in text  # a MIG GPU: per instance only
    labels = 'ci="0",gi="1",gpu="0",mig_uuid="MIG-a",uuid="GPU-m"'
    assert f"gputel_mig_sm_active_ratio{{{labels}}} 0.615\n" in text
    assert 1024.0 * MIB == 1.073741824e09
    assert f"gputel_mig_memory_used_bytes{{{labels}}} 1.073741824e+09\n" in text
    labels_b = 'ci="",gi="2",gpu="0",mig_uuid="MIG-b",uuid="GPU-m"'
    assert f"gputel_mig_memory_total_bytes{{{labels_b}}} 2.147483648e+10\n" in text
    assert "gputel_mig_sm_active_ratio{" + labels_b not in text  # None: no series


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_check_gpm_and_mig_metrics() -> None:
    data = Exposition().update(mig_sample()) + telemetry_active_text(True)
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=data, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_line_reuse_across_ticks_never_serves_a_stale_value() -> None:
    exp = Exposition()
    for power, lost, temp in [(300.5, False, 40.0), (300.5, True, 0.0), (0.0, False, -0.0),
                              (300.5, False, 41.0), (float("nan"), False, 41.0)]:  # fmt: skip
        g = GpuReading(0, "GPU-a", "A", lost=lost, power_w=power, temperature_c=temp)
        s = Sample(T_WALL, 1.0, [g], HostReading(load_1m=power), [])
        assert exp.update(s) == exp.render_reference()


def test_none_values_produce_no_series() -> None:
    g = GpuReading(0, "GPU-x", "X")
    s = Sample(T_WALL, 1.0, [g], HostReading(), [SourceStatus("nvml", False, 0.1, "boom")])
    text = Exposition().update(s).decode()
    assert "gputel_gpu_utilization_ratio" not in text
    assert "clock_event_reason" not in text
    assert 'gputel_gpu_lost{gpu="0",name="X",uuid="GPU-x"} 0.0' in text
    assert "gputel_host_" not in text
    assert 'gputel_source_up{source="nvml"} 0.0' in text


def test_every_family_name_is_exact_in_the_output(tmp_path: Path) -> None:
    text = render_fixed(tmp_path).decode()
    for fam in ALL_FAMILIES:
        if f"# TYPE {fam.name} " in text:
            assert f"# TYPE {fam.name} {fam.type}\n" in text
    assert "# TYPE gputel_ticks_missed_total counter" in text
    assert "gputel_ticks_missed_total 2.0" in text
    assert "_total_total" not in text


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_check_metrics(tmp_path: Path) -> None:
    data = render_fixed(tmp_path) + telemetry_active_text(True)
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=data, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


# ---------------------------------------------------------------------------- HTTP server
def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_server_serves_metrics_health_and_404() -> None:
    health = [(True, "ok")]
    server = MetricsServer("127.0.0.1", 0, metrics=lambda: b"x 1\n", health=lambda: health[0])
    with server:
        base = f"http://127.0.0.1:{server.port}"
        assert server.port != 0
        assert get(base + "/metrics") == (200, CONTENT_TYPE, b"x 1\n")
        assert get(base + "/healthz")[::2] == (200, b"ok\n")
        health[0] = (False, "no tick for 30 s")
        assert get(base + "/healthz")[::2] == (503, b"no tick for 30 s\n")
        assert get(base + "/nope")[0] == 404


def test_server_reports_a_busy_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = MetricsServer("127.0.0.1", port, metrics=lambda: b"", health=lambda: (True, ""))
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            server.start()


def test_server_on_ipv6_any_accepts_ipv4_and_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    server = MetricsServer("::", 0, metrics=lambda: b"y 2\n", health=lambda: (True, "ok"))
    try:
        server.start()
    except OSError as exc:
        pytest.skip(f"cannot bind [::]: {exc}")
    try:
        assert get(f"http://127.0.0.1:{server.port}/metrics")[2] == b"y 2\n"
        try:
            status = get(f"http://[::1]:{server.port}/metrics")[0]
        except urllib.error.URLError:
            pytest.skip("no IPv6 loopback")
        assert status == 200
    finally:
        server.stop()
