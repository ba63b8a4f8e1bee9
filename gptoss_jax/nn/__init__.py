"""The model's layers, one idea a file: rope, cache, attention, moe (router + expert weights), lora
(the adapter module), ops (the product every layer calls, dispatched by the runtime), and model, which
composes them."""

from gptoss_jax.nn.cache import KVCache, LayerCache
from gptoss_jax.nn.model import GptOss

__all__ = ["GptOss", "KVCache", "LayerCache"]
