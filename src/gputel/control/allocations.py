"""GPU allocations: validated ids, the agent's persistent store, and per-allocation summaries.

An orchestrator opens an allocation when GPU work is handed out and closes it when the work ends;
telemetry runs while any is open and every recorded row names the open ones. The store lives in
the agent, which serialises all changes, and is persisted in ``RUN_DIR/allocations.json`` so an
agent restart (a crash, an upgrade) does not forget work that is still running. When an
allocation closes, one summary row goes to ``LOG_DIR/allocations.csv``.

Ids come from outside (a Slurm job id, a scheduler's name for a model run) and end up in CSV
cells, JSON and log lines, so they are restricted to a small character set and never used to
build a path.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gputel.allocstats import STAT_FIELDS, stats_from_json
from gputel.energy import energy_between
from gputel.formats import (
    FORMULA_START,
    FailureCounter,
    RowAppender,
    finite,
    iso_utc_ms,
    parse_iso_utc,
    process_alive,
    process_start_time,
)
from gputel.runtime import ALLOCATIONS_FILE, RECORDER_STATE_FILE, atomic_write_json, read_json
from gputel.settings import parse_gpu_list

log = logging.getLogger(__name__)

ID_MAX_LEN = 128
_ID_RE = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
STORE_VERSION = 1
SUMMARY_FILE = "allocations.csv"
#: How often a release looks for the recorder's final statistics while it waits for them.
RECORDER_POLL_S = 0.01
SUMMARY_COLUMNS = (
    "id",
    "gpus",
    "start",
    "end",
    "duration_s",
    "energy_j",
    *STAT_FIELDS,
    "xids",
    "release_reason",
    "shared",
)
"""``shared`` is empty for an announced allocation (its energy is its GPUs' whole energy); for
a detected job (``docs/attribution.md``) it is ``0`` when the job had its GPUs to itself for its
whole span and ``1`` when another job (or a process of unknown owner) was on one of them at some
tick, in which case ``energy_j`` is empty: the GPU's energy cannot be split between jobs."""
_PID_MAX = 2**22


#: Who knows the Xid codes that hit an allocation (by id): the agent's event recorder.
XidSource = Callable[[str], "builtins.list[int]"]


class AllocationError(ValueError):
    """A refused request. ``str()`` is the one-line reason returned to the caller."""


# ---------------------------------------------------------------------------------- validation
def validate_id(value: object) -> str:
    """The id itself, or AllocationError saying why it is unusable."""
    if not isinstance(value, str):
        raise AllocationError("allocation id must be a string")
    if not value:
        raise AllocationError("allocation id must not be empty")
    if len(value) > ID_MAX_LEN:
        raise AllocationError(
            f"allocation id is {len(value)} characters long; at most {ID_MAX_LEN} are allowed"
        )
    # Refused outright rather than neutralised: an id is typed again on command lines, and a
    # cell would show it with a leading quote.
    if value[0] in FORMULA_START:
        raise AllocationError(
            f"allocation id {value[:40]!r} starts with {value[0]!r}, which a spreadsheet reads "
            "as a formula; start it with a letter, a digit, '.', '_' or ':'"
        )
    if not _ID_RE.fullmatch(value):
        bad = next(c for c in value if not _ID_RE.fullmatch(c))
        raise AllocationError(
            f"allocation id {value[:40]!r} contains {bad!r}; "
            "allowed are letters, digits and . _ : @ -"
        )
    return value


def parse_gpus_text(text: str | None) -> list[int] | None:
    """``"0,1"`` → ``[0, 1]``; None, empty or ``all`` → None (every selected GPU)."""
    if text is None:
        return None
    stripped = text.strip()
    if stripped.lower() in ("", "all"):
        return None
    try:
        return list(parse_gpu_list(stripped))
    except ValueError as exc:
        raise AllocationError(f"invalid GPU list {text[:40]!r}: {exc}") from None


def validate_gpus(gpus: object, known_gpus: Iterable[int] | None = None) -> list[int] | None:
    """Check shape (a list of distinct non-negative ints, or None) and, if known, existence."""
    if gpus is None:
        return None
    if not isinstance(gpus, (list, tuple)):
        raise AllocationError("gpus must be a list of GPU indices or null")
    if not gpus:
        raise AllocationError("GPU list is empty; omit it to mean every GPU")
    out: list[int] = []
    for g in gpus:
        if isinstance(g, bool) or not isinstance(g, int):
            raise AllocationError(f"GPU index {g!r} is not a whole number")
        if g < 0 or g > 1023:
            raise AllocationError(f"GPU index {g} is out of range")
        if g in out:
            raise AllocationError(f"GPU index {g} is listed twice")
        out.append(g)
    if known_gpus is not None:
        known = sorted(set(known_gpus))
        missing = [g for g in out if g not in known]
        if missing:
            have = ",".join(str(k) for k in known) or "none"
            noun = "GPU" if len(missing) == 1 else "GPUs"
            raise AllocationError(
                f"{noun} {','.join(str(m) for m in missing)} not present on this node "
                f"(GPUs known to the agent: {have})"
            )
    return out


def validate_pid(pid: object) -> int | None:
    if pid is None:
        return None
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise AllocationError("pid must be a whole number or null")
    if not 1 <= pid <= _PID_MAX:
        raise AllocationError(f"pid {pid} is out of range")
    return pid


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------------------------- records
@dataclass
class Allocation:
    id: str
    gpus: list[int] | None
    pid: int | None
    start: str
    start_energy_j: dict[int, float | None] = field(default_factory=dict)
    pid_start_time: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "gpus": None if self.gpus is None else list(self.gpus),
            "pid": self.pid,
            "start": self.start,
            "start_energy_j": {str(k): v for k, v in sorted(self.start_energy_j.items())},
            "pid_start_time": self.pid_start_time,
        }

    @classmethod
    def from_json(cls, obj: object) -> Allocation:
        """Rebuild from the store file; anything malformed raises AllocationError."""
        if not isinstance(obj, dict):
            raise AllocationError("entry is not an object")
        ident = validate_id(obj.get("id"))
        gpus = validate_gpus(obj.get("gpus"))
        pid = validate_pid(obj.get("pid"))
        start = obj.get("start")
        if not isinstance(start, str):
            raise AllocationError("start is not a timestamp")
        try:
            parse_iso_utc(start)
        except ValueError:
            raise AllocationError(f"start {start[:40]!r} is not a timestamp") from None
        energy: dict[int, float | None] = {}
        raw_energy = obj.get("start_energy_j") or {}
        if not isinstance(raw_energy, dict):
            raise AllocationError("start_energy_j is not an object")
        for k, v in raw_energy.items():
            try:
                idx = int(k)
            except (TypeError, ValueError):
                raise AllocationError(f"start_energy_j key {k!r} is not a GPU index") from None
            energy[idx] = finite(v)
        pst = obj.get("pid_start_time")
        return cls(ident, gpus, pid, start, energy, finite(pst))


