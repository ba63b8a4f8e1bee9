"""The CPU backend: kernels for MXFP4 experts, bf16 products and decode attention (cpu_kernels.cc),
called through XLA's FFI.

On the CPU, XLA decodes MXFP4 element by element and runs one-row products well below the memory
bandwidth, which is what bounds decoding; for prefill it would decode every expert to a dense copy
and pad each expert's rows. The kernels read each weight byte once instead. They are built (build.py:
a portable variant for this CPU's instruction set, with the system C++ compiler, into a cache folder)
the first time a runtime asks for them (gptoss_jax.runtime, outside any trace), or ahead of time by
`python -m gptoss_jax.backends.cpu`. When that is not possible (no compiler, a failed build, or
GPTOSS_JAX_KERNELS=0) the model runs its plain XLA paths, which compute the same values, slower.
Functions here take a `layer` index for weights stacked over layers; the model's code never does (it
hands over `stacks.LayerOf` views, unpacked in this package's products and expert paths).
The grouped matmul's gradient is the same kernel, transposed; the others' come from XLA formulations."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax import mxfp4
from gptoss_jax.backends.cpu import build
from gptoss_jax.backends.cpu.stacks import LayerOf

TARGETS = {
    "gptoss_mxfp4_expert_matvec": "GptossMxfp4ExpertMatvec",
    "gptoss_mxfp4_expert_matvec_bf16": "GptossMxfp4ExpertMatvecBf16",
    "gptoss_mxfp4_dequantize_bf16": "GptossMxfp4DequantizeBf16",
    "gptoss_mxfp4_dequantize_f32": "GptossMxfp4DequantizeF32",
    "gptoss_bf16_matvec": "GptossBf16Matvec",
    "gptoss_bf16_matvec_blocks": "GptossBf16MatvecBlocks",
    "gptoss_mxfp4_grouped_matmul": "GptossMxfp4GroupedMatmul",
    "gptoss_copy_layer": "GptossCopyLayer",
    "gptoss_decode_attention": "GptossDecodeAttention",
}
# Rows up to which a bf16 product with a weight that is one layer of a stack runs in the matvec kernel:
# XLA's dot would first copy the layer out and relayout it. For a whole weight the build says
# (KernelStatus.matvec_rows): past a few rows the product is compute-bound and XLA's dot may be faster.
MATVEC_MAX_STACKED_ROWS = 16
# On a CPU with AMX, XLA's dot runs a whole bf16 weight on AMX's tiles (20b's unembedding at 16 rows ~52
# ms on a 2-core Xeon; the vdpbf16ps tiles were not measured there): the native AVX512-BF16 build keeps
# the unembedding as [N, K] and hands XLA every product past this many rows. A forced avx2 build keeps
# its own tiles and blocks, which stand for an AVX2 laptop's.
AMX_MATVEC_ROWS = 4


@dataclasses.dataclass(frozen=True)
class KernelStatus:
    """What load_kernels found: the variant built and registered, or why there is none."""

    variant: str | None
    # Whether the build multiplies bf16 pairs in hardware (AVX512-BF16): the bf16 matvec rows.
    bf16_products: bool = False
    # Whether its grouped matmul runs register tiles (bf16 products, or float32 FMA panels on AVX2 and
    # AVX-512); the portable build's loops are slower than XLA's tiled path for prefill.
    grouped_tiles: bool = False
    # Whether its expert matvec takes bf16 rows quantized to int16 per block of 32 (x86 with AVX2): each
    # within its block's largest |x| / 65534, not exact.
    int16_rows: bool = False
    # Rows up to which its bf16 matvec beats XLA's dot on a whole weight (the unembedding): 16 for the
    # avx2 build's register tiles and the avx512bf16 build's (4 where the CPU has AMX), else 4.
    matvec_rows: int = 4
    # Whether the unembedding is best held in blocks of 16 rows ([V/16, K, 16], gptoss_jax.backends.cpu.
    # blocks), which its matvec reads as outer products: the avx2 build, FMA-bound at 16 rows, and the
    # avx512bf16 build where the CPU has no AMX (vdpbf16ps on pairs of k interleaved in registers).
    unembedding_blocks: bool = False
    reason: str | None = None

    @property
    def available(self) -> bool:
        return self.variant is not None


class KernelsUnavailableWarning(UserWarning):
    """The kernels could not be built or loaded here; the model runs XLA's paths (filter it to silence)."""


