"""gpt-oss in JAX / Flax NNX: load the released checkpoints unchanged, with MXFP4 experts kept packed."""

from gptoss_jax.checkpoint.load import load, resident_bytes
from gptoss_jax.config import PRESETS, GptOssConfig
from gptoss_jax.inference.engine import Completion, GenerationError, Generator, generate
from gptoss_jax.errors import CheckpointError, ConfigError, DataError, GptOssError
from gptoss_jax.nn import GptOss, KVCache
from gptoss_jax.runtime import Runtime
from gptoss_jax.inference.sampling import SamplingParams

__all__ = [
    "load",
    "resident_bytes",
    "GptOss",
    "Runtime",
    "KVCache",
    "generate",
    "Generator",
    "Completion",
    "SamplingParams",
    "GenerationError",
    "GptOssConfig",
    "PRESETS",
    "GptOssError",
    "CheckpointError",
    "ConfigError",
    "DataError",
]
