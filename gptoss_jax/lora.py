"""LoRA adapters on a loaded gpt-oss model: attach them, and read their merged updates back out.

Adapters ride on frozen weights, packed MXFP4 experts included (QLoRA-style): each expert of mlp1/mlp2
gets its own pair. They are nnx.LoRAParam variables, so `nnx.state(model, nnx.LoRAParam)` is exactly
what a trainer optimises; everything else stays frozen.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import nnx

from gptoss_jax.errors import ConfigError
from gptoss_jax.nn import GptOss
from gptoss_jax.nn.lora import LoRA
from gptoss_jax.nn.ops import OUT_EQUATION, QKV_EQUATION, ROUTER_EQUATION
from gptoss_jax.sharding import state_shardings, variable_values

ATTENTION_TARGETS = {"q": ("q_proj", QKV_EQUATION), "k": ("k_proj", QKV_EQUATION), "v": ("v_proj", QKV_EQUATION),
                     "o": ("o_proj", OUT_EQUATION)}  # fmt: skip
TARGETS = (*ATTENTION_TARGETS, "router", "mlp1", "mlp2")
DEFAULT_TARGETS = ("q", "k", "v", "o", "mlp1", "mlp2")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank r and alpha give updates scaled by alpha / r; dropout applies to an adapter's input in training."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = [target for target in self.targets if target not in TARGETS]
        if unknown:
            raise ConfigError(f"lora.targets: unknown target {unknown[0]!r} (choose from {', '.join(TARGETS)})")
        if not self.targets:
            raise ConfigError("lora.targets: empty")
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ConfigError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _dense_shapes(equation: str, weight: nnx.Variable, rank: int):
    """Adapter shapes and axes for a dense projection: a [rank, *in], b [*out, rank] (per layer)."""
    inputs, _ = equation.split("->")
    lhs, rhs = inputs.split(",")
    shape, axes = weight.shape[1:], weight.axes  # shape[0] is the layer-group stack
    into = [i for i, label in enumerate(rhs) if label in lhs]
    out = [i for i, label in enumerate(rhs) if label not in lhs]
    a = ((rank, *(shape[i] for i in into)), ("lora_rank", *(axes[i] for i in into)))
    b = ((*(shape[i] for i in out), rank), (*(axes[i] for i in out), "lora_rank"))
    return a, b, math.prod(shape[i] for i in into)


def _expert_shapes(target: str, model: GptOss, rank: int):
    """Per-expert adapter shapes and axes: a [E, rank, in], b [E, out, rank]."""
    c = model.config
    e, h, i = c.num_experts, c.hidden_size, c.intermediate_size
    if target == "mlp1":
        (out, out_axis), (into, in_axis) = (2 * i, "expert_intermediate"), (h, "embed")
    else:
        (out, out_axis), (into, in_axis) = (h, "embed"), (i, "intermediate")
    return ((e, rank, into), ("experts", "lora_rank", in_axis)), ((e, out, rank), ("experts", out_axis, "lora_rank")), into


def add_lora(model: GptOss, config: LoRAConfig, seed: int = 0) -> GptOss:
    """Attach fresh adapters (b = 0: the model's outputs do not change) to every layer; returns the model.

    On a mesh the adapters are placed by their logical axes like every other parameter.
    """
    groups = model.config.num_groups
    for position, block in enumerate(model.groups.layers):
        for index, target in enumerate(config.targets):
            if target in ATTENTION_TARGETS:
                weight_name, equation = ATTENTION_TARGETS[target]
                module, shapes = block.attn, _dense_shapes(equation, getattr(block.attn, weight_name), config.rank)
            elif target == "router":
                module, shapes = block.mlp, _dense_shapes(ROUTER_EQUATION, block.mlp.router, config.rank)
            else:
                module, shapes = block.mlp, _expert_shapes(target, model, config.rank)
            (a_shape, a_axes), (b_shape, b_axes), fan_in = shapes
            key = jax.random.fold_in(jax.random.key(seed), position * len(TARGETS) + index)

            @nnx.split_rngs(splits=groups)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs: nnx.Rngs) -> LoRA:
                return LoRA(
                    a_shape, a_axes, b_shape, b_axes,
                    fan_in=fan_in, scale=config.scale, dropout=config.dropout, rngs=rngs,
                )  # fmt: skip

            setattr(module, f"{target}_lora", stacked(nnx.Rngs(params=key)))
    if model.mesh is not None:
        adapters = nnx.state(model, nnx.LoRAParam)
        nnx.update(model, jax.device_put(adapters, variable_values(state_shardings(adapters, model.mesh))))
    return model


def adapter_targets(model: GptOss) -> tuple[str, ...]:
    """The targets that carry adapters (empty for a plain model)."""
    block = model.groups.layers[0]
    return tuple(
        target
        for target in TARGETS
        if getattr(block.attn if target in ATTENTION_TARGETS else block.mlp, f"{target}_lora", None) is not None
    )


def merged_update(model: GptOss, layer: int, target: str) -> np.ndarray:
    """scale * b @ a of one layer's adapter as float32, in the checkpoint's orientation.

    Dense targets give [out, in] (q/k/v/o flattened over heads as the hub layout stores them); experts
    give [E, out, in], the orientation of their MXFP4 blocks.
    """
    group, position = divmod(layer, len(model.config.layer_pattern))
    block = model.groups.layers[position]
    lora = getattr(block.attn if target in ATTENTION_TARGETS else block.mlp, f"{target}_lora")
    a, b = np.asarray(lora.a[group], np.float32), np.asarray(lora.b[group], np.float32)
    if target in ("mlp1", "mlp2"):
        return lora.scale * np.einsum("eor,eri->eoi", b, a)
    rank = a.shape[0]
    return lora.scale * (b.reshape(-1, rank) @ a.reshape(rank, -1))


def adapters_off(adapter_params: dict) -> dict:
    """The same adapter parameters (a pure dict, as nnx.to_pure_dict gives) with every `b` at zero: the
    model they make is the base model exactly, with no second copy of its weights."""
    return jax.tree_util.tree_map_with_path(
        lambda path, value: jax.numpy.zeros_like(value) if getattr(path[-1], "key", None) == "b" else value,
        adapter_params,
    )
