"""python -m eval.generate: end to end on a tiny random model with the real vocabulary, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import gptoss_jax
from cli_errors import assert_one_line_error
from gptoss_jax.cli import RANDOM_NOTICE
from gptoss_jax.chat import harmony
from gptoss_jax.inference.engine import Generator
from gptoss_jax.inference.sampling import SamplingParams


def run_generate(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eval.generate", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        env=env if env is not None else dict(os.environ),
    )


def test_generate_json_runs_end_to_end_and_matches_the_library(harmony_checkpoint, harmony_vocab_dir):
    result = run_generate(
        "--checkpoint", str(harmony_checkpoint), "--prompt", "hi", "--json",
        "--max-new-tokens", "12", "--temperature", "0", "--dtype", "float32",
    )
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.strip().splitlines()
    record = json.loads(line)
    assert {"tokens", "text", "final", "analysis", "timings"} <= set(record)
    assert len(record["tokens"]) == 12 and record["timings"]["generate_s"] > 0

    # The same request through the library: render with harmony, generate greedily.
    encoding = harmony.load_encoding()
    prompt = harmony.render_chat(encoding, [harmony.ChatMessage("user", "hi")], reasoning_effort="medium")
    model = gptoss_jax.load(harmony_checkpoint, dtype="float32")
    expected = Generator(model).generate(
        [prompt], max_new_tokens=12, sampling=SamplingParams(temperature=0), stop_tokens=harmony.stop_tokens(encoding)
    )[0]
    assert record["tokens"] == expected.tokens
    assert record["prompt_tokens"] == len(prompt)


def test_several_prompts_batch_into_one_json_line_each(harmony_checkpoint, harmony_vocab_dir):
    result = run_generate(
        "--checkpoint", str(harmony_checkpoint), "--prompt", "one", "--prompt", "two", "--json",
        "--max-new-tokens", "4",
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [record["prompt"] for record in records] == ["one", "two"]


def test_prompt_ids_complete_raw_tokens(harmony_checkpoint):
    result = run_generate(
        "--checkpoint", str(harmony_checkpoint), "--prompt-ids", "1,2,3", "--json", "--max-new-tokens", "5",
        "--temperature", "0",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["prompt_tokens"] == [1, 2, 3] and len(record["tokens"]) == 5


def test_a_prompt_from_stdin_streams_text_to_the_terminal(harmony_checkpoint, harmony_vocab_dir):
    result = run_generate("--checkpoint", str(harmony_checkpoint), "--max-new-tokens", "6", stdin="hello there")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.quick
def test_a_missing_checkpoint(tmp_path):
    assert_one_line_error(run_generate("--checkpoint", str(tmp_path / "nowhere"), "--prompt", "hi"), "nowhere")


@pytest.mark.quick
def test_an_unknown_reasoning_effort(harmony_checkpoint):
    result = run_generate("--checkpoint", str(harmony_checkpoint), "--prompt", "hi", "--reasoning-effort", "max")
    assert_one_line_error(result, "--reasoning-effort", "low, medium, high")


@pytest.mark.quick
def test_an_empty_prompt(harmony_checkpoint):
    assert_one_line_error(run_generate("--checkpoint", str(harmony_checkpoint), "--prompt", "  "), "empty")


def test_a_prompt_longer_than_the_context(harmony_checkpoint, harmony_vocab_dir):
    result = run_generate("--checkpoint", str(harmony_checkpoint), "--max-new-tokens", "1", stdin="hi " * 140_000)
    assert_one_line_error(result, "131072")


@pytest.mark.quick
def test_no_vocabulary_available(harmony_checkpoint, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TIKTOKEN_ENCODINGS_BASE"}
    env.update(TIKTOKEN_RS_CACHE_DIR=str(tmp_path / "empty-cache"), HTTPS_PROXY="http://127.0.0.1:9")
    result = run_generate("--checkpoint", str(harmony_checkpoint), "--prompt", "hi", env=env)
    assert_one_line_error(result, "TIKTOKEN_ENCODINGS_BASE", "o200k_base.tiktoken")


def test_the_random_checkpoint_demo_chats_with_no_network(tmp_path):
    # The demo's path: a tiny random model written on the fly, its vocabulary taken from bpe-openai.
    env = {key: value for key, value in os.environ.items() if key != "TIKTOKEN_ENCODINGS_BASE"}
    env.update(TIKTOKEN_RS_CACHE_DIR=str(tmp_path / "empty-cache"))
    result = run_generate("--checkpoint", "random", "--prompt", "hi", "--max-new-tokens", "4", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["tokens"]) == 4
    # It says, in one line, that the model is random and how to get the real one.
    notice = [line for line in result.stderr.splitlines() if "random" in line]
    assert notice == [RANDOM_NOTICE] and "--checkpoint openai/gpt-oss-20b" in notice[0]
