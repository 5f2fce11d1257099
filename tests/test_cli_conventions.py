"""The rules every command follows (docs/cli.md, "Conventions"), checked for every command.

- ``--help`` lists only the settings flags the command reads, each option with the kind of value
  it takes (``SECONDS``, ``PATH``…), never a Python type name;
- a usage error is one line on stderr and exit 2;
- every time printed is ISO 8601 UTC with milliseconds (``replay`` here; ``status`` and
  ``start`` in their own tests);
- the analysis extra's install hint names a command that works where gputel was installed from.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer
from typer._click.core import Command
from typer.core import TyperGroup as Group
from typer.core import TyperOption as Option
from typer.testing import CliRunner

from gputel.analysis.duck import hint_from_direct_url
from gputel.cli.main import app, build_app
from gputel.settings import SETTINGS

SETTING_FLAGS = {s.flag for s in SETTINGS if s.flag}
ALL_SETTINGS = set(SETTING_FLAGS)
DECISIONS = {
    "--start-util",
    "--start-seconds",
    "--stop-util",
    "--stop-seconds",
    "--activity",
    "--event-capture-seconds",
    "--pretrigger-seconds",
    "--kmsg",
}
SNAPSHOT = {
    "--run-dir",
    "--backend",
    "--gpus",
    "--sysfs-root",
    "--proc-root",
    "--sim-gpus",
    "--sim-pattern",
    "--sim-events",
}
#: The settings flags each command takes: what it reads, nothing it would ignore.
EXPECTED_SETTINGS: dict[str, set[str]] = {
    "agent": ALL_SETTINGS,
    "record": ALL_SETTINGS - DECISIONS,
    "start": ALL_SETTINGS,  # it may start the agent, which then runs with them
    "stop": {"--run-dir"},
    "auto": {"--run-dir"},
    "status": SNAPSHOT,
    "hook allocate": ALL_SETTINGS - {"--gpus"},  # --gpus is the allocation's own
    "hook release": {"--run-dir"},
    "hook list": {"--run-dir"},
    "demo": set(),
    "report": {"--log-dir"},
    "replay": {"--log-dir"}
    | (DECISIONS - {"--event-capture-seconds", "--pretrigger-seconds", "--kmsg"}),
    "plot": {"--log-dir"},
    "job": {"--log-dir"},
    "export": set(),
}
#: Options that are the command's own, not the setting of the same flag name.
OWN_OPTIONS = {("hook allocate", "--gpus"), ("status", "--interval"), ("demo", "--interval")}


def commands() -> dict[str, Command]:
    """Every runnable command by its words (``hook allocate``), from the full app."""
    from typer.main import get_command

    out: dict[str, Command] = {}

    def walk(cmd: Command, words: tuple[str, ...]) -> None:
        if isinstance(cmd, Group):
            for name, sub in cmd.commands.items():
                walk(sub, (*words, name))
        else:
            out[" ".join(words)] = cmd

    walk(get_command(app), ())
    return out


COMMANDS = sorted(commands())


def test_every_command_is_covered() -> None:
    assert set(COMMANDS) == set(EXPECTED_SETTINGS)


def run(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("words", COMMANDS)
def test_help_lists_value_kinds_and_only_the_settings_used(words: str) -> None:
    result = run(*words.split(), "--help")
    assert result.exit_code == 0, result.output
    text = result.stdout
    # No Python type in the help: <str>, <bool>, <list[Path]>, <int>, <float>, <path>...
    types = r"str|bool|int|float|path|Path|file|datetime|UUID|list\[[^>]*\]|tuple\[[^>]*\]"
    assert not re.search(rf"<(?:{types})>", text), text
    assert not re.search(r"\b(str|bool|int|float|list\[|Path)\b\]?", _option_lines(text)), text
    flags = set(re.findall(r"(--[a-z][a-z-]+)", _option_lines(text)))
    shown = {f for f in flags & SETTING_FLAGS if (words, f) not in OWN_OPTIONS}
    assert shown == EXPECTED_SETTINGS.get(words, shown), (words, sorted(shown))


def _option_lines(text: str) -> str:
    """The option and argument names with their value kinds (the left column of the help)."""
    return "\n".join(
        line.split("  ", 2)[1] if line.startswith("  ") and len(line.split("  ", 2)) > 1 else ""
        for line in text.splitlines()
    )


@pytest.mark.parametrize("spec", [s for s in SETTINGS if s.flag], ids=lambda s: s.flag)
def test_every_setting_names_its_value_kind(spec: Any) -> None:
    """A new setting's parser gets its kind in ``settings._KINDS`` (``--kmsg PATH``)."""
    assert spec.metavar != "VALUE" and spec.metavar.isupper()


