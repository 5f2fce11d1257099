"""The commands run most (``gputel status``, ``gputel hook``) parse their flags without pydantic.

typer coerces parameters through pydantic; ``gputel.cli.lazy_coercion`` keeps that for values
that need it. Start-up time itself is measured by ``benchmarks/bench_agent.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import sys
sys.argv = ["gputel", *sys.argv[1:]]
from gputel.cli.main import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = sorted(m for m in ("pydantic", "psutil", "rich") if m in sys.modules)
print("LOADED", ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUTEL_", "_GPUTEL_"))}
    env.update(
        GPUTEL_RUN_DIR=str(tmp_path / "run"),
        GPUTEL_LOG_DIR=str(tmp_path / "log"),
        GPUTEL_BACKEND="none",
    )
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def loaded(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("LOADED")]
    assert lines, result.stderr
    return lines[-1].removeprefix("LOADED").strip()


@pytest.mark.parametrize(
    "args",
    [
        ("status", "--json", "--backend", "none", "--sim-gpus", "3"),
        ("hook", "release", "job-1", "--quiet"),
        ("hook", "list", "--json"),
    ],
)
def test_fast_commands_do_not_import_pydantic_or_psutil(tmp_path: Path, args: tuple[str]) -> None:
    result = run(tmp_path, *args)
    assert loaded(result) in ("", "rich")  # rich only if something had to be printed richly
    assert "pydantic" not in loaded(result) and "psutil" not in loaded(result)


def test_typed_flags_are_still_checked(tmp_path: Path) -> None:
    bad = run(tmp_path, "hook", "allocate", "job-1", "--pid", "abc")
    assert bad.returncode == 2 and "--pid" in bad.stderr and "integer" in bad.stderr
    bad = run(tmp_path, "hook", "allocate", "job-1", "--wait", "soon")
    assert bad.returncode == 2
    bad = run(tmp_path, "status", "--sim-gpus", "abc")
    assert bad.returncode == 2 and "GPUTEL_SIM_GPUS" in bad.stderr