# Libraries loaded into this process (kept referenced: XLA calls into them).
_libraries: list[ctypes.CDLL] = []


@functools.cache
def load_kernels() -> KernelStatus:
    """Build (if needed) and register this CPU's kernel variant, once per process.

    When they are unavailable one warning says why; GPTOSS_JAX_KERNELS=0 turns them off quietly. A
    GPTOSS_JAX_KERNEL_VARIANT this machine cannot run is an error (build.VariantError), not a fallback.
    """
    if os.environ.get("GPTOSS_JAX_KERNELS", "1") == "0":
        return KernelStatus(None, reason="turned off by GPTOSS_JAX_KERNELS=0")
    variant = build.chosen_variant()
    try:
        library = ctypes.cdll.LoadLibrary(str(build.build(variant)))
    except (build.BuildError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        message = f"CPU kernels unavailable ({reason}); using XLA's paths, decoding is slower"
        # Attributed to the package, not a source line: the notice prints as one line.
        warnings.warn_explicit(message, KernelsUnavailableWarning, filename="gptoss_jax", lineno=0)
        return KernelStatus(None, reason=reason)
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    _libraries.append(library)
    bf16_products = bool(library.GptossHasBf16Products())
    matvec_rows, blocks = int(library.GptossMatvecRows()), bool(library.GptossUnembeddingBlocks())
    if bf16_products and "amx_bf16" in build.cpu_flags():
        matvec_rows, blocks = min(matvec_rows, AMX_MATVEC_ROWS), False
    return KernelStatus(variant.name, bf16_products=bf16_products,
                        grouped_tiles=bool(library.GptossHasTiledGroupedMatmul()),
                        int16_rows=bool(library.GptossHasInt16Rows()),
                        matvec_rows=matvec_rows, unembedding_blocks=blocks)


def available() -> bool:
    """Whether the kernels are built and registered (building them on the first call)."""
    return load_kernels().available


def bf16_products() -> bool:
    """Whether the registered kernels multiply bf16 pairs in hardware (AVX512-BF16)."""
    return load_kernels().bf16_products


def grouped_tiles() -> bool:
    """Whether the registered kernels' grouped matmul runs register tiles (not the portable loops)."""
    return load_kernels().grouped_tiles


def _layer_index(layer) -> jax.Array:
    """The kernels' layer argument: int32 [1], 0 for an unstacked weight."""
    return jnp.zeros((1,), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32).reshape(1)


def _call(target: str, result: jax.ShapeDtypeStruct, *args):
    return jax.ffi.ffi_call(target, result, vmap_method="sequential")(*args)


# ---- MXFP4 experts applied to token rows -------------------------------------------------------------
#
# Packed weights are [E, N, K/32, 16] blocks and [E, N, K/32] scales, or the same stacked over layers
# ([L, E, ...]) with `layer` saying which: a scanned model passes its whole stack, since slicing one layer
# out of it inside the scan would copy that layer's bytes on every step.


def layer_slice(array, layer):
    """array[layer] for a stack over layers (layer not None), else the array itself.

    On the CPU the layer is copied out by a kernel: XLA's own slice of a bf16 stack inside the layer scan
    first converts the whole stack to float32, on every call.
    """
    if layer is None:
        return array
    if not available():
        return array[layer]
    return _copy_layer(array, jnp.asarray(layer, jnp.int32))


@jax.custom_vjp
def _copy_layer(array, layer):
    out = jax.ShapeDtypeStruct(array.shape[1:], array.dtype)
    return _call("gptoss_copy_layer", out, array, layer.reshape(1))


def _copy_layer_forward(array, layer):
    return _copy_layer(array, layer), (jnp.zeros((0,), array.dtype), array.shape, layer)


def _copy_layer_backward(saved, g):
    like, shape, layer = saved
    return jnp.zeros(shape, g.dtype).at[layer].set(g).astype(like.dtype), None


_copy_layer.defvjp(_copy_layer_forward, _copy_layer_backward)


def _expert_matvec_reference(x, experts, blocks, scales, layer):
    experts = jnp.clip(experts, 0, blocks.shape[-4] - 1)
    blocks, scales = layer_slice(blocks, layer)[experts], layer_slice(scales, layer)[experts]
    weights = mxfp4.dequantize(blocks, scales, jnp.float32)  # [T, k, N, K]
    return jnp.einsum("td,tknd->tkn", x.astype(jnp.float32), weights, preferred_element_type=jnp.float32)


@jax.custom_vjp
def mxfp4_expert_matvec(x, experts, blocks, scales, layer=None):
    """out [T, k, N] = x [T, K] against expert experts[t, j]'s MXFP4 weights [N, K], in float32.

    x may be bfloat16 (products of bf16 pairs, float32 sums: half the work) or float32 (exact products).

    Each chosen expert's bytes are read once per step, whatever the number of tokens that chose it.
    An expert id outside 0..E-1 gives zeros (experts held on another device).
    """
    tokens, k = experts.shape
    out = jax.ShapeDtypeStruct((tokens, k, blocks.shape[-3]), jnp.float32)
    layer = _layer_index(layer)
    target = "gptoss_mxfp4_expert_matvec_bf16" if x.dtype == jnp.bfloat16 else "gptoss_mxfp4_expert_matvec"
    x = x if x.dtype == jnp.bfloat16 else x.astype(jnp.float32)
    return _call(target, out, x, experts.astype(jnp.int32), blocks, scales, layer)


def _expert_matvec_forward(x, experts, blocks, scales, layer=None):
    return mxfp4_expert_matvec(x, experts, blocks, scales, layer), (x, experts, blocks, scales, layer)


def _expert_matvec_backward(saved, g):
    x, experts, blocks, scales, layer = saved
    _, pullback = jax.vjp(lambda x: _expert_matvec_reference(x, experts, blocks, scales, layer), x)
    held = (experts >= 0) & (experts < blocks.shape[-4])
    (dx,) = pullback(jnp.where(held[..., None], g, 0.0))
    return dx, None, None, None, None


mxfp4_expert_matvec.defvjp(_expert_matvec_forward, _expert_matvec_backward)


def mxfp4_grouped_matmul(x, sizes, blocks, scales, layer=None):
    """out [P, N] float32: row p of x [P, K] (bf16) against its expert's MXFP4 weights [N, K].

    Rows are sorted by expert: expert e owns the next sizes[e] rows; rows past sum(sizes) get zeros.
    Each expert's weights are decoded once, a cache-sized panel at a time, for all of its rows.
    Differentiable in x (the same kernel, transposed).
    """
    layer = _layer_index(layer)
    return _grouped_matmul(x.astype(jnp.bfloat16), sizes.astype(jnp.int32), blocks, scales, layer)


def _grouped_call(x, sizes, blocks, scales, layer, transpose: bool):
    columns = blocks.shape[-2] * mxfp4.BLOCK_SIZE if transpose else blocks.shape[-3]
    out = jax.ShapeDtypeStruct((x.shape[0], columns), jnp.float32)
    target = jax.ffi.ffi_call("gptoss_mxfp4_grouped_matmul", out, vmap_method="sequential")
    return target(x, sizes, blocks, scales, layer, transpose=transpose)


@jax.custom_vjp
def _grouped_matmul(x, sizes, blocks, scales, layer):
    return _grouped_call(x, sizes, blocks, scales, layer, transpose=False)


def _grouped_matmul_forward(x, sizes, blocks, scales, layer):
    return _grouped_matmul(x, sizes, blocks, scales, layer), (sizes, blocks, scales, layer)


def _grouped_matmul_backward(saved, g):
    sizes, blocks, scales, layer = saved
    dx = _grouped_call(g.astype(jnp.bfloat16), sizes, blocks, scales, layer, transpose=True)
    return dx.astype(jnp.bfloat16), None, None, None, None


_grouped_matmul.defvjp(_grouped_matmul_forward, _grouped_matmul_backward)


def mxfp4_dequantize(blocks, scales, expert, dtype, layer=None):
    """Expert `expert`'s weights [N, K] in `dtype`: mxfp4.dequantize(blocks[expert], ...), exactly."""
    dtype = jnp.dtype(dtype)
    target = {jnp.dtype(jnp.bfloat16): "gptoss_mxfp4_dequantize_bf16", jnp.dtype(jnp.float32): "gptoss_mxfp4_dequantize_f32"}
    if dtype not in target:
        return mxfp4.dequantize(layer_slice(blocks, layer)[expert], layer_slice(scales, layer)[expert], dtype)
    out = jax.ShapeDtypeStruct((blocks.shape[-3], blocks.shape[-2] * mxfp4.BLOCK_SIZE), dtype)
    index = jnp.stack([jnp.asarray(0 if layer is None else layer, jnp.int32), jnp.asarray(expert, jnp.int32)])
    return _call(target[dtype], out, blocks, scales, index)


# ---- bf16 products with few rows ---------------------------------------------------------------------


@jax.custom_vjp
def bf16_matvec(x, w, layer=None):
    """float32 [R, N] = x [R, K] @ w[N, K].T, both bf16, accumulated in float32 (for small R).

    w may be a stack over layers [L, N, K] with `layer` picking one (read in place, not copied out).
    """
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[-2]), jnp.float32)
    layer = _layer_index(layer)
    return _call("gptoss_bf16_matvec", out, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), layer)


