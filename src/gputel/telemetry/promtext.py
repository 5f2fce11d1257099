"""The one writer of the Prometheus text exposition format (0.0.4).

Both processes that render metrics use it: the recorder (``exposition.py``, GPU/host/source
families, every tick) and the agent (``supervisor/agent_metrics.py``, its own families, at scrape
time). Each family is declared once as a :class:`Family` (name, type, one HELP text); labels are
escaped and sorted here only; values use the Go float form of prometheus_client's
``generate_latest``, so the recorder's bytes equal the library's (a test holds them equal).

How the two expositions join: the families are disjoint by construction. The recorder never
renders ``gputel_telemetry_active`` or any ``gputel_agent_*`` family; the agent renders only
those. So the agent serves its text followed by the recorder's ``metrics.prom`` bytes as they are,
with no parsing (a test checks the two name sets never overlap).

No ``prometheus_client`` import here: the agent's memory budget leaves it out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TYPES = frozenset({"gauge", "counter", "untyped"})


def escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def label_block(labels: Mapping[str, str]) -> str:
    """``{k="v",...}`` with the names sorted, or empty for no labels."""
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in sorted(labels.items())) + "}"


def format_value(value: float) -> str:
    """A sample value as ``generate_latest`` writes it (Go's float form)."""
    d = float(value)
    if math.isnan(d):
        return "NaN"
    if math.isinf(d):
        return "+Inf" if d > 0 else "-Inf"
    s = repr(d)
    dot = s.find(".")
    # Go switches to an exponent for large numbers sooner than Python does.
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


@dataclass(frozen=True, slots=True)
class Family:
    """A metric family: its exact output name (counters keep ``_total``), type and HELP."""

    name: str
    type: str
    help: str

    def __post_init__(self) -> None:
        if self.type not in _TYPES:
            raise ValueError(f"{self.name}: unknown metric type {self.type!r}")
        if (self.type == "counter") != self.name.endswith("_total"):
            raise ValueError(f"{self.name}: counters, and only counters, end in _total")

    @property
    def base(self) -> str:
        """The name prometheus_client's ``Metric`` takes (a counter without ``_total``)."""
        return self.name[: -len("_total")] if self.type == "counter" else self.name

    @property
    def header(self) -> str:
        return f"# HELP {self.name} {escape_help(self.help)}\n# TYPE {self.name} {self.type}\n"

    def sample(self, labels: Mapping[str, str], value: float) -> str:
        return f"{self.name}{label_block(labels)} {format_value(value)}\n"

    def render(self, samples: Iterable[tuple[Mapping[str, str], float]]) -> str:
        """The family's text: HELP, TYPE and one line per ``(labels, value)``."""
        return self.header + "".join(self.sample(lb, v) for lb, v in samples)


TELEMETRY_ACTIVE = Family(
    "gputel_telemetry_active",
    "gauge",
    "Whether telemetry is on (1: the recorder runs or should) or intentionally off (0).",
)
"""Owned by whoever serves ``/metrics``: the agent, or a standalone recorder (always 1)."""


def telemetry_active_text(active: bool) -> bytes:
    return TELEMETRY_ACTIVE.render([({}, 1.0 if active else 0.0)]).encode()


def join(own: bytes, recorded: bytes | None) -> bytes:
    """The server's own families followed by the recorder's (disjoint by construction)."""
    if not recorded:
        return own
    return own + recorded if recorded.endswith(b"\n") else own + recorded + b"\n"
