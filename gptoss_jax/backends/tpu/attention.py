"""Attention of a run of new tokens to themselves on TPU: jax's splash attention kernel (Pallas), which
takes gpt-oss's learned sinks (one logit per head that joins the softmax's max and normaliser) and a
local mask for the sliding window, forward and backward, without materialising [T, T] scores.

Used for prefill into an empty cache and for training; decoding attends to the cache in XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

# Splash attention's block sizes must divide the (padded) sequence and be multiples of 128 lanes.
BLOCKS = (512, 256, 128)


@functools.lru_cache(maxsize=32)
def _kernel(length: int, heads: int, window: int | None, interpret: bool):
    """The splash kernel for `heads` query heads over `length` tokens (causal, within `window` if given)."""
    if window is None:
        mask = masks.CausalMask((length, length))
    else:  # a key is seen from `window - 1` tokens back up to the query itself
        mask = masks.LocalMask((length, length), (window - 1, 0), 0)
    block = next(size for size in BLOCKS if length % size == 0)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    return splash.make_splash_mha_single_device(masks.MultiHeadMask([mask] * heads), block_sizes=sizes, interpret=interpret)


def self_attention(q, k, v, sinks, window: int | None, dtype, *, interpret: bool, mesh=None) -> jax.Array:
    """Softmax attention with sinks of a sequence to itself (causal; sliding within `window` if given).

    q [B, T, kv_heads, group, head_dim] (query head h = kv * group + g reads kv head kv), k and v
    [B, T, kv_heads, head_dim], sinks [kv_heads, group]. Tokens are at positions 0..T-1 of their row
    (right padding, as the engine and the trainers lay them out). float32 [B, T, kv_heads, group, head_dim].
    On a mesh the batch rows split over 'data' (shard_map: the kernel cannot be partitioned by XLA).
    """
    batch, length, kv_heads, group, head_dim = q.shape
    padded = -(-length // BLOCKS[-1]) * BLOCKS[-1]
    pad = ((0, 0), (0, padded - length))
    q = jnp.pad(q * head_dim**-0.5, pad + ((0, 0),) * 3).reshape(batch, padded, kv_heads * group, head_dim)
    k, v = (jnp.pad(x, pad + ((0, 0),) * 2) for x in (k, v))
    with jax.ensure_compile_time_eval():  # its mask tables are constants, cached across traces
        kernel = _kernel(padded, kv_heads * group, window, interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2).astype(dtype)  # [B, heads, T, head_dim]

    def attend(q, k, v, sinks):
        one_row = lambda q, k, v: kernel(q, k, v, sinks=sinks.reshape(-1).astype(jnp.float32))
        return jax.vmap(one_row)(heads_first(q), heads_first(k), heads_first(v))

    if mesh is not None:
        rows = PartitionSpec("data")
        # check_vma=False: splash's pallas_call does not say how its outputs vary over the mesh.
        attend = jax.shard_map(attend, mesh=mesh, in_specs=(rows, rows, rows, PartitionSpec()), out_specs=rows,
                               check_vma=False)
    out = attend(q, k, v, sinks).astype(jnp.float32)  # [B, heads, T, head_dim]
    out = jnp.swapaxes(out, 1, 2)[:, :length]
    return out.reshape(batch, length, kv_heads, group, head_dim)
