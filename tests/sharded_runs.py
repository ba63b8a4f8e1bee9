"""Short SFT and GRPO runs on several meshes, in a process with 8 simulated CPU devices (the device count
is fixed when jax starts, so tests run this file as a script; see test_sharded_training.py).

    python tests/sharded_runs.py CHECKPOINT VOCAB_DIR OUT_DIR sft:data=8 grpo: convert:expert=4,tensor=2 ...

Each run writes OUT_DIR/<kind>-<mesh>.npz: for training, its losses (and rewards), the trained adapters
in a fixed order, and how much of each part of the state the fullest device holds; for `convert`, a
converted checkpoint's sharded loading (see converted_load).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from gptoss_jax.lora import LoRAConfig
from gptoss_jax.training import OptimizerConfig
from train import grpo, sft
from train.config import SFTConfig
from train.loop import MetricsLog

DATA = Path(__file__).parents[1] / "configs" / "data" / "sft-arithmetic.jsonl"
# Adam divides each gradient by its running size, so a component that is ~0 moves its weight by +-lr
# whatever its sign's noise: an epsilon above that noise keeps updates proportional to gradients, and
# the comparison a test of the sharded arithmetic rather than of rounding in near-zero gradients.
OPTIMIZER = dict(eps=1e-4, learning_rate=1e-2)


def sft_config(checkpoint: str, run_dir: Path, mesh: str, **changes) -> SFTConfig:
    values = dict(
        checkpoint=checkpoint, data=str(DATA), run_dir=str(run_dir), steps=4, batch_size=8, max_length=128,
        dtype="float32", reasoning_effort="low", lora=LoRAConfig(rank=4, alpha=8.0),
        optimizer=OptimizerConfig(warmup_steps=2, **OPTIMIZER), save_every=100, mesh=mesh,
    )  # fmt: skip
    values.update(changes)
    return SFTConfig(**values)


def grpo_config(checkpoint: str, run_dir: Path, mesh: str, **changes) -> grpo.GRPOConfig:
    values = dict(
        checkpoint=checkpoint, run_dir=str(run_dir), steps=3, prompts_per_step=2, num_generations=4,
        max_new_tokens=16, micro_batch=8, rollout_slots=8, temperature=0.125, beta=0.05,
        reward="train.rewards:token_fraction", reward_kwargs={"low": 0, "high": 100544}, dtype="float32",
        lora=LoRAConfig(rank=4, alpha=8.0), optimizer=OptimizerConfig(**OPTIMIZER), save_every=100, mesh=mesh,
    )  # fmt: skip
    values.update(changes)
    return grpo.GRPOConfig(**values)


def largest_share(tree) -> float:
    """The largest fraction of any one array that a single device holds (1/n when all are split n ways)."""
    return max(max(shard.data.size for shard in leaf.addressable_shards) / leaf.size
               for leaf in jax.tree.leaves(tree) if leaf.size > 1)  # fmt: skip


def converted_load(checkpoint: str, out: Path, mesh_spec: str) -> None:
    """Load a converted checkpoint onto a mesh: how much of each expert array a device holds, and the
    logits against the same mesh loading the safetensors."""
    import gptoss_jax
    from gptoss_jax import sharding
    from gptoss_jax.checkpoint.converted import convert

    mesh = sharding.make_mesh(mesh_spec)
    converted = convert(checkpoint, out / "converted")
    model = gptoss_jax.load(converted, dtype="float32", mesh=mesh)
    experts = [variable.get_value() for path, variable in nnx.to_flat_state(nnx.state(model))
               if "mlp1" in path or "mlp2" in path]  # fmt: skip
    tokens = np.arange(1, 41, dtype=np.int32).reshape(2, 20) * 7
    reference = gptoss_jax.load(checkpoint, dtype="float32", mesh=mesh)
    np.savez(out / f"convert-{mesh_spec}.npz", expert_share=largest_share(experts),
             logits=np.asarray(model(tokens)), reference=np.asarray(reference(tokens)))  # fmt: skip


def main(checkpoint: str, vocabulary: str, out_dir: str, *runs: str) -> None:
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = vocabulary
    out = Path(out_dir)
    for run in runs:
        kind, _, mesh = run.partition(":")
        name = f"{kind}-{mesh or 'one'}"
        run_dir = out / name
        if kind == "convert":
            converted_load(checkpoint, out, mesh)
            continue
        if kind == "sft":
            trainer = sft.train(sft_config(checkpoint, run_dir, mesh), progress=False)
            metrics = MetricsLog(run_dir / "metrics.jsonl", trainer.step).read()
            rewards = []
        else:
            trainer = grpo.train(grpo_config(checkpoint, run_dir, mesh), progress=False).trainer
            metrics = MetricsLog(run_dir / "metrics.jsonl", trainer.step).read()
            rewards = [line["reward_mean"] for line in metrics]
        frozen = trainer.train_fn.frozen
        embedding = [variable.get_value() for path, variable in nnx.to_flat_state(frozen) if path[0] == "embed"]
        np.savez(
            out / f"{name}.npz",
            losses=[line["loss"] for line in metrics],
            rewards=rewards,
            state_share=largest_share((trainer.params, trainer.opt_state)),
            embedding_share=largest_share(embedding),
            devices=jax.device_count(),
            **{f"param{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(trainer.params))},
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
