"""The TPU form of MXFP4 experts: the checkpoint's bytes, laid out so that one expert's tile is a plain
block on a TPU (gptoss_jax/backends/tpu/mxfp4_matmul.py reads them so). The loader converts on the host.

mlp1's output features, interleaved (gate, linear) pairs in the checkpoint, are held in halves: every
gate, then every linear (`halves=True`), so that SwiGLU reads two contiguous halves of the kernel's
output. Splitting interleaved pairs of a [rows, 2 * intermediate] float32 array takes XLA relayout copies
of it on a TPU, forward and backward: the halves cut a v6e LoRA step's temporaries (20b, 2048 tokens)
from 4.33 to 4.14 GiB and a 2048-token prefill's from 0.50 to 0.30 GiB. A model in this form cannot split
mlp1's outputs over 'tensor' (gptoss_jax.sharding.UNSPLIT).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from gptoss_jax import mxfp4

BLOCK_BYTES = mxfp4.BYTES_PER_BLOCK  # 16: a block's bytes, and the scales kept in one row of bytes
# The projection whose outputs are SwiGLU's (gate, linear) pairs, held in halves in this form.
GATE_LINEAR = "mlp1"


def halves_order(x, axis: int = -1):
    """Interleaved (gate, linear) pairs along `axis` -> every gate, then every linear."""
    xp = np if isinstance(x, np.ndarray) else jnp
    before = (slice(None),) * (axis % x.ndim)
    return xp.concatenate([x[(*before, slice(0, None, 2))], x[(*before, slice(1, None, 2))]], axis=axis)


def pairs_order(x, axis: int = -1):
    """The inverse of `halves_order`."""
    xp = np if isinstance(x, np.ndarray) else jnp
    axis = axis % x.ndim
    gate, linear = xp.split(x, 2, axis=axis)
    return xp.stack([gate, linear], axis=axis + 1).reshape(x.shape)


def to_tpu_form(blocks, scales, halves: bool = False):
    """Checkpoint MXFP4 ([..., out, G, 16] bytes, [..., out, G] scales) -> the TPU form.

    Blocks become [..., G, 16, out] and scales [..., ceil(G/16), 16, out] (scale g at row (g // 16,
    g % 16); the few padding rows hold 0). Both keep 16 bytes over out features as their last two axes,
    which a TPU lays out densely and can DMA an expert at a time. (The checkpoint's scales [E, out, G]
    are laid out by XLA with the experts on sublanes, where one expert's scales cannot be fetched
    without a copy of the whole array.) halves: out features in `halves_order` (mlp1's). numpy arrays
    stay numpy (the loader converts on the host).
    """
    return blocks_to_tpu_form(blocks, halves), scales_to_tpu_form(scales, halves)


def blocks_to_tpu_form(blocks, halves: bool = False):
    """[..., out, G, 16] -> [..., G, 16, out]."""
    xp = np if isinstance(blocks, np.ndarray) else jnp
    blocks = xp.moveaxis(blocks, -3, -1)
    return halves_order(blocks) if halves else blocks


def scales_to_tpu_form(scales, halves: bool = False):
    """[..., out, G] -> [..., ceil(G/16), 16, out]."""
    xp = np if isinstance(scales, np.ndarray) else jnp
    scales = halves_order(scales, -2) if halves else scales
    groups = scales.shape[-1]
    rows = -(-groups // BLOCK_BYTES)
    scales = xp.pad(scales, [(0, 0)] * (scales.ndim - 1) + [(0, rows * BLOCK_BYTES - groups)])
    return xp.moveaxis(scales.reshape(*scales.shape[:-1], rows, BLOCK_BYTES), -3, -1)


# A variable in the TPU form -> the checkpoint tensor it is made from.
STORED = {"tpu_blocks": "blocks", "tpu_scales": "scales"}


def variable_from_checkpoint(leaf: str, projection: str, stored):
    """The TPU-form variable `leaf` ("tpu_blocks" or "tpu_scales") of `projection` ("mlp1" or "mlp2") from
    its checkpoint tensor (numpy on the host, or a jax array)."""
    convert = blocks_to_tpu_form if leaf == "tpu_blocks" else scales_to_tpu_form
    return convert(stored, halves=projection == GATE_LINEAR)


def tpu_form_shapes(blocks_shape: tuple, scales_shape: tuple) -> tuple[tuple, tuple]:
    """The shapes `to_tpu_form` gives arrays of these checkpoint shapes."""
    *lead, out, groups, block = blocks_shape
    return (*lead, groups, block, out), (*lead, -(-groups // BLOCK_BYTES), BLOCK_BYTES, out)


def from_tpu_form(blocks, scales, halves: bool = False):
    """The inverse of `to_tpu_form`: checkpoint blocks [..., out, G, 16] and scales [..., out, G]."""
    xp = np if isinstance(blocks, np.ndarray) else jnp
    if halves:
        blocks, scales = pairs_order(blocks), pairs_order(scales)
    groups = blocks.shape[-3]
    blocks = xp.moveaxis(blocks, -1, -3)
    scales = xp.moveaxis(scales, -1, -3)
    return blocks, scales.reshape(*scales.shape[:-2], -1)[..., :groups]
