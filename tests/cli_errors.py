"""What a command says on bad input: one line, `error: ...`, no traceback."""

from __future__ import annotations

import re
import subprocess

# Start-up lines a native library logs by itself before the command runs: with the plan extra installed
# on a machine without a GPU, jax's CUDA plugin logs "Could not find cuda drivers" (absl/glog format) at
# import. They are jax's, not the command's, and are left out of what the command said.
NATIVE_LOG = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called|[IWEF]\d{4} \d\d:\d\d:[\d.]+ +\d+ \S+:\d+\]"
)


def command_lines(stderr: str) -> list[str]:
    """The command's own stderr lines."""
    return [line for line in stderr.strip().splitlines() if not NATIVE_LOG.match(line)]


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = command_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
