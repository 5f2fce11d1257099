"""The docs say what the code does: the README's configuration table lists every setting."""

from __future__ import annotations

from pathlib import Path

from gputel.settings import SETTINGS

ROOT = Path(__file__).resolve().parent.parent


def test_readme_configuration_table_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("###", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    names = [row.split("`")[1] for row in rows]
    assert names == [spec.env for spec in SETTINGS]
    for row, spec in zip(rows, SETTINGS, strict=True):
        if spec.flag:
            assert f"`{spec.flag}`" in row, spec.env


def test_readme_quick_start_commands_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "gputel demo" in quick
    assert "./scripts/test.sh" in quick
    # The demo's part ends at the command about the job the demo opened.
    from gputel.cli.demo import DEMO_JOB

    demo_part = quick.split("./scripts/test.sh", 1)[0]
    assert demo_part.index("gputel demo") < demo_part.index(f"gputel job {DEMO_JOB}")
    assert (ROOT / "scripts" / "test.sh").stat().st_mode & 0o111
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./scripts/test.sh" in ci
