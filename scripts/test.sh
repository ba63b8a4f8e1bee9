#!/usr/bin/env bash
# Install everything the test suite needs into .venv (created if missing) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The aarch64 kernel test cross-compiles and runs its program under qemu-user (Debian / Ubuntu packages).
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  if command -v apt-get >/dev/null; then
    sudo=$([ "$(id -u)" = 0 ] || echo sudo)
    packages="g++-aarch64-linux-gnu qemu-user"
    $sudo apt-get install -y -q --no-install-recommends $packages >/dev/null \
      || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q --no-install-recommends $packages >/dev/null; } \
      || echo "note: could not install $packages; the aarch64 kernel test will fail" >&2
  else
    echo "note: no apt-get here; install an aarch64 cross g++ and qemu-aarch64, or the aarch64 kernel test fails" >&2
  fi
fi
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[test]"
# OpenAI's reference (a test peer): its metadata asks for Python >= 3.12, but gpt_oss.torch runs on 3.10+.
.venv/bin/pip install -q --no-deps --ignore-requires-python "gpt-oss==0.0.9"
# Two worker processes (GPTOSS_JAX_TEST_WORKERS; 0 runs the tests in this process): most tests wait on
# XLA's compiler, one thread, so two overlap well on 2 cores. A test file stays in one worker: its module
# fixtures (the 8-device runs) run once.
.venv/bin/python -m pytest -q -n "${GPTOSS_JAX_TEST_WORKERS:-2}" --dist loadfile "$@"
