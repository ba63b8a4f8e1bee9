"""Group-by-expert algorithms, for many (token, expert) pairs (prefill, training): pairs sorted by
expert so that each expert's weights are decoded once for all of its rows.

experts holds local expert ids, or local_count for pairs held on another device: those sort last, fall
in no group and have weight 0 (see expert_outputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptoss_jax.backends.cpu import experts as cpu_experts
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
    flat_experts = experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    sorted_experts = flat_experts[order]
    sizes = jnp.bincount(flat_experts, length=local_count + 1)[:local_count]
    padded = -(-sizes // tile) * tile
    padded_end = jnp.cumsum(padded)
    expert_of_row = jnp.minimum(sorted_experts, local_count - 1)
    rank_in_run = jnp.arange(pairs) - (jnp.cumsum(sizes) - sizes)[expert_of_row]
    slot = jnp.where(sorted_experts < local_count, padded_end[expert_of_row] - padded[expert_of_row] + rank_in_run, tiles * tile)
    rows = jnp.zeros((tiles * tile, hidden), tokens.dtype).at[slot].set(tokens[order // k], mode="drop")
    tile_start = jnp.arange(tiles) * tile
    tile_expert = jnp.minimum(jnp.searchsorted(padded_end, tile_start, side="right"), local_count - 1)
    in_use = tile_start < padded_end[-1]

    @jax.checkpoint
    def one_tile(_, scanned):
        x, expert, used, index = scanned

        def mlp(x):
            w1 = decode_experts(params["mlp1"], dtype, runtime, expert)
            h = _weights_first("od,td->ot", w1, x, dtype).T
            h = h + adapters.tile("mlp1", x, expert, index)
            h = swiglu(h + params["mlp1_bias"][expert].astype(jnp.float32), config)
            w2 = decode_experts(params["mlp2"], dtype, runtime, expert)
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
    w1 = jnp.swapaxes(decode_experts(params["mlp1"], dtype, runtime), 1, 2)  # [E, in, out]
    h = jax.lax.ragged_dot(rows.astype(dtype), w1, group_sizes, preferred_element_type=jnp.float32)
    h = h + adapters.grouped("mlp1", rows, group_sizes)
    h = swiglu(h + params["mlp1_bias"][sorted_experts].astype(jnp.float32), config)
    w2 = jnp.swapaxes(decode_experts(params["mlp2"], dtype, runtime), 1, 2)
    y = jax.lax.ragged_dot(h.astype(dtype), w2, group_sizes, preferred_element_type=jnp.float32)
    y = y + adapters.grouped("mlp2", h, group_sizes)
    y = (y + bias2[sorted_experts].astype(jnp.float32)) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((tokens.shape[0], tokens.shape[1]), jnp.float32).at[token_of].add(y)

