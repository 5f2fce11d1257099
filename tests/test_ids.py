"""Allocation ids a spreadsheet or pandas would misread: one rule for the socket, CLI and hooks.

A leading ``=``, ``+``, ``-`` or ``@`` (and tab/CR) makes Excel and LibreOffice evaluate a CSV
cell as a formula, so such ids are refused wherever an id enters gputel. Ids pandas would turn
into NaN or numbers (``NA``, ``null``, ``0042``) stay valid: ``docs/csv.md``'s example reads
them as strings, and a test runs that very example.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gputel import hooks
from gputel.control.allocations import AllocationError, validate_id
from gputel.control.client import request
from gputel.schema import GPU_CSV_COLUMNS
from test_hooks import GPUTEL, env_for, running_agent

FORMULA_IDS = ["=1+1", "+41", "-2-3", "@SUM(A1)", "-", "@", "\tjob", "\rjob", "=cmd|x"]
TRICKY_IDS = ["NA", "null", "nan", "None", "0042", "1e3", "True"]
DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("ident", FORMULA_IDS)
def test_formula_ids_refused_by_the_rule(ident: str) -> None:
    with pytest.raises(AllocationError, match="formula"):
        validate_id(ident)


@pytest.mark.parametrize("ident", [*TRICKY_IDS, "a-", "job@node", "x-1", "0"])
def test_ids_that_are_only_odd_for_pandas_are_valid(ident: str) -> None:
    assert validate_id(ident) == ident


@pytest.fixture
def agent_run(tmp_path: Path) -> Iterator[Path]:
    with running_agent(tmp_path) as run:
        yield run


def test_formula_ids_refused_by_socket_cli_and_hooks(
    tmp_path: Path, agent_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPU_TELEMETRY_AUTOSTART", "1")
    for name, value in env_for(tmp_path).items():
        if name.startswith("GPUTEL_"):
            monkeypatch.setenv(name, value)
    for ident in FORMULA_IDS:
        # The socket, straight to the agent: the hook client's own check is not in the way.
        reply = request(agent_run, {"op": "allocate", "id": ident, "gpus": None, "pid": None})
        assert reply["ok"] is False and "formula" in reply["error"], reply
        # The CLI ("--" so that a leading "-" reaches the id rule rather than option parsing).
        out = subprocess.run(
            [GPUTEL, "hook", "allocate", "--", ident],
            env=env_for(tmp_path),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 2, (ident, out)
        assert len(out.stderr.strip().splitlines()) == 1 and "formula" in out.stderr, out.stderr
        # The Python hook API.
        result = hooks.allocation_created(ident, gpus=[0])
        assert not result.ok and result.action == "failed" and "formula" in result.detail
        assert not hooks.allocation_released(ident).ok
    listed = request(agent_run, {"op": "list"})
    assert listed["ok"] and listed["allocations"] == []


def _docs_pandas_example() -> str:
    text = (DOCS / "csv.md").read_text()
    section = text.split("## Loading in pandas", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "docs/csv.md has no pandas example"
    return match.group(1)


def test_docs_pandas_example_keeps_tricky_ids(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    # Two GPUs, one tricky id per row on GPU 0, GPU 1 idle (empty cell).
    lines = [",".join(GPU_CSV_COLUMNS)]
    for i, ident in enumerate(TRICKY_IDS):
        for gpu, alloc in ((0, ident), (1, "")):
            row = dict.fromkeys(GPU_CSV_COLUMNS, "")
            row.update(
                timestamp=f"2026-01-01T00:00:{i:02d}.000Z",
                gpu=str(gpu),
                uuid=f"GPU-{gpu}",
                utilization_gpu_pct="50",
                temperature_c="40",
                memory_used_mib="100",
                power_w="100",
                energy_j=str(100.0 * i),
                allocations=alloc,
            )
            lines.append(",".join(row[c] for c in GPU_CSV_COLUMNS))
    (log_dir / "gpu-20260101T000000Z-node.csv").write_text("\n".join(lines) + "\n")
    host_cols = ["timestamp", "cpu_util_pct"]
    (log_dir / "host-20260101T000000Z-node.csv").write_text(
        ",".join(host_cols) + "\n2026-01-01T00:00:00.000Z,5\n"
    )
    code = _docs_pandas_example().replace("/var/log/gputel", str(log_dir))
    code = code.replace('"job-42"', "wanted")
    scope: dict[str, object] = {"wanted": None}
    for ident in TRICKY_IDS:
        scope["wanted"] = ident
        exec(compile(code, "docs/csv.md", "exec"), scope)
        job = scope["job"]
        assert isinstance(job, pd.DataFrame)
        assert list(job["allocations"]) == [ident], ident
        assert list(job["gpu"]) == [0]
    gpu = scope["gpu"]
    assert isinstance(gpu, pd.DataFrame)
    assert gpu["allocations"].fillna("").tolist() == [x for i in TRICKY_IDS for x in (i, "")]
    assert gpu["power_w"].dtype.kind in "if"  # numeric columns stay numeric
