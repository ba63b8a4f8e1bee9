"""RL: each loss against a direct numpy computation, rollout/trainer agreement, router replay, learning."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax
from gptoss_jax.errors import ConfigError
from gptoss_jax.lora import LoRAConfig
from gptoss_jax.training import OptimizerConfig
from train import grpo
from train.rewards import RewardError
from gptoss_jax.rl import PolicyLoss, group_advantages, policy_objective

# Hand-made batch: 3 rows of 5 tokens; row 2 has 2 padded tokens; ratios cross both clip edges.
NEW = np.log(np.array([[0.5, 0.9, 0.3, 0.2, 0.6], [0.45, 0.1, 0.8, 0.5, 0.5], [0.7, 0.2, 0.9, 0.3, 0.3]]))
OLD = np.log(np.array([[0.5, 0.6, 0.4, 0.2, 0.4], [0.5, 0.2, 0.5, 0.5, 0.6], [0.7, 0.4, 0.6, 0.9, 0.1]]))
REF = np.log(np.array([[0.4, 0.8, 0.3, 0.3, 0.5], [0.4, 0.2, 0.7, 0.4, 0.5], [0.6, 0.3, 0.8, 0.2, 0.2]]))
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.float64)
ADVANTAGES = np.array([1.5, -0.7, 0.4])


def numpy_loss(loss: str, eps_low=0.2, eps_high=0.28, beta=0.0, max_length=8) -> float:
    """The loss written out directly, row by row and token by token."""
    total_rows = []
    token_terms = []
    for row in range(3):
        tokens = [t for t in range(5) if MASK[row, t]]
        a = ADVANTAGES[row]
        kls = [np.exp(REF[row, t] - NEW[row, t]) - (REF[row, t] - NEW[row, t]) - 1 for t in tokens]
        if loss == "gspo":
            s = np.exp(np.mean([NEW[row, t] - OLD[row, t] for t in tokens]))
            surrogate = min(s * a, np.clip(s, 1 - eps_low, 1 + eps_high) * a)
            total_rows.append(-surrogate + beta * np.mean(kls))
            continue
        terms = []
        for t, kl in zip(tokens, kls):
            r = np.exp(NEW[row, t] - OLD[row, t])
            terms.append(-min(r * a, np.clip(r, 1 - eps_low, 1 + eps_high) * a) + beta * kl)
        token_terms += terms
        total_rows.append(np.mean(terms) if loss == "grpo" else np.sum(terms) / max_length)
    return float(np.sum(token_terms) / len(token_terms)) if loss == "dapo" else float(np.mean(total_rows))


@pytest.mark.quick
@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo", "gspo"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_each_loss_matches_a_direct_computation(loss, beta):
    settings = PolicyLoss(loss, epsilon_low=0.2, epsilon_high=0.28, beta=beta, max_completion_length=8)
    as_jax = [jnp.asarray(x, jnp.float32) for x in (NEW, OLD, REF, ADVANTAGES, MASK)]
    objective, metrics = policy_objective(settings, as_jax[0], as_jax[1], as_jax[2], as_jax[3], as_jax[4])
    assert float(objective / metrics["weight"]) == pytest.approx(numpy_loss(loss, beta=beta), rel=1e-5, abs=1e-6)


@pytest.mark.quick
def test_clip_fractions_count_each_side_and_ignore_padding():
    settings = PolicyLoss("dapo", epsilon_low=0.2, epsilon_high=0.28)
    _, metrics = policy_objective(settings, *(jnp.asarray(x, jnp.float32) for x in (NEW, OLD, REF, ADVANTAGES, MASK)))
    ratio = np.exp(NEW - OLD)
    low = ((ratio < 0.8) & (ADVANTAGES[:, None] < 0) & (MASK > 0)).sum()
    high = ((ratio > 1.28) & (ADVANTAGES[:, None] > 0) & (MASK > 0)).sum()
    assert (float(metrics["clipped_low"]), float(metrics["clipped_high"])) == (low, high) and low > 0 and high > 0
    assert float(metrics["tokens"]) == MASK.sum() == 13  # the padded tokens (ratio 0.3 / 3.0) count nowhere


@pytest.mark.quick
def test_group_advantages_normalise_per_group_and_zero_variance_groups_give_zero():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    scaled, centred = group_advantages(rewards, scale=True), group_advantages(rewards, scale=False)
    np.testing.assert_allclose(centred, rewards - rewards.mean(axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(scaled[0], (rewards[0] - 0.5) / (np.std(rewards[0], ddof=1) + 1e-4), rtol=1e-5)
    assert not scaled[1].any() and not centred[1].any()


def grpo_config(tmp_path: Path, checkpoint, **changes) -> grpo.GRPOConfig:
    values = dict(
        checkpoint=str(checkpoint), run_dir=str(tmp_path / "run"), steps=6, prompts_per_step=4,
        num_generations=8, max_new_tokens=16, temperature=0.125, reasoning_effort="low",
        reward="train.rewards:token_fraction", reward_kwargs={"low": 0, "high": 100544}, micro_batch=16,
        dtype="float32", lora=LoRAConfig(rank=8, alpha=16.0), optimizer=OptimizerConfig(learning_rate=5e-2),
        save_every=100,
    )  # fmt: skip
    values.update(changes)
    return grpo.GRPOConfig(**values)


def rewards(run_dir: Path) -> list[float]:
    return [json.loads(line)["reward_mean"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_a_learnable_reward_and_learning_rate_zero_does_not(tmp_path, harmony_checkpoint, harmony_vocab_dir):
    learning = grpo.train(grpo_config(tmp_path / "a", harmony_checkpoint, beta=0.02), progress=False)
    curve = rewards(tmp_path / "a" / "run")
    assert max(curve[-2:]) > curve[0] + 0.3, curve
    metrics = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["logprob_gap_max"] < 1e-5  # the first pass's ratio is 1: rollout and trainer agree
    assert learning.step == 6
    # The KL reference is the starting model: the base with the adapters off, bit for bit.
    assert abs(metrics[0]["kl"]) < 1e-6 < metrics[-1]["kl"]
    tokens = np.arange(1, 30)[None] * 1009
    base = learning.trainer.train_fn.model(learning.reference)
    plain = gptoss_jax.load(harmony_checkpoint, dtype="float32")
    np.testing.assert_array_equal(np.asarray(base(tokens)), np.asarray(plain(tokens)))

    # With learning rate zero every step samples the same policy, so 2 steps show what 6 would.
    unchanged = OptimizerConfig(learning_rate=0.0)
    frozen = grpo.train(grpo_config(tmp_path / "b", harmony_checkpoint, beta=0.02, optimizer=unchanged, steps=2),
                        progress=False)  # fmt: skip
    still = rewards(tmp_path / "b" / "run")
    assert len(still) == 2 and max(still) < curve[0] + 0.15, still
    assert frozen.step == 2


def test_router_replay_sends_training_tokens_through_the_rollouts_experts(tmp_path, harmony_checkpoint, harmony_vocab_dir):
    run = grpo.GRPO(grpo_config(tmp_path, harmony_checkpoint, prompts_per_step=1, num_generations=4, micro_batch=4))
    prompts, completions, _, _ = run.rollout()
    batch = grpo.build_batch(prompts, completions, np.zeros(4), 4, replay=True, window=16)
    micro = {name: value[0] for name, value in batch.items()}
    # Perturb every router after the rollout: without replay the training forward would pick other experts.
    model = run.trainer.model()
    for block in model.groups.layers:
        block.mlp.router[...] = block.mlp.router[...] + 0.5 * jax.random.normal(jax.random.key(7), block.mlp.router.shape)
    valid = micro["positions"] >= 0
    _, _, replayed = model.forward(micro["inputs"], micro["positions"], routes=micro["routes"])
    _, _, free = model.forward(micro["inputs"], micro["positions"])
    replayed, free = np.asarray(replayed)[:, :, valid], np.asarray(free)[:, :, valid]
    np.testing.assert_array_equal(replayed, micro["routes"][:, :, valid])
    assert (free != micro["routes"][:, :, valid]).any()


def test_reward_failures_name_the_function_and_the_batch(tmp_path, harmony_checkpoint, harmony_vocab_dir):
    run = grpo.GRPO(grpo_config(tmp_path, harmony_checkpoint, prompts_per_step=1, num_generations=2, micro_batch=2,
                                reward="test_grpo:raising_reward", reward_kwargs={}))  # fmt: skip
    with pytest.raises(RewardError, match=r"reward test_grpo:raising_reward on the batch of step 1 \(2 completions\) "
                                          r"raised ZeroDivisionError: no"):  # fmt: skip
        run.run_step()
    run.reward, run.config = wrong_length_reward, grpo_config(tmp_path, harmony_checkpoint, prompts_per_step=1,
                                                              num_generations=2, micro_batch=2, reward="test_grpo:x",
                                                              reward_kwargs={})
    with pytest.raises(RewardError, match=r"reward test_grpo:x on the batch of step 1 .* returned 1 values, expected 2"):
        run.run_step()


def raising_reward(prompts, completions, fields):
    raise ZeroDivisionError("no")


def wrong_length_reward(prompts, completions, fields):
    return [1.0]


def test_prompts_longer_than_the_limit_are_skipped_and_counted(tmp_path, harmony_checkpoint, harmony_vocab_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "2+2?", "answer": 4}) + "\n" + json.dumps({"prompt": "word " * 400, "answer": 1}) + "\n")
    config = grpo_config(tmp_path, harmony_checkpoint, prompts=str(prompts), max_prompt_length=128, steps=1,
                         prompts_per_step=1, num_generations=2, micro_batch=2, reward="train.rewards:numeric_answer",
                         reward_kwargs={})  # fmt: skip
    run = grpo.train(config, progress=False)
    assert len(run.prompts.examples) == 1 and run.prompts.skipped_too_long == 1
    assert "skipped 1 prompt(s) longer than max_prompt_length=128" in capsys.readouterr().err


@pytest.mark.quick
def test_grpo_config_errors_are_named():
    with pytest.raises(ConfigError, match="micro_batch=3 must divide prompts_per_step \\* num_generations = 32"):
        grpo.GRPOConfig(checkpoint="random", run_dir="r", micro_batch=3)
    with pytest.raises(ConfigError, match="loss must be one of grpo, dr_grpo, dapo, gspo"):
        grpo.GRPOConfig(checkpoint="random", run_dir="r", loss="ppo")

