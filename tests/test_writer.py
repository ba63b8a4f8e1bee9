"""Checkpoint names and writers, checked against both peers: transformers loads the hub layout we write,
OpenAI's reference loads the original layout, and the two agree in fp32 on the same random weights."""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from gpt_oss.torch.model import Transformer
from safetensors import safe_open

import gptoss_jax.checkpoint.writer as writer
from gptoss_jax.checkpoint.names import (
    hub_tensor_shapes,
    hub_to_original,
    original_location,
    original_tensor_shapes,
    original_to_hub,
)
from gptoss_jax.checkpoint.random_weights import random_hub_tensors
from gptoss_jax.checkpoint.writer import write_hub_checkpoint, write_original_checkpoint
from gptoss_jax.config import GptOssConfig
from gptoss_jax.errors import CheckpointError

pytestmark = [pytest.mark.peer, pytest.mark.quick]  # compares with transformers / OpenAI's reference (torch on the CPU)

TINY = GptOssConfig.preset("tiny")
# Longer than twice the tiny sliding window (16), so the window mask is exercised.
SEQ = 40
FP4 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 -> float32 [..., out, in], written from the spec (low nibble first)."""
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    values = FP4[codes] * np.exp2(scales.astype(np.float32) - 127)[..., None]
    return values.reshape(*scales.shape[:-1], -1)


def load_hf(directory) -> transformers.GptOssForCausalLM:
    # On CPU without triton / use_kernels, transformers dequantizes the MXFP4 experts into the
    # parameters' dtype (float32 here); asking for it explicitly saves a warning.
    model, info = transformers.GptOssForCausalLM.from_pretrained(
        directory,
        dtype=torch.float32,
        quantization_config=transformers.Mxfp4Config(dequantize=True),
        output_loading_info=True,
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.as_tensor(tokens)[None]).logits[0].float().numpy()


@pytest.fixture(scope="module")
def tensors():
    return random_hub_tensors(TINY, seed=0)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, TINY.vocab_size, SEQ)


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory, tensors):
    return write_hub_checkpoint(tmp_path_factory.mktemp("ckpt") / "hub", TINY, tensors)


@pytest.fixture(scope="module")
def original_dir(tmp_path_factory, tensors):
    return write_original_checkpoint(tmp_path_factory.mktemp("ckpt") / "original", TINY, tensors)


@pytest.fixture(scope="module")
def hf_model(hub_dir):
    return load_hf(hub_dir)


@pytest.fixture(scope="module")
def reference_logits(original_dir, tokens):
    model = Transformer.from_checkpoint(str(original_dir), device="cpu")
    x = torch.as_tensor(tokens, dtype=torch.int32)
    with torch.inference_mode():
        bf16 = model(x)
        model.float()
        fp32 = model(x)
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    return bf16.float().numpy(), fp32.numpy()


# Names and shapes.


def test_shapes_match_the_spec_table_for_20b():
    cfg = GptOssConfig.preset("gpt-oss-20b")
    hub = hub_tensor_shapes(cfg)
    assert hub["model.embed_tokens.weight"] == ((201088, 2880), "bfloat16")
    assert hub["model.layers.23.self_attn.q_proj.weight"] == ((4096, 2880), "bfloat16")
    assert hub["model.layers.0.self_attn.k_proj.weight"] == ((512, 2880), "bfloat16")
    assert hub["model.layers.0.self_attn.o_proj.weight"] == ((2880, 4096), "bfloat16")
    assert hub["model.layers.0.self_attn.sinks"] == ((64,), "bfloat16")
    assert hub["model.layers.0.mlp.router.weight"] == ((32, 2880), "bfloat16")
    assert hub["model.layers.0.mlp.experts.gate_up_proj_blocks"] == ((32, 5760, 90, 16), "uint8")
    assert hub["model.layers.0.mlp.experts.gate_up_proj_scales"] == ((32, 5760, 90), "uint8")
    assert hub["model.layers.0.mlp.experts.down_proj_blocks"] == ((32, 2880, 90, 16), "uint8")
    assert hub["model.layers.0.mlp.experts.down_proj_bias"] == ((32, 2880), "bfloat16")
    assert hub["lm_head.weight"] == ((201088, 2880), "bfloat16")
    assert "model.layers.24.input_layernorm.weight" not in hub
    assert len(hub) == 3 + 24 * 19
    original = original_tensor_shapes(cfg)
    assert original["block.0.attn.qkv.weight"] == ((5120, 2880), "bfloat16")
    assert len(original) == 3 + 24 * 15

    def gib(shapes):
        return sum(math.prod(shape) * (2 if dtype == "bfloat16" else 1) for shape, dtype in shapes.values()) / 2**30

    # The spec's 12.8 GiB checkpoint; both layouts hold the same bytes.
    assert gib(hub) == pytest.approx(12.8, abs=0.05)
    assert gib(original) == pytest.approx(gib(hub))
    assert gib(hub_tensor_shapes(GptOssConfig.preset("gpt-oss-120b"))) == pytest.approx(60.8, abs=0.05)


def test_hub_to_original_stacks_qkv_and_round_trips(tensors):
    original = hub_to_original(tensors, TINY)
    assert list(original) == list(original_tensor_shapes(TINY))
    qkv = original["block.2.attn.qkv.weight"]
    q_rows, kv_rows = TINY.num_heads * TINY.head_dim, TINY.num_kv_heads * TINY.head_dim
    assert np.array_equal(qkv[:q_rows], tensors["model.layers.2.self_attn.q_proj.weight"])
    assert np.array_equal(qkv[q_rows : q_rows + kv_rows], tensors["model.layers.2.self_attn.k_proj.weight"])
    assert np.array_equal(qkv[q_rows + kv_rows :], tensors["model.layers.2.self_attn.v_proj.weight"])
    assert original["block.3.mlp.mlp1_weight.blocks"] is tensors["model.layers.3.mlp.experts.gate_up_proj_blocks"]
    back = original_to_hub(original, TINY)
    assert list(back) == list(tensors)
    for name in tensors:
        assert np.array_equal(back[name], tensors[name]), name
    with pytest.raises(CheckpointError, match="missing"):
        hub_to_original({k: v for k, v in tensors.items() if k != "lm_head.weight"}, TINY)


def test_original_location_covers_the_original_layout():
    hub, original = hub_tensor_shapes(TINY), original_tensor_shapes(TINY)
    rows_of: dict[str, list[tuple[int, int]]] = {}
    for name, (shape, _) in hub.items():
        stored, rows = original_location(name, TINY)
        assert stored in original
        if rows is None:
            assert original[stored] == hub[name]
        else:
            assert rows[1] - rows[0] == shape[0]
            rows_of.setdefault(stored, []).append(rows)
    assert set(original) == {original_location(name, TINY)[0] for name in hub}
    for stored, rows in rows_of.items():  # q, k, v tile the stacked qkv rows in order
        assert sorted(rows) == rows and rows[0][0] == 0 and rows[-1][1] == original[stored][0][0]
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    assert original_location("model.layers.0.self_attn.v_proj.bias", TINY) == ("block.0.attn.qkv.bias", (320, 384))
    for bad in ("model.layers.4.self_attn.sinks", "model.layers.0.mlp.experts.gate_up_proj", "embedding.weight"):
        with pytest.raises(CheckpointError):
            original_location(bad, TINY)


def test_random_weights_are_deterministic_and_well_scaled(tensors):
    again = random_hub_tensors(TINY, seed=0)
    other = random_hub_tensors(TINY, seed=1)
    for name, (shape, dtype) in hub_tensor_shapes(TINY).items():
        assert tensors[name].shape == shape
        assert tensors[name].dtype == (np.uint8 if dtype == "uint8" else ml_dtypes.bfloat16)
        assert np.array_equal(tensors[name], again[name]), name
    assert not np.array_equal(tensors["lm_head.weight"], other["lm_head.weight"])
    p = "model.layers.0.mlp.experts."
    experts = dequantize(tensors[p + "gate_up_proj_blocks"], tensors[p + "gate_up_proj_scales"])
    assert experts.shape == (TINY.num_experts, 2 * TINY.intermediate_size, TINY.hidden_size)
    assert 0.02 < experts.std() < 0.1


# (a) transformers loads the hub layout.


def test_transformers_loads_the_hub_layout(hf_model, tensors, tokens):
    layer = hf_model.model.layers[1]
    experts = layer.mlp.experts
    assert experts.gate_up_proj.dtype == torch.float32  # dequantized on CPU
    p = "model.layers.1.mlp.experts."
    # transformers keeps experts as [E, in, out]: the transpose of the decoded (out, in) blocks.
    gate_up = dequantize(tensors[p + "gate_up_proj_blocks"], tensors[p + "gate_up_proj_scales"])
    down = dequantize(tensors[p + "down_proj_blocks"], tensors[p + "down_proj_scales"])
    assert np.array_equal(experts.gate_up_proj.detach().numpy(), gate_up.transpose(0, 2, 1))
    assert np.array_equal(experts.down_proj.detach().numpy(), down.transpose(0, 2, 1))
    assert np.array_equal(
        experts.gate_up_proj_bias.detach().numpy(), tensors[p + "gate_up_proj_bias"].astype(np.float32)
    )
    assert np.array_equal(
        layer.self_attn.q_proj.weight.detach().numpy(),
        tensors["model.layers.1.self_attn.q_proj.weight"].astype(np.float32),
    )
    sinks = tensors["model.layers.1.self_attn.sinks"].astype(np.float32)
    assert np.array_equal(layer.self_attn.sinks.detach().numpy(), sinks)
    assert np.array_equal(hf_model.lm_head.weight.detach().numpy(), tensors["lm_head.weight"].astype(np.float32))
    assert hf_model.config.layer_types == list(TINY.layer_types)
    assert hf_model.config.sliding_window == TINY.sliding_window

    logits = hf_logits(hf_model, tokens)
    assert logits.shape == (SEQ, TINY.vocab_size)
    assert np.isfinite(logits).all()
    assert 1 < np.abs(logits).max() < 30 and logits.std() > 0.1
    assert len(np.unique(logits.argmax(-1))) > 5  # positions predict different tokens

    # Routing is not degenerate: across the sequence most experts are picked in every layer.
    with torch.inference_mode():
        out = hf_model(torch.as_tensor(tokens)[None], output_router_logits=True)
    for router_logits in out.router_logits:
        chosen = router_logits.topk(TINY.experts_per_token, dim=-1).indices
        assert len(torch.unique(chosen)) >= TINY.num_experts // 2


# (b) OpenAI's reference loads the original layout.


def test_reference_loads_the_original_layout(original_dir, reference_logits):
    config = json.loads((original_dir / "config.json").read_text())
    assert config == TINY.to_original_config()
    assert sorted(p.name for p in original_dir.iterdir()) == ["config.json", "model.safetensors"]
    bf16, fp32 = reference_logits
    for logits in (bf16, fp32):
        assert logits.shape == (SEQ, TINY.vocab_size)
        assert np.isfinite(logits).all()
        assert logits.std() > 0.1 and len(np.unique(logits.argmax(-1))) > 5
    # bf16 rounds after every op; it should still track fp32 loosely.
    assert np.abs(bf16 - fp32).max() / np.abs(fp32).max() < 0.3


# (c) The two peers agree in fp32: both layouts hold the same weights.


def test_peers_agree_in_fp32(hf_model, reference_logits, tokens):
    _, reference = reference_logits
    ours = hf_logits(hf_model, tokens)
    relative = np.abs(ours - reference).max() / np.abs(reference).max()
    assert relative < 1e-4, relative


# Sharding, single file, index.


def test_sharded_and_single_file_layouts_load(tmp_path, tensors, hub_dir, hf_model, tokens):
    expected = hub_tensor_shapes(TINY)
    index = json.loads((hub_dir / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert sorted(weight_map) == sorted(expected)
    files = sorted(set(weight_map.values()))
    assert files == ["model-00000-of-00001.safetensors", "model-00001-of-00001.safetensors"]
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert sorted(p.name for p in hub_dir.iterdir()) == sorted(["config.json", "model.safetensors.index.json", *files])
    for file in files:
        with safe_open(hub_dir / file, framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
            assert sorted(f.keys()) == sorted(n for n, v in weight_map.items() if v == file)
    assert GptOssConfig.from_file(hub_dir / "config.json") == TINY

    single = write_hub_checkpoint(tmp_path / "single", TINY, tensors, single_file=True)
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(single / "model.safetensors", framework="numpy") as f:
        assert sorted(f.keys()) == sorted(expected)
        assert np.array_equal(f.get_tensor("lm_head.weight"), tensors["lm_head.weight"])

    limit = 200_000
    many = write_hub_checkpoint(tmp_path / "many", TINY, tensors, max_shard_bytes=limit)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    count = len(files)
    assert count > 2 and files == [f"model-{i:05d}-of-{count - 1:05d}.safetensors" for i in range(count)]
    for file in files:
        names = [n for n, v in index["weight_map"].items() if v == file]
        size = sum(tensors[n].nbytes for n in names)
        assert size <= limit or len(names) == 1

    reference = hf_logits(hf_model, tokens)
    for directory in (single, many):
        assert np.array_equal(hf_logits(load_hf(directory), tokens), reference)


def test_writes_are_atomic_and_refuse_to_clobber(tmp_path, tensors, monkeypatch):
    target = tmp_path / "ckpt"
    bad = dict(tensors)
    bad["model.norm.weight"] = bad["model.norm.weight"][:-1]
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        write_hub_checkpoint(target, TINY, bad)
    with pytest.raises(CheckpointError, match="missing"):
        write_original_checkpoint(target, TINY, {k: v for k, v in tensors.items() if "sinks" not in k})
    assert list(tmp_path.iterdir()) == []

    # A failure while writing (after the temporary directory exists) leaves nothing behind either.
    def failing_save(path, arrays):
        raise OSError("disk full")

    monkeypatch.setattr(writer, "_save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_hub_checkpoint(target, TINY, tensors)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []

    target.mkdir()  # an empty directory is fine to write into
    write_hub_checkpoint(target, TINY, tensors)
    with pytest.raises(ValueError, match="not empty"):
        write_hub_checkpoint(target, TINY, tensors)
    with pytest.raises(ValueError, match="not empty"):
        write_original_checkpoint(target, TINY, tensors)
    write_original_checkpoint(target, TINY, tensors, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_float_arrays_are_rounded_to_bf16(tmp_path, tensors):
    as_float = {k: (v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v) for k, v in tensors.items()}
    directory = write_hub_checkpoint(tmp_path / "f", TINY, as_float, single_file=True)
    with safe_open(directory / "model.safetensors", framework="numpy") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    assert embed.dtype == ml_dtypes.bfloat16
    assert np.array_equal(embed, tensors["model.embed_tokens.weight"])
