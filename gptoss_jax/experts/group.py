"""Group-by-expert algorithms, for many (token, expert) pairs (prefill, training): pairs sorted by
expert so that each expert's weights are decoded once for all of its rows.

experts holds local expert ids, or local_count for pairs held on another device: those sort last, fall
in no group and have weight 0 (see expert_outputs).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gptoss_jax.backends.cpu import experts as cpu_experts
from gptoss_jax.backends.cpu.stacks import unstack
from gptoss_jax.backends.gpu import mxfp4_matmul as gpu_matmul
from gptoss_jax.backends.pallas_shared import Tiling
from gptoss_jax.backends.tpu import mxfp4_matmul as tpu_matmul
from gptoss_jax.backends.tpu.expert_form import halves_order
from gptoss_jax.experts.common import ExpertAdapters, decode_experts, sort_by_expert, swiglu
from gptoss_jax.sharding import MESH_AXES


def sorted_kernel(tokens, experts, weights, params, bias2, config) -> jax.Array:
    """Many pairs on CPU in bf16: each projection is one grouped kernel call over rows sorted by expert
    (the kernel gives rows in no group zeros)."""
    order, token_of, sorted_experts, sizes = sort_by_expert(experts, params["mlp1_bias"].shape[0])
    h = cpu_experts.grouped_products(tokens[token_of].astype(jnp.bfloat16), sizes, params["mlp1"])
    h = swiglu(h + params["mlp1_bias"][sorted_experts].astype(jnp.float32), config)
    y = cpu_experts.grouped_products(h.astype(jnp.bfloat16), sizes, params["mlp2"])
    y = (y + bias2[sorted_experts].astype(jnp.float32)) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((tokens.shape[0], tokens.shape[1]), jnp.float32).at[token_of].add(y)


class _Tiles(NamedTuple):
    order: jax.Array  # pair order[i] is the i-th pair sorted by expert
    slot: jax.Array  # its row among the tiles (past the end for pairs held elsewhere)
    tile_expert: jax.Array  # [tiles] the expert of each tile (the last expert's for unused tiles)
    used_tiles: jax.Array  # int32: tiles holding rows, all before the unused ones


def _whole_tiles(experts: jax.Array, local_count: int, tile: int, tiles: int) -> _Tiles:
    """Pairs sorted by expert, each expert's run padded to whole tiles of `tile` rows (`tiles` of them
    at most), so that a tile holds one expert's rows.

    experts [N, k] holds local ids, or local_count for pairs held elsewhere (they get no row).
    """
    pairs = experts.size
    flat_experts = experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    sorted_experts = flat_experts[order]
    sizes = jnp.bincount(flat_experts, length=local_count + 1)[:local_count]
    padded = -(-sizes // tile) * tile
    padded_end = jnp.cumsum(padded)
    expert_of_row = jnp.minimum(sorted_experts, local_count - 1)
    rank_in_run = jnp.arange(pairs) - (jnp.cumsum(sizes) - sizes)[expert_of_row]
    slot = jnp.where(sorted_experts < local_count, padded_end[expert_of_row] - padded[expert_of_row] + rank_in_run, tiles * tile)
    tile_start = jnp.arange(tiles) * tile
    tile_expert = jnp.minimum(jnp.searchsorted(padded_end, tile_start, side="right"), local_count - 1)
    used_tiles = (padded_end[-1] // tile).astype(jnp.int32)
    return _Tiles(order, slot, tile_expert.astype(jnp.int32), used_tiles)


def _tile_rows(pairs: int, num_experts: int) -> int:
    """Rows a tile: about the mean pairs an expert gets (a power of two, 8..256), so padding stays small."""
    mean = max(1, pairs // num_experts)
    return min(256, max(8, 1 << (mean - 1).bit_length()))


def _weights_first(equation: str, w: jax.Array, x: jax.Array, dtype) -> jax.Array:
    """einsum(equation, w, x) -> [out, rows] in float32, kept in that orientation.

    XLA's CPU dot runs [out, in] x [rows, in] -> [out, rows] about twice as fast as x against w for a few
    dozen rows (it packs its right operand, here the small one); the barrier stops XLA from folding the
    caller's transpose back into the dot and undoing that.
    """
    out = jnp.einsum(equation, w.astype(dtype), x.astype(dtype), preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(out)


def tiled(tokens, experts, weights, params, bias2, adapters: ExpertAdapters, config, dtype, runtime, sharded: bool):
    """Many tokens on CPU: sort (token, expert) pairs by expert, pad each expert's run to whole tiles, and
    scan over tiles; each tile decodes one expert's weights and applies its MLP. The scan body is rematerialised, so a backward pass keeps each tile's input, not its decoded weights.
    """
    k = config.experts_per_token
    local_count = params["mlp1_bias"].shape[0]
    pairs, hidden = tokens.shape[0] * k, tokens.shape[1]
    tile = _tile_rows(pairs, local_count)
    tiles = -(-pairs // tile) + local_count  # enough for every expert's run rounded up to whole tiles
    layout = _whole_tiles(experts, local_count, tile, tiles)
    order, slot, tile_expert = layout.order, layout.slot, layout.tile_expert
    rows = jnp.zeros((tiles * tile, hidden), tokens.dtype).at[slot].set(tokens[order // k], mode="drop")
    in_use = jnp.arange(tiles) < layout.used_tiles

    @jax.checkpoint
    def one_tile(_, scanned):
        x, expert, used, index = scanned

        def mlp(x):
            w1 = decode_experts(params, "mlp1", dtype, runtime, expert)
            h = _weights_first("od,td->ot", w1, x, dtype).T
            h = h + adapters.tile("mlp1", x, expert, index)
            h = swiglu(h + params["mlp1_bias"][expert].astype(jnp.float32), config)
            w2 = decode_experts(params, "mlp2", dtype, runtime, expert)
            y = _weights_first("di,ti->dt", w2, h, dtype).T
            y = y + adapters.tile("mlp2", h, expert, index)
            return y + bias2[expert].astype(jnp.float32)

        def skip(x):  # a tile past the last expert's run; in shard_map, zeros vary like the MLP's output
            zeros = jnp.zeros((tile, hidden), jnp.float32)
            return jax.lax.pcast(zeros, MESH_AXES, to="varying") if sharded else zeros

        return None, jax.lax.cond(used, mlp, skip, x)

    scanned = (rows.reshape(tiles, tile, hidden), tile_expert, in_use, jnp.arange(tiles))
    _, outputs = jax.lax.scan(one_tile, None, scanned)
    y = outputs.reshape(tiles * tile, hidden).at[slot].get(mode="fill", fill_value=0.0)
    y = y * weights.reshape(-1)[order][:, None]
    return jnp.zeros((tokens.shape[0], hidden), jnp.float32).at[order // k].add(y)


def grouped(tokens, experts, weights, params, bias2, adapters: ExpertAdapters, config, dtype, runtime) -> jax.Array:
    """Many tokens on GPU and TPU: one grouped matmul (ragged_dot) per projection over all experts'
    decoded weights (it gives rows in no group zeros)."""
    order, token_of, sorted_experts, group_sizes = sort_by_expert(experts, params["mlp1_bias"].shape[0])

    rows = tokens[token_of]
    w1 = jnp.swapaxes(decode_experts(params, "mlp1", dtype, runtime), 1, 2)  # [E, in, out]
    h = jax.lax.ragged_dot(rows.astype(dtype), w1, group_sizes, preferred_element_type=jnp.float32)
    h = h + adapters.grouped("mlp1", rows, group_sizes)
    h = swiglu(h + params["mlp1_bias"][sorted_experts].astype(jnp.float32), config)
    w2 = jnp.swapaxes(decode_experts(params, "mlp2", dtype, runtime), 1, 2)
    y = jax.lax.ragged_dot(h.astype(dtype), w2, group_sizes, preferred_element_type=jnp.float32)
    y = y + adapters.grouped("mlp2", h, group_sizes)
    y = (y + bias2[sorted_experts].astype(jnp.float32)) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((tokens.shape[0], tokens.shape[1]), jnp.float32).at[token_of].add(y)



# Rows a tile of the Pallas kernels: a multiple of 16 (bf16 packs 16 rows a vreg), at most 128 (on GPU,
# where each expert's rows fill whole tiles, the rows array holds a tile per expert more than the pairs).
PALLAS_MIN_TILE_ROWS = 16
PALLAS_MAX_TILE_ROWS = 128
# Output columns a tile: each step reads one expert's bytes for these columns (about 0.5 MB at 2880 inputs).
PALLAS_TILE_COLUMNS = 384
# When whole tiles an expert would hold at least this many times the (token, expert) pairs, the pairs are
# decode-sized: on TPU they skip the tiles (`_pallas_pairs`); on GPU the work between the two kernels
# runs on the pairs' rows instead (16-row tiles for a token or two an expert).
PAIRS_FIRST_PADDING = 4
# On a GPU (Triton: powers of two), columns a program; it walks all of an expert's inputs for them.
PALLAS_GPU_TILE_COLUMNS = 64
# ... and rows: a program's float32 accumulator (rows x 64) lives in registers.
PALLAS_GPU_MAX_TILE_ROWS = 64


def pallas_experts(tokens, experts, weights, params, bias2, adapters: ExpertAdapters, config, dtype, runtime) -> jax.Array:
    """MXFP4 experts through a backend's Pallas kernels, which decode one expert's bytes on chip a tile at
    a time, each projection one kernel call. On TPU (weights in the TPU form) the pairs sorted by expert
    (`_pallas_sorted`), or for a decode batch the pairs as they come (`_pallas_pairs`); on GPU (the
    checkpoint's layout) the pairs sorted by expert into whole tiles of one expert each, each expert's
    bytes read once per tile of its rows (once per step while decoding). Adapters add their products on
    the same rows.
    """
    k = config.experts_per_token
    local_count = params["mlp1_bias"].shape[0]
    pairs, hidden = tokens.shape[0] * k, tokens.shape[1]
    on_tpu = runtime.pallas == "tpu"
    most = PALLAS_MAX_TILE_ROWS if on_tpu else PALLAS_GPU_MAX_TILE_ROWS
    tile = min(most, max(PALLAS_MIN_TILE_ROWS, _tile_rows(pairs, local_count)))
    # Each of the (at most) `used` experts with rows fills its last tile with at most tile - 1 padding rows.
    used = min(local_count, pairs)
    tiles = (pairs + used * (tile - 1)) // tile
    decode_sized = tiles * tile >= PAIRS_FIRST_PADDING * pairs
    if on_tpu:
        pallas_form = _pallas_pairs if decode_sized else functools.partial(_pallas_sorted, tile=tile)
        return pallas_form(tokens, experts, weights, params, bias2, adapters, config, dtype, runtime)
    layout = _whole_tiles(experts, local_count, tile, tiles)
    tiling = Tiling(tile, PALLAS_GPU_TILE_COLUMNS)

    in_use = (jnp.arange(tiles * tile) < layout.used_tiles * tile)[:, None]

    def product(x, weights, *, zero_unused: bool = True):
        # The kernel leaves the rows of tiles past the used ones undefined: zeroed unless only the pairs'
        # rows are read afterwards (a bias's gradient sums over every row).
        stack, layer = unstack(weights["blocks"])
        scales, _ = unstack(weights["scales"])
        out = gpu_matmul.grouped_matmul(x, layout.tile_expert, layout.used_tiles, stack, scales, layer, tiling=tiling,
                                        interpret=runtime.interpret)  # fmt: skip
        return jnp.where(in_use, out, 0.0) if zero_unused else out

    rows = jnp.zeros((tiles * tile, hidden), dtype).at[layout.slot].set(tokens[layout.order // k].astype(dtype), mode="drop")
    if decode_sized:
        # The tiles are mostly padding (16 rows an expert for a token or two), so the bias, SwiGLU and
        # weighting run on the pairs' rows only, taken out of the tiles and put back.
        h = product(rows, params["mlp1"], zero_unused=False) + adapters.tiles("mlp1", rows, layout.tile_expert)
        held = (layout.slot < tiles * tile)[:, None]  # pairs held elsewhere (expert-parallel) have no row
        expert = layout.tile_expert[jnp.minimum(layout.slot // tile, tiles - 1)]
        h = h.at[layout.slot].get(mode="fill", fill_value=0.0)
        h = swiglu(h + params["mlp1_bias"][expert].astype(jnp.float32), config)
        h = jnp.zeros((tiles * tile, h.shape[-1]), jnp.float32).at[layout.slot].set(h, mode="drop")
        y = product(h.astype(dtype), params["mlp2"], zero_unused=False) + adapters.tiles("mlp2", h, layout.tile_expert)
        y = jnp.where(held, y.at[layout.slot].get(mode="fill", fill_value=0.0) + bias2[expert].astype(jnp.float32), 0.0)
    else:
        row_expert = jnp.repeat(layout.tile_expert, tile)
        h = product(rows, params["mlp1"]) + adapters.tiles("mlp1", rows, layout.tile_expert)
        h = swiglu(h + params["mlp1_bias"][row_expert].astype(jnp.float32), config)
        y = product(h.astype(dtype), params["mlp2"]) + adapters.tiles("mlp2", h, layout.tile_expert)
        y = y + bias2[row_expert].astype(jnp.float32)
        y = y.at[layout.slot].get(mode="fill", fill_value=0.0)
    y = y * weights.reshape(-1)[layout.order][:, None]
    return jnp.zeros((tokens.shape[0], hidden), jnp.float32).at[layout.order // k].add(y)


def _tpu_weights(weights) -> tuple:
    """(blocks, scales, layer) of one projection's experts in the TPU form, a layer of a stack read in place."""
    stack, layer = unstack(weights["tpu_blocks"])
    scales, _ = unstack(weights["tpu_scales"])
    return stack, scales, layer


def _pallas_sorted(tokens, experts, weights, params, bias2, adapters: ExpertAdapters, config, dtype, runtime, *, tile: int):
    """Many pairs through the TPU kernels' sorted form: the pairs sorted by expert, padded only at the end
    to whole tiles of `tile` rows (a tile may hold the ends of several experts; see
    `tpu_matmul.sorted_matmul`). Against whole tiles an expert, that saves up to tile - 1 rows an expert
    in every array between the kernels and in the MXU's work (a 2048-token step of 20b: 8192 rows, not
    12160). Adapters run as grouped products (ragged_dot) on the same rows.

    What a training step holds is kept small: each row's bias and the adapters' update are added inside
    the kernel, into the update's buffer (no gathered biases, no separate sum), and the adapters' weights
    stay float32 (see `ExpertAdapters.grouped`), and mlp1's outputs come as gate / linear halves (the
    TPU form), which SwiGLU reads without relayout copies. XLA's temporaries for a v6e LoRA step of 20b
    at 2048 tokens: 4.14 GiB, against 4.33 with interleaved pairs and 4.85 with whole tiles an expert.
    """
    local_count = params["mlp1_bias"].shape[0]
    pairs = experts.size
    order, token_of, _, sizes = sort_by_expert(experts, local_count)
    adapters = adapters.in_halves()  # mlp1's outputs come in halves (the TPU form)
    rows_count = -(-pairs // tile) * tile
    in_groups = (jnp.arange(rows_count) < jnp.sum(sizes))[:, None]
    tiling = Tiling(tile, PALLAS_TILE_COLUMNS)

    def product(x, weights, bias, update):
        """x against each row's expert, plus its bias and the adapters' update; rows past the groups (pairs
        held elsewhere, the padding) zero."""
        # The update (ragged_dot) is zero past the groups and those rows keep it; with no adapter here
        # (update 0.0) the kernel leaves them undefined.
        addend = None if isinstance(update, float) else update
        out = tpu_matmul.sorted_matmul(x, sizes, *_tpu_weights(weights), bias, addend, tiling=tiling,
                                       interpret=runtime.interpret)  # fmt: skip
        return out if addend is not None else jnp.where(in_groups, out, 0.0)

    rows = jnp.pad(tokens[token_of].astype(dtype), ((0, rows_count - pairs), (0, 0)))
    h = product(rows, params["mlp1"], halves_order(params["mlp1_bias"]), adapters.grouped("mlp1", rows, sizes))
    h = swiglu(h, config, halves=True)
    y = product(h.astype(dtype), params["mlp2"], bias2, adapters.grouped("mlp2", h, sizes))
    y = y[:pairs] * weights.reshape(-1)[order][:, None]  # pairs held elsewhere have weight 0
    return jnp.zeros((tokens.shape[0], tokens.shape[1]), jnp.float32).at[token_of].add(y)


def _pallas_pairs(tokens, experts, weights, params, bias2, adapters: ExpertAdapters, config, dtype, runtime) -> jax.Array:
    """A decode batch's pairs through the TPU kernels' decode form: one row a (token, expert) pair in the
    order they come, each projection one call that reads each chosen expert's bytes once (see
    `tpu_matmul.expert_rows_matmul`). No tiles, no sort, and the work between the calls is on the pairs'
    rows only."""
    tokens_count, k = experts.shape
    local_count = params["mlp1_bias"].shape[0]
    # Row p is pair p (not padded: the kernel's bound on the experts it walks is the rows); pairs held
    # elsewhere (id local_count) choose no expert here.
    row_experts = experts.reshape(-1)
    held = (row_experts < local_count)[:, None]
    expert = jnp.minimum(row_experts, local_count - 1)
    x = jnp.repeat(tokens.astype(dtype), k, axis=0)

    def product(x, weights):
        return tpu_matmul.expert_rows_matmul(x, row_experts, *_tpu_weights(weights), columns=PALLAS_TILE_COLUMNS,
                                             interpret=runtime.interpret)  # fmt: skip

    # mlp1's outputs come in halves (the TPU form): so must each row's bias and adapter update.
    added = adapters.rows("mlp1", x, expert) + params["mlp1_bias"][expert].astype(jnp.float32)
    h = swiglu(product(x, params["mlp1"]) + halves_order(added), config, halves=True)
    y = product(h.astype(dtype), params["mlp2"]) + adapters.rows("mlp2", h, expert)
    y = jnp.where(held, y + bias2[expert].astype(jnp.float32), 0.0)
    return jnp.sum(y.reshape(tokens_count, k, -1) * weights[..., None], axis=1)
