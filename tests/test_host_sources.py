"""Host sources: RAPL power from counter deltas, hwmon parsing, procfs fields (no sleeping)."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import psutil
import pytest

from fakesysfs import add_hwmon_chip, add_rapl_zone, deny_reads, set_energy
from gputel.schema import MIB
from gputel.sources import host as host_mod
from gputel.sources import hwmon as hwmon_mod
from gputel.sources import rapl as rapl_mod
from gputel.sources.host import ProcfsHostSource
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


# ---------------------------------------------------------------------------------- procfs
# The files as Linux 6.x writes them, cut down to the lines the source reads and a few it skips.
STAT = "cpu  {} 0 {} {} {} 0 0 0 {} 0\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 12345 0 0\nctxt 999\n"
MEMINFO = (
    "MemTotal:       67108864 kB\n"
    "MemFree:         1048576 kB\n"
    "MemAvailable:   50331648 kB\n"
    "Buffers:          123456 kB\n"
    "SwapCached:            0 kB\n"
    "SwapTotal:       8388608 kB\n"
    "SwapFree:        7340032 kB\n"
    "HugePages_Total:       0\n"
    "Hugepagesize:       2048 kB\n"
)
NETDEV_HEAD = (
    "Inter-|   Receive                                                |  Transmit\n"
    " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs"
    " drop fifo colls carrier compressed\n"
)


def diskstats_line(major: int, minor: int, name: str, rsect: int, wsect: int) -> str:
    """A Linux 5.5+ line (20 fields): sectors read is the 6th, sectors written the 10th."""
    return f"{major:>4} {minor:>7} {name} 10 1 {rsect} 5 20 2 {wsect} 7 0 9 12 0 0 0 0 0 0\n"


def netdev_line(nic: str, rx: int, tx: int) -> str:
    return f"{nic:>6}: {rx} 11 0 0 0 0 0 0 {tx} 22 0 0 0 0 0 0\n"


class FakeHost:
    """``proc/`` and ``sys/block/`` under tmp_path, rewritten in place between reads."""

    def __init__(self, root: Path) -> None:
        self.proc = root / "proc"
        self.sys = root / "sys"
        (self.proc / "net").mkdir(parents=True)
        (self.sys / "block").mkdir(parents=True)
        self.set_cpu(user=100, system=50, idle=800, iowait=50, guest=10)
        (self.proc / "meminfo").write_text(MEMINFO)
        self.set_load("1.50 1.00 0.50")
        self.set_nics({"lo": (10**9, 10**9), "eth0": (100, 200), "ib0": (1000, 2000)})

    def set_cpu(self, *, user: int, system: int, idle: int, iowait: int, guest: int) -> None:
        (self.proc / "stat").write_text(STAT.format(user, system, idle, iowait, guest))

    def set_load(self, averages: str) -> None:
        (self.proc / "loadavg").write_text(f"{averages} 2/345 6789\n")

    def set_disks(self, lines: list[str], whole: list[str]) -> None:
        (self.proc / "diskstats").write_text("".join(lines))
        for name in whole:
            (self.sys / "block" / name).mkdir(exist_ok=True)

    def set_nics(self, nics: dict[str, tuple[int, int]]) -> None:
        lines = [netdev_line(nic, rx, tx) for nic, (rx, tx) in nics.items()]
        (self.proc / "net" / "dev").write_text(NETDEV_HEAD + "".join(lines))

    def source(self) -> ProcfsHostSource:
        return ProcfsHostSource(self.proc, self.sys)


@pytest.fixture
def fake(tmp_path: Path) -> FakeHost:
    host = FakeHost(tmp_path)
    host.set_disks([diskstats_line(8, 0, "sda", 8, 16)], whole=["sda"])
    return host


def test_procfs_source_fields(fake: FakeHost) -> None:
    source = fake.source()
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
    # +30 user, +10 system, +50 idle, +10 iowait, guest +5 (inside user): 40 of 100 busy
    fake.set_cpu(user=130, system=60, idle=850, iowait=60, guest=15)
    assert source.read()["cpu_util_pct"] == 40.0
    # no CPU time elapsed between two reads: None, not 0.0 or a division by zero
    assert source.read()["cpu_util_pct"] is None
    # The load averages as the kernel has them now (the file is kept open, read afresh).
    fake.set_load("12.25 3.00 0.75")
    reading = source.read()
    assert (reading["load_1m"], reading["load_5m"], reading["load_15m"]) == (12.25, 3.0, 0.75)


def test_cpu_line_of_an_old_kernel_without_guest_fields(fake: FakeHost) -> None:
    (fake.proc / "stat").write_text("cpu  100 0 50 800 50 0 0 0\n")
    source = fake.source()
    source.read()
    (fake.proc / "stat").write_text("cpu  130 0 60 850 60 0 0 0\n")
    assert source.read()["cpu_util_pct"] == 40.0


def test_only_whole_disks_count_not_partitions_or_virtual_devices(fake: FakeHost) -> None:
    fake.set_disks(
        [
            diskstats_line(7, 0, "loop0", 1_000_000, 0),
            diskstats_line(1, 0, "ram0", 1_000_000, 1_000_000),
            diskstats_line(8, 0, "sda", 100, 200),
            diskstats_line(8, 1, "sda1", 60, 150),
            diskstats_line(8, 2, "sda2", 40, 50),
            "   8       3 sda3 4 8 16 32\n",  # a Linux 2.6 partition line: 7 fields
            diskstats_line(259, 0, "nvme0n1", 1000, 2000),
            diskstats_line(259, 1, "nvme0n1p1", 1000, 2000),
            diskstats_line(104, 0, "cciss/c0d0", 10, 20),
            diskstats_line(104, 1, "cciss/c0d0p1", 10, 20),
            diskstats_line(252, 0, "zram0", 1_000_000, 1_000_000),
            diskstats_line(253, 0, "dm-0", 1_000_000, 1_000_000),  # LVM over nvme0n1p1
            diskstats_line(9, 127, "md127", 1_000_000, 1_000_000),  # RAID over sda1 + sda2
        ],
        # what /sys/block lists: whole disks of every kind, never partitions
        whole=["loop0", "ram0", "sda", "nvme0n1", "cciss!c0d0", "zram0", "dm-0", "md127"],
    )
    reading = fake.source().read()
    assert reading["disk_read_bytes"] == (100 + 1000 + 10) * 512
    assert reading["disk_write_bytes"] == (200 + 2000 + 20) * 512


def test_disk_hot_added_later_is_counted(fake: FakeHost) -> None:
    source = fake.source()
    assert source.read()["disk_read_bytes"] == 8 * 512
    fake.set_disks(
        [diskstats_line(8, 0, "sda", 8, 16), diskstats_line(8, 16, "sdb", 2, 0)],
        whole=["sda", "sdb"],
    )
    assert source.read()["disk_read_bytes"] == 10 * 512


def test_missing_diskstats_gives_none_and_is_not_asked_again(fake: FakeHost) -> None:
    (fake.proc / "diskstats").unlink()
    source = fake.source()
    for _ in range(2):
        reading = source.read()
        assert reading["disk_read_bytes"] is None and reading["disk_write_bytes"] is None
        assert reading["memory_used_mib"] == 16 * 1024.0  # the rest of the source stays up
    fake.set_disks([diskstats_line(8, 0, "sda", 8, 16)], whole=["sda"])
    assert source.read()["disk_read_bytes"] is None


@pytest.mark.parametrize(
    ("lines", "whole"),
    [
        ([], []),  # an empty /proc/diskstats
        ([diskstats_line(8, 1, "sda1", 8, 16)], []),  # a container: partitions only, no /sys/block
        ([diskstats_line(7, 0, "loop0", 8, 16)], ["loop0"]),  # virtual devices only
    ],
)
def test_no_whole_disk_gives_none_never_zero(
    fake: FakeHost, lines: list[str], whole: list[str]
) -> None:
    fake.set_disks(lines, whole)
    reading = fake.source().read()
    assert reading["disk_read_bytes"] is None and reading["disk_write_bytes"] is None


def test_loopback_only_gives_no_network_counters(fake: FakeHost) -> None:
    fake.set_nics({"lo": (5, 5)})
    reading = fake.source().read()
    assert reading["net_rx_bytes"] is None and reading["net_tx_bytes"] is None


def test_a_counter_that_goes_back_does_not_make_the_sum_fall(fake: FakeHost) -> None:
    """psutil's nowrap: a re-created NIC continues from its last value; a removed one is gone."""
    source = fake.source()
    assert source.read()["net_rx_bytes"] == 1100
    fake.set_nics({"eth0": (150, 250), "ib0": (7, 9)})  # ib0's driver reloaded
    reading = source.read()
    assert (reading["net_rx_bytes"], reading["net_tx_bytes"]) == (150 + 1007, 250 + 2009)
    fake.set_nics({"eth0": (160, 260), "ib0": (17, 19)})
    reading = source.read()
    assert (reading["net_rx_bytes"], reading["net_tx_bytes"]) == (160 + 1017, 260 + 2019)
    fake.set_nics({"eth0": (170, 270)})  # ib0 removed: its correction goes with it
    assert source.read()["net_rx_bytes"] == 170
    fake.set_nics({"eth0": (170, 270), "ib0": (1, 1)})  # and comes back from scratch
    assert source.read()["net_rx_bytes"] == 171


