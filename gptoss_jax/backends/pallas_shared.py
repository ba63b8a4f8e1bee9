"""What the Pallas expert kernels of every backend (tpu/, gpu/) share: the tiling, fp4 decoding from
bits, the even/odd split of the rows, and outputs that vary like their inputs inside shard_map."""

from __future__ import annotations

import dataclasses

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


def float32_output(shape, *inputs) -> jax.ShapeDtypeStruct:
    """A float32 output of `shape` that varies over the mesh axes any input varies over (inside
    shard_map, pallas_call must be told)."""
    mat = jax.typeof(inputs[0]).mat
    varying = frozenset().union(*(jax.typeof(x).mat.varying for x in inputs))
    return jax.ShapeDtypeStruct(shape, jnp.float32, manual_axis_type=mat.update(varying=varying))
