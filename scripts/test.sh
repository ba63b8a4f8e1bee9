#!/usr/bin/env bash
# Install everything the test suite needs into .venv (created if missing) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[test]"
# OpenAI's reference (a test peer): its metadata asks for Python >= 3.12, but gpt_oss.torch runs on 3.10+.
.venv/bin/pip install -q --no-deps --ignore-requires-python "gpt-oss==0.0.9"
.venv/bin/python -m pytest -q "$@"
