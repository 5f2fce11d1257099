"""CSV files: naming, header, cells, energy since the file began, rollover, whole-row writes."""

from __future__ import annotations

import csv
import logging
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from gputel.formats import iso_utc_ms
from gputel.schema import (
    GPU_CSV_COLUMNS,
    GPU_FIELDS,
    HOST_CSV_COLUMNS,
    HOST_FIELDS,
    MIG_CSV_COLUMNS,
    MIG_FIELDS,
    GpuReading,
    HostReading,
    MigReading,
    Sample,
    SourceStatus,
)
from gputel.telemetry import csv_sink
from gputel.telemetry.csv_sink import CsvSink, safe_host

T0 = datetime(2026, 11, 22, 3, 45, 12, tzinfo=timezone.utc)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "csv.md"


def sample(t: datetime, energy: list[float | None], **kw: object) -> Sample:
    gpus = [
        GpuReading(
            i,
            f"GPU-{i}",
            'Fake, Inc. "X"',
            utilization_gpu_pct=50.0,
            energy_j=e,
            clock_event_reasons=5,
        )
        for i, e in enumerate(energy)
    ]
    return Sample(
        t,
        0.0,
        gpus,
        HostReading(cpu_util_pct=1.5, load_1m=0.25),
        [SourceStatus("sim", True, 0.0)],
        **kw,
    )  # type: ignore[arg-type]


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_timestamp_format() -> None:
    assert iso_utc_ms(T0) == "2026-11-22T03:45:12.000Z"
    assert iso_utc_ms(T0 + timedelta(microseconds=123999)) == "2026-11-22T03:45:12.123Z"


def test_header_rows_cells_and_energy(tmp_path: Path) -> None:
    sink = CsvSink(tmp_path, host="node01")
    sink.write(sample(T0, [1000.0, None], allocations=("job-1", "job-2")))
    sink.write(sample(T0 + timedelta(seconds=1), [1250.5, None], gpu_allocations={1: ("job-2",)}))
    sink.close()
    gpu = tmp_path / "gpu-20261122T034512Z-node01.csv"
    host = tmp_path / "host-20261122T034512Z-node01.csv"
    assert gpu.read_text().splitlines()[0] == ",".join(GPU_CSV_COLUMNS)
    assert host.read_text().splitlines()[0] == ",".join(HOST_CSV_COLUMNS)
    rows = read(gpu)
    assert [r["gpu"] for r in rows] == ["0", "1", "0", "1"]
    assert rows[0]["timestamp"] == "2026-11-22T03:45:12.000Z"
    assert rows[0]["name"] == 'Fake, Inc. "X"'
    assert [r["energy_j"] for r in rows] == ["0.000", "", "250.500", ""]
    assert rows[0]["allocations"] == "job-1;job-2"
    assert rows[2]["allocations"] == "" and rows[3]["allocations"] == "job-2"
    assert rows[0]["lost"] == "0" and rows[0]["clock_event_reasons"] == "5"
    assert rows[0]["fan_speed_pct"] == "" and rows[0]["power_w"] == ""
    hrows = read(host)
    assert len(hrows) == 2 and hrows[0]["cpu_util_pct"] == "1.5"
    assert hrows[0]["cpu_package_power_w"] == ""


def test_energy_never_goes_backwards_when_the_counter_resets(tmp_path: Path) -> None:
    sink = CsvSink(tmp_path, host="n")
    for k, e in enumerate([500.0, 600.0, 10.0, 30.0]):
        sink.write(sample(T0 + timedelta(seconds=k), [e]))
    assert sink.gpu_path is not None
    values = [float(r["energy_j"]) for r in read(sink.gpu_path)]
    assert values == [0.0, 100.0, 100.0, 120.0]


