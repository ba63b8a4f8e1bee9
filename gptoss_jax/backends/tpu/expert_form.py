"""The TPU form of MXFP4 experts: the checkpoint's bytes, laid out so that one expert's tile is a plain
block on a TPU (gptoss_jax/backends/tpu/mxfp4_matmul.py reads them so). The loader converts on the host.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from gptoss_jax import mxfp4

BLOCK_BYTES = mxfp4.BYTES_PER_BLOCK  # 16: a block's bytes, and the scales kept in one row of bytes


def to_tpu_form(blocks, scales):
    """Checkpoint MXFP4 ([..., out, G, 16] bytes, [..., out, G] scales) -> the TPU form.

    Blocks become [..., G, 16, out] and scales [..., ceil(G/16), 16, out] (scale g at row (g // 16,
    g % 16); the few padding rows hold 0). Both keep 16 bytes over out features as their last two axes,
    which a TPU lays out densely and can DMA an expert at a time. (The checkpoint's scales [E, out, G]
    are laid out by XLA with the experts on sublanes, where one expert's scales cannot be fetched
    without a copy of the whole array.) numpy arrays stay numpy (the loader converts on the host).
    """
    return blocks_to_tpu_form(blocks), scales_to_tpu_form(scales)


def blocks_to_tpu_form(blocks):
    """[..., out, G, 16] -> [..., G, 16, out]."""
    xp = np if isinstance(blocks, np.ndarray) else jnp
    return xp.moveaxis(blocks, -3, -1)


def scales_to_tpu_form(scales):
    """[..., out, G] -> [..., ceil(G/16), 16, out]."""
    xp = np if isinstance(scales, np.ndarray) else jnp
    groups = scales.shape[-1]
    rows = -(-groups // BLOCK_BYTES)
    scales = xp.pad(scales, [(0, 0)] * (scales.ndim - 1) + [(0, rows * BLOCK_BYTES - groups)])
    return xp.moveaxis(scales.reshape(*scales.shape[:-1], rows, BLOCK_BYTES), -3, -1)


def tpu_form_shapes(blocks_shape: tuple, scales_shape: tuple) -> tuple[tuple, tuple]:
    """The shapes `to_tpu_form` gives arrays of these checkpoint shapes."""
    *lead, out, groups, block = blocks_shape
    return (*lead, groups, block, out), (*lead, -(-groups // BLOCK_BYTES), BLOCK_BYTES, out)


def from_tpu_form(blocks, scales):
    """The inverse of `to_tpu_form`: checkpoint blocks [..., out, G, 16] and scales [..., out, G]."""
    xp = np if isinstance(blocks, np.ndarray) else jnp
    groups = blocks.shape[-3]
    blocks = xp.moveaxis(blocks, -1, -3)
    scales = xp.moveaxis(scales, -1, -3)
    return blocks, scales.reshape(*scales.shape[:-2], -1)[..., :groups]
