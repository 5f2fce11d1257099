"""Host sources: RAPL power from counter deltas, hwmon parsing, psutil fields (no sleeping)."""

from __future__ import annotations

import errno
import logging
from collections import namedtuple
from pathlib import Path

import psutil
import pytest

from fakesysfs import add_hwmon_chip, add_rapl_zone, deny_reads, set_energy
from gputel.sources import host as host_mod
from gputel.sources import hwmon as hwmon_mod
from gputel.sources import rapl as rapl_mod
from gputel.sources.host import PsutilHostSource
from gputel.sources.hwmon import HwmonSource
from gputel.sources.rapl import PERMISSION_WARNING, RaplSource

RAPL_FIELDS = {"cpu_package_power_w", "cpu_package_energy_j", "dram_power_w"}


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------------ RAPL
def test_rapl_watts_from_deltas_over_the_injected_clock(tmp_path: Path) -> None:
    pkg0 = add_rapl_zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    pkg1 = add_rapl_zone(tmp_path, "intel-rapl:1", "package-1", 5_000_000)
    dram = add_rapl_zone(tmp_path, "intel-rapl:0:2", "dram", 0)
    add_rapl_zone(tmp_path, "intel-rapl:0:0", "core", 0)
    clock = FakeClock()
    source = RaplSource(tmp_path, clock=clock)
    assert source.name == "rapl"

    first = source.read()
    assert first == {"cpu_package_power_w": None, "cpu_package_energy_j": 0.0, "dram_power_w": None}

    clock.now += 2.0
    set_energy(pkg0, 1_000_000 + 200_000_000)  # 200 J
    set_energy(pkg1, 5_000_000 + 100_000_000)  # 100 J
    set_energy(dram, 30_000_000)  # 30 J
    second = source.read()
    assert second["cpu_package_power_w"] == pytest.approx(150.0)
    assert second["cpu_package_energy_j"] == pytest.approx(300.0)
    assert second["dram_power_w"] == pytest.approx(15.0)

    clock.now += 0.5
    set_energy(pkg0, 201_000_000 + 50_000_000)
    set_energy(pkg1, 105_000_000)
    third = source.read()
    assert third["cpu_package_power_w"] == pytest.approx(100.0)
    assert third["cpu_package_energy_j"] == pytest.approx(350.0)
    assert third["dram_power_w"] == 0.0


def test_rapl_wraparound_uses_max_energy_range(tmp_path: Path) -> None:
    max_range = 262_143_328_850
    pkg = add_rapl_zone(tmp_path, "intel-rapl:0", "package-0", max_range - 10_000_000, max_range)
    clock = FakeClock()
    source = RaplSource(tmp_path, clock=clock)
    source.read()
    clock.now += 1.0
    set_energy(pkg, 40_000_000)  # 10 J up to the wrap, 40 J after
    reading = source.read()
    assert reading["cpu_package_power_w"] == pytest.approx(50.0)
    assert reading["cpu_package_energy_j"] == pytest.approx(50.0)


def test_rapl_wrap_without_known_range_gives_no_power(tmp_path: Path) -> None:
    pkg = add_rapl_zone(tmp_path, "intel-rapl:0", "package-0", 900, max_range_uj=None)
    clock = FakeClock()
    source = RaplSource(tmp_path, clock=clock)
    source.read()
    clock.now += 1.0
    set_energy(pkg, 100)
    assert source.read()["cpu_package_power_w"] is None
    clock.now += 1.0
    set_energy(pkg, 1_000_100)
    assert source.read()["cpu_package_power_w"] == pytest.approx(1.0)


