"""Supervised fine-tuning: the loss falls, runs resume exactly, bad data and configs are named."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import gptoss_jax
from gptoss_jax.chat import harmony
from gptoss_jax.errors import ConfigError, DataError
from gptoss_jax.lora import LoRAConfig
from train import sft
from gptoss_jax.training import OptimizerConfig
from train.config import SFTConfig, read_config
from train.data import load_dataset

DATA = Path(__file__).parents[1] / "configs" / "data" / "sft-arithmetic.jsonl"


def make_config(run_dir: Path, checkpoint: Path, **changes) -> SFTConfig:
    config = SFTConfig(
        checkpoint=str(checkpoint),
        data=str(DATA),
        run_dir=str(run_dir),
        steps=10,
        batch_size=4,
        max_length=128,
        dtype="float32",
        reasoning_effort="low",
        lora=LoRAConfig(rank=4, alpha=8.0),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2),
        save_every=100,
    )
    return dataclasses.replace(config, **changes)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assistant_logprob(model, examples) -> float:
    """Mean log-probability the model gives the learned (assistant) tokens of `examples`: one forward of
    them all, padded at the end (a causal model's earlier positions do not see the padding)."""
    length = max(len(example.tokens) for example in examples)
    tokens = np.zeros((len(examples), length), np.int32)
    learned = np.zeros((len(examples), length), bool)
    for row, example in enumerate(examples):
        tokens[row, : len(example.tokens)] = example.tokens
        learned[row, : len(example.tokens)] = example.learned
    hidden, _ = model.hidden(tokens[:, :-1])
    logprobs = np.asarray(model.token_logprobs(hidden, tokens[:, 1:]))
    return float(logprobs[learned[:, 1:]].sum()) / int(learned[:, 1:].sum())


def test_sft_loss_falls_and_the_adapters_raise_the_answers_likelihood(tmp_path, harmony_checkpoint, harmony_vocab_dir):
    config = make_config(tmp_path / "run", harmony_checkpoint, dtype="bfloat16")
    trainer = sft.train(config, progress=False)
    curve = losses(tmp_path / "run")
    assert len(curve) == config.steps
    assert np.mean(curve[-3:]) < 0.7 * np.mean(curve[:2]), curve

    examples = load_dataset(DATA, harmony.load_encoding(), config.max_length, "low").examples[:8]
    base = gptoss_jax.load(harmony_checkpoint, dtype="float32")
    assert assistant_logprob(trainer.model(), examples) > assistant_logprob(base, examples) + 2.0


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, harmony_checkpoint, harmony_vocab_dir):
    # Dropout (RNG), accumulation over micro-batches and epoch boundaries (10 examples, 4 a step) all
    # have to line up for the second half to match.
    data = tmp_path / "ten.jsonl"
    data.write_text("\n".join(DATA.read_text().splitlines()[:10]) + "\n")
    changes = dict(
        data=str(data), steps=6, batch_size=2, grad_accum=2, save_every=2,
        lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.1),
    )  # fmt: skip
    straight = sft.train(make_config(tmp_path / "straight", harmony_checkpoint, **changes), progress=False)
    sft.train(make_config(tmp_path / "resumed", harmony_checkpoint, **changes), progress=False, stop_after=3)
    resumed = sft.train(make_config(tmp_path / "resumed", harmony_checkpoint, **changes), progress=False)

    assert resumed.step == straight.step == 6
    np.testing.assert_allclose(losses(tmp_path / "resumed"), losses(tmp_path / "straight"), rtol=0, atol=1e-6)
    for ours, theirs in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=0, atol=1e-6)
    # Saved every 2 steps and at the stop (3); the last 3 kept.
    assert sorted(int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == [3, 4, 6]


def test_full_fine_tuning_trains_every_weight(tmp_path, harmony_checkpoint, harmony_vocab_dir):
    config = make_config(
        tmp_path / "full", harmony_checkpoint, steps=4, lora=None, experts="bfloat16",
        optimizer=OptimizerConfig(learning_rate=1e-3),
    )  # fmt: skip
    trainer = sft.train(config, progress=False)
    base = nnx.state(gptoss_jax.load(harmony_checkpoint, dtype="float32", experts="bfloat16"), nnx.Param)
    trained = nnx.state(trainer.model(), nnx.Param)
    changed = [
        not np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(base))
    ]
    assert all(changed)
    assert losses(tmp_path / "full")[-1] < losses(tmp_path / "full")[0]


