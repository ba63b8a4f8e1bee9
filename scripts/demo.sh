#!/usr/bin/env bash
# Install the library into .venv (created if missing) and run the demo; arguments go to `python -m eval.demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e .
.venv/bin/python -m eval.demo "$@"
