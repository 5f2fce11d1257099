"""HTTP basic auth against bcrypt hashes, with a cache so a scrape every second stays cheap.

bcrypt is slow on purpose (about 50-100 ms at cost 10), which is right for an attacker guessing
passwords and wrong for Prometheus sending the same good credentials every second. Like
prometheus/exporter-toolkit, a successful check is remembered under a SHA-256 of the user, the
stored hash and the password (never the password itself), so only the first scrape pays for
bcrypt. Failures are not remembered: there is nothing to gain from a cache full of guesses.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
from collections.abc import Mapping

#: Remembered good credentials; more distinct good ones than this (a rotation) start over.
CACHE_SIZE = 64
#: Checked against when the user is unknown, so the answer takes as long as for a known user.
_DUMMY_HASH = b"$2b$10$5gioVF7CyA9B4EA5awmmQ.x9pmCdUZTxJVDr.kXTC2p7ZpVsp.FL."


def parse_header(value: str | None) -> tuple[str, str] | None:
    """``(user, password)`` from an ``Authorization: Basic ...`` value, or None if malformed."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        text = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = text.partition(":")
    return (user, password) if sep else None


class BasicAuth:
    """Checks credentials against ``users`` (name -> bcrypt hash). Thread-safe."""

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self._users = dict(users)
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()

    def _key(self, user: str, hashed: bytes, password: str) -> bytes:
        return hashlib.sha256(user.encode() + b"\0" + hashed + b"\0" + password.encode()).digest()

    def cached(self, user: str, password: str) -> bool:
        """True when these credentials were checked good before (no bcrypt needed)."""
        hashed = self._users.get(user)
        if hashed is None:
            return False
        with self._lock:
            return self._key(user, hashed, password) in self._ok

    def check(self, user: str, password: str) -> bool:
        """The full check: the cache, else bcrypt (slow; callers keep it off their event loop)."""
        import bcrypt

        hashed = self._users.get(user)
        if hashed is None:
            # Same cost as a real check, so timing does not tell which users exist.
            bcrypt.checkpw(password.encode(), _DUMMY_HASH)
            return False
        key = self._key(user, hashed, password)
        with self._lock:
            if key in self._ok:
                return True
        try:
            good = bcrypt.checkpw(password.encode(), hashed)
        except ValueError:
            good = False
        if good:
            with self._lock:
                if len(self._ok) >= CACHE_SIZE:
                    self._ok.clear()
                self._ok.add(key)
        return good