def test_never_reuses_a_name_and_names_sort_by_time(tmp_path: Path) -> None:
    (tmp_path / "gpu-20261122T034512Z-n.csv").write_text("someone else's\n")
    sink = CsvSink(tmp_path, host="n")
    sink.write(sample(T0, [1.0]))
    first = sink.gpu_path
    sink.reopen()
    sink.write(sample(T0 + timedelta(milliseconds=100), [2.0]))
    second = sink.gpu_path
    sink.close()
    assert (tmp_path / "gpu-20261122T034512Z-n.csv").read_text() == "someone else's\n"
    assert first is not None and second is not None
    assert first.name == "gpu-20261122T034512Z-n_001.csv"
    assert second.name == "gpu-20261122T034512Z-n_002.csv"
    names = sorted(p.name for p in tmp_path.glob("gpu-*.csv"))
    assert names == ["gpu-20261122T034512Z-n.csv", first.name, second.name]
    # energy restarts in a new file
    assert read(second)[0]["energy_j"] == "0.000"


def test_a_name_logrotate_renamed_away_is_not_reused(tmp_path: Path) -> None:
    """Two forced rotations in one second: the second file must not take the first's name."""
    sink = CsvSink(tmp_path, host="n")
    names: list[str] = []
    for i, suffix in enumerate((".1", ".1.gz", ".2.gz")):
        sink.write(sample(T0 + timedelta(milliseconds=10 * i), [1.0]))
        current = sink.gpu_path
        assert current is not None
        names.append(current.name)
        current.rename(current.with_name(current.name + suffix))  # what logrotate does
        sink.reopen()
    sink.close()
    assert names == [
        "gpu-20261122T034512Z-n.csv",
        "gpu-20261122T034512Z-n_001.csv",
        "gpu-20261122T034512Z-n_002.csv",
    ]


def test_new_file_on_utc_day_change(tmp_path: Path) -> None:
    sink = CsvSink(tmp_path, host="n")
    late = datetime(2026, 11, 22, 23, 59, 59, 500000, tzinfo=timezone.utc)
    sink.write(sample(late, [1.0]))
    sink.write(sample(late + timedelta(seconds=1), [2.0]))
    sink.close()
    names = sorted(p.name for p in tmp_path.glob("gpu-*.csv"))
    assert names == ["gpu-20261122T235959Z-n.csv", "gpu-20261123T000000Z-n.csv"]
    for p in tmp_path.glob("*.csv"):
        assert p.read_text().startswith("timestamp,")


def test_new_file_at_size_cap(tmp_path: Path) -> None:
    sink = CsvSink(tmp_path, host="n", max_bytes=1024)
    for k in range(40):
        sink.write(sample(T0 + timedelta(seconds=k), [float(k)]))
    sink.close()
    files = sorted(tmp_path.glob("gpu-*.csv"))
    assert len(files) >= 3
    total = 0
    for p in files:
        assert p.stat().st_size <= 1024
        rows = read(p)
        assert rows[0]["energy_j"] == "0.000"
        total += len(rows)
    assert total == 40