def test_rapl_ignores_psys_and_mmio_zones(tmp_path: Path) -> None:
    pkg = add_rapl_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    psys = add_rapl_zone(tmp_path, "intel-rapl:1", "psys", 0)
    mmio = add_rapl_zone(tmp_path, "intel-rapl-mmio:0", "package-0", 0)
    clock = FakeClock()
    source = RaplSource(tmp_path, clock=clock)
    source.read()
    clock.now += 1.0
    set_energy(pkg, 40_000_000)
    set_energy(psys, 90_000_000)
    set_energy(mmio, 40_000_000)
    reading = source.read()
    assert reading["cpu_package_power_w"] == pytest.approx(40.0)
    assert reading["dram_power_w"] is None


def test_rapl_amd_package_zone_by_name(tmp_path: Path) -> None:
    pkg = add_rapl_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    add_rapl_zone(tmp_path, "intel-rapl:0:0", "core", 0)
    clock = FakeClock()
    source = RaplSource(tmp_path, clock=clock)
    assert source.available
    source.read()
    clock.now += 4.0
    set_energy(pkg, 480_000_000)
    assert source.read()["cpu_package_power_w"] == pytest.approx(120.0)


def test_rapl_without_powercap_reports_none_and_stays_up(tmp_path: Path) -> None:
    source = RaplSource(tmp_path)
    assert not source.available
    assert source.read() == dict.fromkeys(RAPL_FIELDS)
    assert source.read() == dict.fromkeys(RAPL_FIELDS)


