"""python -m eval.perplexity against transformers' GptOssForCausalLM loss on the same random checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import GptOssForCausalLM

from cli_errors import assert_one_line_error
from eval.perplexity import LOGIT_CHUNK
from gptoss_jax.chat import harmony

pytestmark = pytest.mark.peer  # compares with transformers / OpenAI's reference (torch on the CPU)

TEXT = 3 * (
    "The quick brown fox jumps over the lazy dog. Perplexity measures how well a language model predicts a "
    "sample of text; lower is better. This text spans two windows, so the last one is only partly filled, "
    "and <|endoftext|> in it is plain text. "
)


def run_perplexity(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eval.perplexity", *args], capture_output=True, text=True, timeout=600,
        env=dict(os.environ),
    )


def test_mean_nll_over_windows_matches_transformers_loss(harmony_checkpoint, harmony_vocab_dir, tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    window = 150  # many times the tiny model's sliding window (16), and more than one chunk of logits
    assert window - 1 > LOGIT_CHUNK
    result = run_perplexity(
        "--checkpoint", str(harmony_checkpoint), "--text", str(tmp_path / "text.txt"), "--window", str(window),
        "--dtype", "float32", "--json",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)

    tokens = harmony.load_encoding().encode(TEXT, disallowed_special=())
    assert len(tokens) % window > 1  # a partly filled last window
    peer = GptOssForCausalLM.from_pretrained(harmony_checkpoint, dtype=torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens), window):
            piece = torch.tensor([tokens[start : start + window]])
            loss = peer(piece, labels=piece).loss  # mean over the window's predicted tokens
            total += float(loss) * (piece.shape[1] - 1)
            count += piece.shape[1] - 1
    assert (record["tokens"], record["scored"]) == (len(tokens), count)
    assert record["mean_nll"] == pytest.approx(total / count, rel=1e-5)
    assert record["perplexity"] == pytest.approx(torch.exp(torch.tensor(total / count)).item(), rel=1e-4)


@pytest.mark.parametrize(
    "text, args, words",
    [
        (None, [], ["nowhere.txt", "cannot read"]),
        ("", [], ["text.txt", "at least 2 tokens"]),
        ("Some text here.", ["--window", "1"], ["--window", "at least 2"]),
    ],
)
@pytest.mark.quick
def test_bad_input_is_one_error_line(harmony_checkpoint, harmony_vocab_dir, tmp_path, text, args, words):
    path = tmp_path / ("nowhere.txt" if text is None else "text.txt")
    if text is not None:
        path.write_text(text)
    result = run_perplexity("--checkpoint", str(harmony_checkpoint), "--text", str(path), *args)
    assert_one_line_error(result, *words)
