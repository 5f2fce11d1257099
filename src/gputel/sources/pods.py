"""Kubernetes pod names for ``k8s-<uid>`` jobs, from the kubelet's pod log directories.

A process's cgroup names its pod only by UID; people know pods by namespace and name. The
kubelet keeps one directory per pod on the node, ``/var/log/pods/NAMESPACE_POD_UID``, for as
long as the pod's logs are kept, so the names are there without asking the API server (no
credentials, no network, and it works while the control plane is down). Namespace and pod names
are DNS labels and subdomains, which have no ``_``, so an entry splits into exactly three parts.

The directory is listed again only when a UID is not found and the last listing is older than
``rescan_s``: pods come and go, but a lookup per tick must not become a listing per tick.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

#: Seconds between two listings of the directory for a UID it did not have.
DEFAULT_RESCAN_S = 30.0


def parse_entry(name: str) -> tuple[str, str, str] | None:
    """``NAMESPACE_POD_UID`` → (namespace, pod, uid, lower case); None for any other name."""
    parts = name.split("_")
    if len(parts) != 3 or not all(parts):
        return None
    namespace, pod, uid = parts
    return namespace, pod, uid.lower()


class PodNames:
    """UID → (namespace, pod) from a pod log directory (``GPUTEL_POD_LOGS_DIR``, whose default
    lives with the other settings); see the module docstring."""

    def __init__(
        self,
        root: Path,
        *,
        rescan_s: float = DEFAULT_RESCAN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = Path(root)
        self.rescan_s = rescan_s
        self._clock = clock
        self._names: dict[str, tuple[str, str]] = {}
        self._listed_at: float | None = None

    def lookup(self, uid: str) -> tuple[str, str] | None:
        """The pod's (namespace, name), or None when the directory does not name it."""
        key = uid.lower()
        found = self._names.get(key)
        if found is not None:
            return found
        now = self._clock()
        if self._listed_at is None or now - self._listed_at >= self.rescan_s:
            self._listed_at = now
            self._names = self._list()
        return self._names.get(key)

    def _list(self) -> dict[str, tuple[str, str]]:
        out: dict[str, tuple[str, str]] = {}
        try:
            entries = os.listdir(self.root)
        except OSError:
            return out
        for name in entries:
            parsed = parse_entry(name)
            if parsed is not None:
                out[parsed[2]] = (parsed[0], parsed[1])
        return out
