"""Pod names from the kubelet's pod log tree, and the info of each open allocation."""

from __future__ import annotations

from pathlib import Path

from gputel.schema import ProcessRecord
from gputel.sources.pods import PodNames, parse_entry
from gputel.telemetry.allocation_info import AllocationInfo, AllocationNames, kind_of

UID = "1d4a2b3c-5e6f-4a1b-8c9d-0242ac120002"


def test_parse_entry() -> None:
    assert parse_entry(f"ml-team_trainer-0_{UID.upper()}") == ("ml-team", "trainer-0", UID)
    for bad in ("junk", "a_b", "a_b_c_d", "_b_c", "a__c"):
        assert parse_entry(bad) is None


def test_pod_names_rescan_at_most_every_interval(tmp_path: Path) -> None:
    now = [0.0]
    names = PodNames(tmp_path / "pods", rescan_s=30, clock=lambda: now[0])
    assert names.lookup(UID) is None  # no directory at all: no names, no error
    (tmp_path / "pods" / f"ns_pod-a_{UID}").mkdir(parents=True)
    now[0] = 10
    assert names.lookup(UID) is None  # listed 10 s ago: not again yet
    now[0] = 31
    assert names.lookup(UID) == ("ns", "pod-a")
    assert names.lookup(UID.upper()) == ("ns", "pod-a")


def test_kind_of() -> None:
    assert kind_of("slurm-12") == "slurm"
    assert kind_of("slurm-x") == "hooked"
    assert kind_of(f"k8s-{UID}") == "k8s"
    assert kind_of("container-0123456789ab") == "container"
    assert kind_of("unit-cron.service") == "unit"
    assert kind_of("user-bob") == "user"
    assert kind_of("train-run-7") == "hooked"
    assert kind_of("job") == "hooked"


def test_infos_join_names_users_and_slurm_ids(tmp_path: Path) -> None:
    (tmp_path / f"ml_trainer_{UID}").mkdir()
    names = AllocationNames(PodNames(tmp_path))
    procs = [
        ProcessRecord(0, 10, "alice", "python", "slurm-5", 1.0, None),
        ProcessRecord(1, 11, None, None, None, 1.0, None),
        ProcessRecord(1, 12, "root", "python", f"k8s-{UID}", 1.0, None),
    ]
    got = names.infos(["slurm-5", "run-7", f"k8s-{UID}", "user-bob", "slurm-5"], procs)
    assert got == [
        AllocationInfo("slurm-5", "slurm", "alice", "", "", "5"),
        AllocationInfo("run-7", "hooked", "", "", "", ""),
        AllocationInfo(f"k8s-{UID}", "k8s", "root", "ml", "trainer", ""),
        AllocationInfo("user-bob", "user", "bob", "", "", ""),
    ]
    # The user stays known after the processes have left (the allocation may still be open).
    assert names.infos(["slurm-5"], [])[0].user == "alice"
