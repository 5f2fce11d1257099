"""The ``gputel=`` AdminComment token and the Slurm job watch, as pure functions."""

from __future__ import annotations

import subprocess
import threading

import pytest

from gputel.control.slurm_comment import decode, encode, merge, slurm_job_id
from gputel.control.slurm_jobs import JOB_GONE, SlurmJobWatch, job_verdict

SUMMARY = {
    "id": "slurm-42",
    "gpus": [0, 3],
    "duration_s": 3600.25,
    "energy_j": 1234567.89,
    "util_mean_pct": 87.25,
    "util_max_pct": 100.0,
    "memory_max_mib": 40536.0,
    "sm_active_mean_pct": 61.04,
    "throttled_s": 12.0,
    "xids": [79, 13],
    "release_reason": "released",
}


def slurm_mangles(text: str) -> str:
    """What sacctmgr and slurmdbd do to a stored AdminComment."""
    return text.lower().replace('"', "`")


def test_round_trip_survives_lowercasing_and_backticks() -> None:
    token = encode(SUMMARY)
    assert token == token.lower() and '"' not in token and " " not in token
    back = decode(slurm_mangles(merge('Other "Tool" Said=X', token)))
    assert back == {
        "gpus": [0, 3],
        "duration_s": 3600.2,
        "energy_j": 1234567.9,
        "util_mean_pct": 87.2,
        "memory_max_mib": 40536.0,
        "sm_active_mean_pct": 61.0,
        "throttled_s": 12.0,
        "xids": [79, 13],
    }


def test_unknown_fields_are_left_out_never_zero() -> None:
    token = encode(
        {"gpus": [1], "duration_s": 5.0, "energy_j": None, "util_mean_pct": float("nan")}
    )
    assert token == "gputel=gpus=1,duration_s=5"
    assert decode(token) == {"gpus": [1], "duration_s": 5.0}


def test_merge_keeps_other_text_and_replaces_only_its_token() -> None:
    assert merge("", "gputel=a=1") == "gputel=a=1"
    assert merge(None, "gputel=a=1") == "gputel=a=1"
    assert merge("js1:abc", "gputel=a=1") == "js1:abc gputel=a=1"
    assert merge("x=1 gputel=energy_j=5 y=2", "gputel=energy_j=6") == "x=1 gputel=energy_j=6 y=2"
    assert merge("notgputel=1", "gputel=a=1") == "notgputel=1 gputel=a=1"


@pytest.mark.parametrize("comment", [None, "", "js1:abc", "notgputel=energy_j=3"])
def test_decode_without_a_token_is_none(comment: str | None) -> None:
    assert decode(comment) is None


def test_decode_skips_fields_that_do_not_parse() -> None:
    assert decode("gputel=energy_j=abc,gpus=0+x,duration_s=2,junk,other=1") == {"duration_s": 2.0}


def test_slurm_job_id() -> None:
    assert slurm_job_id("slurm-1234") == "1234"
    for other in ("slurm-", "slurm-12a", "k8s-1234", "slurm-1234-x", "1234"):
        assert slurm_job_id(other) is None


# ---------------------------------------------------------------------------------- job watch
@pytest.mark.parametrize(
    ("rc", "out", "err", "verdict"),
    [
        (0, "JobId=7 JobName=wrap UserId=root(0) JobState=RUNNING Reason=None", "", False),
        (0, "JobId=7 JobName=wrap JobState=COMPLETING Reason=None", "", False),
        (0, "JobId=7 JobName=wrap JobState=PENDING Reason=Priority", "", False),
        (0, "JobId=7 JobName=wrap JobState=COMPLETED Reason=None", "", True),
        (0, "JobId=7 JobName=wrap JobState=CANCELLED Reason=None", "", True),
        (0, "JobId=7 JobName=wrap JobState=OUT_OF_MEMORY Reason=None", "", True),
        (1, "", "slurm_load_jobs error: Invalid job id specified", True),
        (1, "", "slurm_load_jobs error: Unable to contact slurm controller", None),
        (0, "garbage", "", None),
    ],
)
def test_job_verdict(rc: int, out: str, err: str, verdict: bool | None) -> None:
    assert job_verdict(rc, out, err) is verdict


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_watch_asks_in_the_background_rate_limited_and_only_for_slurm_ids() -> None:
    clock = FakeClock()
    asked: list[list[str]] = []
    states = {"7": "RUNNING", "8": "RUNNING"}
    release = threading.Event()
    release.set()

    def runner(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str] | str:
        release.wait(5)
        asked.append(argv)
        return subprocess.CompletedProcess(
            argv, 0, f"JobId={argv[-1]} JobState={states[argv[-1]]}", ""
        )

    watch = SlurmJobWatch(interval_s=15, clock=clock, runner=runner)
    ids = ["slurm-7", "slurm-8", "k8s-abc", "user-bob"]
    assert watch.gone(ids) == []
    assert watch.wait_idle(5)
    assert [a[-1] for a in asked] == ["7", "8"]
    assert asked[0] == ["scontrol", "-o", "show", "job", "7"]
    states["7"] = "COMPLETED"
    clock.now += 5
    assert watch.gone(ids) == [] and watch.wait_idle(5)
    assert len(asked) == 2  # not due yet
    clock.now += 10
    assert watch.gone(ids) == []  # the check starts now; its answer comes with the next call
    assert watch.wait_idle(5)
    assert watch.gone(ids) == ["slurm-7"]
    # A slow Slurm never blocks the caller, and one check runs at a time.
    release.clear()
    clock.now += 15
    assert watch.gone(["slurm-8"]) == []
    clock.now += 15
    assert watch.gone(["slurm-8"]) == []
    release.set()
    assert watch.wait_idle(5)
    assert JOB_GONE == "job-gone"


def test_watch_without_an_answer_keeps_the_allocation(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    watch = SlurmJobWatch(clock=clock, runner=lambda argv, t: "scontrol not found on PATH")
    for _ in range(3):
        assert watch.gone(["slurm-9"]) == []
        assert watch.wait_idle(5)
        clock.now += 60
    lines = [r.getMessage() for r in caplog.records if "scontrol" in r.getMessage()]
    assert lines == [
        "cannot ask Slurm whether job 9 is gone: scontrol not found on PATH; "
        "its allocation stays open until the epilog releases it"
    ]
