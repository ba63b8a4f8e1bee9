"""Write a gpt-oss checkpoint as a GGUF file that llama.cpp runs, the experts still MXFP4.

llama.cpp's `gpt-oss` architecture wants: gate and up experts as two tensors (the hub interleaves their
rows), MXFP4 blocks of 17 bytes (the E8M0 scale byte, then 16 bytes whose low nibbles are the block's first
16 codes and high nibbles its last 16; the hub packs codes pairwise, low nibble first), and the o200k
vocabulary as a byte-level BPE (tokens spelled in GPT-2's byte-to-character map, merges recovered from the
tiktoken ranks). Dense weights stay bf16; norms, biases and sinks are widened to float32 exactly, as
llama.cpp's own converter writes 1-D tensors.

The file is written to a temporary name beside the target and renamed at the end: an error leaves nothing.
"""

from __future__ import annotations

import base64
import functools
import gzip
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from gptoss_jax.checkpoint.reader import TensorSource
from gptoss_jax.config import GptOssConfig
from gptoss_jax.errors import CheckpointError
from gptoss_jax.mxfp4 import BYTES_PER_BLOCK

ARCHITECTURE = "gpt-oss"
# o200k_base holds ids 0..199997; harmony's special tokens follow (GPTOSS_SPEC.md section 5).
BPE_TOKENS = 199998
SPECIAL_TOKENS = {
    199998: "<|startoftext|>",
    199999: "<|endoftext|>",
    200002: "<|return|>",
    200003: "<|constrain|>",
    200005: "<|channel|>",
    200006: "<|start|>",
    200007: "<|end|>",
    200008: "<|message|>",
    200012: "<|call|>",
}
BOS, EOS, PAD = 199998, 200002, 199999


