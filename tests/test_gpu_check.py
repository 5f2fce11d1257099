"""scripts/gpu-check.sh end to end over the fake driver and the fake nvidia-smi.

On a GPU node the script checks the real driver; here it runs every step against the fakes, with
a load command that raises the fake GPUs' utilization for a few seconds instead of PyTorch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fakedriver import REPO, FakeDriver, scenario

SCRIPT = REPO / "scripts" / "gpu-check.sh"
TOOLS = REPO / "scripts" / "gpu_check.py"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_are_shellcheck_clean() -> None:
    scripts = sorted(str(p) for p in (REPO / "scripts").glob("*.sh"))
    proc = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


def test_gpu_check_runs_end_to_end_on_the_fakes(fake_driver: FakeDriver, tmp_path: Path) -> None:
    busy, idle = tmp_path / "busy.txt", tmp_path / "idle.txt"
    # GPU 0's driver restricts profiling to admins: root gets GPM, nobody would not.
    fake_driver.write(scenario(2, gpu__0__utilization__gpu_pct=90, gpu__0__gpm__admin_only=1))
    shutil.copy(fake_driver.path, busy)
    fake_driver.write(scenario(2, gpu__0__gpm__admin_only=1))
    shutil.copy(fake_driver.path, idle)
    swap = f"cp {{}} {fake_driver.path}.new && mv {fake_driver.path}.new {fake_driver.path}"
    load = f"{swap.format(busy)} && sleep 5 && {swap.format(idle)}"
    out = tmp_path / "out"
    env = fake_driver.env(
        smi=True,
        GPU_CHECK_VENV=str(Path(sys.executable).parent.parent),
        GPU_CHECK_INTERVAL="0.2",
        GPU_CHECK_TIMING_SECONDS="2",
        GPU_CHECK_LOAD=load,
    )
    proc = subprocess.run(
        [str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=400, check=False
    )
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "**pytest -m gpu**: PASS" in summary
    assert "**agent under load**: PASS" in summary and "idle -> arming -> active" in summary
    assert "**CSV vs nvidia-smi**: PASS" in summary
    assert "gputel record (NVML" in summary and "spawned once a second" in summary
    assert "**GPM as root and as nobody**: PASS — as root: GPU 0 available; GPU 1 available" in (
        summary
    )
    assert "as nobody: " in summary
    assert "**PCI addresses (kernel log format)**" in summary
    assert "NVRM: Xid (PCI:0000:18:00)" in (out / "pci.txt").read_text()
    for raw in (
        "nvidia-smi-L.txt",
        "gpus.csv",
        "pytest-gpu.txt",
        "agent/log/transitions.csv",
        "agent/nvidia-smi-samples.csv",
        "timing-record.json",
        "timing-smi-loop.json",
        "timing-smi-spawn.json",
        "gpm-root.json",
        "gpm-nobody.json",
    ):
        assert (out / raw).exists(), raw


def test_the_load_step_says_why_it_skips_without_torch() -> None:
    proc = subprocess.run(
        [sys.executable, str(TOOLS), "matmul", "1"], capture_output=True, text=True, check=False
    )
    try:
        import torch  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        assert proc.returncode == 3
        assert proc.stdout.startswith("SKIP: PyTorch is not installed")
    else:
        assert proc.returncode in (0, 3)


def test_gpm_as_an_unprivileged_caller_names_the_restriction(fake_driver: FakeDriver) -> None:
    """``gpu_check.py gpm`` as a caller the driver does not count as admin."""
    fake_driver.write(scenario(2, gpu__0__gpm__admin_only=1, caller__admin=0))
    proc = subprocess.run(
        [sys.executable, str(TOOLS), "gpm"],
        env=fake_driver.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["gpus"][0]["gpm"].startswith("refused: ")
    assert doc["gpus"][1]["gpm"] == "available"


def test_pci_addresses_in_the_kernel_logs_format_checked_against_sysfs(
    fake_driver: FakeDriver, tmp_path: Path
) -> None:
    fake_driver.write(scenario(2, gpu__1__pci_bus_id="00000001:3B:1F.0"))
    devices = tmp_path / "sys" / "bus" / "pci" / "devices"
    devices.mkdir(parents=True)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(TOOLS), "pci", str(tmp_path / "sys")],
            env=fake_driver.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert run().returncode == 3  # none known to this "kernel": a fake driver
    (devices / "0000:18:00.0").mkdir()
    proc = run()
    assert proc.returncode == 1, proc.stdout + proc.stderr  # GPU 1's address is not there
    assert "NVRM: Xid (PCI:0000:18:00)" in proc.stdout
    assert "NVRM: Xid (PCI:0001:3b:1f)" in proc.stdout  # lower-case hex, no function
    (devices / "0001:3b:1f.0").mkdir()
    assert run().returncode == 0
