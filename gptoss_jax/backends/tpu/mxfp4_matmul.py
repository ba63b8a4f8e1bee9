"""Grouped matmuls against MXFP4 experts that decode each weight tile in VMEM (Pallas, TPU).

Two forms. `sorted_matmul`, for many rows (prefill, training): rows sorted by expert, each expert's rows
following the one before with no padding between them, in tiles of `tiling.rows`; the grid walks the
output's column tiles and, inside, the (row tile, expert) pairs where an expert's rows meet a tile (a
count known only at run time), keeping each expert's rows of the product. Each expert's packed bytes
are read once per tile its rows touch. `expert_rows_matmul`, for a decode batch's few rows: rows in any
order, all in VMEM; the grid walks the experts they chose, each read once per step whatever the batch.
No dense copy of any expert exists outside VMEM.

Why not jax's megablox `gmm` or tokamax's ragged dot: both take the weights as a dense array, so the
MXFP4 bytes would have to be decoded to bf16 in HBM first, which is the copy this kernel exists to
avoid. The sorted form follows megablox's gmm (scalar-prefetched maps from each grid step to its row
tile and expert drive the blocks' indices; rows of other experts are masked out of a shared tile).

The weights come in the TPU form (see `expert_form.to_tpu_form`): output features on the 128 lanes,
so that one expert's tile is a plain block, and byte j of block g at row (g, j). Byte j of a 32-value
block holds value 2j in its low nibble and 2j+1 in its high one; rather than interleave nibbles across
rows in the kernel, the caller's rows are split into even and odd columns and the product is
x_even @ low + x_odd @ high, low and high being the decoded nibbles [in/2, out] in the bytes' order.

Decoding multiplies the fp4 value by 2**(scale - 127) in float32: exact for every scale a trained or
random checkpoint has; scale 0 (2**-127, subnormal) reads as 0 where gptoss_jax.mxfp4 keeps the
subnormal products.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gptoss_jax.backends.pallas_shared import Tiling, fp4_values, split_columns, varying_output
from gptoss_jax.backends.tpu.expert_form import BLOCK_BYTES

LANES = 128
# Up to this many bytes of rows (a decode batch's), the forward keeps them all in VMEM: fetching the row
# tile at every step would add a read of the rows per column tile to the weights' bytes.
RESIDENT_ROWS_BYTES = 2 * 1024 * 1024


def column_tile(out_features: int, target: int) -> int:
    """The output columns a tile: all of them when they fit `target`, else the largest multiple of
    128 lanes dividing them (up to `target`), else `target` with a partial last tile."""
    if out_features <= target:
        return out_features
    for tile in range(target - target % LANES, 0, -LANES):
        if out_features % tile == 0:
            return tile
    return target


def _decode_tile(blocks, scales, low, high, *, columns_left: int | None = None):
    """Decode one expert's tile into the VMEM scratch low, high [G * 16, columns] (their dtype).

    blocks [G, 16, columns], scales [ceil(G/16), 16, columns] (uint8 refs). columns_left: past this
    column the tile reads beyond the weight's end; those columns are zeroed (the backward pass sums
    over them).
    """
    groups = blocks.shape[0]
    for row in range(scales.shape[0]):
        # 2**(s - 127) from the bits (s = 0 gives 0); a row of 16 blocks' scales at a time.
        scale_row = jax.lax.bitcast_convert_type(scales[row].astype(jnp.int32) << 23, jnp.float32)
        for j in range(min(BLOCK_BYTES, groups - row * BLOCK_BYTES)):
            group = row * BLOCK_BYTES + j
            scale = scale_row[j : j + 1, :]
            if columns_left is not None:
                lane = jax.lax.broadcasted_iota(jnp.int32, scale.shape, 1)
                scale = jnp.where(lane < columns_left, scale, 0.0)
            codes = blocks[group].astype(jnp.int32)  # [16, columns]
            rows = slice(group * BLOCK_BYTES, (group + 1) * BLOCK_BYTES)
            low[rows, :] = (fp4_values(codes & 15) * scale).astype(low.dtype)
            high[rows, :] = (fp4_values(codes >> 4) * scale).astype(high.dtype)


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def _visits(group_sizes: jax.Array, tile_rows: int, tiles: int):
    """The (row tile, expert) pairs the grid visits, in order: each expert's rows [bounds[e], bounds[e+1])
    of the rows sorted by expert meet one or more tiles, and a tile may hold the ends of several experts.

    Returns (visit_tile [V], visit_expert [V], bounds [E + 1], count): V = tiles + E - 1 is the most there
    can be (each expert's first tile may be shared with the one before); only the first `count` (at
    least 1) are run. Visits of one tile come one after another, so its output block stays in VMEM.
    """
    experts = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first_tile, last_tile = starts // tile_rows, (ends - 1) // tile_rows
    counts = jnp.where(sizes > 0, last_tile - first_tile + 1, 0)
    visit_ends = jnp.cumsum(counts)
    visit = jnp.arange(tiles + experts - 1)
    expert = jnp.minimum(jnp.searchsorted(visit_ends, visit, side="right"), experts - 1)
    tile = jnp.clip(first_tile[expert] + visit - (visit_ends[expert] - counts[expert]), 0, tiles - 1)
    bounds = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    count = jnp.maximum(visit_ends[-1], 1)  # one visit at least (it writes a tile of zeros)
    return tile.astype(jnp.int32), expert.astype(jnp.int32), bounds, count.astype(jnp.int32)


def _visit_state(visit_tile, visit_expert, bounds, visit: jax.Array, tile_rows: int):
    """(first visit of its tile?, [tile_rows, 1] mask of the tile's rows that are this visit's expert's)."""
    tile, expert = visit_tile[visit], visit_expert[visit]
    first = (visit == 0) | (visit_tile[jnp.maximum(visit - 1, 0)] != tile)
    row = tile * tile_rows + jax.lax.broadcasted_iota(jnp.int32, (tile_rows, 1), 0)
    return first, (row >= bounds[expert]) & (row < bounds[expert + 1])


def _forward_kernel(visit_tile, visit_expert, bounds, layer, x_even, x_odd, bias, *refs, resident_rows: int | None,
                    added: bool):
    del layer  # it chooses the blocks (index maps)
    addend, (blocks, scales, out, low, high) = (refs[0], refs[1:]) if added else (None, refs)
    visit, tile_rows = pl.program_id(1), out.shape[0]
    _decode_tile(blocks, scales, low, high)
    if resident_rows is None:  # the row tile's block
        rows = slice(None)
    else:  # all rows stay in VMEM; this visit's tile of them
        rows = pl.ds(pl.multiple_of(visit_tile[visit] * resident_rows, resident_rows), resident_rows)
    precision = _precision(low.dtype)
    product = jnp.dot(x_even[rows, :], low[...], precision=precision, preferred_element_type=jnp.float32)
    product += jnp.dot(x_odd[rows, :], high[...], precision=precision, preferred_element_type=jnp.float32)
    first, mine = _visit_state(visit_tile, visit_expert, bounds, visit, tile_rows)
    if addend is None:
        value, before = product + bias[...], 0.0
    else:  # rows of other experts and of none keep the addend's values
        value, before = product + bias[...] + addend[...], addend[...]
    out[...] = jnp.where(mine, value, jnp.where(first, before, out[...]))


def _backward_kernel(visit_tile, visit_expert, bounds, layer, grad, blocks, scales, out_even, out_odd, low, high,
                     acc_even, acc_odd, *, out_features: int):
    del layer
    visit, column = pl.program_id(0), pl.program_id(1)
    columns = blocks.shape[-1]

    @pl.when(column == 0)
    def _():
        acc_even[...] = jnp.zeros_like(acc_even)
        acc_odd[...] = jnp.zeros_like(acc_odd)

    # A partial last tile reads past the weight's end: zero those columns (the gradient sums over them).
    left = out_features - column * columns if out_features % columns else None
    _decode_tile(blocks, scales, low, high, columns_left=left)
    g, precision, transposed = grad[...], _precision(low.dtype), (((1,), (1,)), ((), ()))
    acc_even[...] += jax.lax.dot_general(g, low[...], transposed, precision=precision, preferred_element_type=jnp.float32)
    acc_odd[...] += jax.lax.dot_general(g, high[...], transposed, precision=precision, preferred_element_type=jnp.float32)

    @pl.when(column == pl.num_programs(1) - 1)
    def _():
        first, mine = _visit_state(visit_tile, visit_expert, bounds, visit, out_even.shape[0])
        kept_even = jnp.where(first, 0.0, out_even[...].astype(jnp.float32))
        kept_odd = jnp.where(first, 0.0, out_odd[...].astype(jnp.float32))
        out_even[...] = jnp.where(mine, acc_even[...], kept_even).astype(out_even.dtype)
        out_odd[...] = jnp.where(mine, acc_odd[...], kept_odd).astype(out_odd.dtype)


def _weight_specs(blocks, scales, columns: int, column_first: bool, experts_at: int):
    """BlockSpecs of one expert's column tile of blocks [L, E, G, 16, out] and scales [L, E, S, 16, out].

    The grid is (column tile, step) or (step, column tile); of the scalar-prefetched arguments, the one
    at `experts_at` maps a step to its expert and the last holds the layer."""

    def weight(*grid_and_refs):
        column, step = grid_and_refs[:2] if column_first else grid_and_refs[1::-1]
        refs = grid_and_refs[2:]
        return refs[-1][0], refs[experts_at][step], 0, 0, column

    return [
        pl.BlockSpec((None, None, blocks.shape[2], BLOCK_BYTES, columns), weight),
        pl.BlockSpec((None, None, scales.shape[2], BLOCK_BYTES, columns), weight),
    ]


def _cost(flops: int, reads: list[tuple[int, int]], writes: int) -> pl.CostEstimate:
    """From the blocks the grid moves: (bytes of a block, how many times it is fetched) pairs, bytes written."""
    return pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=sum(b * n for b, n in reads) + writes)


