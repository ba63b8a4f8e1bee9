"""Rotary position embedding with YaRN scaling, as gpt-oss uses it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.config import GptOssConfig


def rope_inverse_frequencies(config: GptOssConfig) -> np.ndarray:
    """YaRN inverse frequencies (NTK-by-parts, no rounding of the ramp ends), float32 like the reference."""
    half = config.head_dim // 2
    freq = np.float32(config.rope_theta) ** (np.arange(0, config.head_dim, 2, dtype=np.float32) / config.head_dim)
    if config.rope_scaling_factor <= 1.0:
        return (1.0 / freq).astype(np.float32)

    def ramp_end(beta: float) -> float:
        return half * np.log(config.rope_original_context / (beta * 2 * np.pi)) / np.log(config.rope_theta)

    low, high = ramp_end(config.rope_beta_fast), ramp_end(config.rope_beta_slow)
    ramp = np.clip((np.arange(half, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    interpolation = 1.0 / (config.rope_scaling_factor * freq)
    extrapolation = 1.0 / freq
    return (interpolation * ramp + extrapolation * (1 - ramp)).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, config: GptOssConfig) -> jax.Array:
    """Rotate half-split pairs (dimension j with j + head_dim/2); x: [B, T, heads, head_dim]; float32 out."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inverse_frequencies(config))
    cos = (jnp.cos(angles) * config.rope_concentration)[:, :, None, :]
    sin = (jnp.sin(angles) * config.rope_concentration)[:, :, None, :]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)

