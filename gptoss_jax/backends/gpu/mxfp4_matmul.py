"""A grouped matmul against MXFP4 experts that decodes each weight chunk in registers (Pallas, Triton).

The same contract as the TPU kernel (gptoss_jax/backends/tpu/mxfp4_matmul.py): rows sorted by expert
and padded to whole tiles of `tiling.rows`, tile t belonging to expert tile_experts[t], the first
used_tiles tiles computed. A program computes one row tile x one column tile, walking the inputs 16
blocks (512 values) at a time: it loads that chunk of one expert's packed bytes and scales, decodes
them and multiplies. The grid is static (Triton's), so programs past the tiles in use return at once.

Weights are read in the checkpoint's layout: blocks [E, out, G, 16], scales [E, out, G]. As on the TPU,
the rows come split into even and odd columns and the product is x_even @ low.T + x_odd @ high.T
(low/high: a byte's nibbles), so no nibbles are interleaved in registers. Triton wants power-of-two
block shapes, so the chunk is 16 blocks with the last one masked, and tiles are powers of two.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gptoss_jax import mxfp4
from gptoss_jax.backends.pallas_shared import Tiling, differentiable, fp4_values, varying_output

CHUNK_BLOCKS = 16  # blocks of 32 values an inner step decodes: 256 bytes, 512 inputs
BLOCK_BYTES = mxfp4.BYTES_PER_BLOCK


def _decode_chunk(blocks_ref, scales_ref, layer, expert, column, chunk, columns: int, dtype):
    """(low, high) [columns, 256] of one expert's column tile, chunk `chunk` of its inputs (zeros past
    the weight's end)."""
    out_features, groups = blocks_ref.shape[2], blocks_ref.shape[3]
    rows = column * columns + jax.lax.broadcasted_iota(jnp.int32, (columns, CHUNK_BLOCKS), 0)
    group = chunk * CHUNK_BLOCKS + jax.lax.broadcasted_iota(jnp.int32, (columns, CHUNK_BLOCKS), 1)
    inside = (rows < out_features) & (group < groups)
    where = (layer, expert, pl.ds(column * columns, columns), pl.ds(chunk * CHUNK_BLOCKS, CHUNK_BLOCKS))
    scales = plgpu.load(scales_ref.at[where], mask=inside, other=0).astype(jnp.int32)
    scale = jax.lax.bitcast_convert_type(scales << 23, jnp.float32)[:, :, None]  # 2**(s - 127)
    mask = jnp.broadcast_to(inside[:, :, None], (columns, CHUNK_BLOCKS, BLOCK_BYTES))
    codes = plgpu.load(blocks_ref.at[(*where, slice(None))], mask=mask, other=0).astype(jnp.int32)
    low = (fp4_values(codes & 15) * scale).reshape(columns, CHUNK_BLOCKS * BLOCK_BYTES)
    high = (fp4_values(codes >> 4) * scale).reshape(columns, CHUNK_BLOCKS * BLOCK_BYTES)
    return low.astype(dtype), high.astype(dtype)


def _load_rows(ref, index, tile: int, start, width: int):
    """Row tile `index` of ref, `width` columns from `start`: zeros past its last column."""
    column = jax.lax.broadcasted_iota(jnp.int32, (tile, width), 1) + start
    return plgpu.load(ref.at[pl.ds(index * tile, tile), pl.ds(start, width)], mask=column < ref.shape[1], other=0)


