"""The o200k vocabulary offline, for tests: bpe-openai ships the file openai-harmony would download."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from pathlib import Path

import pytest

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


def write_vocab(folder: Path) -> Path:
    """Gunzip bpe-openai's o200k_base.tiktoken.gz into folder, checked against the hash harmony expects."""
    package = Path(importlib.util.find_spec("bpe_openai").origin).parent  # found, not imported (its import is slow)
    data = gzip.decompress((package / "data" / f"{VOCAB_FILE}.gz").read_bytes())
    assert hashlib.sha256(data).hexdigest() == VOCAB_SHA256, "bpe-openai's o200k_base differs from harmony's"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / VOCAB_FILE).write_bytes(data)
    return folder


@pytest.fixture(scope="session")
def harmony_vocab_dir(tmp_path_factory) -> Path:
    """A folder holding o200k_base.tiktoken, named by TIKTOKEN_ENCODINGS_BASE for the whole session."""
    folder = write_vocab(tmp_path_factory.mktemp("harmony_vocab"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_ENCODINGS_BASE", str(folder))
        yield folder
