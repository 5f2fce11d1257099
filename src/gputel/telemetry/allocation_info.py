"""What each open allocation is, for ``gputel_allocation_info`` (a PromQL join from ids to names).

Per-allocation series carry only the ``allocation`` id; this one series per open allocation
(announced or detected) carries its kind, the user of its processes, the Kubernetes namespace
and pod of a ``k8s-<uid>`` id and the Slurm job id of a ``slurm-<jobid>`` one, so a query can
say ``... * on(allocation) group_left(pod, namespace) gputel_allocation_info``. An unknown
value is an empty label (which Prometheus treats as absent), never a guess.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from gputel.control.slurm_comment import slurm_job_id
from gputel.schema import ProcessRecord
from gputel.sources.pods import PodNames

#: The id forms of detected jobs (``sources/owners.py``); any other id is an announced name.
_KINDS = ("slurm", "k8s", "container", "unit", "user")
#: Users remembered for ids no longer open are dropped past this many ids.
_USERS_MAX = 4096


@dataclass(frozen=True, slots=True)
class AllocationInfo:
    allocation: str
    kind: str
    user: str
    namespace: str
    pod: str
    slurm_job: str

    def labels(self) -> dict[str, str]:
        return {
            "allocation": self.allocation,
            "kind": self.kind,
            "user": self.user,
            "namespace": self.namespace,
            "pod": self.pod,
            "slurm_job": self.slurm_job,
        }


@functools.lru_cache(maxsize=4096)
def kind_of(ident: str) -> str:
    """``slurm``, ``k8s``, ``container``, ``unit`` or ``user`` for those id forms, else
    ``hooked`` (a name an orchestrator chose)."""
    prefix, sep, rest = ident.partition("-")
    if not sep or not rest or prefix not in _KINDS:
        return "hooked"
    if prefix == "slurm" and slurm_job_id(ident) is None:
        return "hooked"
    return prefix


class AllocationNames:
    """Builds the info of every open allocation, tick after tick."""

    def __init__(self, pods: PodNames) -> None:
        self.pods = pods
        self._users: dict[str, str] = {}

    def pod_of(self, ident: str | None) -> tuple[str, str] | None:
        """(namespace, pod) of a ``k8s-<uid>`` id, when the pod log directory names it."""
        if ident is None or kind_of(ident) != "k8s":
            return None
        return self.pods.lookup(ident.removeprefix("k8s-"))

    def infos(
        self, open_ids: Iterable[str], processes: Iterable[ProcessRecord]
    ) -> list[AllocationInfo]:
        """One entry per distinct id in ``open_ids``, in that order."""
        for p in processes:
            if p.job is not None and p.user and p.job not in self._users:
                self._users[p.job] = p.user
        ids = list(dict.fromkeys(open_ids))
        if len(self._users) > _USERS_MAX:
            keep = set(ids)
            self._users = {k: v for k, v in self._users.items() if k in keep}
        out: list[AllocationInfo] = []
        for ident in ids:
            kind = kind_of(ident)
            namespace, pod = self.pod_of(ident) or ("", "")
            user = self._users.get(ident, "")
            if not user and kind == "user":
                user = ident.removeprefix("user-")
            out.append(
                AllocationInfo(
                    ident,
                    kind,
                    user,
                    namespace,
                    pod,
                    (slurm_job_id(ident) or "") if kind == "slurm" else "",
                )
            )
        return out