def test_short_write_is_truncated_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sink = CsvSink(tmp_path, host="n")
    sink.write(sample(T0, [1.0, 2.0]))
    assert sink.gpu_path is not None
    good = sink.gpu_path.stat().st_size
    real_write = os.write

    def half_write(fd: int, data: bytes) -> int:
        return real_write(fd, bytes(data)[: len(data) // 2])

    monkeypatch.setattr(csv_sink.os, "write", half_write)
    with caplog.at_level(logging.WARNING, "gputel.csv"):
        sink.write(sample(T0 + timedelta(seconds=1), [3.0, 4.0]))
        sink.write(sample(T0 + timedelta(seconds=2), [3.0, 4.0]))
        assert sink.gpu_path.stat().st_size == good
        assert sink.rows_failed == 6  # 2 GPU rows + 1 host row per tick
        monkeypatch.setattr(csv_sink.os, "write", real_write)
        sink.write(sample(T0 + timedelta(seconds=3), [5.0, 6.0]))
    assert sink.rows_failed == 6
    rows = read(sink.gpu_path)
    later = iso_utc_ms(T0 + timedelta(seconds=3))
    assert [r["timestamp"] for r in rows] == [iso_utc_ms(T0)] * 2 + [later] * 2
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot write" in m for m in messages) == 1
    assert sum("recovered" in m for m in messages) == 1


def test_unwritable_directory_counts_rows_and_recovers(tmp_path: Path) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the directory should be")
    sink = CsvSink(blocker, host="n")
    for k in range(3):
        sink.write(sample(T0 + timedelta(seconds=k), [1.0, 2.0]))
    assert sink.rows_failed == 9
    assert sink.paths() == {"gpu": None, "host": None, "processes": None}
    blocker.unlink()
    sink.write(sample(T0 + timedelta(seconds=3), [1.0, 2.0]))
    assert sink.rows_failed == 9
    assert sink.gpu_path is not None and len(read(sink.gpu_path)) == 2


def test_safe_host() -> None:
    assert safe_host("node/01 x") == "node-01-x"
    assert safe_host("..") == "localhost"


def test_docs_list_every_column() -> None:
    text = DOCS.read_text()
    for col in (*GPU_CSV_COLUMNS, *HOST_CSV_COLUMNS, *MIG_CSV_COLUMNS):
        assert f"`{col}`" in text, col


def test_docs_precision_column_is_the_schema_table() -> None:
    """docs/csv.md's precision column says what the sink writes: ``Field.decimals``."""
    text = DOCS.read_text()
    for title, table in (
        ("## `gpu-*.csv`", GPU_FIELDS),
        ("## `host-*.csv`", HOST_FIELDS),
        ("## `mig-*.csv`", MIG_FIELDS),
    ):
        section = text.split(title, 1)[1].split("\n## ", 1)[0]
        lines = section.split("\n")
        header = next(line for line in lines if line.startswith("| column |"))
        assert [c.strip() for c in header.strip("|").split("|")][:3] == [
            "column",
            "unit",
            "precision",
        ]
        documented = {
            line.split("`")[1]: line.split(" | ")[2]
            for line in lines
            if line.startswith("| `") and "|---" not in line
        }
        for f in table:
            assert documented[f.csv] == f.precision, f.csv


def test_cells_at_their_precision(tmp_path: Path) -> None:
    """Every value cell has exactly its field's decimals: no repr tails like 412.79296875."""
    g = GpuReading(
        0,
        "GPU-0",
        "X",
        utilization_gpu_pct=37.0,
        utilization_memory_pct=12.34,
        memory_used_mib=412.79296875,
        memory_total_mib=81559.0,
        temperature_c=41.0,
        power_w=301.123456,
        power_limit_w=700.0,
        energy_j=5000.0,
        sm_clock_mhz=1980.0,
        memory_clock_mhz=2619.0,
        fan_speed_pct=None,
        performance_state=0,
        clock_event_reasons=4,
        pcie_rx_bytes_per_s=4.44e9 / 3,
        pcie_tx_bytes_per_s=1.0,
        ecc_corrected_volatile=0,
        ecc_uncorrected_volatile=2,
    )
    g2 = GpuReading(**{**{k: getattr(g, k) for k in g.__slots__}, "energy_j": 5001.23456789})
    h = HostReading(
        cpu_util_pct=3.3333333,
        load_1m=0.69287109375,
        load_5m=1.0,
        load_15m=0.5,
        memory_used_mib=12345.6789,
        memory_available_mib=100.5,
        swap_used_mib=0.0,
        disk_read_bytes=2**63 + 5,
        disk_write_bytes=1,
        net_rx_bytes=2,
        net_tx_bytes=3,
        cpu_package_power_w=55.555,
        cpu_package_energy_j=123.4567891,
        dram_power_w=None,
        cpu_temperature_c=48.0,
    )
    sink = CsvSink(tmp_path, host="n")
    sink.write(Sample(T0, 0.0, [g], h, []))
    sink.write(Sample(T0 + timedelta(seconds=1), 1.0, [g2], h, []))
    sink.close()
    gpu_rows = read(next(tmp_path.glob("gpu-*.csv")))
    host_row = read(next(tmp_path.glob("host-*.csv")))[0]
    for row in gpu_rows:
        for f in GPU_FIELDS:
            cell = row[f.csv]
            if cell:
                decimals = len(cell.split(".")[1]) if "." in cell else 0
                assert decimals == f.decimals, (f.csv, cell)
    assert gpu_rows[0]["memory_used_mib"] == "413"
    assert gpu_rows[0]["power_w"] == "301.12"
    assert gpu_rows[0]["fan_speed_pct"] == ""
    assert gpu_rows[0]["pcie_rx_bytes_per_s"] == "1480000000"
    # Energy keeps the millijoule of NVML's counter.
    assert gpu_rows[1]["energy_j"] == "1.235"
    assert host_row["load_1m"] == "0.69"
    assert host_row["cpu_util_pct"] == "3.3"
    assert host_row["memory_used_mib"] == "12346"
    assert host_row["disk_read_bytes"] == str(2**63 + 5)
    assert host_row["cpu_package_energy_j"] == "123.456789"
    assert host_row["dram_power_w"] == ""


def test_mig_devices_get_their_own_file_only_where_there_are_some(tmp_path: Path) -> None:
    sink = CsvSink(tmp_path, host="node01")
    plain = GpuReading(0, "GPU-0", "H100", utilization_gpu_pct=50.0)
    sink.write(Sample(T0, 0.0, [plain], HostReading(), []))
    assert sink.mig_path is None and "mig" not in sink.paths()
    mig = GpuReading(
        1,
        "GPU-1",
        "H100",
        mig=(
            MigReading(1, 0, "MIG-a", sm_active_pct=61.25, memory_used_mib=1024.4),
            MigReading(2, None, "MIG-b", memory_total_mib=20480.0),
        ),
    )
    sample = Sample(T0 + timedelta(seconds=1), 1.0, [plain, mig], HostReading(), [])
    sample.gpu_allocations = {1: ("job-1",)}
    sink.write(sample)
    assert sink.mig_path is not None and sink.paths()["mig"] == str(sink.mig_path)
    assert sink.mig_path.name.startswith("mig-") and sink.mig_path.name.endswith("-node01.csv")
    lines = sink.mig_path.read_text().splitlines()
    assert lines[0] == ",".join(MIG_CSV_COLUMNS)
    stamp = iso_utc_ms(T0 + timedelta(seconds=1))
    assert lines[1:] == [
        f"{stamp},1,GPU-1,1,0,MIG-a,61.2,1024,,job-1",
        f"{stamp},1,GPU-1,2,,MIG-b,,,20480,job-1",
    ]
    sink.close()


def test_process_rows_follow_their_values_tick_after_tick(tmp_path: Path) -> None:
    """A process's row is reused while nothing in it changes; any change of owner, value or
    the value's type (1 and 1.0 are written differently) is written as it is."""
    from gputel.schema import ProcessRecord

    ticks = [
        [ProcessRecord(0, 7, "ann", "python", "slurm-1", 1024.0, 50.0)],
        [ProcessRecord(0, 7, "ann", "python", "slurm-1", 1024.0, 50.0)],
        [ProcessRecord(0, 7, "ann", "python", "slurm-1", 1024.0, 51.0)],
        [ProcessRecord(0, 7, "bob", "python", "slurm-2", 1024.0, 51.0)],
        [ProcessRecord(0, 7, "bob", "python", "slurm-2", 1024, None)],  # type: ignore[arg-type]
        [
            ProcessRecord(1, 7, "bob", "python", "slurm-2", 1024, None),  # type: ignore[arg-type]
            ProcessRecord(0, 7, "bob", "python", "slurm-2", 1024.0, None),
        ],
    ]
    sink = CsvSink(tmp_path, host="node01")
    for k, procs in enumerate(ticks):
        s = sample(T0 + timedelta(seconds=k), [1.0])
        s.processes = procs
        sink.write(s)
    sink.close()
    (path,) = tmp_path.glob("processes-*.csv")
    got = [
        (r["gpu"], r["user"], r["job"], r["memory_used_mib"], r["sm_util_pct"]) for r in read(path)
    ]
    assert got == [
        ("0", "ann", "slurm-1", "1024", "50"),
        ("0", "ann", "slurm-1", "1024", "50"),
        ("0", "ann", "slurm-1", "1024", "51"),
        ("0", "bob", "slurm-2", "1024", "51"),
        ("0", "bob", "slurm-2", "1024", ""),
        ("1", "bob", "slurm-2", "1024", ""),
        ("0", "bob", "slurm-2", "1024", ""),
    ]