def test_rapl_unreadable_gives_none_and_exactly_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pkg0 = add_rapl_zone(tmp_path, "intel-rapl:0", "package-0", 1)
    pkg1 = add_rapl_zone(tmp_path, "intel-rapl:1", "package-1", 1)
    deny_reads(monkeypatch, rapl_mod, [pkg0 / "energy_uj", pkg1 / "energy_uj"])
    clock = FakeClock()
    source = RaplSource(tmp_path, clock=clock)
    with caplog.at_level(logging.WARNING, logger="gputel.rapl"):
        for _ in range(5):
            clock.now += 1.0
            assert source.read() == dict.fromkeys(RAPL_FIELDS)
    warnings = [r for r in caplog.records if r.name == "gputel.rapl"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert PERMISSION_WARNING in message
    assert "CVE-2020-8694" in message and "install.sh" in message
    assert "\n" not in message


def test_rapl_becomes_readable_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = add_rapl_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    deny_reads(monkeypatch, rapl_mod, [pkg / "energy_uj"])
    clock = FakeClock()
    source = RaplSource(tmp_path, clock=clock)
    assert source.read()["cpu_package_power_w"] is None
    monkeypatch.undo()
    (pkg / "energy_uj").chmod(0o644)
    clock.now += 1.0
    assert source.read()["cpu_package_power_w"] is None  # first readable tick: no delta yet
    clock.now += 1.0
    set_energy(pkg, 7_000_000)
    assert source.read()["cpu_package_power_w"] == pytest.approx(7.0)


def test_rapl_other_read_errors_raise_and_keep_state(tmp_path: Path) -> None:
    pkg = add_rapl_zone(tmp_path, "intel-rapl:0", "package-0", 0)
    clock = FakeClock()
    source = RaplSource(tmp_path, clock=clock)
    source.read()
    (pkg / "energy_uj").write_text("garbage\n")
    clock.now += 1.0
    with pytest.raises(ValueError):
        source.read()
    clock.now += 1.0
    set_energy(pkg, 20_000_000)
    assert source.read()["cpu_package_power_w"] == pytest.approx(10.0)


# ----------------------------------------------------------------------------------- hwmon
def test_hwmon_parses_chips_labels_and_cpu_package(tmp_path: Path) -> None:
    add_hwmon_chip(
        tmp_path,
        "hwmon0",
        "coretemp",
        {1: (55000, "Package id 0"), 2: (61000, "Core 0"), 3: (50000, "Core 1")},
    )
    add_hwmon_chip(tmp_path, "hwmon1", "coretemp", {1: (58500, "Package id 1")})
    add_hwmon_chip(tmp_path, "hwmon2", "acpitz", {1: (27800, None)})
    add_hwmon_chip(tmp_path, "hwmon10", "nvme", {1: (38850, "Composite")}, device="nvme0")
    add_hwmon_chip(tmp_path, "hwmon3", "nvme", {1: (40850, "Composite")}, device="nvme1")
    source = HwmonSource(tmp_path)
    assert source.name == "hwmon"
    reading = source.read()
    assert reading["hwmon_temperatures_c"] == {
        ("coretemp-hwmon0", "Package id 0"): 55.0,
        ("coretemp-hwmon0", "Core 0"): 61.0,
        ("coretemp-hwmon0", "Core 1"): 50.0,
        ("coretemp-hwmon1", "Package id 1"): 58.5,
        ("acpitz", "temp1"): 27.8,
        ("nvme-nvme1", "Composite"): 40.85,
        ("nvme-nvme0", "Composite"): 38.85,
    }
    # the package sensors win over a hotter core sensor
    assert reading["cpu_temperature_c"] == 58.5


def test_hwmon_k10temp_prefers_tdie_over_offset_tctl(tmp_path: Path) -> None:
    add_hwmon_chip(
        tmp_path,
        "hwmon0",
        "k10temp",
        {1: (77000, "Tctl"), 2: (50000, "Tdie"), 3: (45000, "Tccd1")},
    )
    assert HwmonSource(tmp_path).read()["cpu_temperature_c"] == 50.0


def test_hwmon_k10temp_tctl_only(tmp_path: Path) -> None:
    add_hwmon_chip(tmp_path, "hwmon0", "k10temp", {1: (48125, "Tctl"), 3: (52000, "Tccd1")})
    assert HwmonSource(tmp_path).read()["cpu_temperature_c"] == 48.125


def test_hwmon_cpu_chip_without_package_labels_uses_its_hottest(tmp_path: Path) -> None:
    add_hwmon_chip(tmp_path, "hwmon0", "zenpower", {1: (41000, None), 2: (43000, None)})
    assert HwmonSource(tmp_path).read()["cpu_temperature_c"] == 43.0


def test_hwmon_without_cpu_chip_gives_none(tmp_path: Path) -> None:
    add_hwmon_chip(tmp_path, "hwmon0", "acpitz", {1: (90000, None)})
    reading = HwmonSource(tmp_path).read()
    assert reading["cpu_temperature_c"] is None
    assert reading["hwmon_temperatures_c"] == {("acpitz", "temp1"): 90.0}


def test_hwmon_without_hwmon_dir(tmp_path: Path) -> None:
    assert HwmonSource(tmp_path).read() == {"hwmon_temperatures_c": {}, "cpu_temperature_c": None}


def test_hwmon_old_driver_layout_under_device(tmp_path: Path) -> None:
    chip = tmp_path / "class" / "hwmon" / "hwmon0" / "device"
    chip.mkdir(parents=True)
    (chip / "name").write_text("it8728\n")
    (chip / "temp2_input").write_text("36000\n")
    assert HwmonSource(tmp_path).read()["hwmon_temperatures_c"] == {("it8728", "temp2"): 36.0}


def test_hwmon_skips_a_sensor_that_errors_this_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chip = add_hwmon_chip(tmp_path, "hwmon0", "nvme", {1: (38000, "Composite"), 2: ("", "x")})
    source = HwmonSource(tmp_path)
    assert source.read()["hwmon_temperatures_c"] == {("nvme", "Composite"): 38.0}

    real_open = open

    def enodata(file: object, *args: object, **kwargs: object) -> object:
        if str(file) == str(chip / "temp1_input"):
            raise OSError(errno.ENODATA, "No data available")
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(hwmon_mod, "open", enodata, raising=False)
    assert source.read()["hwmon_temperatures_c"] == {}
    assert not source._stale


def test_hwmon_rediscovers_when_files_vanish(tmp_path: Path) -> None:
    add_hwmon_chip(tmp_path, "hwmon0", "coretemp", {1: (50000, "Package id 0")})
    clock = FakeClock()
    source = HwmonSource(tmp_path, clock=clock)
    assert source.read()["cpu_temperature_c"] == 50.0

    # driver reload: the chip comes back under another hwmon number
    old = tmp_path / "class" / "hwmon" / "hwmon0"
    old.rename(tmp_path / "class" / "hwmon" / "hwmon7")
    assert source.read()["cpu_temperature_c"] is None
    clock.now += 1.0
    assert source.read()["cpu_temperature_c"] is None  # not rescanned every tick
    clock.now += hwmon_mod.REDISCOVER_AFTER_S
    assert source.read()["cpu_temperature_c"] == 50.0


# ---------------------------------------------------------------------------------- psutil
CpuTimes = namedtuple("CpuTimes", "user nice system idle iowait irq softirq steal guest guest_nice")
DiskIO = namedtuple("DiskIO", "read_bytes write_bytes")
NicIO = namedtuple("NicIO", "bytes_recv bytes_sent")


def test_psutil_source_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    times = [
        CpuTimes(100, 0, 50, 800, 50, 0, 0, 0, 10, 0),
        # +30 user, +10 system, +50 idle, +10 iowait, guest +5 (inside user): 40 of 100 busy
        CpuTimes(130, 0, 60, 850, 60, 0, 0, 0, 15, 0),
    ]
    monkeypatch.setattr(psutil, "cpu_times", lambda: times.pop(0))
    monkeypatch.setattr(host_mod.os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    vm = namedtuple("VM", "total available")(64 * 2**30, 48 * 2**30)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm)
    monkeypatch.setattr(psutil, "swap_memory", lambda: namedtuple("Swap", "used")(2**30))
    monkeypatch.setattr(psutil, "disk_io_counters", lambda perdisk: DiskIO(4096, 8192))
    nics = {"lo": NicIO(10**9, 10**9), "eth0": NicIO(100, 200), "ib0": NicIO(1000, 2000)}
    monkeypatch.setattr(psutil, "net_io_counters", lambda pernic: nics)

    source = PsutilHostSource()
    assert source.name == "host"
    first = source.read()
    assert first == {
        "cpu_util_pct": None,  # primes the delta: no meaningless 0.0
        "load_1m": 1.5,
        "load_5m": 1.0,
        "load_15m": 0.5,
        "memory_used_mib": 16 * 1024.0,
        "memory_available_mib": 48 * 1024.0,
        "swap_used_mib": 1024.0,
        "disk_read_bytes": 4096,
        "disk_write_bytes": 8192,
        "net_rx_bytes": 1100,
        "net_tx_bytes": 2200,
    }
    assert source.read()["cpu_util_pct"] == 40.0


def test_psutil_source_without_disks_or_nics(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def no_diskstats(perdisk: bool) -> None:
        calls.append(perdisk)
        raise NotImplementedError("/proc/diskstats nor /sys/block are available")

    monkeypatch.setattr(psutil, "disk_io_counters", no_diskstats)
    monkeypatch.setattr(psutil, "net_io_counters", lambda pernic: {"lo": NicIO(1, 1)})
    source = PsutilHostSource()
    for _ in range(3):
        reading = source.read()
        assert reading["disk_read_bytes"] is None and reading["disk_write_bytes"] is None
        assert reading["net_rx_bytes"] is None and reading["net_tx_bytes"] is None
    assert calls == [False]  # not asked again


def test_psutil_source_disk_none_in_container(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "disk_io_counters", lambda perdisk: None)
    reading = PsutilHostSource().read()
    assert reading["disk_read_bytes"] is None


def test_psutil_source_reads_the_real_host() -> None:
    source = PsutilHostSource()
    source.read()
    reading = source.read()
    assert reading["memory_used_mib"] > 0
    assert reading["memory_available_mib"] > 0
    assert reading["load_1m"] >= 0
    cpu = reading["cpu_util_pct"]
    assert cpu is None or 0 <= cpu <= 100
