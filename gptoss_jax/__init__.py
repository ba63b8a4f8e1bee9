"""gpt-oss in JAX / Flax NNX: load the released checkpoints unchanged, with MXFP4 experts kept packed."""

from gptoss_jax.checkpoint.load import load, resident_bytes
from gptoss_jax.config import PRESETS, GptOssConfig
from gptoss_jax.engine import Completion, GenerationError, Generator, generate
from gptoss_jax.errors import CheckpointError, ConfigError, GptOssError
from gptoss_jax.model import GptOss, KVCache
from gptoss_jax.sampling import SamplingParams

__all__ = [
    "load",
    "resident_bytes",
    "GptOss",
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
]
