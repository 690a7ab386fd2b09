"""The atheris harness of ``make fuzz`` runs (briefly) on every target without a crash."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="atheris ships x86-64 wheels only")
def test_the_atheris_harness_runs_every_target_without_a_crash(tmp_path):
    # libFuzzer's RSS limit reads ru_maxrss, which Linux carries from the forking process
    # through fork + exec: the limit counts this pytest session's own peak (over 2 GB after
    # the engine tests), so it is set as `make fuzz` sets it
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.run",
            "-runs=5000",
            "-rss_limit_mb=8192",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done 5000 runs" in done.stderr
    assert not list(tmp_path.glob("crash-*"))
