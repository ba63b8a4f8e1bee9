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


def hub_tensor_shapes(config: GptOssConfig) -> Shapes:
    """Every tensor of the Hugging Face hub layout, name -> (shape, dtype name), in a stable order."""
    c = config
    h, i, e = c.hidden_size, c.intermediate_size, c.num_experts
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out: Shapes = {"model.embed_tokens.weight": ((c.vocab_size, h), BF16)}
    for n in range(c.num_layers):
        p = f"model.layers.{n}."
        out[p + "input_layernorm.weight"] = ((h,), BF16)
        out[p + "self_attn.q_proj.weight"] = ((q_out, h), BF16)
        out[p + "self_attn.q_proj.bias"] = ((q_out,), BF16)
        out[p + "self_attn.k_proj.weight"] = ((kv_out, h), BF16)
        out[p + "self_attn.k_proj.bias"] = ((kv_out,), BF16)
        out[p + "self_attn.v_proj.weight"] = ((kv_out, h), BF16)
        out[p + "self_attn.v_proj.bias"] = ((kv_out,), BF16)
        out[p + "self_attn.o_proj.weight"] = ((h, q_out), BF16)
        out[p + "self_attn.o_proj.bias"] = ((h,), BF16)
        out[p + "self_attn.sinks"] = ((c.num_heads,), BF16)
        out[p + "post_attention_layernorm.weight"] = ((h,), BF16)
        out[p + "mlp.router.weight"] = ((e, h), BF16)
        out[p + "mlp.router.bias"] = ((e,), BF16)
        out[p + "mlp.experts.gate_up_proj_blocks"] = ((e, 2 * i, h // BLOCK_SIZE, BYTES_PER_BLOCK), UINT8)
        out[p + "mlp.experts.gate_up_proj_scales"] = ((e, 2 * i, h // BLOCK_SIZE), UINT8)
        out[p + "mlp.experts.gate_up_proj_bias"] = ((e, 2 * i), BF16)
        out[p + "mlp.experts.down_proj_blocks"] = ((e, h, i // BLOCK_SIZE, BYTES_PER_BLOCK), UINT8)
        out[p + "mlp.experts.down_proj_scales"] = ((e, h, i // BLOCK_SIZE), UINT8)
        out[p + "mlp.experts.down_proj_bias"] = ((e, h), BF16)
    out["model.norm.weight"] = ((h,), BF16)
    out["lm_head.weight"] = ((c.vocab_size, h), BF16)
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
