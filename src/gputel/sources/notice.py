"""A listener's standing notice: what is wrong with it now, logged once when it changes.

The event listeners run on threads of their own and can go wrong at any moment (a driver that
stops answering, a kernel log that becomes unreadable); ``gputel status`` shows what is wrong
now, and the journal should have it once, not once per retry.
"""

from __future__ import annotations

import logging
import threading


class StandingNotice:
    """The current notice (None: nothing wrong), thread-safe; each new text is logged once."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._lock = threading.Lock()
        self._text: str | None = None

    @property
    def text(self) -> str | None:
        with self._lock:
            return self._text

    def say(self, text: str | None) -> None:
        """Set the notice (None clears it), logging it when it is new."""
        with self._lock:
            new = text is not None and text != self._text
            self._text = text
        if new:
            self._log.warning("%s", text)