@pytest.mark.parametrize("words", COMMANDS)
def test_every_option_names_its_value_kind(words: str) -> None:
    """Checked on the parameters themselves, so a new option cannot slip a type name in."""
    from typer._click.core import Context

    cmd = commands()[words]
    ctx = Context(cmd)
    for param in cmd.params:
        if isinstance(param, Option) and (param.is_flag or param.hidden):
            continue
        shown = param.display_type_rich(ctx) if isinstance(param, Option) else param.metavar
        assert shown and re.fullmatch(r"[A-Z][A-Z_.]*", shown), (words, param.name, shown)


@pytest.mark.parametrize(
    ("label", "kind"),
    [
        ("<str>", "TEXT"),
        ("<int>", "N"),
        ("<float>", "NUMBER"),
        ("<path>", "PATH"),
        ("<list[Path]>", "PATH"),
        ("<bytes>", "VALUE"),
        (None, None),
    ],
)
def test_an_option_without_a_kind_gets_one_from_its_type(label: str | None, kind: str) -> None:
    from gputel.cli.value_kinds import kind_of

    assert kind_of(label) == kind


def test_a_new_option_without_a_metavar_shows_a_kind() -> None:
    extra = build_app(("status_cmd",))

    @extra.command("probe")
    def probe(
        count: Annotated[int, typer.Option("--count")] = 1,
        where: Annotated[Path, typer.Option("--where")] = Path("."),
    ) -> None:
        """A command as a future module might write it."""

    result = CliRunner().invoke(extra, ["probe", "--help"])
    assert "--count N" in result.stdout and "--where PATH" in result.stdout
    assert "<" not in result.stdout


@pytest.mark.parametrize("words", COMMANDS)
def test_an_unknown_option_is_one_line_and_exit_2(words: str) -> None:
    result = run(*words.split(), "--no-such-option")
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gputel: "), result.stderr
    assert "--no-such-option" in lines[0] and f"gputel {words} --help" in lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ["no-such-command"],
        ["hook", "allocate"],  # missing argument
        ["hook", "allocate", "job-1", "--pid", "abc"],  # not a number
        ["hook", "allocate", "job-1", "--pid"],  # option without its value
        ["start", "--for", "1e2"],  # an exponent is not a duration
        ["start", "--interval", "1h30"],  # nor is a bare number after a unit
        ["stop", "--interval", "1"],  # a setting stop does not read
        ["status", "--interval", "2"],  # the refresh of --watch, without --watch
        ["status", "--watch", "--interval", "1e2"],
        ["report", "--idle-util", "many"],
        ["demo", "--seconds", "1"],  # out of range
        ["export", "somewhere"],  # a required option missing
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str]) -> None:
    result = run(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gputel: "), result.stderr
    assert "Traceback" not in result.output and "╭" not in result.stderr


def test_the_real_entry_point_prints_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gputel", "hook", "release"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "GPUTEL_RUN_DIR": str(tmp_path)},
    )
    assert done.returncode == 2
    assert done.stderr == "gputel: Missing argument 'ID'. (see gputel hook release --help)\n"