def test_disk_counter_reset_is_carried_too(fake: FakeHost) -> None:
    source = fake.source()
    source.read()
    fake.set_disks([diskstats_line(8, 0, "sda", 2, 20)], whole=["sda"])
    reading = source.read()
    assert (reading["disk_read_bytes"], reading["disk_write_bytes"]) == ((8 + 2) * 512, 20 * 512)


def test_long_files_are_read_to_the_end(fake: FakeHost) -> None:
    """seq_file returns about a page per read(2), so one pread is not the whole file."""
    nics = {f"veth{i:04d}": (i, 2 * i) for i in range(300)}
    fake.set_nics(nics)
    source = fake.source()
    source._netdev._chunk = 100  # a short read on every call, as a busy host's net/dev gives
    reading = source.read()
    assert reading["net_rx_bytes"] == sum(range(300))
    assert reading["net_tx_bytes"] == 2 * sum(range(300))


def test_files_stay_open_between_reads(fake: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    source = fake.source()
    source.read()
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(host_mod.os, "open", counting_open)
    for _ in range(3):
        source.read()
    monkeypatch.undo()
    assert [p for p in opened if p.startswith(str(fake.proc))] == []
    source.close()


def test_a_descriptor_gone_bad_is_reopened(fake: FakeHost) -> None:
    source = fake.source()
    source.read()
    fd = source._meminfo._fd
    assert fd is not None
    os.close(fd)
    assert source.read()["memory_used_mib"] == 16 * 1024.0
    source.close()


def test_missing_mem_available_gives_none_not_a_guess(fake: FakeHost) -> None:
    text = "".join(line for line in MEMINFO.splitlines(True) if "MemAvailable" not in line)
    (fake.proc / "meminfo").write_text(text)
    reading = fake.source().read()
    assert reading["memory_used_mib"] is None and reading["memory_available_mib"] is None
    assert reading["swap_used_mib"] == 1024.0


def test_without_proc_the_source_raises_so_it_is_marked_down(tmp_path: Path) -> None:
    source = ProcfsHostSource(tmp_path / "proc", tmp_path / "sys")
    with pytest.raises(FileNotFoundError):
        source.read()


def test_garbled_file_raises(fake: FakeHost) -> None:
    (fake.proc / "meminfo").write_text("garbage\n")
    with pytest.raises(ValueError):
        fake.source().read()


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux procfs")
def test_procfs_source_reads_the_real_host() -> None:
    source = ProcfsHostSource()
    source.read()
    reading = source.read()
    assert reading["memory_used_mib"] > 0
    assert reading["memory_available_mib"] > 0
    assert reading["swap_used_mib"] >= 0
    assert reading["load_1m"] >= 0
    cpu = reading["cpu_util_pct"]
    assert cpu is None or 0 <= cpu <= 100
    source.close()


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux procfs")
def test_agrees_with_psutil_on_the_real_host() -> None:
    """Same figures as psutil gave, except the disks psutil double-counted (see host.py)."""
    reading = ProcfsHostSource().read()
    assert reading["load_1m"] == pytest.approx(os.getloadavg()[0], abs=0.5)
    vm = psutil.virtual_memory()
    # memory moves between the two reads; a few MiB is plenty on a quiet test host
    assert reading["memory_available_mib"] == pytest.approx(vm.available / MIB, abs=64)
    assert reading["swap_used_mib"] == pytest.approx(psutil.swap_memory().used / MIB, abs=64)
    nics = {k: v for k, v in psutil.net_io_counters(pernic=True).items() if k != "lo"}
    if nics:
        assert reading["net_rx_bytes"] is not None
        assert reading["net_rx_bytes"] <= sum(n.bytes_recv for n in nics.values())
    else:
        assert reading["net_rx_bytes"] is None
    per_disk = psutil.disk_io_counters(perdisk=True) or {}
    counted = [d for d in per_disk if host_mod.is_counted_disk(d, Path("/sys"))]
    if counted:
        assert reading["disk_read_bytes"] is not None
        assert reading["disk_read_bytes"] <= sum(per_disk[d].read_bytes for d in counted)
    else:
        assert reading["disk_read_bytes"] is None
