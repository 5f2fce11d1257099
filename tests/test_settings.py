"""Settings: defaults, environment, flags, and a one-line error naming the setting for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gputel.settings import (
    DEFAULTS,
    SETTINGS,
    Settings,
    SettingsError,
    autostart_enabled,
    load_settings,
    parse_duration,
    threshold_problem,
)
from gputel.supervisor.states import Thresholds


def test_defaults_match_contract() -> None:
    s = load_settings({})
    assert s.backend == "auto"
    assert s.interval_s == 1.0
    assert (s.start_util_pct, s.start_seconds) == (20.0, 5.0)
    assert (s.stop_util_pct, s.stop_seconds) == (10.0, 15.0)
    assert s.gpus is None
    assert s.log_dir == Path("/var/log/gputel")
    assert (s.exporter_addr, s.exporter_port) == ("0.0.0.0", 9118)
    assert s.sysfs_root == Path("/sys")
    assert (s.sim_gpus, s.sim_pattern) == (2, "0:5,80:20,0:30")


def test_every_default_text_parses_to_the_dataclass_default() -> None:
    s = Settings()
    for spec in SETTINGS:
        if spec.scope != "agent" or spec.attr == "run_dir":
            continue
        assert spec.parse(spec.default) == getattr(s, spec.attr), spec.env


def test_environment_and_flags() -> None:
    env = {"GPUTEL_INTERVAL": "0.25", "GPUTEL_GPUS": "1, 0", "GPUTEL_BACKEND": "SIM"}
    s = load_settings(env, {"interval_s": "2s", "stop_seconds": "1m"})
    assert s.interval_s == 2.0
    assert s.stop_seconds == 60.0
    assert s.gpus == (1, 0)
    assert s.backend == "sim"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5", 5.0),
        ("0.5", 0.5),
        (".5", 0.5),
        (" 7 ", 7.0),
        ("250ms", 0.25),
        ("500ms", 0.5),
        ("1.5s", 1.5),
        ("90s", 90.0),
        ("15m", 900.0),
        ("15min", 900.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("2m30s", 150.0),
        ("1m30.5s", 90.5),
        ("1s500ms", 1.5),
        ("1d12h", 129600.0),
        ("1h0m5s", 3605.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "1e2",  # an exponent is a typo more often than a meaning
        "1E2",
        "5e-1s",
        "-5",
        "+5",
        "inf",
        "nan",
        "",
        "s",
        "1.",
        "1,5s",
        "0x10",
        "1h30",  # a bare number after a unit: 30 what?
        "30m1h",  # largest unit first
        "1m1m",  # each unit once
        "1m30min",  # m and min are the same unit
        "1 h",
        "1h 30m",
        "5 parsecs",
        "1mins",
        "9" * 400,  # not finite
    ],
)
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_bad_duration_setting_is_named() -> None:
    with pytest.raises(SettingsError, match="GPUTEL_INTERVAL") as info:
        load_settings({"GPUTEL_INTERVAL": "1e2"})
    assert "1h30m" in str(info.value)  # the message shows the grammar by example
    assert load_settings({"GPUTEL_STOP_SECONDS": "1m30s"}).stop_seconds == 90.0


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"GPUTEL_BACKEND": "cuda"}, "GPUTEL_BACKEND"),
        ({"GPUTEL_INTERVAL": "0"}, "GPUTEL_INTERVAL"),
        ({"GPUTEL_INTERVAL": "-1"}, "GPUTEL_INTERVAL"),
        ({"GPUTEL_INTERVAL": "fast"}, "GPUTEL_INTERVAL"),
        ({"GPUTEL_START_UTIL": "101"}, "GPUTEL_START_UTIL"),
        ({"GPUTEL_START_UTIL": "nan"}, "GPUTEL_START_UTIL"),
        ({"GPUTEL_START_SECONDS": "soon"}, "GPUTEL_START_SECONDS"),
        ({"GPUTEL_STOP_UTIL": "-5"}, "GPUTEL_STOP_UTIL"),
        ({"GPUTEL_STOP_UTIL": "50"}, "GPUTEL_STOP_UTIL"),
        ({"GPUTEL_GPUS": "0,x"}, "GPUTEL_GPUS"),
        ({"GPUTEL_GPUS": "0,0"}, "GPUTEL_GPUS"),
        ({"GPUTEL_GPUS": "-1"}, "GPUTEL_GPUS"),
        ({"GPUTEL_EXPORTER_ADDR": "not-an-ip"}, "GPUTEL_EXPORTER_ADDR"),
        ({"GPUTEL_EXPORTER_PORT": "70000"}, "GPUTEL_EXPORTER_PORT"),
        ({"GPUTEL_EXPORTER_PORT": "http"}, "GPUTEL_EXPORTER_PORT"),
        ({"GPUTEL_SIM_GPUS": "0"}, "GPUTEL_SIM_GPUS"),
        ({"GPUTEL_SIM_PATTERN": "0:5,eighty:20"}, "GPUTEL_SIM_PATTERN"),
        ({"GPUTEL_SIM_PATTERN": "0:5,80"}, "GPUTEL_SIM_PATTERN"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    message = str(info.value)
    assert name in message
    assert "\n" not in message


def test_bad_pattern_names_the_segment() -> None:
    with pytest.raises(SettingsError, match=r"'eighty:20'"):
        load_settings({"GPUTEL_SIM_PATTERN": "0:5,eighty:20,0:30"})


def test_flag_error_names_flag_and_env() -> None:
    with pytest.raises(SettingsError, match=r"--interval \(GPUTEL_INTERVAL\)"):
        load_settings({}, {"interval_s": "zero"})


def test_to_env_round_trips() -> None:
    s = load_settings({"GPUTEL_GPUS": "2,3", "GPUTEL_INTERVAL": "0.2", "GPUTEL_BACKEND": "sim"})
    assert load_settings(s.to_env()) == s


def test_run_dir_default_when_root_or_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = load_settings({"XDG_RUNTIME_DIR": str(tmp_path)})
    if os.geteuid() == 0:
        assert s.run_dir == Path("/run/gputel")
    else:
        assert s.run_dir == tmp_path / "gputel"


@pytest.mark.parametrize("word", ["1", "true", "TRUE", "Yes", "on"])
def test_autostart_true_words(word: str) -> None:
    assert autostart_enabled({"GPU_TELEMETRY_AUTOSTART": word})


@pytest.mark.parametrize("word", ["", "0", "false", "off", "maybe"])
def test_autostart_other_words(word: str) -> None:
    assert not autostart_enabled({"GPU_TELEMETRY_AUTOSTART": word})


def test_cli_bad_setting_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "GPUTEL_INTERVAL": "abc", "GPUTEL_RUN_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "gputel", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "GPUTEL_INTERVAL" in lines[0]
    assert "Traceback" not in proc.stderr


def test_interval_below_the_floor_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"at least 0\.01"):
        load_settings({"GPUTEL_INTERVAL": "0.001"})


def test_help_shows_environment_names() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gputel", "agent", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0
    assert "env GPUTEL_INTERVAL, default 1" in " ".join(proc.stdout.split())


@pytest.mark.parametrize("command", ["status", "agent", "record"])
def test_missing_gpu_index_is_a_bad_setting(command: str, tmp_path: Path) -> None:
    """GPUTEL_GPUS naming a GPU the node lacks exits 2 (the unit does not restart on 2)."""
    env = {
        **os.environ,
        "GPUTEL_BACKEND": "sim",
        "GPUTEL_SIM_GPUS": "2",
        "GPUTEL_GPUS": "5",
        "GPUTEL_RUN_DIR": str(tmp_path / "run"),
        "GPUTEL_LOG_DIR": str(tmp_path / "log"),
        "GPUTEL_EXPORTER_PORT": "0",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "gputel", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert "GPUTEL_GPUS" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_non_root_finds_the_system_agent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With the service's socket present, a non-root caller talks to it, not to a private agent."""
    import socket as socketlib

    from gputel import settings as settings_module

    system = tmp_path / "run-gputel"
    system.mkdir()
    monkeypatch.setattr(settings_module, "SYSTEM_RUN_DIR", system)
    monkeypatch.setattr(settings_module.os, "geteuid", lambda: 1000)
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    assert settings_module.default_run_dir(env) == tmp_path / "gputel"
    sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    try:
        sock.bind(str(system / "control.sock"))
        assert settings_module.default_run_dir(env) == system
    finally:
        sock.close()
    (system / "control.sock").unlink()
    (system / "control.sock").write_text("not a socket")
    assert settings_module.default_run_dir(env) == tmp_path / "gputel"

    class Closed(type(system)):  # type: ignore[misc]
        """The service's 0750 directory seen by someone outside group gputel."""

        def lstat(self) -> os.stat_result:  # type: ignore[override]
            raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(settings_module, "SYSTEM_RUN_DIR", Closed(system))
    assert settings_module.default_run_dir(env) == system


