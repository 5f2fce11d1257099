"""``transitions.csv``: one row per supervisor state change, with its reason.

The file is opened for append on every row and written with one ``write`` call, so a row is never
split between two agents' lifetimes or half-written by a crash, and logrotate may move the file at
any time (the next row simply starts a new file, with a header). A failing disk costs these rows
only: the failure is logged once and the agent keeps running.

Rows: the activity states (``idle``, ``arming``, ``active``, ``cooling``), the telemetry child
(``telemetry_off`` → ``telemetry_on`` and back) and the operator mode (``mode_auto``,
``mode_on``, ``mode_off``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

TRANSITIONS_FILE = "transitions.csv"
HEADER = "timestamp,from_state,to_state,reason\n"


def iso_utc_ms(ts: float | None = None) -> str:
    """ISO 8601 UTC with milliseconds, the timestamp format of every gputel CSV."""
    dt = datetime.fromtimestamp(
        ts if ts is not None else datetime.now(timezone.utc).timestamp(), timezone.utc
    )
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _csv_field(text: str) -> str:
    if any(c in text for c in ',"\n\r'):
        return '"' + text.replace('"', '""').replace("\r", " ").replace("\n", " ") + '"'
    return text


@dataclass(frozen=True, slots=True)
class TransitionRecord:
    timestamp: str
    from_state: str
    to_state: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {
            "timestamp": self.timestamp,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "reason": self.reason,
        }

    def csv_row(self) -> str:
        return (
            ",".join(
                _csv_field(v) for v in (self.timestamp, self.from_state, self.to_state, self.reason)
            )
            + "\n"
        )


class TransitionsLog:
    """Appends rows to ``log_dir/transitions.csv``; never raises."""

    def __init__(self, log_dir: Path) -> None:
        self.path = log_dir / TRANSITIONS_FILE
        self._failed = False

    def append(self, record: TransitionRecord) -> bool:
        row = record.csv_row()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            self._report(exc)
            return False
        try:
            data = row if os.fstat(fd).st_size > 0 else HEADER + row
            os.write(fd, data.encode())
        except OSError as exc:
            self._report(exc)
            return False
        finally:
            os.close(fd)
        if self._failed:
            log.info("writing %s works again", self.path)
            self._failed = False
        return True

    def _report(self, exc: OSError) -> None:
        if not self._failed:
            self._failed = True
            log.error(
                "cannot write %s (%s); transitions are still logged here; "
                "check GPUTEL_LOG_DIR exists and is writable",
                self.path,
                exc.strerror or exc,
            )
