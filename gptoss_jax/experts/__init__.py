"""The expert algorithms of the mixture-of-experts layer; the runtime picks one per shape.

Per pair (few tokens: decoding): `gathered` (XLA, decodes each pair's expert) and `fused` (the CPU
kernel reads each chosen expert's packed bytes once). Grouped by expert (many tokens: prefill,
training): `sorted` (the CPU grouped kernel), `tiled` (XLA on the CPU, tiles of one expert) and
`grouped` (jax.lax.ragged_dot, for GPU and TPU). For any number: `pallas` (the TPU and GPU kernels
decoding MXFP4 tiles on chip; on TPU, experts held in the TPU form). A new backend plugs its products in here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptoss_jax.config import GptOssConfig
from gptoss_jax.experts.common import ExpertAdapters
from gptoss_jax.experts.gather import fused, gathered
from gptoss_jax.experts.group import grouped, pallas_experts, sorted_kernel, tiled
from gptoss_jax.runtime import Runtime
from gptoss_jax.sharding import MESH_AXES


def expert_outputs(
    tokens, experts, weights, params, *, config: GptOssConfig, dtype, runtime: Runtime, sharded: bool, lora=None
) -> jax.Array:
    """sum_k weight_k * expert_k(token) over the experts held here (all of them when not sharded).

    tokens [N, D]; experts, weights [N, k]. Sharded, this device holds experts offset..offset+E_local
    and one slice of the intermediate dimension; its partial sums are added across devices (an expert
    adapter's update is linear in that slice too, so the same sum completes it).
    params may hold "mlp1_lora"/"mlp2_lora" ({"a", "b"} per expert) with lora[name] = (scale, dropout),
    and a "dropout_key".
    """
    local_count = params["mlp1_bias"].shape[0]
    if sharded:
        tokens, weights, params = _varying((tokens, weights, params))
        offset = jax.lax.axis_index("expert") * local_count
        first_tensor_shard = jax.lax.axis_index("tensor") == 0
    else:
        offset, first_tensor_shard = 0, True
    local = experts - offset
    held = (local >= 0) & (local < local_count)
    weights = jnp.where(held, weights, 0.0)
    local = jnp.clip(local, 0, local_count - 1)
    marked = jnp.where(held, local, local_count)  # pairs held elsewhere get the id local_count
    # The down projection's bias is added once, by the first slice of the intermediate dimension.
    bias2 = params["mlp2_bias"] * first_tensor_shard
    adapters = ExpertAdapters(params, lora or {}, dtype, runtime)
    path = runtime.expert_path_for(
        tokens.shape[0] * config.experts_per_token,
        config.num_experts,
        packed="weight" not in params["mlp1"],
        bf16=jnp.dtype(dtype) == jnp.bfloat16,
        adapters=bool(lora),
        tpu_form="tpu_blocks" in params["mlp1"],
    )
    if path == "fused":
        out = fused(tokens, marked, weights, params, bias2, adapters, config, dtype)
    elif path == "sorted":
        out = sorted_kernel(tokens, marked, weights, params, bias2, config)
    elif path == "gathered":
        out = gathered(tokens, local, weights, params, bias2, adapters, config, dtype, runtime)
    elif path == "pallas":
        out = pallas_experts(tokens, marked, weights, params, bias2, adapters, config, dtype, runtime)
    elif path == "tiled":
        out = tiled(tokens, marked, weights, params, bias2, adapters, config, dtype, runtime, sharded)
    else:
        out = grouped(tokens, marked, weights, params, bias2, adapters, config, dtype, runtime)
    return jax.lax.psum(out, ("expert", "tensor")) if sharded else out


def _varying(tree):
    """Float arrays cast to vary over every mesh axis, here at the top of the shard_map body. Arrays the
    devices share (an adapter replicated over 'data', tokens over 'expert') must vary to meet each other;
    left implicit, that cast lands inside the per-tile cond, and so does the psum of its gradient that
    the backward pass adds: devices whose tiles differ take different branches and wait forever there."""

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        missing = tuple(axis for axis in MESH_AXES if axis not in jax.typeof(x).mat.varying)
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)