def _matvec_forward(x, w, layer=None):
    return bf16_matvec(x, w, layer), (x, w, layer)


def _matvec_backward(saved, g):
    x, w, layer = saved
    dx = jnp.einsum("rn,nk->rk", g, layer_slice(w, layer).astype(jnp.float32))
    dw = jnp.einsum("rn,rk->nk", g, x.astype(jnp.float32))
    if layer is not None:
        dw = jnp.zeros(w.shape, jnp.float32).at[layer].set(dw)
    return dx.astype(x.dtype), dw.astype(w.dtype), None


bf16_matvec.defvjp(_matvec_forward, _matvec_backward)


@jax.custom_vjp
def bf16_matvec_blocks(x, w):
    """float32 [R, N] = x [R, K] against w in blocks of 16 rows [N/16, K, 16] (blocks.to_blocks of a
    [N, K] weight), both bf16, accumulated in float32 (for small R)."""
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0] * w.shape[2]), jnp.float32)
    return _call("gptoss_bf16_matvec_blocks", out, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))


def _blocks_forward(x, w):
    return bf16_matvec_blocks(x, w), (x, w)


def _blocks_backward(saved, g):
    x, w = saved
    g = g.reshape(g.shape[0], w.shape[0], w.shape[2])
    dx = jnp.einsum("rbj,bkj->rk", g, w.astype(jnp.float32))
    dw = jnp.einsum("rbj,rk->bkj", g, x.astype(jnp.float32))
    return dx.astype(x.dtype), dw.astype(w.dtype)


