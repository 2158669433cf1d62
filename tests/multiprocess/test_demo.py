"""``python -m dmodel demo``: three peer processes tell the story, or the exit status says no.

Every run gets its own ``--home``, so the test can check afterwards that no peer left
its embedded Redis running.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]


def demo(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMODEL_")}
    return subprocess.run([sys.executable, "-m", "dmodel", "demo", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=110, env=env)


def assert_no_store_left_running(home: Path) -> None:
    for pidfile in home.glob("host-*/redis/redis.pid"):
        # redis-server removes its pidfile when it shuts down cleanly.
        pid = int(pidfile.read_text().strip())
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        pytest.fail(f"{pidfile.parent.parent.name} left redis-server {pid} running")


def test_demo_tells_the_whole_story(tmp_path):
    result = demo(tmp_path / "demo", "--updates", "300")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for expected in [
        "B: salary -> DecryptionError",
        "Person(worker_id, chief_id).salary.get() -> '44321'",
        "A rejected it as unauthorized",
        "A's LogChanges listener: Person:",
        "C read A's whole log",
        "C's RejectUnauthorized listener vetoed the intruder's update",
        "Summary",
        "Every step behaved as narrated.",
    ]:
        assert expected in out, out
    assert "Traceback" not in out + result.stderr
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == \
        ["host-a", "host-b", "host-c"]
    assert_no_store_left_running(tmp_path / "demo")


@pytest.mark.parametrize("step, complaint", [
    ("intruder", "A accepted the intruder's change"),
    ("chief", "the chief cannot read the worker's salary"),
])
def test_a_broken_step_fails_the_demo(tmp_path, step, complaint):
    result = demo(tmp_path / "demo", "--break", step, "--timeout", "10", "--updates", "10")
    assert result.returncode == 1, result.stdout + result.stderr
    assert complaint in result.stdout
    assert "Every step behaved as narrated." not in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert_no_store_left_running(tmp_path / "demo")


def test_demo_refuses_a_home_in_use(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "something").write_text("x")
    result = demo(tmp_path / "demo")
    assert result.returncode == 2  # a usage error
    assert result.stderr.startswith("error: --home") and "not an empty directory" in result.stderr
    assert result.stdout == ""
