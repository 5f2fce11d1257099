"""What a full read asks for, and how often: slow-changing fields every SLOW_EVERY reads (carried
over in between), PCIe from the driver's byte counters (field values 197/198) instead of the
~20 ms throughput calls. NVIDIA's real binding over the fake libnvidia-ml.so.1, in process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from fakedriver import GPU_IS_LOST, FakeDriver, read_until, scenario
from gputel.sources import nvml
from gputel.sources.nvml_fields import SLOW_EVERY, SLOW_FIELDS
from test_nvml_gpm import Clock


@pytest.fixture
def drv(inproc_driver: FakeDriver) -> Iterator[FakeDriver]:
    """Two GPUs without GPM; GPU 0 has row remapping and PCIe byte counters."""
    inproc_driver.write(
        scenario(
            2,
            gpu__0__gpm__supported=0,
            gpu__1__gpm__supported=0,
            gpu__0__remapped_rows__correctable=3,
            gpu__0__pcie__counters=1,
            gpu__0__pcie__tx_kbps=1000,
            gpu__0__pcie__rx_kbps=2000,
        )
    )
    yield inproc_driver


def test_slow_fields_are_read_every_n_reads_and_carried_over(drv: FakeDriver) -> None:
    src = nvml.open_nvml(None, clock=Clock())
    try:
        first = src.read_gpu(0)
        assert first.power_limit_w == 700.0 and first.remapped_rows_correctable == 3
        drv.set(gpu__0__power_limit_mw=450_000, gpu__0__ecc__corrected=9)
        for _ in range(SLOW_EVERY - 1):
            r = src.read_gpu(0)
            # Every row carries the last values read (never empty between two reads).
            assert {f: getattr(r, f) for f in SLOW_FIELDS} == {
                f: getattr(first, f) for f in SLOW_FIELDS
            }
        assert drv.calls("power_limit", 0) == 1 and drv.calls("remapped_rows", 0) == 1
        r = src.read_gpu(0)
        assert r.power_limit_w == 450.0 and r.ecc_corrected_volatile == 9
        assert drv.calls("power_limit", 0) == 2 and drv.calls("remapped_rows", 0) == 2
        assert r.power_w is not None and drv.calls("power", 0) == SLOW_EVERY + 1  # every read
    finally:
        src.close()


def test_a_gpu_back_from_lost_reads_its_slow_fields_at_once(drv: FakeDriver) -> None:
    clock = Clock()
    src = nvml.open_nvml(None, clock=clock)
    try:
        src.read_gpu(0)
        drv.set(gpu__0__all__error=GPU_IS_LOST)
        assert src.read_gpu(0).lost
        drv.set(gpu__0__all__error=None, gpu__0__power_limit_mw=300_000)
        clock.now += 61  # the re-probe
        r = src.read_gpu(0)
        assert not r.lost and r.power_limit_w == 300.0
    finally:
        src.close()


def test_pcie_from_the_drivers_byte_counters_not_the_throughput_calls(drv: FakeDriver) -> None:
    src = nvml.open_nvml(None, clock=Clock())
    try:
        first = src.read_gpu(0)
        # A rate needs two counter reads: empty on the first, never invented.
        assert first.pcie_tx_bytes_per_s is None and first.pcie_rx_bytes_per_s is None
        for _ in range(3):
            time.sleep(0.02)
            r = src.read_gpu(0)
            assert r.pcie_tx_bytes_per_s == pytest.approx(1000 * 1024.0)
            assert r.pcie_rx_bytes_per_s == pytest.approx(2000 * 1024.0)
        assert drv.calls("pcie", 0) == 0  # no ~20 ms sample on the read's path
        # GPU 1's driver has no counters: the throughput calls, sampled off the read's path.
        r1 = read_until(lambda: src.read_gpu(1), lambda r: r.pcie_rx_bytes_per_s is not None)
        assert r1.pcie_rx_bytes_per_s == 2000 * 1024.0
        assert r1.field_errors == {} and r.field_errors == {}
    finally:
        src.close()


def test_throughput_samples_are_off_the_reads_path(drv: FakeDriver) -> None:
    """GPU 1 has neither GPM nor byte counters: its ~20 ms throughput calls run on the source's
    sampling thread. Hung there, they hold up no read; the stale sample is dropped, not kept."""
    clock = Clock()
    src = nvml.open_nvml(None, clock=clock)
    try:
        r1 = read_until(lambda: src.read_gpu(1), lambda r: r.pcie_rx_bytes_per_s is not None)
        assert r1.pcie_rx_bytes_per_s == 2000 * 1024.0
        calls = drv.calls("pcie", 1)
        drv.set(gpu__1__pcie__sleep_ms=600_000)  # the driver's next sample never returns
        read_until(lambda: drv.calls("pcie", 1), lambda n: n > calls)  # the thread is in it
        for _ in range(3):  # reads go on, with the last sample while it is fresh
            r1 = src.read_gpu(1)
            assert r1.power_w is not None and r1.pcie_rx_bytes_per_s == 2000 * 1024.0
        clock.now += 10  # older than MAX_AGE_S: empty, never a stale number
        r1 = src.read_gpu(1)
        assert r1.pcie_rx_bytes_per_s is None and r1.power_w is not None and not r1.lost
    finally:
        drv.set(gpu__1__pcie__sleep_ms=None)
        src.close()
