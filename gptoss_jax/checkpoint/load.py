"""Build a GptOss model from a checkpoint, streaming tensors one at a time.

The model is first built abstractly (shapes only). Each parameter is then filled from the checkpoint:
unstacked ones directly, stacked ones (one slice per layer group) into a preallocated array updated in
place, so host memory peaks near the size of the loaded model plus one tensor, never two copies.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax import mxfp4
from gptoss_jax.checkpoint.reader import TensorSource, open_checkpoint
from gptoss_jax.model import GptOss

# Model parameter path -> hub tensor name. Per-layer names carry `{n}`, the layer index.
TOP_LEVEL = {
    ("embed",): "model.embed_tokens.weight",
    ("norm", "scale"): "model.norm.weight",
    ("unembed",): "lm_head.weight",
}
PER_LAYER = {
    ("attn_norm", "scale"): "model.layers.{n}.input_layernorm.weight",
    ("attn", "q_proj"): "model.layers.{n}.self_attn.q_proj.weight",
    ("attn", "q_bias"): "model.layers.{n}.self_attn.q_proj.bias",
    ("attn", "k_proj"): "model.layers.{n}.self_attn.k_proj.weight",
    ("attn", "k_bias"): "model.layers.{n}.self_attn.k_proj.bias",
    ("attn", "v_proj"): "model.layers.{n}.self_attn.v_proj.weight",
    ("attn", "v_bias"): "model.layers.{n}.self_attn.v_proj.bias",
    ("attn", "o_proj"): "model.layers.{n}.self_attn.o_proj.weight",
    ("attn", "o_bias"): "model.layers.{n}.self_attn.o_proj.bias",
    ("attn", "sinks"): "model.layers.{n}.self_attn.sinks",
    ("mlp_norm", "scale"): "model.layers.{n}.post_attention_layernorm.weight",
    ("mlp", "router"): "model.layers.{n}.mlp.router.weight",
    ("mlp", "router_bias"): "model.layers.{n}.mlp.router.bias",
    ("mlp", "mlp1", "blocks"): "model.layers.{n}.mlp.experts.gate_up_proj_blocks",
    ("mlp", "mlp1", "scales"): "model.layers.{n}.mlp.experts.gate_up_proj_scales",
    ("mlp", "mlp1_bias"): "model.layers.{n}.mlp.experts.gate_up_proj_bias",
    ("mlp", "mlp2", "blocks"): "model.layers.{n}.mlp.experts.down_proj_blocks",
    ("mlp", "mlp2", "scales"): "model.layers.{n}.mlp.experts.down_proj_scales",
    ("mlp", "mlp2_bias"): "model.layers.{n}.mlp.experts.down_proj_bias",
}
# Dense experts (experts="bfloat16") are decoded from the packed pair once, at load.
DENSE_EXPERTS = {
    ("mlp", "mlp1", "weight"): ("mlp", "mlp1"),
    ("mlp", "mlp2", "weight"): ("mlp", "mlp2"),
}


def load(path_or_repo_id: str | Path, dtype: str = "bfloat16", experts: str = "mxfp4") -> GptOss:
    """Load a gpt-oss checkpoint: a hub-layout folder, an original-layout folder, or a hub repo id.

    dtype: "float32" (for exactness checks) or "bfloat16" (for speed): the dense weights and compute.
    experts: "mxfp4" keeps expert weights packed (decoded inside the forward); "bfloat16" decodes at load.
    """
    source = open_checkpoint(path_or_repo_id)
    config = source.config
    abstract = nnx.eval_shape(lambda: GptOss(config, dtype=dtype, experts=experts, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pattern_length = len(config.layer_pattern)

    def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        # Keep dict keys and list indices; drop the `.value` step into each nnx.Variable.
        path = tuple(k.key if hasattr(k, "key") else k.idx for k in path if not isinstance(k, jax.tree_util.GetAttrKey))
        if path[0] != "groups":
            return _to_device(source.read(TOP_LEVEL[path]), leaf.dtype)
        # groups/layers/<position in pattern>/<module path>: slice g of the stack is layer g * P + position.
        position, inner = path[2], path[3:]
        stacked = jnp.zeros(leaf.shape, leaf.dtype)
        for group in range(config.num_groups):
            layer = group * pattern_length + position
            value = _read_layer_param(source, inner, layer, leaf.shape[1:], leaf.dtype)
            stacked = _set_slice(stacked, group, value)
        return stacked

    state = jax.tree_util.tree_map_with_path(fill, state)
    model = nnx.merge(graphdef, state)
    model.checkpoint_dir = str(source.directory)  # where tokenizer files next to the weights can be found
    return model


def _read_layer_param(source: TensorSource, inner: tuple, layer: int, shape: tuple, dtype) -> jax.Array:
    if inner in DENSE_EXPERTS:
        prefix = PER_LAYER[DENSE_EXPERTS[inner] + ("blocks",)].format(n=layer)
        blocks = source.read(prefix)
        scales = source.read(prefix.removesuffix("_blocks") + "_scales")
        return mxfp4.dequantize(blocks, scales, dtype)
    value = source.read(PER_LAYER[inner].format(n=layer))
    return _to_device(value.reshape(shape), dtype)


def _to_device(value: np.ndarray, dtype) -> jax.Array:
    return jnp.asarray(value if value.dtype == dtype else value.astype(dtype))


# Donating the stack lets XLA write the slice in place instead of copying the whole stack per layer.
_set_slice = jax.jit(lambda stacked, index, value: stacked.at[index].set(value), donate_argnums=0)


def resident_bytes(model: GptOss) -> int:
    """Bytes held by the model's arrays (parameters and packed expert bytes)."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model)))