def test_every_command_word_registers_its_command() -> None:
    from typer.main import get_command

    from gputel.cli.main import ALL_MODULES, COMMAND_MODULES, build_app, modules_for

    for word, module in COMMAND_MODULES.items():
        assert modules_for([word]) == (module,)
        group = get_command(build_app(modules_for([word, "--json"])))
        assert word in group.commands, word  # type: ignore[attr-defined]
    full = get_command(build_app())
    assert set(full.commands) == set(COMMAND_MODULES)  # type: ignore[attr-defined]
    assert modules_for(["--help", "status"]) == ALL_MODULES
    assert modules_for(["--version"]) == ALL_MODULES
    assert modules_for(["bogus"]) == ALL_MODULES


def test_agent_command_imports_neither_rich_nor_analysis() -> None:
    code = (
        "import sys\n"
        "from gputel.cli.main import build_app, modules_for\n"
        "build_app(modules_for(['agent']))\n"
        "bad = [m for m in ('rich', 'gputel.analysis.report', 'gputel.hooks', 'gputel.cli.demo') "
        "if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_defaults_have_one_home_the_table() -> None:
    plain = Settings()
    for spec in SETTINGS:
        if spec.scope == "agent" and spec.default:
            assert getattr(plain, spec.attr) == spec.parse(spec.default) == DEFAULTS[spec.attr]
    assert Thresholds() == Thresholds.of(plain) == Thresholds.of(load_settings({}))


def test_threshold_rule_is_the_same_for_settings_and_the_state_machine() -> None:
    assert threshold_problem(20, 5, 10, 15) is None
    assert threshold_problem(20, 5, 20, 15) is None  # equal is allowed
    attr, why = threshold_problem(10, 5, 20, 15) or ("", "")
    assert attr == "stop_util_pct" and "GPUTEL_START_UTIL (10)" in why
    with pytest.raises(SettingsError, match="GPUTEL_STOP_UTIL"):
        load_settings({"GPUTEL_START_UTIL": "10", "GPUTEL_STOP_UTIL": "20"})
    with pytest.raises(ValueError, match="stop_util_pct must not exceed"):
        Thresholds(start_util_pct=10, stop_util_pct=20)
    with pytest.raises(ValueError, match="stop_seconds must be >= 0"):
        Thresholds(stop_seconds=-1)