def _tile_bytes(blocks, scales, columns: int) -> int:
    """Bytes of one expert's column tile (its blocks and scales)."""
    return (blocks.shape[2] + scales.shape[2]) * BLOCK_BYTES * columns


def _forward(x_even, x_odd, bias, addend, visits, layer, blocks, scales, tiling: Tiling, interpret) -> jax.Array:
    visit_tile, visit_expert, bounds, count = visits
    if bias is None:
        bias = jnp.zeros((blocks.shape[1], blocks.shape[-1]), jnp.float32)
    rows, half = x_even.shape
    out_features = blocks.shape[-1]
    columns = column_tile(out_features, tiling.columns)
    column_tiles = pl.cdiv(out_features, columns)
    steps = column_tiles * visit_tile.shape[0]  # at most: only `count` visits a column tile run
    row_bytes = 2 * half * x_even.dtype.itemsize
    if rows * row_bytes <= RESIDENT_ROWS_BYTES:  # decode-sized: every row fetched once, not once a step
        row_spec, resident, row_reads = pl.BlockSpec((rows, half), lambda n, v, *_: (0, 0)), tiling.rows, [(rows * row_bytes, 1)]
    else:  # a tile's rows, fetched again only when the visit moves to another tile (or column tile)
        row_spec, resident = pl.BlockSpec((tiling.rows, half), lambda n, v, tiles, *_: (tiles[v], 0)), None
        row_reads = [(tiling.rows * row_bytes, steps)]
    cost = _cost(
        flops=2 * rows * 2 * half * out_features,
        reads=[*row_reads, (columns * bias.dtype.itemsize, steps), (_tile_bytes(blocks, scales, columns), steps)]
        + ([(tiling.rows * columns * 4, steps)] if addend is not None else []),
        writes=rows * out_features * 4,
    )
    bias_spec = pl.BlockSpec((None, 1, columns), lambda n, v, tiles, experts, *_: (experts[v], 0, n))
    out_spec = pl.BlockSpec((tiling.rows, columns), lambda n, v, tiles, *_: (tiles[v], n))
    added = [] if addend is None else [addend]
    return pl.pallas_call(
        functools.partial(_forward_kernel, resident_rows=resident, added=addend is not None),
        out_shape=varying_output((rows, out_features), jnp.float32, x_even, bias, *added, blocks, scales, visit_tile, layer),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(column_tiles, count),
            in_specs=[row_spec, row_spec, bias_spec, *[out_spec] * len(added),
                      *_weight_specs(blocks, scales, columns, column_first=True, experts_at=1)],  # fmt: skip
            out_specs=out_spec,
            scratch_shapes=[pltpu.VMEM((half, columns), x_even.dtype)] * 2,
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=cost,
        # The result takes the addend's buffer: no second [rows, out] array for the sum.
        input_output_aliases={7: 0} if added else {},
        interpret=interpret,
    )(visit_tile, visit_expert, bounds, layer, x_even, x_odd, bias[:, None, :], *added, blocks, scales)