def write_gguf(path: str | Path, source: TensorSource, vocabulary: str | Path) -> Path:
    """Write `source` (any checkpoint layout) to the GGUF file `path`; `vocabulary` is o200k_base.tiktoken[.gz]."""
    import gguf  # optional: the `gguf` package (pip install gptoss_jax[gguf])

    config = source.config
    path = Path(path)
    tokens, merges = bpe_vocabulary(str(vocabulary), config.vocab_size)
    tensors = list(_tensors(source, config))
    partial = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(partial, ARCHITECTURE)
    try:
        _write_metadata(writer, gguf, config, tokens, merges)
        for name, kind, shape, _ in tensors:
            dtype, raw = {"mxfp4": (np.uint8, gguf.GGMLQuantizationType.MXFP4),
                          "bf16": (np.uint16, gguf.GGMLQuantizationType.BF16),
                          "f32": (np.float32, None)}[kind]  # fmt: skip
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(name, shape, np.dtype(dtype), nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, _, shape, make in tensors:
            array = make()
            if array.shape != shape:  # a layout bug, not bad input: the plan's shapes come from the config
                raise CheckpointError(f"{name}: made {array.shape}, planned {shape}")
            writer.write_tensor_data(array)
        writer.close()
        os.replace(partial, path)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return path


def _write_metadata(writer, gguf, config: GptOssConfig, tokens: list[bytes], merges: list[str]) -> None:
    writer.add_name("gpt-oss")
    writer.add_context_length(config.max_context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_expert_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(config.rope_scaling_factor)
    writer.add_rope_scaling_orig_ctx_len(config.rope_original_context)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.experts_per_token)
    writer.add_sliding_window(config.sliding_window)
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-4o")
    writer.add_token_list([_byte_level(token) for token in tokens])
    types = [gguf.TokenType.NORMAL if i < BPE_TOKENS else gguf.TokenType.CONTROL for i in range(len(tokens))]
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_pad_token_id(PAD)


Planned = tuple[str, str, tuple[int, ...], Callable[[], np.ndarray]]


def _tensors(source: TensorSource, config: GptOssConfig) -> Iterator[Planned]:
    """(GGUF name, kind, numpy shape, maker) for every tensor, in file order; makers read when called."""
    h, e, i, heads = config.hidden_size, config.num_experts, config.intermediate_size, config.num_heads
    q, kv = heads * config.head_dim, config.num_kv_heads * config.head_dim

    def bf16(name: str) -> Callable[[], np.ndarray]:
        return lambda: np.ascontiguousarray(source.read(name)).view(np.uint16)

    def f32(name: str, rows: slice = slice(None)) -> Callable[[], np.ndarray]:
        return lambda: np.ascontiguousarray(source.read(name).astype(np.float32)[..., rows])

    def experts(prefix: str, rows: slice = slice(None)) -> Callable[[], np.ndarray]:
        return lambda: ggml_mxfp4(source.read(f"{prefix}_blocks")[:, rows], source.read(f"{prefix}_scales")[:, rows])

    yield "token_embd.weight", "bf16", (config.vocab_size, h), bf16("model.embed_tokens.weight")
    for n in range(config.num_layers):
        hub, blk = f"model.layers.{n}", f"blk.{n}"
        attn, mlp = f"{hub}.self_attn", f"{hub}.mlp"
        yield f"{blk}.attn_norm.weight", "f32", (h,), f32(f"{hub}.input_layernorm.weight")
        for proj, width in (("q", q), ("k", kv), ("v", kv)):
            yield f"{blk}.attn_{proj}.weight", "bf16", (width, h), bf16(f"{attn}.{proj}_proj.weight")
            yield f"{blk}.attn_{proj}.bias", "f32", (width,), f32(f"{attn}.{proj}_proj.bias")
        yield f"{blk}.attn_output.weight", "bf16", (h, q), bf16(f"{attn}.o_proj.weight")
        yield f"{blk}.attn_output.bias", "f32", (h,), f32(f"{attn}.o_proj.bias")
        yield f"{blk}.attn_sinks.weight", "f32", (heads,), f32(f"{attn}.sinks")
        yield f"{blk}.post_attention_norm.weight", "f32", (h,), f32(f"{hub}.post_attention_layernorm.weight")
        yield f"{blk}.ffn_gate_inp.weight", "bf16", (e, h), bf16(f"{mlp}.router.weight")
        yield f"{blk}.ffn_gate_inp.bias", "f32", (e,), f32(f"{mlp}.router.bias")
        # The hub's gate_up rows interleave: gate rows are the even ones, up rows the odd ones.
        for part, rows in (("gate", slice(0, None, 2)), ("up", slice(1, None, 2))):
            yield f"{blk}.ffn_{part}_exps.weight", "mxfp4", _mxfp4_shape(e, i, h), experts(f"{mlp}.experts.gate_up_proj", rows)
            yield f"{blk}.ffn_{part}_exps.bias", "f32", (e, i), f32(f"{mlp}.experts.gate_up_proj_bias", rows)
        yield f"{blk}.ffn_down_exps.weight", "mxfp4", _mxfp4_shape(e, h, i), experts(f"{mlp}.experts.down_proj")
        yield f"{blk}.ffn_down_exps.bias", "f32", (e, h), f32(f"{mlp}.experts.down_proj_bias")
    yield "output_norm.weight", "f32", (h,), f32("model.norm.weight")
    yield "output.weight", "bf16", (config.vocab_size, h), bf16("lm_head.weight")


def _mxfp4_shape(experts: int, rows: int, columns: int) -> tuple[int, int, int]:
    """The byte shape of [experts, rows, columns] MXFP4 values in ggml's 17-byte blocks."""
    return (experts, rows, columns // (2 * BYTES_PER_BLOCK) * (BYTES_PER_BLOCK + 1))


def ggml_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Hub MXFP4 [..., groups, 16] codes + [..., groups] scales -> ggml's blocks, [..., groups * 17] bytes.

    A hub byte k holds codes 2k (low nibble) and 2k+1; a ggml byte k holds codes k (low) and k+16 (high).
    """
    low, high = blocks & 0x0F, blocks >> 4
    codes = np.stack([low, high], axis=-1).reshape(*blocks.shape[:-1], 2 * BYTES_PER_BLOCK)  # code order
    packed = codes[..., :BYTES_PER_BLOCK] | (codes[..., BYTES_PER_BLOCK:] << 4)
    ggml = np.concatenate([scales[..., None], packed], axis=-1)
    return ggml.reshape(*blocks.shape[:-2], -1)


@functools.lru_cache(maxsize=2)
def bpe_vocabulary(vocabulary: str, vocab_size: int) -> tuple[list[bytes], list[str]]:
    """The o200k tokens as bytes (special and reserved ids spelled as harmony names them) and its BPE merges."""
    ranks = _read_tiktoken(Path(vocabulary))
    if len(ranks) != BPE_TOKENS:
        raise CheckpointError(f"{vocabulary}: {len(ranks)} tokens, the o200k_base vocabulary has {BPE_TOKENS}")
    if vocab_size < BPE_TOKENS + len(SPECIAL_TOKENS):
        raise CheckpointError(
            f"vocab_size {vocab_size} cannot hold o200k_base and harmony's special tokens ({BPE_TOKENS + 12}+ ids): "
            "a GGUF needs the model's real vocabulary"
        )
    tokens = sorted(ranks, key=ranks.__getitem__)
    tokens += [SPECIAL_TOKENS.get(i, f"<|reserved_{i}|>").encode() for i in range(BPE_TOKENS, vocab_size)]
    return tokens, _merges(ranks)


def _read_tiktoken(path: Path) -> dict[bytes, int]:
    """A .tiktoken file (lines of base64 token, rank), plain or gzipped."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as lines:
            pairs = [line.split() for line in lines if line.strip()]
        return {base64.b64decode(token): int(rank) for token, rank in pairs}
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable .tiktoken vocabulary ({error})") from None


def _merges(ranks: dict[bytes, int]) -> list[str]:
    """Each multi-byte token's last merge, in rank order: the two parts that byte-pair encoding its bytes
    with only lower-ranked tokens ends with (tiktoken ranks are merge order)."""
    merges = []
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__):
        limit = ranks[token]
        parts = [token[k : k + 1] for k in range(len(token))]
        while len(parts) > 2:
            best, where = limit, -1
            for k in range(len(parts) - 1):
                rank = ranks.get(parts[k] + parts[k + 1], limit)
                if rank < best:
                    best, where = rank, k
            if where < 0:
                break
            parts[where : where + 2] = [parts[where] + parts[where + 1]]
        if len(parts) == 2:
            merges.append(f"{_byte_level(parts[0])} {_byte_level(parts[1])}")
    return merges


@functools.lru_cache(maxsize=1)
def _byte_characters() -> list[str]:
    """GPT-2's map of the 256 bytes to printable characters (byte-level BPE vocabularies are spelled in it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[byte] = chr(byte)
        else:
            characters[byte] = chr(256 + extra)
            extra += 1
    return [characters[byte] for byte in range(256)]


def _byte_level(token: bytes) -> str:
    table = _byte_characters()
    return "".join(table[byte] for byte in token)
