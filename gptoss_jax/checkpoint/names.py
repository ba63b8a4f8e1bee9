"""Tensor names, shapes and dtypes of the two released gpt-oss checkpoint layouts (spec section 3).

This module is the single place that spells checkpoint tensor names. Both layouts store dense weights
(out, in) and the expert weights as MXFP4: `*_blocks` (uint8, two fp4 codes a byte, 16 bytes a block of 32
values along the input dimension) and `*_scales` (uint8 E8M0 exponents, one per block). The expert bytes
are identical in both layouts.

Dtypes: every non-expert tensor is bf16 in both layouts. OpenAI's reference (`gpt_oss/torch/model.py`) keeps
its RMSNorm scales as float32 parameters, but it fills them with `param.data.copy_(loaded)`, which casts, so a
bf16 `*.norm.scale` loads exactly; we write bf16 (as the released `original/model.safetensors` does).
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from gptoss_jax.config import GptOssConfig
from gptoss_jax.mxfp4 import BLOCK_SIZE, BYTES_PER_BLOCK
from gptoss_jax.errors import CheckpointError

BF16 = "bfloat16"
UINT8 = "uint8"


Shapes = dict[str, tuple[tuple[int, ...], str]]


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
# A model holding dense experts (experts="bfloat16") has one weight where the checkpoint has the packed pair.
DENSE_EXPERTS = {
    ("mlp", "mlp1", "weight"): ("mlp", "mlp1"),
    ("mlp", "mlp2", "weight"): ("mlp", "mlp2"),
}


def hub_tensor_shapes(config: GptOssConfig) -> Shapes:
    """Every tensor of the Hugging Face hub layout, name -> (shape, dtype name), in a stable order."""
    c = config
    h, i, e = c.hidden_size, c.intermediate_size, c.num_experts
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layer_shapes = {
        ("attn_norm", "scale"): (h,),
        ("attn", "q_proj"): (q_out, h),
        ("attn", "q_bias"): (q_out,),
        ("attn", "k_proj"): (kv_out, h),
        ("attn", "k_bias"): (kv_out,),
        ("attn", "v_proj"): (kv_out, h),
        ("attn", "v_bias"): (kv_out,),
        ("attn", "o_proj"): (h, q_out),
        ("attn", "o_bias"): (h,),
        ("attn", "sinks"): (c.num_heads,),
        ("mlp_norm", "scale"): (h,),
        ("mlp", "router"): (e, h),
        ("mlp", "router_bias"): (e,),
        ("mlp", "mlp1", "blocks"): (e, 2 * i, h // BLOCK_SIZE, BYTES_PER_BLOCK),
        ("mlp", "mlp1", "scales"): (e, 2 * i, h // BLOCK_SIZE),
        ("mlp", "mlp1_bias"): (e, 2 * i),
        ("mlp", "mlp2", "blocks"): (e, h, i // BLOCK_SIZE, BYTES_PER_BLOCK),
        ("mlp", "mlp2", "scales"): (e, h, i // BLOCK_SIZE),
        ("mlp", "mlp2_bias"): (e, h),
    }
    out: Shapes = {TOP_LEVEL[("embed",)]: ((c.vocab_size, h), BF16)}
    for n in range(c.num_layers):
        for path, template in PER_LAYER.items():
            out[template.format(n=n)] = (layer_shapes[path], UINT8 if path[-1] in ("blocks", "scales") else BF16)
    out[TOP_LEVEL[("norm", "scale")]] = ((h,), BF16)
    out[TOP_LEVEL[("unembed",)]] = ((c.vocab_size, h), BF16)
    return out


def dense_expert_name(blocks_name: str) -> str:
    """`...experts.gate_up_proj_blocks` -> `...experts.gate_up_proj`: where the bf16 hub layout keeps it."""
    return blocks_name.removesuffix("_blocks")


def dense_expert_hub_shapes(config: GptOssConfig) -> Shapes:
    """The hub layout with bf16 experts (no quantization_config; what transformers writes after dequantizing).

    Each MXFP4 pair (`*_blocks`, `*_scales`) [E, out, in] becomes one bf16 tensor stored [E, in, out].
    """
    out: Shapes = {}
    for name, (shape, dtype) in hub_tensor_shapes(config).items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            experts, rows, groups, _ = shape
            out[dense_expert_name(name)] = ((experts, groups * BLOCK_SIZE, rows), BF16)
        else:
            out[name] = (shape, dtype)
    return out


def original_tensor_shapes(config: GptOssConfig) -> Shapes:
    """Every tensor of OpenAI's original layout (what `gpt_oss.torch` loads), name -> (shape, dtype name)."""
    c = config
    h, i, e = c.hidden_size, c.intermediate_size, c.num_experts
    q_out = c.num_heads * c.head_dim
    qkv_out = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    out: Shapes = {"embedding.weight": ((c.vocab_size, h), BF16)}
    for n in range(c.num_layers):
        p = f"block.{n}."
        out[p + "attn.norm.scale"] = ((h,), BF16)
        out[p + "attn.qkv.weight"] = ((qkv_out, h), BF16)
        out[p + "attn.qkv.bias"] = ((qkv_out,), BF16)
        out[p + "attn.sinks"] = ((c.num_heads,), BF16)
        out[p + "attn.out.weight"] = ((h, q_out), BF16)
        out[p + "attn.out.bias"] = ((h,), BF16)
        out[p + "mlp.norm.scale"] = ((h,), BF16)
        out[p + "mlp.gate.weight"] = ((e, h), BF16)
        out[p + "mlp.gate.bias"] = ((e,), BF16)
        out[p + "mlp.mlp1_weight.blocks"] = ((e, 2 * i, h // BLOCK_SIZE, BYTES_PER_BLOCK), UINT8)
        out[p + "mlp.mlp1_weight.scales"] = ((e, 2 * i, h // BLOCK_SIZE), UINT8)
        out[p + "mlp.mlp1_bias"] = ((e, 2 * i), BF16)
        out[p + "mlp.mlp2_weight.blocks"] = ((e, h, i // BLOCK_SIZE, BYTES_PER_BLOCK), UINT8)
        out[p + "mlp.mlp2_weight.scales"] = ((e, h, i // BLOCK_SIZE), UINT8)
        out[p + "mlp.mlp2_bias"] = ((e, h), BF16)
    out["norm.scale"] = ((h,), BF16)
    out["unembedding.weight"] = ((c.vocab_size, h), BF16)
    return out


# Hub name -> original name, for every tensor that is renamed only (all but q, k, v).
_RENAMED_TOP = {
    "model.embed_tokens.weight": "embedding.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "unembedding.weight",
}
_RENAMED_PER_LAYER = {
    "input_layernorm.weight": "attn.norm.scale",
    "self_attn.sinks": "attn.sinks",
    "self_attn.o_proj.weight": "attn.out.weight",
    "self_attn.o_proj.bias": "attn.out.bias",
    "post_attention_layernorm.weight": "mlp.norm.scale",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.bias": "mlp.gate.bias",
    "mlp.experts.gate_up_proj_blocks": "mlp.mlp1_weight.blocks",
    "mlp.experts.gate_up_proj_scales": "mlp.mlp1_weight.scales",
    "mlp.experts.gate_up_proj_bias": "mlp.mlp1_bias",
    "mlp.experts.down_proj_blocks": "mlp.mlp2_weight.blocks",
    "mlp.experts.down_proj_scales": "mlp.mlp2_weight.scales",
    "mlp.experts.down_proj_bias": "mlp.mlp2_bias",
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
_QKV_PART = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")


def original_location(hub_name: str, config: GptOssConfig) -> tuple[str, tuple[int, int] | None]:
    """Where the original layout stores hub tensor `hub_name`: (original name, rows or None).

    rows = (start, stop) selects the leading-axis slice of the stacked `block.N.attn.qkv.*` tensor that
    holds a q, k or v projection; every other tensor is stored whole under its original name.
    """
    if hub_name in _RENAMED_TOP:
        return _RENAMED_TOP[hub_name], None
    match = _LAYER_NAME.fullmatch(hub_name)
    if match and int(match[1]) < config.num_layers and str(int(match[1])) == match[1]:
        n, rest = match[1], match[2]
        if rest in _RENAMED_PER_LAYER:
            return f"block.{n}.{_RENAMED_PER_LAYER[rest]}", None
        part = _QKV_PART.fullmatch(rest)
        if part:
            q_rows = config.num_heads * config.head_dim
            kv_rows = config.num_kv_heads * config.head_dim
            start = {"q": 0, "k": q_rows, "v": q_rows + kv_rows}[part[1]]
            return f"block.{n}.attn.qkv.{part[2]}", (start, start + (q_rows if part[1] == "q" else kv_rows))
    raise CheckpointError(f"{hub_name!r} is not a tensor of the hub layout for this config")


def check_tensors(tensors: Mapping[str, np.ndarray], expected: Shapes, what: str) -> None:
    """Raise CheckpointError unless `tensors` has exactly the expected names, shapes and dtypes."""
    missing = [name for name in expected if name not in tensors]
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), first {missing[0]!r}")
        if extra:
            parts.append(f"{len(extra)} unexpected tensor(s), first {extra[0]!r}")
        raise CheckpointError(f"{what}: {'; '.join(parts)}")
    for name, (shape, dtype) in expected.items():
        value = tensors[name]
        if tuple(value.shape) != shape or np.dtype(value.dtype).name != dtype:
            raise CheckpointError(
                f"{what}: tensor {name!r} is {np.dtype(value.dtype).name}{list(value.shape)}, "
                f"expected {dtype}{list(shape)}"
            )


def hub_to_original(tensors: Mapping[str, np.ndarray], config: GptOssConfig) -> dict[str, np.ndarray]:
    """Convert a full hub-named tensor dict to the original layout (q, k, v rows stacked into qkv)."""
    check_tensors(tensors, hub_tensor_shapes(config), "hub tensors")
    parts: dict[str, list[tuple[int, np.ndarray]]] = {}
    for name, value in tensors.items():
        stored, rows = original_location(name, config)
        parts.setdefault(stored, []).append((0 if rows is None else rows[0], value))
    out: dict[str, np.ndarray] = {}
    for name in original_tensor_shapes(config):
        pieces = sorted(parts[name], key=lambda piece: piece[0])
        out[name] = pieces[0][1] if len(pieces) == 1 else np.concatenate([value for _, value in pieces], axis=0)
    return out


def original_to_hub(tensors: Mapping[str, np.ndarray], config: GptOssConfig) -> dict[str, np.ndarray]:
    """The inverse of `hub_to_original`: split qkv into q, k, v and rename everything else."""
    check_tensors(tensors, original_tensor_shapes(config), "original tensors")
    out: dict[str, np.ndarray] = {}
    for name in hub_tensor_shapes(config):
        stored, rows = original_location(name, config)
        out[name] = tensors[stored] if rows is None else tensors[stored][rows[0] : rows[1]]
    return out
