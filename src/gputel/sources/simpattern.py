"""The simulated-GPU utilization timeline grammar (``GPUTEL_SIM_PATTERN``).

A pattern is comma-separated ``UTIL:SECONDS`` segments; several GPUs may follow different
patterns separated by ``;`` (GPU i takes pattern i, the last one repeats). After the last segment
its UTIL holds. Parsing is strict because a typo in a test or demo pattern should fail loudly,
naming the bad segment, rather than silently simulating something else.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


class PatternError(ValueError):
    """A malformed pattern; the message names the offending segment."""


@dataclass(frozen=True, slots=True)
class Segment:
    util_pct: float
    seconds: float


@dataclass(frozen=True, slots=True)
class Timeline:
    """One GPU's piecewise-constant utilization over time since the shared epoch."""

    segments: tuple[Segment, ...]

    def util_at(self, t: float) -> float:
        """Utilization at ``t`` seconds after the epoch (before 0: the first segment)."""
        elapsed = 0.0
        for seg in self.segments:
            elapsed += seg.seconds
            if t < elapsed:
                return seg.util_pct
        return self.segments[-1].util_pct

    def boundaries(self) -> list[tuple[float, float, float]]:
        """``(start, end, util)`` of each segment; the last one ends at infinity."""
        out: list[tuple[float, float, float]] = []
        start = 0.0
        for i, seg in enumerate(self.segments):
            end = math.inf if i == len(self.segments) - 1 else start + seg.seconds
            out.append((start, end, seg.util_pct))
            start += seg.seconds
        return out


# Plain decimal numbers only: float() alone would also take "nan", "inf" and "1_0".
_NUMBER = re.compile(r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")


def parse_number(text: str) -> float:
    if not _NUMBER.match(text.strip()):
        raise ValueError(text)
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def parse_timeline(text: str) -> Timeline:
    """Parse one GPU's ``UTIL:SECONDS,...`` pattern."""
    segments: list[Segment] = []
    for position, raw in enumerate(text.split(","), start=1):
        seg = raw.strip()
        if not seg:
            raise PatternError(f"segment {position} of {text!r} is empty (expected UTIL:SECONDS)")
        parts = seg.split(":")
        if len(parts) != 2:
            raise PatternError(f"segment {seg!r} is not UTIL:SECONDS")
        try:
            util = parse_number(parts[0])
        except ValueError:
            raise PatternError(f"segment {seg!r}: UTIL {parts[0]!r} is not a number") from None
        try:
            seconds = parse_number(parts[1])
        except ValueError:
            raise PatternError(f"segment {seg!r}: SECONDS {parts[1]!r} is not a number") from None
        if not 0 <= util <= 100:
            raise PatternError(f"segment {seg!r}: UTIL must be within 0-100")
        if seconds <= 0:
            raise PatternError(f"segment {seg!r}: SECONDS must be > 0")
        segments.append(Segment(util, seconds))
    return Timeline(tuple(segments))


def parse_pattern(text: str) -> tuple[Timeline, ...]:
    """Parse a full pattern: one timeline per ``;``-separated part."""
    if not text.strip():
        raise PatternError("pattern is empty")
    timelines: list[Timeline] = []
    for gpu, part in enumerate(text.split(";")):
        if not part.strip():
            raise PatternError(f"the pattern for GPU {gpu} in {text!r} is empty")
        timelines.append(parse_timeline(part))
    return tuple(timelines)


def timeline_for_gpu(timelines: tuple[Timeline, ...], index: int) -> Timeline:
    """GPU ``index`` takes pattern ``index``; GPUs past the last pattern repeat the last one."""
    return timelines[min(index, len(timelines) - 1)]
