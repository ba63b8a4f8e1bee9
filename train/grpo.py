"""RL fine-tuning of the GRPO family: in-process rollouts, verifiable rewards, router replay.

    python -m train.grpo --config configs/grpo-tiny.yaml          # a toy reward a random model can learn
    python -m train.grpo --config configs/grpo-20b.yaml loss=dapo num_generations=16

Each step takes `prompts_per_step` prompts, samples `num_generations` harmony completions of each with
the inference engine (same model, same weights, no second copy), scores them with the reward, turns the
rewards into group advantages and takes `num_iterations` optimizer steps on the batch. Rollout and
trainer share one forward, and with router replay (on by default) the trainer sends every token through
the experts the rollout chose, so on the first pass the ratio is 1 up to float rounding (the measured
log-prob gap is logged). The KL reference is the model as it started: for LoRA the adapters switched off
(the base model exactly, no second copy of the weights); for full fine-tuning a copy of the starting weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import gptoss_jax
from gptoss_jax.chat import harmony
from gptoss_jax.chat.answers import final_answer
from gptoss_jax.chat.harmony import check_reasoning_effort
from gptoss_jax.cli import join_distributed, run_command
from gptoss_jax.datafile import read_jsonl
from gptoss_jax.errors import ConfigError, DataError
from gptoss_jax.inference.batching import Batcher, Request
from gptoss_jax.inference.sampling import SamplingParams
from gptoss_jax.config import check_experts
from gptoss_jax.lora import LoRAConfig, adapters_off
from gptoss_jax.sharding import host_array
from gptoss_jax.rl import LOSSES, PolicyLoss, completion_hidden, group_advantages, rl_loss
from gptoss_jax.training import OptimizerConfig
from train.config import check_full_run_experts, check_resumable, read_config, run_arguments, write_run_config
from train.data import example_order
from train.loop import MetricsLog, Trainer, setting_up
from train.model import base_checkpoint, build_model
from train.rewards import Sample, arithmetic_task, load_reward, score

ROW_BUCKET = 64  # completions are padded to a multiple of this many tokens (few compiled shapes)


ROLLOUTS = ("continuous", "static")

@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO-family RL (see configs/grpo-*.yaml for annotated examples)."""

    checkpoint: str  # a checkpoint folder, a hub repo id, or "random"
    run_dir: str
    prompts: str = ""  # JSONL of {"prompt": ..., fields the reward reads}; empty: the built-in arithmetic task
    task_size: int = 512  # problems in the built-in task
    steps: int = 100
    prompts_per_step: int = 4
    num_generations: int = 8  # completions per prompt (a group)
    max_new_tokens: int = 256
    max_prompt_length: int = 512  # longer prompts are skipped (and counted)
    temperature: float = 1.0
    top_p: float = 1.0
    reasoning_effort: str = "low"
    reward: str = "train.rewards:numeric_answer"  # module:function
    reward_kwargs: dict = dataclasses.field(default_factory=dict)
    loss: str = "grpo"  # grpo, dr_grpo, dapo, gspo
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0  # KL weight (k3 estimator) to the starting model
    num_iterations: int = 1  # optimizer steps per batch of rollouts
    micro_batch: int = 8  # completions per micro-batch of the training step
    router_replay: bool = True
    # continuous: completions take slots of one KV cache as they free (a row that ends early makes room
    # for the next); static: all completions in one batch until the longest ends (train.grpo before).
    rollout: str = "continuous"
    rollout_slots: int = 16  # continuous rollouts: completions decoded at once
    dtype: str = "bfloat16"
    experts: str = "auto"  # as the checkpoint stores them (MXFP4 stays packed), or "bfloat16" / "mxfp4"
    lora: LoRAConfig | None = LoRAConfig()
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-5)
    save_every: int = 20
    keep: int = 3
    seed: int = 0
    mesh: str = ""

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "num_generations", "max_new_tokens", "num_iterations",
                     "micro_batch", "save_every", "keep", "task_size", "max_prompt_length"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        try:
            check_reasoning_effort(self.reasoning_effort)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.rollout not in ROLLOUTS:
            raise ConfigError(f"rollout must be one of {', '.join(ROLLOUTS)}, got {self.rollout!r}")
        if self.rollout_slots < 1:
            raise ConfigError(f"rollout_slots must be at least 1, got {self.rollout_slots}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if (self.prompts_per_step * self.num_generations) % self.micro_batch:
            raise ConfigError(
                f"micro_batch={self.micro_batch} must divide prompts_per_step * num_generations = "
                f"{self.prompts_per_step * self.num_generations}"
            )
        check_full_run_experts(self.lora is None, check_experts(self.experts))

    @property
    def policy_loss(self) -> PolicyLoss:
        return PolicyLoss(self.loss, self.epsilon_low, self.epsilon_high, self.beta, self.max_new_tokens)


@dataclasses.dataclass
class Prompts:
    examples: list[dict]  # each has "prompt" and the reward's fields
    tokens: list[list[int]]  # rendered for the assistant's turn
    skipped_too_long: int = 0


def load_prompts(config: GRPOConfig, encoding) -> Prompts:
    """The prompts (a JSONL file or the arithmetic task), rendered; too-long ones skipped and counted."""
    if config.prompts:
        examples = []
        for number, record in read_jsonl(config.prompts, "prompts"):
            if not isinstance(record.get("prompt"), str):
                raise DataError(f"{config.prompts}:{number}: expected an object with a string 'prompt'")
            examples.append(record)
    else:
        examples = arithmetic_task(config.task_size, config.seed)
    prompts = Prompts([], [])
    for example in examples:
        message = [harmony.ChatMessage("user", example["prompt"])]
        tokens = harmony.render_chat(encoding, message, reasoning_effort=config.reasoning_effort)
        if len(tokens) > config.max_prompt_length:
            prompts.skipped_too_long += 1
            continue
        prompts.examples.append(example)
        prompts.tokens.append(tokens)
    if not prompts.examples:
        raise DataError(f"{config.prompts or 'task'}: no prompt fits max_prompt_length={config.max_prompt_length}")
    return prompts


def build_batch(prompts: list[list[int]], completions, advantages: np.ndarray, micro_batch: int, replay: bool,
                window: int) -> dict[str, np.ndarray]:  # fmt: skip
    """Arrays [micro-batches, micro_batch, ...]: each row's prompt + completion (inputs, positions, and with
    replay the experts every input went through, [.., L]), and its completion window of `window` tokens
    (targets, mask, the rollout's log-probs, [.., W]) starting at input `window_start`; advantages."""
    longest = max(len(p) + len(c.tokens) - 1 for p, c in zip(prompts, completions))
    length = -(-longest // ROW_BUCKET) * ROW_BUCKET
    rows = len(prompts)
    batch = {
        "inputs": np.zeros((rows, length), np.int32),
        "positions": np.full((rows, length), -1, np.int32),
        "window_start": np.zeros(rows, np.int32),
        "targets": np.zeros((rows, window), np.int32),
        "mask": np.zeros((rows, window), np.float32),
        "old_logprobs": np.zeros((rows, window), np.float32),
        "advantages": np.asarray(advantages, np.float32),
    }
    if replay:
        groups, pattern, _, k = completions[0].routes.shape
        routes = np.zeros((groups, pattern, rows, length, k), np.int32)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        sequence = list(prompt) + list(completion.tokens)
        n = len(sequence) - 1
        batch["inputs"][row, :n] = sequence[:-1]
        batch["positions"][row, :n] = np.arange(n)
        batch["window_start"][row] = len(prompt) - 1  # this input's target is the first completion token
        made = len(completion.tokens)
        batch["targets"][row, :made] = completion.tokens
        batch["mask"][row, :made] = 1.0
        batch["old_logprobs"][row, :made] = completion.logprobs
        if replay:
            routes[:, :, row, :n] = completion.routes
    micro = rows // micro_batch
    out = {name: value.reshape(micro, micro_batch, *value.shape[1:]) for name, value in batch.items()}
    if replay:
        out["routes"] = np.moveaxis(routes.reshape(groups, pattern, micro, micro_batch, length, k), 2, 0)
    return out


class GRPO:
    """The run: model, trainer, rollout engine, prompts, reward."""

    def __init__(self, config: GRPOConfig):
        self.config = config
        self.run_dir = Path(config.run_dir)
        checkpoint = base_checkpoint(config)
        self.encoding = harmony.load_encoding(checkpoint)
        self.prompts = load_prompts(config, self.encoding)
        self.reward = load_reward(config.reward)
        rows = {"micro_batch": config.micro_batch}
        if config.rollout == "continuous":
            rows["rollout_slots"] = min(config.rollout_slots, config.prompts_per_step * config.num_generations)
        else:
            rows["prompts_per_step * num_generations"] = config.prompts_per_step * config.num_generations
        model = build_model(config, checkpoint, rows)
        if config.max_prompt_length + config.max_new_tokens > model.config.max_context:
            raise ConfigError(
                f"max_prompt_length + max_new_tokens = {config.max_prompt_length + config.max_new_tokens} exceeds "
                f"the model's context of {model.config.max_context} tokens"
            )
        self.trainer = Trainer(
            model,
            nnx.Param if config.lora is None else nnx.LoRAParam,
            config.optimizer,
            config.steps * config.num_iterations,
            self.run_dir,
            loss_fn=rl_loss(config.policy_loss),
            seed=config.seed,
            keep=config.keep,
            use_dropout=config.lora is not None and config.lora.dropout > 0,
            row_axes={"routes": 3},  # [micro-batches, groups, pattern, rows, length, k]: see build_batch
        )
        # Full fine-tuning keeps the starting weights for the KL term (LoRA needs no copy: see `reference`).
        needs_copy = config.lora is None and config.beta > 0
        self._starting = jax.tree.map(jnp.copy, self.trainer.params) if needs_copy else None
        self.resumed = self.trainer.restore_latest()
        if config.rollout == "continuous":
            slots = min(config.rollout_slots, config.prompts_per_step * config.num_generations)
            self.engine = Batcher(self.trainer.model(), slots=slots, record_routes=config.router_replay,
                                  context=config.max_prompt_length + config.max_new_tokens)  # fmt: skip
        else:
            self.engine = gptoss_jax.Generator(self.trainer.model(), record_routes=config.router_replay)
        self._reference_logprobs = jax.jit(self._reference_impl)

    @property
    def reference(self) -> dict | None:
        """The KL reference's trainable weights: the adapters switched off (the base model exactly), or
        for full fine-tuning the starting weights when beta > 0."""
        return adapters_off(self.trainer.params) if self.config.lora is not None else self._starting

    @property
    def step(self) -> int:
        return self.trainer.step // self.config.num_iterations

    def _reference_impl(self, params, frozen, batch):
        model = self.trainer.train_fn.model(params, frozen)
        return model.token_logprobs(completion_hidden(model, batch), batch["targets"])

    def rollout(self) -> tuple[list[list[int]], list, list[Sample], list[dict]]:
        """Sample every completion of this step's prompts with the current weights."""
        config = self.config
        order = example_order(len(self.prompts.examples), config.seed, self.trainer.examples_seen, config.prompts_per_step)
        prompts = [self.prompts.tokens[i] for i in order for _ in range(config.num_generations)]
        fields = [self.prompts.examples[i] for i in order for _ in range(config.num_generations)]
        self.engine.update(self.trainer.model())
        sampling = SamplingParams(temperature=config.temperature, top_p=config.top_p)
        seed, stops = config.seed * 1_000_003 + self.step, harmony.stop_tokens(self.encoding)
        if config.rollout == "continuous":  # a seed per completion, so a row's sample is its own
            completions = self.engine.run(
                Request(prompt, config.max_new_tokens, sampling, (seed * 65_536 + row) % 2**32, stops)
                for row, prompt in enumerate(prompts)
            )
        else:
            completions = self.engine.generate(prompts, max_new_tokens=config.max_new_tokens, sampling=sampling,
                                               seed=seed, stop_tokens=stops)  # fmt: skip
        samples = []
        for completion in completions:
            messages = harmony.parse_completion(self.encoding, completion.tokens)
            samples.append(Sample(completion.tokens, harmony.decode_text(self.encoding, completion.tokens), messages,
                                  final_answer(messages), completion.finish_reason))  # fmt: skip
        return prompts, completions, samples, fields

    def run_step(self) -> dict:
        """One RL step: rollouts, rewards, advantages, `num_iterations` optimizer steps."""
        config = self.config
        started = time.perf_counter()
        prompts, completions, samples, fields = self.rollout()
        rollout_seconds = time.perf_counter() - started
        texts = [example["prompt"] for example in fields]
        rewards = np.asarray(score(self.reward, config.reward, texts, samples, fields, config.reward_kwargs, self.step + 1))
        grouped = rewards.reshape(config.prompts_per_step, config.num_generations)
        advantages = group_advantages(grouped, config.policy_loss.scales_rewards).reshape(-1)
        batch = build_batch(prompts, completions, advantages, config.micro_batch, config.router_replay,
                            config.max_new_tokens)  # fmt: skip
        if config.beta > 0:
            batch["ref_logprobs"] = np.stack(
                [host_array(self._reference_logprobs(self.reference, self.trainer.train_fn.frozen,
                                                     {name: value[i] for name, value in batch.items()}))
                 for i in range(batch["inputs"].shape[0])]
            )  # fmt: skip
        passes = []
        for iteration in range(config.num_iterations):
            examples = config.prompts_per_step if iteration == 0 else 0
            passes.append(self.trainer.train_step(batch, examples))
        first, last = passes[0], passes[-1]
        lengths = np.array([len(c.tokens) for c in completions])
        tokens = first["tokens"]
        metrics = {
            "step": self.step,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "zero_variance_groups": float((grouped.std(axis=1) == 0).mean()),
            "loss": last["loss"],
            "kl": first["kl"] / max(tokens, 1.0),
            "clip_low": last["clipped_low"] / max(last["clip_count"], 1.0),
            "clip_high": last["clipped_high"] / max(last["clip_count"], 1.0),
            "entropy": first["entropy"] / max(tokens, 1.0),
            "completion_length_mean": float(lengths.mean()),
            "completion_length_max": int(lengths.max()),
            "truncated": float(np.mean([c.finish_reason == "length" for c in completions])),
            "logprob_gap_mean": first["logprob_gap"] / max(tokens, 1.0),
            "logprob_gap_max": first["logprob_gap_max"],
            "grad_norm": last["grad_norm"],
            "learning_rate": last["learning_rate"],
            "rollout_tokens_per_second": float(lengths.sum()) / rollout_seconds,
            "train_tokens_per_second": sum(p["tokens"] for p in passes) / sum(p["seconds"] for p in passes),
        }
        return metrics


def train(config: GRPOConfig, progress: bool = True, stop_after: int | None = None) -> GRPO:
    """Run (or resume) the RL run described by `config`; returns it at its last step."""
    check_resumable(config)
    with setting_up(Path(config.run_dir)):  # a failure before the first step leaves no new run_dir behind
        run = GRPO(config)
    primary = jax.process_index() == 0  # every process computes; the first one reports
    progress = progress and primary
    if run.prompts.skipped_too_long and primary:
        print(f"warning: skipped {run.prompts.skipped_too_long} prompt(s) longer than "
              f"max_prompt_length={config.max_prompt_length}", file=sys.stderr)  # fmt: skip
    write_run_config(config)
    log = MetricsLog(run.run_dir / "metrics.jsonl", run.step)
    last_step = config.steps if stop_after is None else min(stop_after, config.steps)
    bar = tqdm(total=config.steps, initial=run.step, disable=not progress, desc="grpo", unit="step")
    while run.step < last_step:
        metrics = run.run_step()
        log.write(metrics)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.4f}",
                        len=f"{metrics['completion_length_mean']:.0f}")  # fmt: skip
        if run.step % config.save_every == 0 or run.step == last_step:
            run.trainer.save()
    bar.close()
    return run


def run(args: argparse.Namespace, scratch: Path) -> int:
    config = read_config(GRPOConfig, args.config, args.overrides)
    join_distributed(args)
    rl = train(config, progress=not args.no_progress, stop_after=args.stop_after)
    last = MetricsLog(Path(config.run_dir) / "metrics.jsonl", rl.step).read()[-1:]
    if last:
        print(f"step {rl.step}: reward {last[0]['reward_mean']:.3f}; run in {config.run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, run_arguments(argv, "python -m train.grpo", __doc__, "beta=0.01"))


if __name__ == "__main__":
    sys.exit(main())
