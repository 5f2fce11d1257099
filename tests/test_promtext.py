"""The one Prometheus text writer: escaping, values, one HELP per family, and the agent's
exposition joined with the recorder's by plain concatenation (promtool-clean)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.utils import floatToGoString

from gputel.supervisor.agent_metrics import (
    AGENT_FAMILIES,
    AgentSnapshot,
    join_exposition,
    render_agent,
)
from gputel.telemetry import promtext
from gputel.telemetry.exposition import ALL_FAMILIES
from gputel.telemetry.promtext import Family, escape_help, escape_label, format_value, label_block
from test_exposition import render_fixed


def test_escaping() -> None:
    assert escape_label('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    assert escape_help('a\\b"c\nd') == 'a\\\\b"c\\nd'  # quotes stay in HELP
    assert label_block({}) == ""
    assert label_block({"z": "1", "a": 'x"y'}) == '{a="x\\"y",z="1"}'


@pytest.mark.parametrize(
    "value",
    [
        0.0,
        -0.0,
        1.0,
        0.1,
        1.5e-7,
        123456.0,
        1234567.0,
        1764400000.123,
        76114034688.0,
        2.0**70,
        -3e9,
        42,
    ],
)
def test_values_are_written_as_prometheus_client_writes_them(value: float) -> None:
    assert format_value(value) == floatToGoString(value)


def test_special_values() -> None:
    assert format_value(float("nan")) == "NaN"
    assert format_value(float("inf")) == "+Inf"
    assert format_value(float("-inf")) == "-Inf"


def test_family_rules() -> None:
    fam = Family("x_total", "counter", "Things.\nMore.")
    assert fam.base == "x"
    assert fam.render([({"k": "v"}, 2), ({}, 0.5)]) == (
        '# HELP x_total Things.\\nMore.\n# TYPE x_total counter\nx_total{k="v"} 2.0\nx_total 0.5\n'
    )
    with pytest.raises(ValueError):
        Family("x", "counter", "a counter without _total")
    with pytest.raises(ValueError):
        Family("x_total", "gauge", "a gauge named like a counter")
    with pytest.raises(ValueError):
        Family("x", "histogramm", "unknown type")


def test_agent_and_recorder_families_never_overlap() -> None:
    agent = {f.name for f in AGENT_FAMILIES}
    recorder = {f.name for f in ALL_FAMILIES}
    assert agent and recorder and not agent & recorder
    assert promtext.TELEMETRY_ACTIVE in AGENT_FAMILIES


def snapshot() -> AgentSnapshot:
    return AgentSnapshot(
        version='1.0 "dev"\\x',
        backend="sim",
        start_time_s=1764400000.5,
        state="active",
        mode="on",
        telemetry_active=True,
        child_up=True,
        allocations_open=2,
        poll_duration_s=0.002,
        transitions={"active": 3},
        restarts={"crash": 1},
    )


def test_joined_exposition_has_one_help_and_type_per_family(tmp_path: Path) -> None:
    text = join_exposition(render_agent(snapshot()), render_fixed(tmp_path)).decode()
    helps = re.findall(r"^# HELP (\S+) ", text, flags=re.M)
    types = re.findall(r"^# TYPE (\S+) ", text, flags=re.M)
    assert len(helps) == len(set(helps)) == len(types) == len(set(types))
    assert "gputel_telemetry_active" in helps and "gputel_gpu_power_watts" in helps
    assert 'gputel_agent_info{backend="sim",version="1.0 \\"dev\\"\\\\x"} 1.0' in text
    assert join_exposition(b"a 1\n", None) == b"a 1\n"
    assert join_exposition(b"a 1\n", b"b 2") == b"a 1\nb 2\n"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_joined_exposition_is_promtool_clean(tmp_path: Path) -> None:
    data = join_exposition(render_agent(snapshot()), render_fixed(tmp_path))
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=data, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout + result.stderr == b""  # no lint warnings either
