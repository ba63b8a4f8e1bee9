"""The mixture-of-experts layer: the router, the experts' weights (packed MXFP4 or dense) and, on a
mesh, the shard_map around the expert algorithms of gptoss_jax/experts."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from gptoss_jax import mxfp4
from gptoss_jax.backends.cpu.stacks import LayerOf
from gptoss_jax.backends.tpu.expert_form import to_tpu_form
from gptoss_jax.config import GptOssConfig
from gptoss_jax.experts import expert_outputs
from gptoss_jax.nn.lora import LoRA, project
from gptoss_jax.nn.ops import ROUTER_EQUATION, init, site_key
from gptoss_jax.runtime import Runtime
from gptoss_jax.sharding import spec_for


class PackedBytes(nnx.Variable):
    """Frozen MXFP4 bytes (blocks or scales): kept as stored, never trained."""


class PackedExpertWeights(nnx.Module):
    """One projection of every expert, kept as MXFP4 bytes.

    form "checkpoint": `blocks` [E, out, in/32, 16] and `scales` [E, out, in/32], as stored.
    form "tpu": `tpu_blocks` [E, in/32, 16, out] and `tpu_scales` [E, ceil(in/512), 16, out], the same bytes
    laid out for the Pallas kernels (gptoss_jax.backends.tpu.expert_form.to_tpu_form); with gate_linear
    (mlp1) the outputs, SwiGLU's interleaved (gate, linear) pairs, held as halves.
    """

    def __init__(self, num_experts: int, out_features: int, in_features: int, out_axis: str, in_axis: str, rngs,
                 form: str, gate_linear: bool = False):  # fmt: skip
        groups = in_features // mxfp4.BLOCK_SIZE
        shape = (num_experts, out_features, groups)
        axes = ("experts", out_axis, in_axis + "_blocks")
        blocks = jax.random.randint(rngs.params(), (*shape, mxfp4.BYTES_PER_BLOCK), 0, 256, jnp.int32).astype(jnp.uint8)
        # Scale 2**-6 on fp4 values of RMS ~2.9 gives weights of RMS ~0.05, a sensible random init.
        scales = jnp.full(shape, mxfp4.SCALE_BIAS - 6, jnp.uint8)
        if form == "tpu":
            blocks, scales = to_tpu_form(blocks, scales, halves=gate_linear)
            out_axis = "gate_linear_halves" if gate_linear else out_axis
            self.tpu_blocks = PackedBytes(blocks, axes=("experts", in_axis + "_blocks", "block_bytes", out_axis))
            self.tpu_scales = PackedBytes(scales, axes=("experts", in_axis + "_scale_rows", "block_bytes", out_axis))
        else:
            self.blocks = PackedBytes(blocks, axes=(*axes, "block_bytes"))
            self.scales = PackedBytes(scales, axes=axes)

    def arrays(self) -> dict[str, jax.Array]:
        return {name: value[...] for name, value in vars(self).items() if isinstance(value, PackedBytes)}


class DenseExpertWeights(nnx.Module):
    """One projection of every expert as a dense [E, out, in] array (for full fine-tuning)."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, out_axis: str, in_axis: str, rngs):
        self.weight = nnx.Param(
            init(rngs, (num_experts, out_features, in_features), jnp.bfloat16, 0.05), axes=("experts", out_axis, in_axis)
        )

    def arrays(self) -> dict[str, jax.Array]:
        return {"weight": self.weight[...]}


def _weight_specs(module: nnx.Module, mesh) -> dict[str, Any]:
    """PartitionSpecs of a module's direct arrays, from their declared axes (a stacked layer's view gets
    its stack's spec and a replicated index)."""

    def spec(name: str, variable: nnx.Variable):
        value = variable[...]
        if isinstance(value, LayerOf):
            return LayerOf(PartitionSpec(None, *spec_for(variable.axes, value.shape, mesh, name)), PartitionSpec())
        return spec_for(variable.axes, variable.shape, mesh, name)

    return {name: spec(name, variable) for name, variable in vars(module).items() if isinstance(variable, nnx.Variable)}