def test_bad_setting_value_names_the_flag() -> None:
    result = run("start", "--interval", "1e2")
    assert result.exit_code == 2
    assert result.stderr.startswith("gputel: invalid --interval (GPUTEL_INTERVAL)='1e2'")
    assert len(result.stderr.splitlines()) == 1


def test_help_without_a_command_is_the_overview() -> None:
    result = run("--help")
    assert result.exit_code == 0
    assert "status" in result.stdout and "<" not in result.stdout


def test_status_help_does_not_load_rich() -> None:
    """Help is click's plain text: ``--help`` stays as fast as the command."""
    probe = (
        "import sys; sys.argv=['gputel','status','--help']\n"
        "from gputel.cli.main import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('rich' in sys.modules, file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert done.stderr.strip().splitlines()[-1] == "False", done.stderr


def test_build_app_twice_is_harmless() -> None:
    build_app(("status_cmd",))
    result = CliRunner().invoke(build_app(("status_cmd",)), ["status", "--help"])
    assert result.exit_code == 0 and "--watch" in result.stdout


# ---------------------------------------------------------------------------------- times
ISO_MS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.mark.parametrize(
    ("moment", "shown"),
    [
        ("2026-12-07T03:10:25.309Z", "2026-12-07T03:10:25.309Z"),
        ("2026-12-07T05:10:25.3+02:00", "2026-12-07T03:10:25.300Z"),
        ("2026-12-07T03:10Z", "2026-12-07T03:10:00.000Z"),
        (1796613025.309, "2026-12-07T03:10:25.309Z"),
        ("soon", "soon"),  # not a time: shown as it is
        (None, None),
        ("", None),
    ],
)
def test_display_time_is_the_one_form(moment: Any, shown: str | None) -> None:
    from gputel.formats import display_time

    assert display_time(moment) == shown


def test_replay_prints_iso_times_with_milliseconds(tmp_path: Path) -> None:
    pytest.importorskip("duckdb")
    from test_analysis import T0, pattern, write_gpu_csv

    write_gpu_csv(tmp_path / "gpu-20261122T100000Z-n.csv", T0, 60, pattern)
    args = ["replay", str(tmp_path), "--start-seconds", "2", "--stop-seconds", "5"]
    text = run(*args)
    assert text.exit_code == 0, text.output
    moves = [line for line in text.stdout.splitlines() if "→" in line]
    assert moves and all(re.match(rf"{ISO_MS}  ", line) for line in moves), text.stdout
    assert "000Z" in text.stdout and "000000Z" not in text.stdout
    data = json.loads(run(*args, "--json").stdout)
    stamps = [t["at"] for t in data["transitions"]]
    stamps += [s[k] for s in data["telemetry_spans"] for k in ("start", "end")]
    assert stamps and all(re.fullmatch(ISO_MS, s) for s in stamps), stamps


# ---------------------------------------------------------------------------------- install hint
@pytest.mark.parametrize(
    ("direct_url", "expected"),
    [
        (None, "'gputel[analysis]'"),  # from an index
        (
            '{"url": "file:///src/gputel", "dir_info": {"editable": true}}',
            "-e '/src/gputel[analysis]'",
        ),
        ('{"url": "file:///src/my%20gputel", "dir_info": {}}', "'/src/my gputel[analysis]'"),
        (
            '{"url": "https://example.org/gputel-0.1.tar.gz", "archive_info": {}}',
            "'gputel[analysis]'",
        ),
        ("not json", "'gputel[analysis]'"),
    ],
)
def test_install_hint_fits_where_gputel_came_from(direct_url: str | None, expected: str) -> None:
    hint = hint_from_direct_url(direct_url)
    assert hint == f"{sys.executable} -m pip install {expected}"


def test_install_hint_of_this_checkout_installs(tmp_path: Path) -> None:
    """The hint for this very installation names this checkout: pip accepts it as it is."""
    from gputel.analysis.duck import install_hint

    hint = install_hint()
    root = Path(__file__).resolve().parents[1]
    assert f"{root}[analysis]" in hint or "'gputel[analysis]'" in hint
