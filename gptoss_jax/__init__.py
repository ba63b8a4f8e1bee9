"""gpt-oss in JAX / Flax NNX: load the released checkpoints unchanged, with MXFP4 experts kept packed."""

from gptoss_jax.checkpoint.load import load, resident_bytes
from gptoss_jax.config import PRESETS, GptOssConfig
from gptoss_jax.errors import CheckpointError, ConfigError, GptOssError
from gptoss_jax.model import GptOss

__all__ = [
    "load",
    "resident_bytes",
    "GptOss",
    "GptOssConfig",
    "PRESETS",
    "GptOssError",
    "CheckpointError",
    "ConfigError",
]