@pytest.mark.quick
def test_malformed_jsonl_line_is_named_with_its_number(tmp_path, harmony_vocab_dir):
    data = tmp_path / "bad.jsonl"
    good = DATA.read_text().splitlines()[0]
    data.write_text(f"{good}\n\n{good}\n{{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:4: not valid JSON"):
        load_dataset(data, harmony.load_encoding(), 128, "low")
    data.write_text(f'{good}\n{{"messages": [{{"role": "robot", "content": "x"}}]}}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: message 0: expected an object with role"):
        load_dataset(data, harmony.load_encoding(), 128, "low")


@pytest.mark.quick
def test_conversations_without_an_assistant_message_are_skipped_and_counted(tmp_path, harmony_vocab_dir):
    data = tmp_path / "some.jsonl"
    user_only = json.dumps({"messages": [{"role": "user", "content": "hello?"}]})
    data.write_text("\n".join([DATA.read_text().splitlines()[0], user_only, user_only]) + "\n")
    dataset = load_dataset(data, harmony.load_encoding(), 128, "low")
    assert len(dataset.examples) == 1 and dataset.skipped_no_assistant == 2
    assert dataset.warnings(str(data), 128) == [f"{data}: skipped 2 conversation(s) with no assistant message"]


@pytest.mark.quick
def test_only_assistant_tokens_after_the_header_are_learned(harmony_vocab_dir):
    encoding = harmony.load_encoding()
    messages = [
        harmony.ChatMessage("user", "2+2?"),
        harmony.ChatMessage("assistant", "add", channel="analysis"),
        harmony.ChatMessage("assistant", "4", channel="final"),
    ]
    tokens, learned = harmony.render_training(encoding, messages, reasoning_effort="low")
    learned_text = encoding.decode([t for t, keep in zip(tokens, learned) if keep])
    assert learned_text == "<|channel|>analysis<|message|>add<|end|><|channel|>final<|message|>4<|return|>"
    prompt = harmony.render_chat(encoding, messages[:1], reasoning_effort="low")
    assert tokens[: len(prompt)] == prompt  # the unlearned start is exactly what inference prompts with


@pytest.mark.quick
def test_cli_rejects_an_unknown_config_key_in_one_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"checkpoint: random\ndata: {DATA}\nrun_dir: {tmp_path / 'run'}\nlora:\n  rnk: 4\n")
    assert sft.main(["--config", str(config)]) == 1
    assert capsys.readouterr().err == "error: unknown config key 'lora.rnk' (known: rank, alpha, dropout, targets)\n"
    assert sft.main(["--config", str(config), "lora={}", "stepz=3"]) == 1
    assert "unknown config key 'stepz'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.quick
def test_config_overrides_and_number_parsing(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("checkpoint: random\ndata: d.jsonl\nrun_dir: r\noptimizer:\n  learning_rate: 1e-3\n")
    parsed = read_config(SFTConfig, config, ["lora.rank=16", "lora.targets=[q,v]", "steps=7"])
    assert parsed.optimizer.learning_rate == 1e-3 and parsed.steps == 7
    assert parsed.lora == LoRAConfig(rank=16, targets=("q", "v"))
    with pytest.raises(ConfigError, match="config key 'steps': expected int, got 'many'"):
        read_config(SFTConfig, config, ["steps=many"])
    with pytest.raises(ConfigError, match="full fine-tuning .* needs experts: bfloat16 or auto"):
        read_config(SFTConfig, config, ["lora=null", "experts=mxfp4"])
    with pytest.raises(ConfigError, match="experts must be one of auto, mxfp4, bfloat16, got 'fp8'"):
        read_config(SFTConfig, config, ["experts=fp8"])


@pytest.mark.quick
def test_an_unknown_reasoning_effort_is_a_config_error_naming_the_choices(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("checkpoint: random\ndata: d.jsonl\nrun_dir: r\n")
    with pytest.raises(ConfigError, match="reasoning_effort must be one of low, medium, high, got 'max'"):
        read_config(SFTConfig, config, ["reasoning_effort=max"])
