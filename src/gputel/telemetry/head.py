"""The pre-trigger head of a session: the agent's readings from before telemetry started.

The agent keeps the light readings of the last ``GPUTEL_PRETRIGGER_SECONDS`` in memory
(``supervisor/pretrigger.py``). When it starts a recording session it writes them to
``RUN_DIR/pretrigger.json`` (atomic replace); the recorder child takes the file once, at its
first tick (read, then unlink), and writes the rows at the head of its ``gpu-*.csv``, before its
own first row. This module is that file's format and the rule for which rows are written:

- only GPUs the recorder records, with the identity it knows (a row whose uuid differs is
  dropped: it is not the same board);
- strictly increasing timestamps at the file's resolution (milliseconds), all strictly before
  the recorder's first own row, so the file has one row per GPU per tick and never the same tick
  twice, even if the wall clock stepped;
- nothing from a stale file (one left by a session that never started its child): a head whose
  newest tick is more than ``STALE_S`` (or ten intervals) older than the first own tick is
  ignored.

Only the fields of ``sources.base.LIGHT_FIELDS`` are carried; every other column of a head row
is empty (the agent did not read it). The head has no host rows: the agent reads no host source.

Import-light: both the agent and the recorder load it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gputel.formats import finite, iso_utc_ms, one_line, parse_iso_utc
from gputel.schema import GpuReading
from gputel.sources.base import LIGHT_FIELDS, GpuIdentity

log = logging.getLogger("gputel.record")

FORMAT_VERSION = 1
#: A head whose newest tick is older than this before the recorder's first tick is stale.
STALE_S = 60.0


@dataclass(frozen=True, slots=True)
class HeadTick:
    """One agent tick of the pre-trigger: when it was read and the light reading of each GPU."""

    timestamp: datetime
    """Wall clock, UTC, when the agent's read began."""
    monotonic: float
    """``CLOCK_MONOTONIC`` (system-wide), comparable with the recorder's own ticks."""
    gpus: tuple[GpuReading, ...]


def encode_head(ticks: Iterable[HeadTick]) -> bytes:
    """The ``pretrigger.json`` bytes: per tick its time and, per GPU, the light fields."""
    identities: dict[int, tuple[str, str]] = {}
    out_ticks: list[list[Any]] = []
    for tick in ticks:
        gpus: list[list[Any]] = []
        for g in tick.gpus:
            identities.setdefault(g.index, (g.uuid, g.name))
            gpus.append([g.index, g.lost, *(getattr(g, f) for f in LIGHT_FIELDS)])
        out_ticks.append([iso_utc_ms(tick.timestamp), tick.monotonic, gpus])
    doc = {
        "version": FORMAT_VERSION,
        "fields": list(LIGHT_FIELDS),
        "gpus": [[i, uuid, name] for i, (uuid, name) in sorted(identities.items())],
        "ticks": out_ticks,
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def decode_head(data: bytes) -> list[HeadTick]:
    """The ticks of a ``pretrigger.json``; ValueError when it is not one."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {one_line(exc)}") from None
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
        raise ValueError("not a version 1 pre-trigger file")
    names = doc.get("fields")
    if not isinstance(names, list) or not set(names) <= set(LIGHT_FIELDS):
        raise ValueError("unknown fields")
    try:
        identity = {int(i): (str(uuid), str(name)) for i, uuid, name in doc["gpus"]}
        ticks: list[HeadTick] = []
        for stamp, mono, gpus in doc["ticks"]:
            readings: list[GpuReading] = []
            for index, lost, *values in gpus:
                uuid, name = identity[int(index)]
                reading = GpuReading(int(index), uuid, name, lost=lost is True)
                for field_name, value in zip(names, values, strict=True):
                    setattr(reading, field_name, finite(value))
                readings.append(reading)
            monotonic = finite(mono)
            if monotonic is None:
                raise ValueError("a tick without a monotonic time")
            ticks.append(HeadTick(parse_iso_utc(stamp), monotonic, tuple(readings)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed pre-trigger file: {one_line(exc)}") from None
    return ticks


def take_head(path: Path) -> list[HeadTick]:
    """Read the head once and remove the file; no file is no head, a bad one is logged."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot read the pre-trigger file %s (%s); no head rows", path, exc.strerror)
        return []
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    try:
        return decode_head(data)
    except ValueError as exc:
        log.warning("ignoring the pre-trigger file %s: %s", path, exc)
        return []


def head_rows(
    ticks: Sequence[HeadTick],
    first: datetime,
    first_monotonic: float,
    devices: Sequence[GpuIdentity],
    interval_s: float,
) -> list[HeadTick]:
    """The ticks to write before the recorder's first own row (at ``first``), in order.

    Readings of GPUs not in ``devices`` (or with another uuid) are dropped, and the GPUs of each
    tick are put in the recorder's order.
    """
    if not ticks or ticks[-1].monotonic < first_monotonic - max(STALE_S, 10 * interval_s):
        return []
    known = {d.index: d.uuid for d in devices}
    order = {d.index: k for k, d in enumerate(devices)}
    first_stamp = iso_utc_ms(first)
    kept: list[HeadTick] = []
    last_stamp = ""
    for tick in ticks:
        stamp = iso_utc_ms(tick.timestamp)
        # ISO 8601 UTC text with fixed width sorts as time does.
        if stamp <= last_stamp or stamp >= first_stamp or tick.monotonic >= first_monotonic:
            continue
        gpus = sorted(
            (g for g in tick.gpus if known.get(g.index) == g.uuid), key=lambda g: order[g.index]
        )
        if gpus:
            kept.append(HeadTick(tick.timestamp, tick.monotonic, tuple(gpus)))
            last_stamp = stamp
    return kept
