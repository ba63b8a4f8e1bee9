"""The model a training run starts from, shared by train.sft and train.grpo."""

from __future__ import annotations

from pathlib import Path

import jax
from jax.experimental import multihost_utils

import gptoss_jax
from gptoss_jax import sharding
from gptoss_jax.checkpoint.reader import open_checkpoint
from gptoss_jax.cli import RANDOM, write_random_checkpoint
from gptoss_jax.config import AUTO
from gptoss_jax.errors import ConfigError
from gptoss_jax.lora import add_lora


def base_checkpoint(config) -> Path:
    """The checkpoint folder to fine-tune (a hub repo id is fetched); `random` is a tiny random model
    written once into the run dir. `config` is a run config (SFTConfig, GRPOConfig)."""
    if config.checkpoint != RANDOM:
        return open_checkpoint(config.checkpoint).directory
    folder = Path(config.run_dir) / "base"
    if jax.process_index() == 0 and not (folder / "tiny-random").exists():
        write_random_checkpoint(folder)
    if jax.process_count() > 1:  # the others read it once the first process has written it
        multihost_utils.sync_global_devices("random base checkpoint written")
    return folder / "tiny-random"


def build_model(config, checkpoint: Path, rows: dict[str, int]) -> gptoss_jax.GptOss:
    """The base model with fresh adapters (or, for full fine-tuning, as loaded), placed on the run's mesh.

    rows: the run's batch dimensions (config name -> rows), each of which the mesh's 'data' axis splits.
    """
    mesh = sharding.make_mesh(config.mesh) if config.mesh else None
    data = 1 if mesh is None else mesh.shape["data"]
    for name, count in rows.items():
        if count % data:
            raise ConfigError(f"{name}={count} does not split over the mesh's data={data} (mesh={config.mesh})")
    experts = experts_to_load(config.lora is None, config.experts)
    model = gptoss_jax.load(checkpoint, dtype=config.dtype, experts=experts, mesh=mesh, training=True)
    return model if config.lora is None else add_lora(model, config.lora, seed=config.seed)


def experts_to_load(full: bool, experts: str) -> str:
    """The `experts` argument for loading a run's base: a full run trains its experts, so "auto" decodes
    MXFP4 to bf16 (exact) there."""
    return "bfloat16" if full and experts == AUTO else experts