def _energy_snapshot(
    energy_j: Mapping[int, float | None] | None, gpus: Iterable[int]
) -> dict[int, float | None]:
    energy_j = energy_j or {}
    return {g: finite(energy_j.get(g)) for g in gpus}


def _fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".")
    return str(value)


def release_summary(
    ident: str,
    gpus: Iterable[int],
    start: str | datetime,
    end: datetime,
    energy_j: float | None,
    stats: Mapping[str, float | int | None],
    reason: str,
    xids: Iterable[int] = (),
) -> dict[str, Any]:
    """The summary of an ended allocation: the ``release`` reply and, through
    :class:`SummaryLog`, its ``allocations.csv`` row.

    One shape for the agent's announced allocations and the recorder's detected jobs (which add
    ``shared``), so both kinds of row mean the same. ``stats`` is an ``AllocationStats`` JSON
    object (missing fields stay None); ``start`` is the allocation's timestamp text as stored, or
    the moment it began.
    """
    if isinstance(start, str):
        text = start
        try:
            duration = (end - parse_iso_utc(start)).total_seconds()
        except ValueError:
            duration = 0.0
    else:
        text, duration = iso_utc_ms(start), (end - start).total_seconds()
    summary: dict[str, Any] = {
        "id": ident,
        "gpus": list(gpus),
        "start": text,
        "end": iso_utc_ms(end),
        "duration_s": round(max(0.0, duration), 3),
        "energy_j": energy_j,
    }
    for key in STAT_FIELDS:
        summary[key] = stats.get(key)
    summary["samples"] = stats.get("samples")
    summary["xids"] = list(xids)
    summary["release_reason"] = reason
    return summary


