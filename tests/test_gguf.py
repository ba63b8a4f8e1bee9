"""The GGUF writer (gptoss_jax/checkpoint/gguf.py), read back by the `gguf` package (llama.cpp's own Python
reader and dequantizer), and its BPE merges checked against harmony's tokenizer."""

from __future__ import annotations

import gzip

import gguf
import numpy as np
import pytest

from gptoss_jax import mxfp4
from gptoss_jax.chat import harmony
from gptoss_jax.checkpoint.gguf import bpe_vocabulary, write_gguf
from gptoss_jax.checkpoint.random_weights import random_hub_tensors
from gptoss_jax.checkpoint.reader import MemorySource, open_checkpoint
from gptoss_jax.checkpoint.writer import write_hub_checkpoint
from gptoss_jax.config import GptOssConfig
from gptoss_jax.errors import CheckpointError

CONFIG = GptOssConfig.preset("tiny").replace(num_layers=2, vocab_size=201088)


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    """o200k_base.tiktoken, plain (harmony reads it from a folder as well)."""
    path = harmony.vocabulary_file()
    assert path is not None, "the test extras install bpe-openai, which ships o200k_base"
    if path.suffix == ".gz":
        plain = tmp_path_factory.mktemp("vocabulary") / harmony.VOCAB_FILE
        with gzip.open(path) as packed:
            plain.write_bytes(packed.read())
        path = plain
    return path


@pytest.fixture(scope="module")
def written(tmp_path_factory, vocabulary):
    tensors = random_hub_tensors(CONFIG, seed=3)
    # Through the hub files, as `eval.bench --compare llama.cpp --checkpoint DIR` reads them.
    checkpoint = write_hub_checkpoint(tmp_path_factory.mktemp("hub") / "model", CONFIG, tensors)
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "model.gguf", open_checkpoint(checkpoint), vocabulary)
    return tensors, gguf.GGUFReader(path)


def _tensor(reader: gguf.GGUFReader, name: str):
    (found,) = [t for t in reader.tensors if t.name == name]
    return found


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.quick
def test_experts_stay_mxfp4_and_decode_to_the_hub_values_by_ggufs_own_dequantizer(written):
    tensors, reader = written
    e, i, h = CONFIG.num_experts, CONFIG.intermediate_size, CONFIG.hidden_size
    prefix = "model.layers.1.mlp.experts"
    mlp1 = np.asarray(mxfp4.dequantize(tensors[f"{prefix}.gate_up_proj_blocks"], tensors[f"{prefix}.gate_up_proj_scales"],
                                       np.float32))  # fmt: skip
    mlp2 = np.asarray(mxfp4.dequantize(tensors[f"{prefix}.down_proj_blocks"], tensors[f"{prefix}.down_proj_scales"],
                                       np.float32))  # fmt: skip
    # The hub interleaves gate and up rows; llama.cpp keeps them as two tensors.
    for name, expected, shape in (("ffn_gate_exps", mlp1[:, 0::2], [h, i, e]), ("ffn_up_exps", mlp1[:, 1::2], [h, i, e]),
                                  ("ffn_down_exps", mlp2, [i, h, e])):  # fmt: skip
        tensor = _tensor(reader, f"blk.1.{name}.weight")
        assert tensor.tensor_type == gguf.GGMLQuantizationType.MXFP4 and list(tensor.shape) == shape
        assert tensor.n_bytes == e * expected.shape[1] * expected.shape[2] // 32 * 17  # 4.25 bits a weight
        decoded = gguf.quants.dequantize(tensor.data, gguf.GGMLQuantizationType.MXFP4)
        np.testing.assert_array_equal(decoded.reshape(expected.shape), expected)
    bias = _tensor(reader, "blk.1.ffn_up_exps.bias")
    assert bias.tensor_type == gguf.GGMLQuantizationType.F32 and list(bias.shape) == [i, e]
    np.testing.assert_array_equal(bias.data, tensors[f"{prefix}.gate_up_proj_bias"].astype(np.float32)[:, 1::2])


