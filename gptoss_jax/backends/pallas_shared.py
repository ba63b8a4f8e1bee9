"""What the Pallas expert kernels of every backend (tpu/, gpu/) share: the tiling, fp4 decoding from
bits, the even/odd split of the rows, and outputs that vary like their inputs inside shard_map."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile sizes of one call: rows per tile (a multiple of 16, bf16's sublane packing and Triton's
    smallest dot) and output columns per tile (the forward's tile; the backward's reduction chunk)."""

    rows: int
    columns: int


def fp4_values(codes: jax.Array) -> jax.Array:
    """float32 values of fp4 (e2m1) codes 0..15 held in int32, built from bits (no table lookups)."""
    exponent, mantissa = (codes >> 1) & 3, codes & 1
    magnitude = jnp.where(exponent > 0, ((exponent + 126) << 23) | (mantissa << 22), mantissa * (126 << 23))
    return jax.lax.bitcast_convert_type(magnitude | ((codes >> 3) << 31), jnp.float32)


def split_columns(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(even, odd) columns of x [rows, in], by a reshape (lane-strided slices are slow to compile on TPU).

    Byte j of an MXFP4 block holds value 2j in its low nibble and 2j+1 in its high one, so a kernel
    computes x_even @ low + x_odd @ high instead of interleaving nibbles in registers."""
    pairs = x.reshape(x.shape[0], x.shape[1] // 2, 2)
    return pairs[..., 0], pairs[..., 1]


def varying_output(shape, dtype, *inputs) -> jax.ShapeDtypeStruct:
    """An output of `shape` and `dtype` that varies over the mesh axes any input varies over (inside
    shard_map, pallas_call must be told)."""
    mat = jax.typeof(inputs[0]).mat
    varying = frozenset().union(*(jax.typeof(x).mat.varying for x in inputs))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat.update(varying=varying))


def differentiable(forward, backward):
    """A backend's grouped matmul, differentiable with respect to its rows, from its two kernels:
    forward(x_even, x_odd, tile_experts, used_tiles, layer, blocks, scales, tiling, interpret) -> [rows, out]
    and backward(grad, tile_experts, used_tiles, layer, blocks, scales, tiling, interpret) -> (even, odd)
    gradients of the rows' columns. used_tiles arrives as an int32 scalar, layer as int32 [1]."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
    def product(x, tile_experts, used_tiles, layer, blocks, scales, tiling, interpret):
        return forward(*split_columns(x), tile_experts, used_tiles, layer, blocks, scales, tiling, interpret)

    def product_forward(x, tile_experts, used_tiles, layer, blocks, scales, tiling, interpret):
        out = product(x, tile_experts, used_tiles, layer, blocks, scales, tiling, interpret)
        return out, (jnp.zeros((0,), x.dtype), tile_experts, used_tiles, layer, blocks, scales)

    def product_backward(tiling, interpret, saved, grad):
        like, tile_experts, used_tiles, layer, blocks, scales = saved
        even, odd = backward(grad.astype(like.dtype), tile_experts, used_tiles, layer, blocks, scales, tiling, interpret)
        dx = jnp.stack([even, odd], axis=-1).reshape(even.shape[0], -1)
        # Tiles past the last one in use are never visited: their rows' gradients are zero, not whatever
        # the output buffer held.
        in_use = jnp.arange(dx.shape[0]) < used_tiles * tiling.rows
        return jnp.where(in_use[:, None], dx, 0.0).astype(like.dtype), None, None, None, None, None

    product.defvjp(product_forward, product_backward)

    def grouped_matmul(x, tile_experts, used_tiles, blocks, scales, layer=None, *, tiling: Tiling, interpret=False):
        if layer is None:
            blocks, scales, layer = blocks[None], scales[None], jnp.zeros((), jnp.int32)
        layer = jnp.asarray(layer, jnp.int32).reshape(1)
        used_tiles = jnp.asarray(used_tiles, jnp.int32).reshape(())
        return product(x, tile_experts.astype(jnp.int32), used_tiles, layer, blocks, scales, tiling, interpret)

    return grouped_matmul
