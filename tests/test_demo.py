"""The demo command: runs end to end on a tiny random checkpoint, and fails cleanly on bad input."""

from __future__ import annotations

import subprocess
import sys


def run_demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eval.demo", *args], capture_output=True, text=True, timeout=600)


def test_demo_continues_a_prompt_on_a_tiny_random_checkpoint():
    result = run_demo("--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "greedy next ids:" in result.stdout and "resident" in result.stdout


def test_demo_with_a_missing_checkpoint_exits_nonzero_with_one_line_and_no_traceback(tmp_path):
    result = run_demo("--checkpoint", str(tmp_path / "nowhere"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "nowhere" in result.stderr