@pytest.mark.quick
def test_dense_weights_keep_their_bf16_bits_and_the_metadata_is_llama_cpps(written):
    tensors, reader = written
    for name, hub in (("token_embd.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight"),
                      ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                      ("blk.0.ffn_gate_inp.weight", "model.layers.0.mlp.router.weight")):  # fmt: skip
        tensor = _tensor(reader, name)
        assert tensor.tensor_type == gguf.GGMLQuantizationType.BF16
        assert list(tensor.shape) == list(tensors[hub].shape[::-1])  # ggml lists the fastest axis first
        np.testing.assert_array_equal(tensor.data.view(np.uint16).reshape(tensors[hub].shape), tensors[hub].view(np.uint16))
    sinks = _tensor(reader, "blk.0.attn_sinks.weight")
    np.testing.assert_array_equal(sinks.data, tensors["model.layers.0.self_attn.sinks"].astype(np.float32))
    assert len(reader.tensors) == 2 + 1 + CONFIG.num_layers * 19
    assert _field(reader, "general.architecture") == "gpt-oss"
    expected = {
        "gpt-oss.block_count": CONFIG.num_layers,
        "gpt-oss.embedding_length": CONFIG.hidden_size,
        "gpt-oss.expert_feed_forward_length": CONFIG.intermediate_size,
        "gpt-oss.attention.head_count": CONFIG.num_heads,
        "gpt-oss.attention.head_count_kv": CONFIG.num_kv_heads,
        "gpt-oss.attention.key_length": CONFIG.head_dim,
        "gpt-oss.expert_count": CONFIG.num_experts,
        "gpt-oss.expert_used_count": CONFIG.experts_per_token,
        "gpt-oss.attention.sliding_window": CONFIG.sliding_window,
        "gpt-oss.rope.scaling.type": "yarn",
        "gpt-oss.rope.scaling.original_context_length": CONFIG.rope_original_context,
        "gpt-oss.attention.sliding_window_pattern": [True, False],  # layer 0 slides, as in the spec
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-4o",
        "tokenizer.ggml.eos_token_id": 200002,
    }
    assert {key: _field(reader, key) for key in expected} == expected
    assert _field(reader, "gpt-oss.rope.freq_base") == pytest.approx(CONFIG.rope_theta)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == CONFIG.vocab_size and tokens[200006] == "<|start|>" and tokens[200013] == "<|reserved_200013|>"


def _bpe(word: bytes, merge_ranks: dict[tuple[str, str], int], spell) -> list[str]:
    """Byte-pair encoding of one pre-token by ranked merges (what llama.cpp does with the GGUF's merges)."""
    parts = [spell(word[k : k + 1]) for k in range(len(word))]
    while len(parts) > 1:
        ranked = [(merge_ranks.get((a, b), len(merge_ranks)), k) for k, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, k = min(ranked)
        if rank == len(merge_ranks):
            break
        parts[k : k + 2] = [parts[k] + parts[k + 1]]
    return parts


@pytest.mark.quick
def test_the_merges_encode_words_as_harmonys_tokenizer_does(vocabulary):
    from gptoss_jax.checkpoint.gguf import _byte_level

    tokens, merges = bpe_vocabulary(str(vocabulary), CONFIG.vocab_size)
    assert len(merges) == 199998 - 256  # every multi-byte token is one merge (the 256 bytes are not)
    merge_ranks = {tuple(m.split(" ")): rank for rank, m in enumerate(merges)}
    ids = {_byte_level(t): n for n, t in enumerate(tokens)}
    encoding = harmony.load_encoding(vocabulary.parent)
    words = [" tokenization", " Hello", " antidisestablishmentarianism", "ünïcödé", " 12345", "\n\n", " übermäßig"]
    for word in words:
        ours = [ids[p] for p in _bpe(word.encode(), merge_ranks, _byte_level)]
        assert ours == encoding.encode(word, allowed_special=set()), word
        assert b"".join(tokens[n] for n in ours) == word.encode()
    # Every token's own bytes encode back to that one token.
    rng = np.random.default_rng(0)
    for n in rng.integers(256, 199998, 300):
        assert _bpe(tokens[n], merge_ranks, _byte_level) == [_byte_level(tokens[n])], tokens[n]


@pytest.mark.quick
def test_bad_input_is_one_line_and_leaves_no_file(tmp_path, vocabulary):
    small = GptOssConfig.preset("tiny").replace(num_layers=2)
    source = MemorySource(small, random_hub_tensors(small, seed=0))
    target = tmp_path / "model.gguf"
    with pytest.raises(CheckpointError, match="vocab_size 512 cannot hold o200k_base"):
        write_gguf(target, source, vocabulary)
    not_a_vocabulary = tmp_path / "o200k_base.tiktoken"
    not_a_vocabulary.write_text("no base64 here at all\n")
    with pytest.raises(CheckpointError, match="not a readable .tiktoken vocabulary"):
        write_gguf(target, source, not_a_vocabulary)
    assert list(tmp_path.iterdir()) == [not_a_vocabulary]
