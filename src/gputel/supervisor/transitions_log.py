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
from dataclasses import dataclass
from pathlib import Path

from gputel.formats import FailureCounter, RowAppender

log = logging.getLogger(__name__)

TRANSITIONS_FILE = "transitions.csv"
COLUMNS = ("timestamp", "from_state", "to_state", "reason")


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

    def values(self) -> tuple[str, str, str, str]:
        return (self.timestamp, self.from_state, self.to_state, self.reason)


class TransitionsLog:
    """Appends rows to ``log_dir/transitions.csv``; never raises."""

    def __init__(self, log_dir: Path) -> None:
        self.path = log_dir / TRANSITIONS_FILE
        self._rows = RowAppender(self.path, COLUMNS, log)

    @property
    def failures(self) -> FailureCounter:
        return self._rows.failures

    def append(self, record: TransitionRecord) -> bool:
        return self._rows.append(record.values())
