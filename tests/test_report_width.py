"""``gputel report`` fits the terminal: no cut cell and no GPU name broken over lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_analysis import T0, pattern, write_gpu_csv, write_host_csv

pytest.importorskip("duckdb")

NAME = "NVIDIA H100 80GB HBM3"


def _report(path: Path, columns: int, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "LINES"}
    res = subprocess.run(
        [sys.executable, "-m", "gputel", "report", str(path), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "COLUMNS": str(columns)},
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("columns", [80, 100, 200])
def test_no_cut_cell(tmp_path: Path, columns: int) -> None:
    gpu_file = tmp_path / "gpu-20261122T100000Z-node01.csv"
    write_gpu_csv(
        gpu_file,
        T0,
        120,
        pattern,
        gpus=4,
        allocations=lambda k: "slurm-1234567" if 5 <= k < 105 else "",
        # Power cap and hardware slowdown: two throttle reasons in one cell.
        reasons=lambda k, u: 4 | 8 if u > 50 else 0,
    )
    gpu_file.write_text(gpu_file.read_text().replace("Test GPU", NAME))
    write_host_csv(tmp_path / "host-20261122T100000Z-node01.csv", T0, 120)
    text = _report(tmp_path, columns)
    assert "…" not in text and "..." not in text
    lines = text.splitlines()
    assert all(len(line.rstrip()) <= columns for line in lines), text
    data = json.loads(_report(tmp_path, columns, "--json"))
    for g in data["sessions"][0]["gpus"]:
        # Every GPU's name whole on one line, and its figures whole.
        assert any(f"{g['gpu']} {NAME}" in line for line in lines), text
        figures = (
            f"{g['util_mean_pct']:.1f}/{g['util_p95_pct']:.1f}/{g['util_max_pct']:.1f}",
            f"{g['energy_j']:.0f} ({g['energy_kwh']:.4f})",
            f"{g['power_mean_w']:.1f}/{g['power_peak_w']:.1f}",
            "hw_slowdown 30, sw_power_cap 30",
        )
        for figure in figures:
            assert figure in text, (figure, text)
    (alloc,) = data["allocations"]
    assert "slurm-1234567" in text and alloc["start"] in text
    assert f"{alloc['util_mean_pct']:.1f}/{alloc['util_max_pct']:.1f}" in text
    if columns >= 200:
        assert "┃ GPU" in text  # wide enough: the table itself


@pytest.mark.parametrize("columns", [80, 100])
def test_fleet_tables_fit(tmp_path: Path, columns: int) -> None:
    for node in ("node-a-long-hostname-01", "node-b-long-hostname-02"):
        (tmp_path / node).mkdir()
        write_gpu_csv(
            tmp_path / node / f"gpu-20261122T100000Z-{node}.csv",
            T0,
            120,
            lambda k, g: 0.0,
            allocations=lambda k: "slurm-77" if k > 5 else "",
        )
    text = _report(tmp_path, columns, "--idle-minutes", "1")
    assert "…" not in text
    assert all(len(line.rstrip()) <= columns for line in text.splitlines()), text
    # Each node name whole (in a table cell or a block's heading), the idle allocation listed.
    assert text.count("node-a-long-hostname-01") >= 2 and "slurm-77" in text