def _forward_kernel(tile_experts, used_tiles, layer, x_even, x_odd, blocks, scales, out, *, tiling: Tiling):
    index, column = pl.program_id(0), pl.program_id(1)
    width = CHUNK_BLOCKS * BLOCK_BYTES

    @pl.when(index < used_tiles[0])
    def _():
        expert, lay = tile_experts[index], layer[0]

        def chunk(c, acc):
            low, high = _decode_chunk(blocks, scales, lay, expert, column, c, tiling.columns, x_even.dtype)
            acc += jax.lax.dot_general(_load_rows(x_even, index, tiling.rows, c * width, width), low, (((1,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32)
            return acc + jax.lax.dot_general(_load_rows(x_odd, index, tiling.rows, c * width, width), high,
                                             (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

        chunks = pl.cdiv(blocks.shape[3], CHUNK_BLOCKS)
        acc = jax.lax.fori_loop(0, chunks, chunk, jnp.zeros((tiling.rows, tiling.columns), jnp.float32))
        columns = column * tiling.columns + jax.lax.broadcasted_iota(jnp.int32, acc.shape, 1)
        plgpu.store(out.at[pl.ds(index * tiling.rows, tiling.rows), pl.ds(column * tiling.columns, tiling.columns)],
                    acc, mask=columns < out.shape[1])


def _backward_kernel(tile_experts, used_tiles, layer, grad, blocks, scales, out_even, out_odd, *, tiling: Tiling):
    index, chunk = pl.program_id(0), pl.program_id(1)
    width = CHUNK_BLOCKS * BLOCK_BYTES

    @pl.when(index < used_tiles[0])
    def _():
        expert, lay = tile_experts[index], layer[0]

        def column_tile(n, accs):
            low, high = _decode_chunk(blocks, scales, lay, expert, n, chunk, tiling.columns, grad.dtype)
            g = _load_rows(grad, index, tiling.rows, n * tiling.columns, tiling.columns)
            return accs[0] + jnp.dot(g, low, preferred_element_type=jnp.float32), accs[1] + jnp.dot(
                g, high, preferred_element_type=jnp.float32)

        zeros = jnp.zeros((tiling.rows, width), jnp.float32)
        even, odd = jax.lax.fori_loop(0, pl.cdiv(blocks.shape[2], tiling.columns), column_tile, (zeros, zeros))
        columns = chunk * width + jax.lax.broadcasted_iota(jnp.int32, even.shape, 1)
        where = (pl.ds(index * tiling.rows, tiling.rows), pl.ds(chunk * width, width))
        plgpu.store(out_even.at[where], even, mask=columns < out_even.shape[1])
        plgpu.store(out_odd.at[where], odd, mask=columns < out_odd.shape[1])


def _expert_bytes(blocks, scales) -> int:
    """One expert's packed bytes (blocks and scales) in a stack [L, E, ...]."""
    return math.prod(blocks.shape[2:]) + math.prod(scales.shape[2:])


def _cost(rows: int, half: int, out_features: int, tiles: int, tile_bytes: int, row_bytes: int, written: int):
    """Every row tile reads its expert's whole weight (blocks and scales) and its rows once a column tile."""
    return pl.CostEstimate(flops=2 * rows * 2 * half * out_features, transcendentals=0,
                           bytes_accessed=tiles * tile_bytes + row_bytes + written)


def _forward(x_even, x_odd, tile_experts, used_tiles, layer, blocks, scales, tiling: Tiling, interpret):
    rows, half = x_even.shape
    out_features = blocks.shape[2]
    tiles, column_tiles = rows // tiling.rows, pl.cdiv(out_features, tiling.columns)
    expert_bytes = _expert_bytes(blocks, scales)
    cost = _cost(rows, half, out_features, tiles, expert_bytes, 2 * x_even.nbytes * column_tiles, rows * out_features * 4)
    return pl.pallas_call(
        functools.partial(_forward_kernel, tiling=tiling),
        out_shape=varying_output((rows, out_features), jnp.float32, x_even, blocks, scales, tile_experts, layer),
        grid=(tiles, column_tiles),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        cost_estimate=cost,
        interpret=interpret,
    )(tile_experts, used_tiles.reshape(1), layer, x_even, x_odd, blocks, scales)


def _backward(grad, tile_experts, used_tiles, layer, blocks, scales, tiling: Tiling, interpret):
    rows, out_features = grad.shape
    half = blocks.shape[3] * BLOCK_BYTES
    tiles, chunks = rows // tiling.rows, pl.cdiv(blocks.shape[3], CHUNK_BLOCKS)
    expert_bytes = _expert_bytes(blocks, scales)
    cost = _cost(rows, half, out_features, tiles, expert_bytes, grad.nbytes * chunks, 2 * rows * half * 4)
    return pl.pallas_call(
        functools.partial(_backward_kernel, tiling=tiling),
        out_shape=[varying_output((rows, half), jnp.float32, grad, blocks, scales, tile_experts, layer)] * 2,
        grid=(tiles, chunks),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        cost_estimate=cost,
        interpret=interpret,
    )(tile_experts, used_tiles.reshape(1), layer, grad, blocks, scales)


grouped_matmul = differentiable(_forward, _backward)
grouped_matmul.__doc__ = """grouped_matmul(x, tile_experts, used_tiles, blocks, scales, layer=None, *, tiling, interpret=False)

float32 [rows, out]: row tile t of x [rows, in] against expert tile_experts[t] (decoded from MXFP4).

rows is a whole number of tiles (tiling.rows and tiling.columns powers of two, rows at least 16);
rows past the first used_tiles tiles are undefined. blocks [E, out, G, 16] and scales [E, out, G]
as the checkpoint stores them (or stacks over layers, read at `layer` in place). Differentiable with
respect to x.
"""