# ---------------------------------------------------------------------------------- the store
class AllocationStore:
    """The agent's open allocations. Thread-safe; the agent is its only writer.

    Every change is written to ``allocations.json`` before the call returns, so the recorder
    (which tags rows from that file) and a restarted agent see it.
    """

    def __init__(
        self,
        run_dir: Path,
        log_dir: Path,
        known_gpus: list[int],
        *,
        now: Callable[[], datetime] = _utc_now,
        ask_recorder: Callable[[], float] = lambda: 0.0,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.run_dir = Path(run_dir)
        self._ask_recorder = ask_recorder
        """Asks the recorder to publish its state now; how long a release may wait for the
        allocation's end there (0: take ``recorder.json`` as it is)."""
        self._monotonic = monotonic
        self._sleep = sleep
        self.log_dir = Path(log_dir)
        self.known_gpus = sorted(set(known_gpus))
        self._now = now
        self._lock = threading.Lock()
        self._open: dict[str, Allocation] = {}
        self._summaries = SummaryLog(self.log_dir)
        self._load()

    @property
    def path(self) -> Path:
        return self.run_dir / ALLOCATIONS_FILE

    @property
    def summary_failures(self) -> FailureCounter:
        """Rows of ``allocations.csv`` this store could not write."""
        return self._summaries.failures

    # -- persistence
    def _load(self) -> None:
        path = self.path
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot read %s: %s; starting with no open allocations", path, exc)
            return
        data: Any = None
        reason = ""
        try:
            data = json.loads(raw)
        except ValueError as exc:
            reason = f"not valid JSON ({exc})"
        if not reason and parse_store(data) is None:
            reason = "not an allocations file"
        if reason:
            aside = path.with_name(
                f"{path.name}.corrupt-{self._now().astimezone(timezone.utc):%Y%m%dT%H%M%S}"
            )
            try:
                os.replace(path, aside)
                log.error("%s is %s; moved it to %s and started empty", path, reason, aside)
            except OSError as exc:
                log.error("%s is %s and could not be moved aside: %s", path, reason, exc)
            return
        for alloc in (
            parse_store(
                data, lambda why: log.error("skipping a malformed entry in %s: %s", path, why)
            )
            or ()
        ):
            self._open[alloc.id] = alloc
        if self._open:
            log.info("restored %d open allocation(s) from %s", len(self._open), path)

    def _save(self) -> None:
        payload = {
            "version": STORE_VERSION,
            "allocations": [a.to_json() for a in self._open.values()],
        }
        atomic_write_json(self.path, payload)

    # -- the protocol operations
    def allocate(
        self,
        id: str,
        gpus: list[int] | None,
        pid: int | None,
        energy_j: Mapping[int, float | None] | None,
    ) -> dict[str, Any]:
        """Open ``id``; opening an already open id changes nothing and says so."""
        ident = validate_id(id)
        with self._lock:
            existing = self._open.get(ident)
            if existing is not None:
                return {"allocation": existing.to_json(), "created": False}
            wanted = validate_gpus(gpus, self.known_gpus)
            owner = validate_pid(pid)
            owner_start: float | None = None
            if owner is not None:
                owner_start = process_start_time(owner)
                if owner_start is None or not process_alive(owner, owner_start):
                    raise AllocationError(f"owner pid {owner} is not running")
            counted = self.known_gpus if wanted is None else wanted
            alloc = Allocation(
                id=ident,
                gpus=wanted,
                pid=owner,
                start=iso_utc_ms(self._now()),
                start_energy_j=_energy_snapshot(energy_j, counted),
                pid_start_time=owner_start,
            )
            self._open[ident] = alloc
            try:
                self._save()
            except OSError as exc:
                del self._open[ident]
                raise AllocationError(f"cannot record the allocation: {exc}") from None
            log.info(
                "allocation %s opened (gpus %s, owner pid %s)",
                ident,
                "all" if wanted is None else ",".join(map(str, wanted)),
                owner if owner is not None else "none",
            )
            return {"allocation": alloc.to_json(), "created": True}

    def release(
        self,
        id: str,
        energy_j: Mapping[int, float | None] | None,
        reason: str = "released",
        xids: XidSource | None = None,
    ) -> dict[str, Any]:
        """Close ``id`` and summarise it; closing an unknown id is harmless. ``xids`` gives the
        Xid codes that hit the allocation (the agent's event recorder)."""
        ident = validate_id(id)
        with self._lock:
            closed = self._close_locked(ident)
        if closed is None:
            return {"released": False, "summary": None}
        return {"released": True, "summary": self._finish(closed, energy_j, reason, xids)}

    def _close_locked(self, ident: str) -> tuple[Allocation, datetime] | None:
        """Remove ``ident`` from the store and its file; the allocation and when it ended."""
        alloc = self._open.get(ident)
        if alloc is None:
            return None
        del self._open[ident]
        try:
            self._save()
        except OSError as exc:
            self._open[ident] = alloc
            raise AllocationError(f"cannot record the release: {exc}") from None
        return alloc, self._now()

    def _finish(
        self,
        closed: tuple[Allocation, datetime],
        energy_j: Mapping[int, float | None] | None,
        reason: str,
        xids: XidSource | None,
    ) -> dict[str, Any]:
        """The summary of a closed allocation, appended to ``allocations.csv``. Outside the
        store's lock: it may wait for the recorder, and other requests need not."""
        alloc, end = closed
        summary = self._summarise(alloc, end, energy_j, reason, xids(alloc.id) if xids else ())
        with self._lock:
            self._append_summary(summary)
        log.info(
            "allocation %s closed (%s) after %.1fs, energy %s J",
            alloc.id,
            reason,
            summary["duration_s"],
            "unknown" if summary["energy_j"] is None else f"{summary['energy_j']:.1f}",
        )
        return summary

    def list(self) -> builtins.list[dict[str, Any]]:
        with self._lock:
            return [a.to_json() for a in self._open.values()]

    def open_count(self) -> int:
        with self._lock:
            return len(self._open)

    def reap_dead_owners(
        self, energy_j: Mapping[int, float | None] | None, xids: XidSource | None = None
    ) -> builtins.list[dict[str, Any]]:
        """Close every allocation whose owner process has exited; return their summaries.

        An orchestrator that crashes never calls release, and telemetry must not stay on for it.
        """
        closed: list[tuple[tuple[Allocation, datetime], str]] = []
        with self._lock:
            dead = [
                a
                for a in self._open.values()
                if a.pid is not None and not process_alive(a.pid, a.pid_start_time)
            ]
            for alloc in dead:
                try:
                    done = self._close_locked(alloc.id)
                except AllocationError as exc:
                    log.error("cannot release %s after its owner exited: %s", alloc.id, exc)
                    continue
                if done is not None:
                    closed.append((done, f"owner pid {alloc.pid} exited"))
        return [self._finish(done, energy_j, reason, xids) for done, reason in closed]

    # -- summaries
    def _summarise(
        self,
        alloc: Allocation,
        end: datetime,
        energy_j: Mapping[int, float | None] | None,
        reason: str,
        xids: Iterable[int] = (),
    ) -> dict[str, Any]:
        gpus = alloc.gpus if alloc.gpus is not None else sorted(alloc.start_energy_j)
        if alloc.gpus is None and not gpus:
            gpus = list(self.known_gpus)
        entry = self._recorder_entry(alloc)
        if entry is not None:
            # The one allocation rule (gputel.energy, rule 4), tick by tick in the recorder:
            # the number gputel report counts from the same rows.
            energy = finite(entry.get("energy_j"))
            energy = None if energy is None else round(energy, 6)
        else:
            # No recorder ticked during it (telemetry forced off): the agent's own counter
            # readings at open and release are its only two ticks.
            energy = energy_between(alloc.start_energy_j, _energy_snapshot(energy_j, gpus), gpus)
        return release_summary(
            alloc.id,
            gpus,
            alloc.start,
            end,
            energy,
            stats_from_json(entry) if entry is not None else {},
            reason,
            xids,
        )

    def _recorder_entry(self, alloc: Allocation) -> dict[str, Any] | None:
        """The recorder's statistics of ``alloc``, which was just removed from the store.

        Best: its final entry, once the recorder has seen it end (every tick it was open,
        none after), which it publishes when asked (``ask_recorder``; at intervals of a second
        or more it publishes every tick, and ``recorder.json`` as it is holds the last tick).
        Without it, the entry of the open allocation as last published.
        """
        path = self.run_dir / RECORDER_STATE_FILE
        wait_s = self._ask_recorder()
        deadline = self._monotonic() + wait_s
        while True:
            state = read_json(path)
            ended = ended_stats_entry(state, alloc.id, alloc.start)
            if ended is not None:
                return ended
            if wait_s <= 0 or self._monotonic() >= deadline:
                return recorder_stats_entry(state, alloc.id, alloc.start)
            self._sleep(RECORDER_POLL_S)

    def _append_summary(self, summary: Mapping[str, Any]) -> None:
        self._summaries.append(summary)


class SummaryLog:
    """``LOG_DIR/allocations.csv``: one whole row per ended allocation, announced (the agent's
    store) or detected (the recorder). Both processes append whole rows with ``O_APPEND``."""

    def __init__(self, log_dir: Path) -> None:
        self.path = Path(log_dir) / SUMMARY_FILE
        self._rows = RowAppender(self.path, SUMMARY_COLUMNS, log, make_dir=True)

    @property
    def rows_failed(self) -> int:
        return self._rows.rows_failed

    @property
    def failures(self) -> FailureCounter:
        return self._rows.failures

    def append(self, summary: Mapping[str, Any]) -> None:
        """One whole row; an unwritable log directory costs the row, not the call."""
        self._rows.append(
            ";".join(str(v) for v in summary.get(key) or ())
            if key in ("gpus", "xids")
            else _fmt(summary.get(key))
            for key in SUMMARY_COLUMNS
        )


def recorder_stats_entry(state: object, ident: str, start: str) -> dict[str, Any] | None:
    """The ``allocation_stats`` entry of a parsed ``recorder.json`` for the allocation ``ident``
    that began at ``start``; None when there is none or it may be about another allocation.

    A recorder.json older than the allocation (telemetry forced off by the operator, so no
    recorder ran; or a recorder that ended before this allocation began) may hold stats of an
    earlier allocation with the same id: ignored. Used by the release summary and by a
    restarted recorder that continues its predecessor's statistics.
    """
    if not isinstance(state, dict):
        return None
    written = state.get("timestamp")
    if isinstance(written, str):
        try:
            if parse_iso_utc(written) < parse_iso_utc(start):
                return None
        except ValueError:
            pass
    all_stats = state.get("allocation_stats")
    if not isinstance(all_stats, dict):
        return None
    entry = all_stats.get(ident)
    return entry if isinstance(entry, dict) else None


def ended_stats_entry(state: object, ident: str, start: str) -> dict[str, Any] | None:
    """The final statistics of the allocation ``ident`` that began at ``start``, from a parsed
    ``recorder.json``'s ``ended_allocations``: the recorder saw it end; None when not (yet)."""
    ended = state.get("ended_allocations") if isinstance(state, dict) else None
    entry = ended.get(ident) if isinstance(ended, dict) else None
    return entry if isinstance(entry, dict) and entry.get("start") == start else None


def parse_store(
    data: object, on_bad: Callable[[str], None] | None = None
) -> builtins.list[Allocation] | None:
    """The allocations in a parsed ``allocations.json``; None when it is not such a file.

    The one reader of the file's format (the agent at start, the recorder, the hooks). A
    malformed entry is skipped (``on_bad`` hears why), never fatal for the others.
    """
    items = data.get("allocations") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return None
    out: list[Allocation] = []
    for entry in items:
        try:
            out.append(Allocation.from_json(entry))
        except AllocationError as exc:
            if on_bad is not None:
                on_bad(str(exc))
    return out


def read_open_ids(run_dir: Path) -> builtins.list[str]:
    """The open allocation ids from ``allocations.json`` (for readers such as the hooks)."""
    return [a.id for a in parse_store(read_json(Path(run_dir) / ALLOCATIONS_FILE)) or ()]
