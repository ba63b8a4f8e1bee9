"""Data files as the commands read them (eval examples, perplexity text, training conversations, RL
prompts): any failure is one DataError naming the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from gptoss_jax.errors import DataError


def read_text(path: str | Path, what: str = "data") -> str:
    """The file as UTF-8 text; a DataError saying why it cannot be read (`what` says what it was for)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read {what} ({getattr(error, 'strerror', None) or error})") from None


def read_jsonl(path: str | Path, what: str = "data") -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is a DataError
    naming the file and line."""
    out = []
    # split on newlines only: splitlines() would also cut at U+2028, which a JSON string may hold raw
    for number, line in enumerate(read_text(path, what).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        out.append((number, record))
    return out
