"""The GPUTEL_SIM_PATTERN grammar: what it accepts, and that every mistake names its segment."""

from __future__ import annotations

import math

import pytest

from gputel.sources.simpattern import (
    PatternError,
    Segment,
    parse_pattern,
    parse_timeline,
    timeline_for_gpu,
)


def test_segments_in_order() -> None:
    (timeline,) = parse_pattern("0:5,80:20,0:30")
    assert timeline.segments == (Segment(0.0, 5.0), Segment(80.0, 20.0), Segment(0.0, 30.0))


def test_util_at_follows_the_segments_and_the_last_holds() -> None:
    (timeline,) = parse_pattern("0:5,80:20,10:30")
    assert timeline.util_at(0.0) == 0.0
    assert timeline.util_at(4.999) == 0.0
    assert timeline.util_at(5.0) == 80.0
    assert timeline.util_at(24.999) == 80.0
    assert timeline.util_at(25.0) == 10.0
    assert timeline.util_at(54.999) == 10.0
    assert timeline.util_at(55.0) == 10.0
    assert timeline.util_at(1e9) == 10.0


def test_before_the_epoch_is_the_first_segment() -> None:
    (timeline,) = parse_pattern("30:5,80:20")
    assert timeline.util_at(-3.0) == 30.0


def test_fractions_and_whitespace() -> None:
    (timeline,) = parse_pattern(" 12.5 : 0.25 , 99.9:.5 ,100:1e1")
    assert timeline.segments == (Segment(12.5, 0.25), Segment(99.9, 0.5), Segment(100.0, 10.0))
    assert timeline.util_at(0.2) == 12.5
    assert timeline.util_at(0.25) == 99.9
    assert timeline.util_at(0.75) == 100.0


def test_boundaries_end_at_infinity() -> None:
    (timeline,) = parse_pattern("0:5,80:20")
    assert timeline.boundaries() == [(0.0, 5.0, 0.0), (5.0, math.inf, 80.0)]


def test_semicolon_gives_one_pattern_per_gpu_and_the_last_repeats() -> None:
    timelines = parse_pattern("0:5,80:20;50:1;100:2")
    assert len(timelines) == 3
    assert timeline_for_gpu(timelines, 0).util_at(6) == 80.0
    assert timeline_for_gpu(timelines, 1).util_at(0) == 50.0
    assert timeline_for_gpu(timelines, 2).util_at(0) == 100.0
    assert timeline_for_gpu(timelines, 7) is timelines[2]


def test_single_pattern_serves_every_gpu() -> None:
    timelines = parse_pattern("40:1")
    assert timeline_for_gpu(timelines, 0) is timeline_for_gpu(timelines, 5)


def test_bounds_are_inclusive_for_util() -> None:
    (timeline,) = parse_pattern("0:1,100:1")
    assert [s.util_pct for s in timeline.segments] == [0.0, 100.0]


@pytest.mark.parametrize(
    ("pattern", "names"),
    [
        ("", "pattern is empty"),
        ("   ", "pattern is empty"),
        ("0:5,,80:20", "segment 2 of '0:5,,80:20' is empty"),
        ("0:5,", "segment 2 of '0:5,' is empty"),
        ("0:5;", "pattern for GPU 1"),
        ("80", "'80' is not UTIL:SECONDS"),
        ("0:5,80-20", "'80-20' is not UTIL:SECONDS"),
        ("0:5:1", "'0:5:1' is not UTIL:SECONDS"),
        ("0:5,eighty:20", "'eighty:20'"),
        ("0:5,80:twenty", "'80:twenty'"),
        ("101:5", "'101:5': UTIL must be within 0-100"),
        ("-1:5", "'-1:5': UTIL must be within 0-100"),
        ("50:-5", "'50:-5': SECONDS must be > 0"),
        ("50:0", "'50:0': SECONDS must be > 0"),
        ("nan:5", "'nan:5'"),
        ("50:nan", "'50:nan'"),
        ("inf:5", "'inf:5'"),
        ("50:inf", "'50:inf'"),
        ("1_0:5", "'1_0:5'"),
        ("0x10:5", "'0x10:5'"),
        (":5", "':5'"),
        ("5:", "'5:'"),
    ],
)
def test_bad_patterns_name_the_bad_segment(pattern: str, names: str) -> None:
    with pytest.raises(PatternError) as info:
        parse_pattern(pattern)
    message = str(info.value)
    assert names in message
    assert "\n" not in message


def test_bad_segment_in_a_later_gpu_pattern_is_named() -> None:
    with pytest.raises(PatternError, match=r"'200:1'"):
        parse_pattern("0:5;200:1")


def test_parse_timeline_alone() -> None:
    assert parse_timeline("7:1").util_at(100) == 7.0
