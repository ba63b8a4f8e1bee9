"""Per-pair expert algorithms, for few (token, expert) pairs: each pair reads only its expert's weights.

experts holds local expert ids, or local_count for pairs held on another device (see expert_outputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptoss_jax.backends.cpu import experts as cpu_experts
from gptoss_jax.experts.common import ExpertAdapters, decode_experts, swiglu
from gptoss_jax.nn.ops import matmul


def gathered(tokens, experts, weights, params, bias2, adapters: ExpertAdapters, config, dtype, runtime) -> jax.Array:
    """Decode only the chosen experts' weights and apply them token by token (ids must be local)."""
    h = matmul("nd,nkod->nko", tokens, decode_experts(params, "mlp1", dtype, runtime, experts), dtype, runtime)
    h = h + adapters.gathered("mlp1", "nd,nkrd->nkr", tokens, experts)
    h = swiglu(h + params["mlp1_bias"][experts].astype(jnp.float32), config)
    y = matmul("nki,nkdi->nkd", h, decode_experts(params, "mlp2", dtype, runtime, experts), dtype, runtime)
    y = y + adapters.gathered("mlp2", "nki,nkri->nkr", h, experts)
    y = y + bias2[experts].astype(jnp.float32)
    return jnp.einsum("nkd,nk->nd", y, weights)


def fused(tokens, experts, weights, params, bias2, adapters: ExpertAdapters, config, dtype) -> jax.Array:
    """Decode-sized batches on CPU: the MXFP4 kernel reads each chosen expert's bytes once.

    Pairs held elsewhere (id local_count) get zeros from the kernel.
    """
    held = experts < params["mlp1_bias"].shape[0]
    index = jnp.minimum(experts, params["mlp1_bias"].shape[0] - 1)
    x = tokens.astype(dtype)  # the same rounding of the input as the matmul paths
    h = cpu_experts.pair_products(x, experts, params["mlp1"])
    h = h + adapters.gathered("mlp1", "nd,nkrd->nkr", tokens, index)
    h = swiglu(h + params["mlp1_bias"][index].astype(jnp.float32), config)
    pairs = h.reshape(-1, h.shape[-1]).astype(dtype)  # each pair's own input to mlp2
    y = cpu_experts.pair_products(pairs, experts.reshape(-1, 1), params["mlp2"])
    y = y.reshape(*h.shape[:2], -1) + adapters.gathered("mlp2", "nki,nkri->nkr", h, index)
    y = y + bias2[index].astype(jnp.float32)
    return jnp.einsum("nkd,nk->nd", y, jnp.where(held, weights, 0.0))
