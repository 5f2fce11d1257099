"""The suite's own check that nothing it started is left running (tests/leftovers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

TESTS = Path(__file__).resolve().parent

LEAKY = """
import subprocess, sys

def test_leaves_a_process_behind():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    open("leaked.pid", "w").write(str(p.pid))
"""

TIDY = """
import subprocess, sys

def test_waits_for_its_process():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
"""


def run_pytest(tmp_path: Path, body: str, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(body)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_GPUTEL_SESSION"}
    env["PYTHONPATH"] = str(TESTS)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "leftovers",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-c",
            os.devnull,
            *extra,
            "test_inner.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_process_left_running_fails_the_run_and_is_killed(tmp_path: Path) -> None:
    proc = run_pytest(tmp_path, LEAKY, "-n", "0")
    assert proc.returncode != 0, proc.stdout
    assert "outlived them" in proc.stdout
    pid = int((tmp_path / "leaked.pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_tidy_run_passes(tmp_path: Path) -> None:
    proc = run_pytest(tmp_path, TIDY, "-n", "0")
    assert proc.returncode == 0, proc.stdout


def test_each_xdist_worker_checks_its_own(tmp_path: Path) -> None:
    proc = run_pytest(tmp_path, LEAKY, "-n", "2")
    assert proc.returncode != 0, proc.stdout
    assert "outlived them" in proc.stdout
