"""python -m eval.run end to end on tiny checkpoints: the log, the summary, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from cli_errors import assert_one_line_error
from conftest import TINY_HARMONY
from eval.tasks import TASKS, read_examples
from gptoss_jax.checkpoint.random_weights import random_hub_tensors
from gptoss_jax.checkpoint.writer import write_hub_checkpoint

# What the scripted model says after any chat prompt (which ends "<|start|>assistant"): one token each.
ASSISTANT, CHANNEL, FINAL, MESSAGE, FIFTY_SIX, RETURN = 173781, 200005, 17196, 200008, 5007, 200002
SCRIPT = [ASSISTANT, CHANNEL, FINAL, MESSAGE, FIFTY_SIX, RETURN]


@pytest.fixture(scope="module")
def scripted_checkpoint(tmp_path_factory):
    """A tiny model that always replies "<|channel|>final<|message|>56<|return|>".

    Attention outputs and experts are zero, so the final hidden state is the current token's embedding:
    token SCRIPT[i] embeds as basis vector i, and the unembedding row of SCRIPT[i + 1] reads it.
    """
    tensors = random_hub_tensors(TINY_HARMONY, seed=3)
    for name, value in tensors.items():
        if "o_proj" in name or (".experts." in name and "scales" not in name):
            tensors[name] = np.zeros_like(value)  # MXFP4 code 0 is +0
    embed = np.zeros((TINY_HARMONY.vocab_size, TINY_HARMONY.hidden_size), np.float32)
    unembed = np.zeros_like(embed)
    for i, (token, following) in enumerate(zip(SCRIPT, SCRIPT[1:])):
        embed[token, i] = 1.0
        unembed[following, i] = 1.0
    tensors["model.embed_tokens.weight"] = embed.astype(ml_dtypes.bfloat16)
    tensors["lm_head.weight"] = unembed.astype(ml_dtypes.bfloat16)
    return write_hub_checkpoint(tmp_path_factory.mktemp("ckpt") / "scripted", TINY_HARMONY, tensors)


def run_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eval.run", *args], capture_output=True, text=True, timeout=600, env=dict(os.environ)
    )


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_random_model_on_the_bundled_sample_writes_a_log_and_a_summary_that_agree(
    harmony_checkpoint, harmony_vocab_dir, tmp_path
):
    result = run_eval(
        "--task", "aime", "--checkpoint", str(harmony_checkpoint), "--samples", "2", "--max-new-tokens", "8",
        "--reasoning-effort", "low", "--output-dir", str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    rows = read_log(tmp_path / "aime-low.jsonl")
    summary = json.loads((tmp_path / "aime-low.summary.json").read_text())
    bundled = read_examples(TASKS["aime"], TASKS["aime"].example_file)
    assert sorted((row["id"], row["sample"]) for row in rows) == sorted(
        (example.id, sample) for example in bundled for sample in (0, 1)
    )
    for row in rows:
        assert {"prompt", "analysis", "final", "extracted", "correct"} <= set(row)
        assert row["completion_tokens"] <= 8
    assert summary["accuracy"] == sum(row["correct"] for row in rows) / len(rows)
    assert (summary["examples"], summary["samples"], summary["rows"]) == (5, 2, 10)
    assert "accuracy" in result.stdout and "95% CI (Wilson)" in result.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == ["aime-low.jsonl", "aime-low.summary.json"]


def test_a_model_that_always_answers_56_gets_one_of_the_five_custom_examples(
    scripted_checkpoint, harmony_vocab_dir, tmp_path
):
    result = run_eval(
        "--task", "custom", "--checkpoint", str(scripted_checkpoint), "--dtype", "float32", "--temperature", "0",
        "--max-new-tokens", "16", "--batch-size", "2", "--output-dir", str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    rows = read_log(tmp_path / "custom-medium.jsonl")
    assert [row["final"] for row in rows] == ["56"] * 5 and all(row["finish_reason"] == "stop" for row in rows)
    assert [row["correct"] for row in rows] == [row["answer"] == "56" for row in rows] == [False, True, False, False, False]
    summary = json.loads((tmp_path / "custom-medium.summary.json").read_text())
    assert summary["accuracy"] == 0.2 and summary["no_answer"] == 0.0
    assert "20.0%" in result.stdout


@pytest.mark.quick
@pytest.mark.parametrize(
    "args, words",
    [
        (["--task", "mmlu"], ["--task", "aime, gpqa, custom", "mmlu"]),
        (["--task", "aime", "--samples", "0"], ["--samples", "at least 1"]),
        (["--task", "aime", "--data", "{tmp}/bad.jsonl"], ["bad.jsonl:2", "'answer'"]),
        (["--task", "aime", "--data", "{tmp}/nowhere.jsonl"], ["nowhere.jsonl", "cannot read"]),
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(harmony_checkpoint, tmp_path, args, words):
    (tmp_path / "bad.jsonl").write_text('{"problem": "p", "answer": 1}\n{"problem": "q"}\n')
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = run_eval(*args, "--checkpoint", str(harmony_checkpoint), "--output-dir", str(tmp_path / "out"))
    assert_one_line_error(result, *words)
    assert not (tmp_path / "out").exists()