bf16_matvec_blocks.defvjp(_blocks_forward, _blocks_backward)


# ---- decode attention over the stacked KV cache ------------------------------------------------------


def decode_attention(q, new_keys, new_values, cache, query_positions, sinks, window: int | None):
    """One decode step's attention for one layer group of the stacked KV cache, written and read in place.

    q [B, kv_heads, group, head_dim] (unscaled), new_keys and new_values [B, kv_heads, head_dim]: the row's
    token, stored into slot position % slots first; cache: a LayerCache of LayerOf views of the stacks
    (keys and values [G, B, slots, kv_heads * head_dim] bf16, positions [G, B, slots]); query_positions
    [B] (-1: a padding row, which stores and sees nothing); sinks [kv_heads, group]. Returns float32
    [B, kv_heads, group, head_dim] and the cache with the token stored. As the XLA path computes it
    (nn.attention._attend), in bf16 products with float32 sums.
    """
    keys, values, positions = cache.keys.stack, cache.values.stack, cache.positions.stack
    batch, kv_heads, group, head_dim = q.shape
    results = (
        jax.ShapeDtypeStruct(q.shape, jnp.float32),
        jax.ShapeDtypeStruct(keys.shape, keys.dtype),
        jax.ShapeDtypeStruct(values.shape, values.dtype),
        jax.ShapeDtypeStruct(positions.shape, positions.dtype),
    )
    call = jax.ffi.ffi_call("gptoss_decode_attention", results, vmap_method="sequential",
                            input_output_aliases={1: 1, 2: 2, 3: 3})  # fmt: skip
    out, keys, values, positions = call(
        q.astype(jnp.bfloat16), keys, values, positions, _layer_index(cache.keys.index),
        new_keys.reshape(batch, -1).astype(keys.dtype), new_values.reshape(batch, -1).astype(values.dtype),
        query_positions.astype(jnp.int32), sinks.astype(jnp.float32),
        window=np.int64(window or 0), scale=np.float32(head_dim**-0.5),
    )  # fmt: skip
    index = cache.keys.index
    written = dataclasses.replace(cache, keys=LayerOf(keys, index), values=LayerOf(values, index),
                                  positions=LayerOf(positions, index))  # fmt: skip
    return out, written
