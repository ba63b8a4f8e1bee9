"""Attention on TPU, in Pallas.

`self_attention`: a run of new tokens attending to themselves (prefill into an empty cache, training)
with jax's splash attention kernel, which takes gpt-oss's learned sinks (one logit per head that joins
the softmax's max and normaliser) and a local mask for the sliding window, forward and backward,
without materialising [T, T] scores.

`decode_attention`: a decode step's token per row attending to its KV cache, read in place from the
cache stacked over layer groups, a block of slots at a time, and only the blocks a row has filled (the
whole ring on sliding layers). Splash and jax's paged attention do not fit here: neither takes the
sinks, and paged attention returns no log-sum-exp to fold them in afterwards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

from gptoss_jax.sharding import CACHE_AXES, spec_for

# Splash attention's block sizes must divide the (padded) sequence and be multiples of 128 lanes.
BLOCKS = (512, 256, 128)
# Cache slots a decode step reads at a time (all of them when fewer).
DECODE_SLOTS = 512


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


def _decode_kernel(layer, query_positions, q, keys, values, positions, sinks, out, top, total, acc,
                   *, slots: int, window: int | None, precision):
    """One row's queries (all heads, block-diagonal: see `decode_attention`) against one block of slots,
    an online softmax started from the sink logit."""
    del layer  # it chooses the blocks (index maps)
    row, step = pl.program_id(0), pl.program_id(1)
    block = keys.shape[0]
    at = query_positions[row]

    @pl.when(step == 0)
    def _():
        top[...] = sinks[...]
        total[...] = jnp.ones_like(total)
        acc[...] = jnp.zeros_like(acc)

    @pl.when(step * block <= jnp.minimum(at, slots - 1))  # blocks past the row's last filled slot: skipped
    def _():
        scores = jax.lax.dot_general(q[...], keys[...], (((1,), (1,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32)  # [rows, block]
        slot = step * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
        key_at = positions[pl.ds(row % positions.shape[0], 1), :]  # the row's among the block's rows
        visible = (slot < slots) & (key_at >= 0) & (key_at <= at)
        if window is not None:
            visible &= at - key_at < window
        scores = jnp.where(visible, scores, -jnp.inf)
        new_top = jnp.maximum(top[...], scores.max(axis=1, keepdims=True))
        weights = jnp.exp(scores - new_top)
        shrink = jnp.exp(top[...] - new_top)
        total[...] = total[...] * shrink + weights.sum(axis=1, keepdims=True)
        v = values[...]
        if slots % block:  # the last block reads past the cache's end: whatever is there must not reach acc
            v = jnp.where(slot.reshape(block, 1) < slots, v, jnp.zeros_like(v))
        acc[...] = acc[...] * shrink + jnp.dot(weights.astype(v.dtype), v, precision=precision,
                                               preferred_element_type=jnp.float32)
        top[...] = new_top

    @pl.when(step == pl.num_programs(1) - 1)
    def _():
        out[...] = acc[...] / total[...]


def decode_attention(q, cache, query_positions, sinks, window: int | None, *, interpret: bool, mesh=None,
                     block_slots: int = DECODE_SLOTS) -> jax.Array:
    """Softmax attention with sinks of one new token per row to its cache (the token already written).

    q [B, kv_heads, group, head_dim] float32, unscaled; cache: a LayerCache of LayerOf views (one group
    of the stacked cache: keys and values [G, B, slots, kv_heads * head_dim], positions [G, B, slots]);
    query_positions [B] (-1: a padding row, which sees nothing); sinks [kv_heads, group]. float32
    [B, kv_heads, group, head_dim]. On a mesh the rows split over 'data' and the heads over 'tensor' as
    the cache's sharding rules say.

    The queries of all heads go to the kernel as one block-diagonal matrix [heads, kv_heads * head_dim]
    (head h = (kv, g) holds its query in kv's head_dim columns, zeros elsewhere), so each block of slots
    is a pair of plain matmuls over the slots' full rows, with no head-sized lane slices; the product's
    diagonal blocks are the heads' outputs. The MXU does kv_heads times the useful work, which decode,
    bound by reading the cache, has to spare. block_slots: slots a step reads (all, when fewer).
    """
    keys, values, positions = cache.keys.stack, cache.values.stack, cache.positions.stack
    layer = jnp.reshape(cache.keys.index, (1,)).astype(jnp.int32)
    precision = jax.lax.Precision.HIGHEST if keys.dtype == jnp.float32 else jax.lax.Precision.DEFAULT

    def attend(layer, query_positions, q, keys, values, positions, sinks):
        batch, kv_heads, group, head_dim = q.shape
        slots, features = keys.shape[2], keys.shape[3]
        block = slots if slots <= block_slots else block_slots
        blocks = pl.cdiv(slots, block)
        eye = jnp.eye(kv_heads, dtype=jnp.float32)
        diagonal = jnp.einsum("bngd,nm->bngmd", q * head_dim**-0.5, eye).reshape(batch, kv_heads * group, features)
        rows = kv_heads * group

        def slot_block(row, step, layer, query_positions):
            last = jnp.minimum(query_positions[row], slots - 1) // block
            return layer[0], row, jnp.clip(step, 0, jnp.maximum(last, 0))  # repeated index: no new fetch

        kv_spec = pl.BlockSpec((None, None, block, features), lambda r, s, *refs: (*slot_block(r, s, *refs), 0))
        # A TPU moves int32 rows 8 at a time: the positions come for 8 rows (all, when fewer), the kernel
        # picks its row's.
        position_rows = min(batch, 8)

        def position_block(row, step, *refs):
            layer, _, slot = slot_block(row, step, *refs)
            return layer, row // position_rows, slot
        row_spec = pl.BlockSpec((None, rows, features), lambda r, s, *_: (r, 0, 0))
        kv_bytes = 2 * batch * blocks * block * features * keys.dtype.itemsize  # every block, when full
        cost = pl.CostEstimate(
            flops=2 * 2 * batch * rows * blocks * block * features,
            transcendentals=batch * rows * blocks * block,
            bytes_accessed=kv_bytes + batch * blocks * position_rows * block * 4  # + queries in, float32 out:
            + batch * rows * features * (keys.dtype.itemsize + 4),
        )
        out = pl.pallas_call(
            functools.partial(_decode_kernel, slots=slots, window=window, precision=precision),
            out_shape=jax.ShapeDtypeStruct((batch, rows, features), jnp.float32),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2,
                grid=(batch, blocks),
                in_specs=[
                    row_spec, kv_spec, kv_spec,
                    pl.BlockSpec((None, position_rows, block), position_block),
                    pl.BlockSpec((rows, 1), lambda r, s, *_: (0, 0)),
                ],
                out_specs=row_spec,
                scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32)] * 2 + [pltpu.VMEM((rows, features), jnp.float32)],
            ),
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
            cost_estimate=cost,
            interpret=interpret,
        )(layer, query_positions, diagonal.astype(keys.dtype), keys, values, positions, sinks.reshape(rows, 1))
        out = out.reshape(batch, kv_heads, group, kv_heads, head_dim)
        return jnp.einsum("bngmd,nm->bngd", out, eye)

    args = (layer, query_positions.astype(jnp.int32), q, keys, values, positions, sinks.astype(jnp.float32))
    if mesh is not None:
        specs = (
            PartitionSpec(), spec_for(("batch",), query_positions.shape, mesh, "decode positions"),
            spec_for(("batch", "kv_heads"), q.shape[:2], mesh, "decode queries"),
            spec_for(CACHE_AXES, keys.shape, mesh, "KV cache"), spec_for(CACHE_AXES, values.shape, mesh, "KV cache"),
            spec_for(CACHE_AXES[:2], positions.shape, mesh, "KV cache"),
            spec_for(("kv_heads",), sinks.shape[:1], mesh, "sinks"),
        )  # fmt: skip
        attend = jax.shard_map(attend, mesh=mesh, in_specs=specs, out_specs=specs[2], check_vma=False)
    return attend(*args)