class MoE(nnx.Module):
    """Top-k routed experts with the clamped SwiGLU of gpt-oss (interleaved gate/linear columns, `+1`).

    On a mesh (see gptoss_jax.sharding.shard_model) the experts run in `shard_map`: each device holds num_experts / n
    experts and a 1/t slice of their intermediate dimension, computes the tokens' contributions from
    what it holds, and a psum over the 'expert' and 'tensor' axes adds them up.
    """

    def __init__(self, config: GptOssConfig, param_dtype, dtype, experts: str, rngs: nnx.Rngs, expert_form: str):
        """expert_form: how MXFP4 experts are held ("checkpoint" or "tpu", see PackedExpertWeights)."""
        c = config
        e, h, i = c.num_experts, c.hidden_size, c.intermediate_size
        self.router = nnx.Param(init(rngs, (e, h), param_dtype, h**-0.5), axes=("router", "embed"))
        self.router_bias = nnx.Param(jnp.zeros((e,), param_dtype), axes=("router",))
        if experts == "mxfp4":
            self.mlp1 = PackedExpertWeights(e, 2 * i, h, "expert_intermediate", "embed", rngs, expert_form, gate_linear=True)
            self.mlp2 = PackedExpertWeights(e, h, i, "embed", "intermediate", rngs, expert_form)
        else:
            self.mlp1 = DenseExpertWeights(e, 2 * i, h, "expert_intermediate", "embed", rngs)
            self.mlp2 = DenseExpertWeights(e, h, i, "embed", "intermediate", rngs)
        self.mlp1_bias = nnx.Param(jnp.zeros((e, 2 * i), param_dtype), axes=("experts", "expert_intermediate"))
        self.mlp2_bias = nnx.Param(jnp.zeros((e, h), param_dtype), axes=("experts", "embed"))
        self.router_lora: LoRA | None = nnx.data(None)  # adapters, attached by gptoss_jax.lora.add_lora
        self.mlp1_lora: LoRA | None = nnx.data(None)  # one adapter per expert
        self.mlp2_lora: LoRA | None = nnx.data(None)
        self.config = config
        self.dtype = dtype
        self.mesh = None  # set by gptoss_jax.sharding.shard_model

    def __call__(
        self,
        x: jax.Array,
        dropout_key: jax.Array | None = None,
        route: jax.Array | None = None,
        *,
        runtime: Runtime,
    ) -> tuple[jax.Array, jax.Array]:
        """(output [B, T, D], the chosen experts int32 [B, T, k]).

        route: replay these experts [B, T, k] instead of the router's top-k (router replay in RL); their
        weights are still the softmax of the router's logits for them, so the router keeps its gradient.
        """
        c, dtype = self.config, self.dtype
        batch, length, hidden = x.shape
        tokens = x.reshape(batch * length, hidden)
        router_logits = project(
            ROUTER_EQUATION, tokens, self.router[...], dtype, self.router_lora, site_key(dropout_key, 4), runtime
        )
        router_logits = router_logits + self.router_bias[...].astype(jnp.float32)
        if route is None:
            top_logits, experts = jax.lax.top_k(router_logits, c.experts_per_token)
        else:
            experts = route.reshape(batch * length, c.experts_per_token).astype(jnp.int32)
            top_logits = jnp.take_along_axis(router_logits, experts, axis=-1)
        weights = jax.nn.softmax(top_logits, axis=-1)  # over the k chosen experts only
        params = {
            "mlp1": self.mlp1.arrays(),
            "mlp2": self.mlp2.arrays(),
            "mlp1_bias": self.mlp1_bias[...],
            "mlp2_bias": self.mlp2_bias[...],
        }
        adapters = {name: getattr(self, f"{name}_lora") for name in ("mlp1", "mlp2")}
        adapters = {name: lora for name, lora in adapters.items() if lora is not None}
        params.update({f"{name}_lora": {"a": lora.a[...], "b": lora.b[...]} for name, lora in adapters.items()})
        if adapters and dropout_key is not None:
            params["dropout_key"] = site_key(dropout_key, 5)
        apply = functools.partial(
            expert_outputs,
            config=c,
            dtype=dtype,
            runtime=runtime,
            lora={name: (lora.scale, lora.dropout) for name, lora in adapters.items()},
        )
        mesh = self.mesh
        if mesh is None:
            out = apply(tokens, experts, weights, params, sharded=False)
        else:
            own = _weight_specs(self, mesh)
            specs = {
                "mlp1": _weight_specs(self.mlp1, mesh),
                "mlp2": _weight_specs(self.mlp2, mesh),
                "mlp1_bias": own["mlp1_bias"],
                "mlp2_bias": own["mlp2_bias"],
            }
            specs.update({f"{name}_lora": _weight_specs(lora, mesh) for name, lora in adapters.items()})
            if "dropout_key" in params:
                specs["dropout_key"] = PartitionSpec()
            rows = PartitionSpec("data")
            out = jax.shard_map(
                functools.partial(apply, sharded=True),
                mesh=mesh,
                in_specs=(rows, rows, rows, specs),
                out_specs=rows,
            )(tokens, experts, weights, params)
        return out.reshape(batch, length, hidden), experts.reshape(batch, length, c.experts_per_token)
