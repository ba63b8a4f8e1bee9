"""Dense products on the CPU: the einsums of attention, adapters and the unembedding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gptoss_jax.backends import cpu
from gptoss_jax.backends.cpu.stacks import unstack, whole


def matmul(equation: str, x: jax.Array, w, dtype, kernels: bool) -> jax.Array:
    """einsum(equation, x, w) in `dtype` with float32 accumulation; w may be a stacked layer (LayerOf).

    A product of a few rows with a weight (decoding), written as x [rows..., in...] and w [out..., in...],
    runs in the bf16 matvec kernel, which reads the weight once at the memory's speed, in place in its
    stack. Otherwise XLA's dot, except that its CPU dot takes a path about 20x slower when the left
    operand contributes a single row: there the product runs on two copies of the row and one is kept.
    """
    x = x.astype(dtype)
    inputs, output = equation.split("->")
    lhs, rhs = inputs.split(",")
    rows = math.prod(size for label, size in zip(lhs, x.shape) if label not in rhs)
    stack, layer = unstack(w)
    if not kernels:
        max_rows = 0
    elif layer is None:
        max_rows = cpu.load_kernels().matvec_rows  # past it XLA's dot may be faster (the build says)
    else:
        max_rows = cpu.MATVEC_MAX_STACKED_ROWS  # XLA would first copy the layer out and relayout it
    if rows <= max_rows and jnp.dtype(dtype) == jnp.bfloat16:
        contracted = "".join(label for label in lhs if label in rhs)
        free_x, free_w = lhs[: len(lhs) - len(contracted)], rhs[: len(rhs) - len(contracted)]
        contracts_trailing = lhs.endswith(contracted) and rhs.endswith(contracted)
        if contracts_trailing and output == free_x + free_w and not set(contracted) & set(output):
            out_shape = stack.shape[-len(rhs) :][: len(free_w)]
            flat = stack.reshape(*stack.shape[: stack.ndim - len(rhs)], math.prod(out_shape), -1)
            out = cpu.bf16_matvec(x.reshape(rows, -1), flat, layer)
            return out.reshape(*x.shape[: len(free_x)], *out_shape)
    w = whole(w).astype(dtype)
    if rows == 1:
        twice = jnp.stack([x, x])
        return jnp.einsum(f"Z{lhs},{rhs}->Z{output}", twice, w, preferred_element_type=jnp.float32)[0]
    return jnp.einsum(equation, x, w, preferred_element_type=jnp.float32)


def blocks_matmul(x: jax.Array, w: jax.Array, dtype, kernels: bool) -> jax.Array:
    """float32 [R, N] = x [R, K] against w in blocks of 16 rows [N/16, K, 16] (blocks.to_blocks of [N, K]),
    in `dtype` with float32 accumulation: in bf16, the kernel for any number of rows. XLA's dot on this
    layout is far slower (20b's unembedding at 32 rows on a 2-core Zen 4: 660 ms, where the kernel takes
    195 ms on AVX2 and 90 with AVX512-BF16, and XLA's dot on [N, K] 192)."""
    x = x.astype(dtype)
    if kernels and jnp.dtype(dtype) == jnp.bfloat16:
        return cpu.bf16_matvec_blocks(x, w)
    out = jnp.einsum("rk,bkj->rbj", x, w.astype(dtype), preferred_element_type=jnp.float32)
    return out.reshape(x.shape[0], -1)
