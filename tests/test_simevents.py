"""GPUTEL_SIM_EVENTS: the grammar, the delivery schedule, and the setting's exit-2 errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gputel.settings import SettingsError, load_settings
from gputel.sources.simevents import (
    SimEvent,
    SimEventSchedule,
    SimEventsError,
    parse_sim_events,
)


def test_parses_the_documented_example() -> None:
    assert parse_sim_events("0:79@12,1:48@30") == (SimEvent(0, 79, 12.0), SimEvent(1, 48, 30.0))


def test_fractions_spaces_and_repeats() -> None:
    assert parse_sim_events(" 0:79@0.5 , 0:79@0.5,1:13@.25 ") == (
        SimEvent(0, 79, 0.5),
        SimEvent(0, 79, 0.5),
        SimEvent(1, 13, 0.25),
    )


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_means_no_events(text: str) -> None:
    assert parse_sim_events(text) == ()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("0:79", "'0:79'"),
        ("0@12", "'0@12'"),
        ("79@12", "'79@12'"),
        ("0:79@12,,1:48@3", "entry 2"),
        ("0:79@12,", "entry 2"),
        ("x:79@1", "'x:79@1'"),
        ("-1:79@1", "'-1:79@1'"),
        ("1024:79@1", "'1024:79@1'"),
        ("0:xid@1", "'0:xid@1'"),
        ("0:0@1", "'0:0@1'"),
        ("0:79.5@1", "'0:79.5@1'"),
        ("0:79@soon", "'0:79@soon'"),
        ("0:79@-1", "'0:79@-1'"),
        ("0:79@nan", "'0:79@nan'"),
        ("0:79@inf", "'0:79@inf'"),
        ("0:79@1@2", "'0:79@1@2'"),
        ("0:７9@1", "'0:７9@1'"),
    ],
)
def test_bad_entries_are_named(text: str, named: str) -> None:
    with pytest.raises(SimEventsError) as err:
        parse_sim_events(text)
    message = str(err.value)
    assert named in message
    assert "\n" not in message


def test_gpu_count_bounds_the_gpu_index() -> None:
    assert parse_sim_events("1:79@1", gpu_count=2) == (SimEvent(1, 79, 1.0),)
    with pytest.raises(SimEventsError, match=r"'2:79@1' names GPU 2.*GPUs 0-1"):
        parse_sim_events("0:48@3,2:79@1", gpu_count=2)


def test_schedule_delivers_each_event_once_in_time_order() -> None:
    schedule = SimEventSchedule(parse_sim_events("1:48@30,0:79@12,0:79@12,0:13@0"))
    assert schedule.next_at() == 0.0
    assert schedule.due(0.0) == [SimEvent(0, 13, 0.0)]
    assert schedule.due(0.0) == []
    assert schedule.due(11.999) == []
    assert schedule.next_at() == 12.0
    assert schedule.due(12.0) == [SimEvent(0, 79, 12.0), SimEvent(0, 79, 12.0)]
    assert schedule.due(29.0) == []
    assert schedule.due(1e9) == [SimEvent(1, 48, 30.0)]
    assert schedule.next_at() is None
    assert schedule.due(2e9) == []


def test_schedule_catches_up_after_a_jump() -> None:
    schedule = SimEventSchedule(parse_sim_events("0:79@1,0:48@2,0:94@3"))
    assert [e.xid for e in schedule.due(10)] == [79, 48, 94]


def test_schedule_keeps_only_selected_gpus() -> None:
    schedule = SimEventSchedule(parse_sim_events("0:79@1,1:48@2,2:94@3"), selected=(1, 2))
    assert [e.gpu for e in schedule.due(5)] == [1, 2]
    assert SimEventSchedule(parse_sim_events("0:79@1"), selected=()).due(5) == []


def test_setting_defaults_to_no_events_and_keeps_the_text() -> None:
    assert load_settings({}).sim_events == ""
    settings = load_settings({"GPUTEL_SIM_EVENTS": " 0:79@12,1:48@30 "})
    assert settings.sim_events == "0:79@12,1:48@30"
    assert load_settings(settings.to_env()) == settings


def test_setting_checks_gpus_against_sim_gpus_only_for_the_sim_backend() -> None:
    env = {"GPUTEL_SIM_EVENTS": "0:79@1,3:48@2", "GPUTEL_SIM_GPUS": "2"}
    with pytest.raises(SettingsError, match=r"GPUTEL_SIM_EVENTS.*'3:48@2'"):
        load_settings({**env, "GPUTEL_BACKEND": "sim"})
    assert load_settings({**env, "GPUTEL_BACKEND": "sim", "GPUTEL_SIM_GPUS": "4"})
    assert load_settings({**env, "GPUTEL_BACKEND": "none"}).sim_events == "0:79@1,3:48@2"


def test_event_capture_setting() -> None:
    assert load_settings({}).event_capture_s == 300.0
    assert load_settings({"GPUTEL_EVENT_CAPTURE_SECONDS": "0"}).event_capture_s == 0.0
    assert load_settings({"GPUTEL_EVENT_CAPTURE_SECONDS": "2m"}).event_capture_s == 120.0
    assert load_settings({"GPUTEL_EVENT_CAPTURE_SECONDS": "0.5"}).event_capture_s == 0.5
    for bad in ("-1", "soon", "8d"):
        with pytest.raises(SettingsError, match="GPUTEL_EVENT_CAPTURE_SECONDS"):
            load_settings({"GPUTEL_EVENT_CAPTURE_SECONDS": bad})


@pytest.mark.parametrize(
    ("value", "named"),
    [("0:79@12,1:48", "'1:48'"), ("0:79@12,5:48@3", "'5:48@3'")],
)
def test_agent_exits_2_naming_the_bad_entry_and_touches_nothing(
    tmp_path: Path, value: str, named: str
) -> None:
    env = {
        **os.environ,
        "GPUTEL_BACKEND": "sim",
        "GPUTEL_SIM_GPUS": "2",
        "GPUTEL_SIM_EVENTS": value,
        "GPUTEL_LOG_DIR": str(tmp_path / "log"),
        "GPUTEL_RUN_DIR": str(tmp_path / "run"),
        "GPUTEL_EXPORTER_PORT": "0",
    }
    res = subprocess.run(
        [sys.executable, "-m", "gputel", "agent"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "GPUTEL_SIM_EVENTS" in lines[0] and named in lines[0]
    assert list(tmp_path.iterdir()) == []
