"""Random weights in the hub layout, scaled so a forward pass is numerically interesting.

Magnitudes: the embedding is N(0, 1); dense projections are N(0, 1/fan_in) so activations stay of order one;
the unembedding then gives logits of order a few units. The router's logits have unit scale, so routing is
far from uniform yet not degenerate. Expert weights are MXFP4 with random codes and scales 2^-8 .. 2^-5, so
decoded values have a standard deviation of roughly 0.01 .. 0.1 (about 0.05 overall). Biases are small,
norm weights are 1 plus a little noise, sinks are N(0, 1).
"""

from __future__ import annotations

import functools
import math
import statistics
from pathlib import Path

import ml_dtypes
import numpy as np

from gptoss_jax.checkpoint.names import BF16, hub_tensor_shapes
from gptoss_jax.checkpoint.writer import hub_config_json, shard_file_name, write_hub_shards
from gptoss_jax.config import GptOssConfig

# Generate big tensors in pieces of this many values: temporaries stay in cache (fastest, measured).
_CHUNK = 1 << 20
# E8M0 exponent bytes of the expert scales: 2^(byte - 127) = 2^-8 .. 2^-5.
_SCALE_LOW, _SCALE_HIGH = 119, 122


@functools.lru_cache(maxsize=1)
def _normal_quantiles() -> np.ndarray:
    """The 65536 equiprobable quantiles of N(0, 1) (tails end at +-4.3)."""
    dist = statistics.NormalDist()
    return np.array([dist.inv_cdf((k + 0.5) / 65536) for k in range(65536)], dtype=np.float64)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float, mean: float = 0.0) -> np.ndarray:
    """N(mean, std^2) in bf16, by inverse CDF: random 16-bit codes index a table of bf16 quantiles.

    bf16 keeps 8 significant bits, so 65536 levels lose nothing visible, and a table gather is several
    times faster than numpy's normal sampler followed by rounding (it matters for 201088 x 2880 tensors).
    """
    table = (_normal_quantiles() * std + mean).astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    out = np.empty(math.prod(shape), dtype=np.uint16)
    for start in range(0, out.size, _CHUNK):
        stop = min(start + _CHUNK, out.size)
        codes = np.frombuffer(rng.bytes(2 * (stop - start)), dtype="<u2")
        np.take(table, codes, out=out[start:stop])
    return out.view(ml_dtypes.bfloat16).reshape(shape)


def _bytes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform random bytes."""
    out = np.empty(math.prod(shape), dtype=np.uint8)
    for start in range(0, out.size, 2 * _CHUNK):
        stop = min(start + 2 * _CHUNK, out.size)
        out[start:stop] = np.frombuffer(rng.bytes(stop - start), dtype=np.uint8)
    return out.reshape(shape)


def _std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a bf16 tensor from its name."""
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return 1.0, 0.05
    if name == "model.embed_tokens.weight":
        return 0.0, 1.0
    if name.endswith("sinks"):
        return 0.0, 1.0
    if name.endswith("_bias") or name.endswith(".bias"):
        return 0.0, 0.02
    # Dense (out, in) weights: unit-variance outputs from unit-variance inputs.
    return 0.0, 1.0 / math.sqrt(shape[-1])


def _random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    if name.endswith("_blocks"):
        return _bytes(rng, shape)
    if name.endswith("_scales"):
        return rng.integers(_SCALE_LOW, _SCALE_HIGH + 1, size=shape, dtype=np.uint8)
    assert dtype == BF16, name
    mean, std = _std(name, shape)
    return _normal(rng, shape, std, mean)


def random_hub_tensors(config: GptOssConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors with the hub layout's names, shapes and dtypes (bf16 as ml_dtypes.bfloat16).

    Deterministic in `seed` (numpy's default_rng); tensors are drawn in `hub_tensor_shapes` order.
    """
    rng = np.random.default_rng(seed)
    return {name: _random_tensor(rng, name, shape, dtype) for name, (shape, dtype) in hub_tensor_shapes(config).items()}


def write_random_hub_checkpoint(directory, config: GptOssConfig, seed: int = 0) -> Path:
    """A random model of any size written in the hub layout one layer at a time (one shard per layer and
    one for the rest), so that writing the full 20b or 120b shape holds one shard in memory, not the model.

    Same distributions as `random_hub_tensors`; each shard draws from its own generator (seed, shard).
    """
    shapes = hub_tensor_shapes(config)
    def layer_of(name: str) -> int:
        return int(name.split(".")[2]) if name.startswith("model.layers.") else -1

    shard_names = [-1, *range(config.num_layers)]
    files = {index: shard_file_name(number, len(shard_names)) for number, index in enumerate(shard_names)}

    def make(index: int):
        def tensors() -> dict[str, np.ndarray]:
            rng = np.random.default_rng([seed, index + 1])
            return {
                name: _random_tensor(rng, name, shape, dtype)
                for name, (shape, dtype) in shapes.items()
                if layer_of(name) == index
            }

        return tensors

    return write_hub_shards(directory, hub_config_json(config), {files[index]: make(index) for index in shard_names})
