"""The CPU kernels' products with MXFP4 experts, taking weights as the model holds them (an array or
a stacked layer view) for the expert algorithms in gptoss_jax/experts."""

from __future__ import annotations

import jax

from gptoss_jax.backends import cpu
from gptoss_jax.backends.cpu.stacks import unstack


def pair_products(x: jax.Array, experts: jax.Array, weights: dict) -> jax.Array:
    """[T, k, out] float32: token t against expert experts[t, j] (each chosen expert's bytes read once)."""
    blocks, layer = unstack(weights["blocks"])
    scales, _ = unstack(weights["scales"])
    return cpu.mxfp4_expert_matvec(x, experts, blocks, scales, layer)


def grouped_products(x: jax.Array, sizes: jax.Array, weights: dict) -> jax.Array:
    """[P, out] float32: rows sorted by expert (sizes[e] rows each) against their expert."""
    blocks, layer = unstack(weights["blocks"])
    scales, _ = unstack(weights["scales"])
    return cpu.mxfp4_grouped_matmul(x, sizes, blocks, scales, layer)


def dequantize_one(blocks, scales, expert: jax.Array, dtype) -> jax.Array:
    """Expert `expert`'s weights [out, in] in `dtype`."""
    blocks, layer = unstack(blocks)
    scales, _ = unstack(scales)
    return cpu.mxfp4_dequantize(blocks, scales, expert, dtype, layer)
