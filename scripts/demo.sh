#!/usr/bin/env bash
# Install the library into .venv (created if missing) and run the main command, `python -m eval.generate`.
# With no arguments: a short chat with a tiny random model that has gpt-oss's real vocabulary (its
# replies are gibberish, but every step of the real pipeline runs). With arguments: they go to
# eval.generate, e.g. `bash scripts/demo.sh --prompt "Why is the sky blue?"` for openai/gpt-oss-20b.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[demo]"
if [ "$#" -eq 0 ]; then
  set -- --checkpoint random --prompt "Hello! What can you do?" --show-reasoning --max-new-tokens 32
fi
.venv/bin/python -m eval.generate "$@"
