"""Small functions every layer uses: initialisation, the one product (dispatched by the runtime),
dropout, embedding lookup."""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax.backends.cpu import products as cpu_products
from gptoss_jax.runtime import Runtime

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# einsum of each dense projection (input x, weight in checkpoint orientation): one place for the forward
# and for the shapes of the LoRA adapters that may ride on it.
QKV_EQUATION = "btd,hkd->bthk"
OUT_EQUATION = "bthk,dhk->btd"
ROUTER_EQUATION = "nd,ed->ne"


def init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def matmul(equation: str, x: jax.Array, w, dtype, runtime: Runtime) -> jax.Array:
    """einsum in the compute dtype with float32 accumulation and a float32 result (w may be a stacked
    layer view on the CPU: see gptoss_jax/backends/cpu/stacks.py)."""
    if runtime.platform == "cpu":
        return cpu_products.matmul(equation, x, w, dtype, kernels=runtime.cpu_kernels is not None)
    return jnp.einsum(equation, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def unembedding(x: jax.Array, w: jax.Array, dtype, runtime: Runtime) -> jax.Array:
    """Logits float32 [N, V] of x [N, D]: w is the unembedding [V, D], or [V/16, D, 16] where the model
    holds it in blocks of 16 rows (Runtime.unembedding_in_blocks: a CPU's form for its kernel)."""
    if w.ndim == 2:
        return matmul("nd,vd->nv", x, w, dtype, runtime)
    return cpu_products.blocks_matmul(x, w, dtype, kernels=runtime.cpu_kernels is not None)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def site_key(key: jax.Array | None, site: int) -> jax.Array | None:
    """A dropout key of its own for each adapter site of a layer."""
    return None if key is None else jax.random.fold_in(key, site)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def embedding_rows(table: jax.Array, tokens: jax.Array, as_bits: bool = False) -> jax.Array:
    """table[tokens]. as_bits (Runtime.gathers_bits, the CPU's choice): a bf16 table is gathered as its
    uint16 bits, since XLA's CPU backend otherwise converts the whole table to float32 before gathering a
    few rows (2.3 GB written a step for gpt-oss's vocabulary); elsewhere the bitcast itself can be a copy
    of the table."""
    if table.dtype != jnp.bfloat16 or not as_bits:
        return table[tokens]
    rows = jax.lax.bitcast_convert_type(table, jnp.uint16)[tokens]
    return jax.lax.bitcast_convert_type(rows, jnp.bfloat16)


def _embedding_rows_forward(table, tokens, as_bits):
    return embedding_rows(table, tokens, as_bits), (jnp.zeros((0,), table.dtype), table.shape, tokens)


def _embedding_rows_backward(as_bits, saved, g):
    like, shape, tokens = saved  # the gather's transpose: each row's cotangent added at its token
    table_grad = jnp.zeros(shape, jnp.float32).at[tokens].add(g.astype(jnp.float32)).astype(like.dtype)
    return table_grad, None


embedding_rows.defvjp(_embedding_rows_forward, _embedding_rows_backward)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, param_dtype):
        self.scale = nnx.Param(jnp.ones((size,), param_dtype), axes=("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * self.scale[...].astype(jnp.float32)