def _backward(grad, visits, layer, blocks, scales, tiling: Tiling, interpret):
    visit_tile, visit_expert, bounds, count = visits
    rows, out_features = grad.shape
    half = blocks.shape[2] * BLOCK_BYTES
    columns = column_tile(out_features, tiling.columns)
    column_tiles = pl.cdiv(out_features, columns)
    grad = jnp.pad(grad, ((0, 0), (0, column_tiles * columns - out_features)))  # zeros past the end
    steps = column_tiles * visit_tile.shape[0]
    cost = _cost(
        flops=2 * rows * out_features * 2 * half,
        reads=[(tiling.rows * columns * grad.dtype.itemsize, steps), (_tile_bytes(blocks, scales, columns), steps)],
        writes=2 * rows * half * grad.dtype.itemsize,
    )
    out_spec = pl.BlockSpec((tiling.rows, half), lambda v, n, tiles, *_: (tiles[v], 0))
    return pl.pallas_call(
        functools.partial(_backward_kernel, out_features=out_features),
        # In the rows' dtype: each row's sum over the columns is complete in the float32 scratch.
        out_shape=[varying_output((rows, half), grad.dtype, grad, blocks, scales, visit_tile, layer)] * 2,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(count, column_tiles),
            in_specs=[
                pl.BlockSpec((tiling.rows, columns), lambda v, n, tiles, *_: (tiles[v], n)),
                *_weight_specs(blocks, scales, columns, column_first=False, experts_at=1),
            ],
            out_specs=[out_spec, out_spec],
            scratch_shapes=[pltpu.VMEM((half, columns), grad.dtype)] * 2
            + [pltpu.VMEM((tiling.rows, half), jnp.float32)] * 2,
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(visit_tile, visit_expert, bounds, layer, grad, blocks, scales)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _sorted_product(x, bias, addend, visits, layer, blocks, scales, tiling, interpret):
    return _forward(*split_columns(x), bias, addend, visits, layer, blocks, scales, tiling, interpret)


def _sorted_product_forward(x, bias, addend, visits, layer, blocks, scales, tiling, interpret):
    out = _sorted_product(x, bias, addend, visits, layer, blocks, scales, tiling, interpret)
    # None where there is no bias or addend, and so no gradient for it.
    given = tuple(None if a is None else jnp.zeros((0,), jnp.float32) for a in (bias, addend))
    return out, (jnp.zeros((0,), x.dtype), given, visits, layer, blocks, scales)


def _sorted_product_backward(tiling, interpret, saved, grad):
    like, (biased, added), visits, layer, blocks, scales = saved
    even, odd = _backward(grad.astype(like.dtype), visits, layer, blocks, scales, tiling, interpret)
    dx = jnp.stack([even, odd], axis=-1).reshape(even.shape[0], -1)
    # Tiles past the last one visited are never written: their rows' gradients are zero, not whatever the
    # output buffer held.
    bounds = visits[2]
    in_groups = jnp.arange(dx.shape[0]) < bounds[-1]
    dx = jnp.where(in_groups[:, None], dx, 0.0).astype(like.dtype)
    dbias = None
    if biased is not None:  # each expert's bias gathers its rows' gradients (rows past the groups: none)
        row_expert = jnp.searchsorted(bounds[1:], jnp.arange(dx.shape[0]), side="right")
        dbias = jax.ops.segment_sum(grad, row_expert, num_segments=bounds.shape[0] - 1, indices_are_sorted=True)
    return dx, dbias, None if added is None else grad, None, None, None, None


_sorted_product.defvjp(_sorted_product_forward, _sorted_product_backward)


def sorted_matmul(x, group_sizes, blocks, scales, layer=None, bias=None, addend=None, *, tiling: Tiling,
                  interpret=False) -> jax.Array:  # fmt: skip
    """float32 [rows, out]: rows x [rows, in] sorted by expert, expert e's group_sizes[e] rows after the
    groups before it, each against its expert (decoded from MXFP4), plus its bias (bias [E, out]) and the
    addend's row (addend float32 [rows, out], such as the adapters' update), both optional. Rows past the
    groups hold the addend's, or are left undefined without one.

    rows is a whole number of tiles of `tiling.rows`. The grid visits (row tile, expert) pairs in order
    (see `_visits`): a tile holding the ends of several experts is multiplied by each of their decoded
    column tiles, keeping each expert's rows, so the rows need no padding per expert (megablox's gmm
    layout). Each expert's bytes are read once per tile its rows touch. The bias and the addend are added
    in the kernel, which writes the result into the addend's buffer: no [rows, out] array of each row's
    bias, and no second array for the sum. blocks and scales are one projection's experts in the TPU form
    (`expert_form.to_tpu_form`: [E, G, 16, out] and [E, ceil(G/16), 16, out] uint8), or stacks of them
    over layers with one more leading axis, read at `layer` in place. Differentiable with respect to x,
    the bias and the addend.
    """
    if layer is None:
        blocks, scales, layer = blocks[None], scales[None], jnp.zeros((), jnp.int32)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    bias, addend = (None if a is None else a.astype(jnp.float32) for a in (bias, addend))
    visits = _visits(group_sizes, tiling.rows, x.shape[0] // tiling.rows)
    return _sorted_product(x, bias, addend, visits, layer, blocks, scales, tiling, interpret)


# The decode form: few rows, each of its own expert, in the order they come (no tiles, no sorting).


def _rows_forward_kernel(experts, layer, row_experts, x_even, x_odd, blocks, scales, out, low, high):
    del layer
    step = pl.program_id(1)

    @pl.when(step == 0)
    def _():
        out[...] = jnp.zeros_like(out)

    _decode_tile(blocks, scales, low, high)
    precision = _precision(low.dtype)
    product = jnp.dot(x_even[...], low[...], precision=precision, preferred_element_type=jnp.float32)
    product += jnp.dot(x_odd[...], high[...], precision=precision, preferred_element_type=jnp.float32)
    out[...] += jnp.where(row_experts[...] == experts[step], product, 0.0)


def _rows_backward_kernel(experts, layer, row_experts, grad, blocks, scales, out_even, out_odd, low, high, *, out_features: int):
    del layer
    step, column = pl.program_id(0), pl.program_id(1)
    columns = blocks.shape[-1]

    @pl.when((step == 0) & (column == 0))
    def _():
        out_even[...] = jnp.zeros_like(out_even)
        out_odd[...] = jnp.zeros_like(out_odd)

    left = out_features - column * columns if out_features % columns else None
    _decode_tile(blocks, scales, low, high, columns_left=left)
    g, precision, transposed = grad[...], _precision(low.dtype), (((1,), (1,)), ((), ()))
    mine = row_experts[...] == experts[step]
    even = jax.lax.dot_general(g, low[...], transposed, precision=precision, preferred_element_type=jnp.float32)
    odd = jax.lax.dot_general(g, high[...], transposed, precision=precision, preferred_element_type=jnp.float32)
    out_even[...] += jnp.where(mine, even, 0.0)
    out_odd[...] += jnp.where(mine, odd, 0.0)


def _rows_forward(x_even, x_odd, row_experts, experts, used, layer, blocks, scales, columns_target: int, interpret):
    rows, half = x_even.shape
    out_features = blocks.shape[-1]
    columns = column_tile(out_features, columns_target)
    column_tiles, most = pl.cdiv(out_features, columns), experts.shape[0]
    whole = lambda n, e, *_: (0, 0)
    # A partial last column tile is fetched whole (past the weight's end too): count the blocks as fetched.
    cost = _cost(
        flops=2 * rows * 2 * half * column_tiles * columns * most,
        reads=[(2 * x_even.nbytes + row_experts.nbytes, 1), (_tile_bytes(blocks, scales, columns), column_tiles * most)],
        writes=rows * out_features * 4,
    )
    return pl.pallas_call(
        _rows_forward_kernel,
        out_shape=varying_output((rows, out_features), jnp.float32, x_even, blocks, scales, experts, layer, row_experts),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(column_tiles, used),
            in_specs=[pl.BlockSpec((rows, 1), whole), pl.BlockSpec((rows, half), whole), pl.BlockSpec((rows, half), whole),
                      *_weight_specs(blocks, scales, columns, column_first=True, experts_at=0)],  # fmt: skip
            out_specs=pl.BlockSpec((rows, columns), lambda n, e, *_: (0, n)),
            scratch_shapes=[pltpu.VMEM((half, columns), x_even.dtype)] * 2,
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(experts, layer, row_experts, x_even, x_odd, blocks, scales)


def _rows_backward(grad, row_experts, experts, used, layer, blocks, scales, columns_target: int, interpret):
    rows, out_features = grad.shape
    half = blocks.shape[2] * BLOCK_BYTES
    columns = column_tile(out_features, columns_target)
    column_tiles, most = pl.cdiv(out_features, columns), experts.shape[0]
    grad = jnp.pad(grad, ((0, 0), (0, column_tiles * columns - out_features)))  # zeros past the end
    cost = _cost(
        flops=2 * rows * column_tiles * columns * 2 * half * most,
        reads=[(rows * columns * grad.dtype.itemsize, column_tiles * most), (row_experts.nbytes, 1),
               (_tile_bytes(blocks, scales, columns), column_tiles * most)],  # fmt: skip
        writes=2 * rows * half * 4,
    )
    whole = lambda e, n, *_: (0, 0)
    return pl.pallas_call(
        functools.partial(_rows_backward_kernel, out_features=out_features),
        out_shape=[varying_output((rows, half), jnp.float32, grad, blocks, scales, experts, layer, row_experts)] * 2,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(used, column_tiles),
            in_specs=[pl.BlockSpec((rows, 1), whole), pl.BlockSpec((rows, columns), lambda e, n, *_: (0, n)),
                      *_weight_specs(blocks, scales, columns, column_first=False, experts_at=0)],  # fmt: skip
            out_specs=[pl.BlockSpec((rows, half), whole)] * 2,
            scratch_shapes=[pltpu.VMEM((half, columns), grad.dtype)] * 2,
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(experts, layer, row_experts, grad, blocks, scales)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _rows_product(x, row_experts, experts, used, layer, blocks, scales, columns, interpret):
    return _rows_forward(*split_columns(x), row_experts, experts, used, layer, blocks, scales, columns, interpret)


def _rows_product_forward(x, row_experts, experts, used, layer, blocks, scales, columns, interpret):
    out = _rows_product(x, row_experts, experts, used, layer, blocks, scales, columns, interpret)
    return out, (jnp.zeros((0,), x.dtype), row_experts, experts, used, layer, blocks, scales)


def _rows_product_backward(columns, interpret, saved, grad):
    like, row_experts, experts, used, layer, blocks, scales = saved
    even, odd = _rows_backward(grad.astype(like.dtype), row_experts, experts, used, layer, blocks, scales, columns, interpret)
    dx = jnp.stack([even, odd], axis=-1).reshape(even.shape[0], -1).astype(like.dtype)
    return dx, None, None, None, None, None, None


_rows_product.defvjp(_rows_product_forward, _rows_product_backward)


def expert_rows_matmul(x, row_experts, blocks, scales, layer=None, *, columns: int, interpret=False) -> jax.Array:
    """float32 [rows, out]: row r of x [rows, in] against expert row_experts[r] (decoded from MXFP4); rows
    whose expert is not one of this device's (any id outside [0, E)) give zeros.

    The decode form of `grouped_matmul`: for a few rows (a decode batch's pairs) it walks the experts the
    rows chose, each once, multiplying all rows (kept in VMEM) by its decoded tile and keeping the rows
    that chose it. So each chosen expert's bytes are read once per step whatever the batch, with no tiles
    of padding rows to fill and no sort; the wasted MXU work (every row against every chosen expert) is
    free while a step waits on the weights' bytes. Differentiable with respect to x.
    """
    if layer is None:
        blocks, scales, layer = blocks[None], scales[None], jnp.zeros((), jnp.int32)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    num_experts, rows = blocks.shape[1], x.shape[0]
    row_experts = row_experts.astype(jnp.int32)
    mine = (row_experts >= 0) & (row_experts < num_experts)
    present = jnp.zeros((num_experts,), bool).at[jnp.where(mine, row_experts, num_experts)].set(True, mode="drop")
    # The chosen experts in order; the grid walks the first `used`; the static bound is the most there can be.
    experts = jnp.nonzero(present, size=min(num_experts, rows), fill_value=0)[0].astype(jnp.int32)
    used = jnp.maximum(jnp.sum(present), 1).astype(jnp.int32)  # one step at least: it zeroes the output
    return _rows_product(x, row_experts.reshape(rows, 1), experts, used, layer, blocks, scales, columns, interpret)
