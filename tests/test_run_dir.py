"""The run directory does not trust its contents: owner, modes, symlinks, the lock file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gputel import runtime
from test_hooks import GPUTEL, env_for

SECRET = "precious contents\n"


def agent(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GPUTEL, "agent"], env=env_for(tmp_path), capture_output=True, text=True, timeout=30
    )


def test_symlinked_lock_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    target = tmp_path / "target"
    target.write_text(SECRET)
    (run / runtime.AGENT_LOCK).symlink_to(target)
    out = agent(tmp_path)
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "agent.lock" in lines[0] and "symlink" in lines[0], out.stderr
    assert target.read_text() == SECRET
    assert (run / runtime.AGENT_LOCK).is_symlink()


def test_hard_linked_lock_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    target = tmp_path / "target"
    target.write_text(SECRET)
    os.link(target, run / runtime.AGENT_LOCK)
    with pytest.raises(runtime.RunDirError, match="not a plain file"):
        runtime.take_agent_lock(run)
    assert target.read_text() == SECRET


def test_lock_is_created_new_and_holds(tmp_path: Path) -> None:
    fd = runtime.take_agent_lock(tmp_path)
    try:
        assert (tmp_path / runtime.AGENT_LOCK).read_text() == f"{os.getpid()}\n"
        with pytest.raises(runtime.LockHeld) as held:
            runtime.take_agent_lock(tmp_path)
        assert held.value.holder == os.getpid()
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o757, 0o1777])
def test_run_dir_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(mode)
    with pytest.raises(runtime.RunDirError, match="writable by others"):
        runtime.ensure_run_dir(run)
    out = agent(tmp_path)
    assert out.returncode == 1 and "writable by others" in out.stderr, out
    assert not (run / runtime.AGENT_LOCK).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_run_dir_owned_by_another_user_is_refused_even_for_root(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    target = tmp_path / "target"
    target.write_text(SECRET)
    (run / runtime.AGENT_LOCK).symlink_to(target)
    os.chown(run, 65534, 65534)  # nobody
    os.lchown(run / runtime.AGENT_LOCK, 65534, 65534)
    with pytest.raises(runtime.RunDirError, match="owned by uid 65534"):
        runtime.ensure_run_dir(run)
    out = agent(tmp_path)
    assert out.returncode == 1 and "owned by uid 65534" in out.stderr, out
    assert target.read_text() == SECRET


def test_state_files_are_not_read_through_symlinks(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"pid": 1}')
    (tmp_path / runtime.RECORDER_STATE_FILE).symlink_to(elsewhere)
    assert runtime.read_json(tmp_path / runtime.RECORDER_STATE_FILE) is None
    (tmp_path / "plain.json").write_text('{"pid": 1}')
    assert runtime.read_json(tmp_path / "plain.json") == {"pid": 1}


def test_only_a_recorder_is_signalled_for_the_recorder_lock(tmp_path: Path) -> None:
    """A pid read from recorder.lock is signalled only when it runs ``gputel record`` (by any
    path to the command), never a process that took over the number."""
    from gputel.runtime import _is_recorder

    script = (
        f"exec -a /usr/local/bin/gputel {sys.executable} -c 'import time; time.sleep(30)' record"
    )
    installed = subprocess.Popen(["bash", "-c", script])
    other = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while not _is_recorder(installed.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _is_recorder(installed.pid)
        assert not _is_recorder(other.pid)
    finally:
        for p in (installed, other):
            p.kill()
            p.wait(10)
