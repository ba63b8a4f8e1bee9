"""Logits of gptoss_jax against the peers (transformers' GptOss, OpenAI's gpt_oss.torch) on the same files."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from gpt_oss.torch.model import Transformer as OpenAIReference
from transformers import GptOssForCausalLM

import gptoss_jax
from gptoss_jax.config import GptOssConfig
from gptoss_jax.runtime import Runtime

pytestmark = [pytest.mark.peer, pytest.mark.quick]  # compares with transformers / OpenAI's reference (torch on the CPU)


def forced(**choices) -> Runtime:
    """This machine's runtime with some choices forced."""
    return Runtime.default().replace(**choices)


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """Max absolute error scaled by the largest reference logit."""
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def transformers_logits(checkpoint, tokens: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    model = GptOssForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def reference_fp32(hub_checkpoint, long_tokens) -> np.ndarray:
    return transformers_logits(hub_checkpoint, long_tokens, torch.float32)


def test_float32_logits_match_transformers_on_the_hub_layout(hub_checkpoint, long_tokens, reference_fp32):
    ours = np.asarray(gptoss_jax.load(hub_checkpoint, dtype="float32")(long_tokens))
    assert ours.dtype == np.float32 and ours.shape == reference_fp32.shape
    assert relative_error(ours, reference_fp32) <= 1e-4


def test_float32_logits_match_openai_reference_on_the_original_layout(original_checkpoint, long_tokens):
    reference = OpenAIReference.from_checkpoint(str(original_checkpoint), device="cpu").float()
    ours = np.asarray(gptoss_jax.load(original_checkpoint, dtype="float32")(long_tokens))
    for row, sequence in enumerate(long_tokens):  # the reference takes one unbatched sequence
        with torch.no_grad():
            expected = reference(torch.tensor(sequence, dtype=torch.long)).numpy()
        assert relative_error(ours[row], expected) <= 1e-4


def test_both_layouts_and_the_single_file_give_the_same_logits(
    hub_checkpoint, hub_single_file_checkpoint, original_checkpoint, long_tokens
):
    hub = np.asarray(gptoss_jax.load(hub_checkpoint, dtype="float32")(long_tokens))
    single = np.asarray(gptoss_jax.load(hub_single_file_checkpoint, dtype="float32")(long_tokens))
    original = np.asarray(gptoss_jax.load(original_checkpoint, dtype="float32")(long_tokens))
    np.testing.assert_array_equal(hub, original)
    np.testing.assert_array_equal(hub, single)


@pytest.mark.parametrize("path", [pytest.param("fused", marks=pytest.mark.cpu_kernels), "gathered"])
def test_each_few_token_expert_path_matches_transformers(hub_checkpoint, tiny_config, path):
    # Decoding: the CPU kernel reading the chosen experts' packed bytes, or XLA decoding just those experts.
    tokens = np.array([[5, 300, 17]], dtype=np.int32)
    pairs = tokens.size * tiny_config.experts_per_token
    chosen = Runtime.default().expert_path_for(pairs, tiny_config.num_experts, packed=True, bf16=False, adapters=False)
    assert chosen == ("fused" if Runtime.default().cpu_kernels else "gathered")
    ours = np.asarray(gptoss_jax.load(hub_checkpoint, dtype="float32", runtime=forced(expert_path=path))(tokens))
    assert relative_error(ours, transformers_logits(hub_checkpoint, tokens, torch.float32)) <= 1e-4


@pytest.mark.parametrize("path", ["tiled", "grouped"])
def test_each_many_token_expert_path_matches_transformers(hub_checkpoint, long_tokens, reference_fp32, path):
    # CPU runs the tiled path; GPU and TPU the grouped ragged_dot one: check both here.
    ours = np.asarray(gptoss_jax.load(hub_checkpoint, dtype="float32", runtime=forced(expert_path=path))(long_tokens))
    assert relative_error(ours, reference_fp32) <= 1e-4


@pytest.mark.parametrize("block, key_block", [(8, 16), (16, 8), (32, 24)])
def test_blockwise_attention_of_long_sequences_matches_transformers(
    hub_checkpoint, long_tokens, reference_fp32, block, key_block
):
    # Sequences longer than the attention block attend a block of queries at a time; with the tiny model's
    # window of 16, blocks of 8, 16 and 32 cover reaches of two, one and a partial block. Full layers walk
    # the keys key_block at a time: smaller, larger and not a multiple of the query block.
    runtime = forced(attention_block=block, key_block=key_block)
    ours = np.asarray(gptoss_jax.load(hub_checkpoint, dtype="float32", runtime=runtime)(long_tokens))
    assert relative_error(ours, reference_fp32) <= 1e-4


def test_bfloat16_experts_decoded_at_load_give_the_packed_models_logits(hub_checkpoint, long_tokens):
    packed = gptoss_jax.load(hub_checkpoint, dtype="float32", experts="mxfp4")
    dense = gptoss_jax.load(hub_checkpoint, dtype="float32", experts="bfloat16")
    np.testing.assert_allclose(np.asarray(dense(long_tokens)), np.asarray(packed(long_tokens)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", [pytest.param("sorted", marks=pytest.mark.cpu_kernels), "tiled"])
def test_bfloat16_path_is_as_accurate_as_transformers_in_bfloat16(hub_checkpoint, long_tokens, reference_fp32, path):
    # bf16 prompts on CPUs with AVX512-BF16 run the sorted kernel path; the tiled one runs elsewhere and
    # for expert adapters.
    ours = np.asarray(gptoss_jax.load(hub_checkpoint, dtype="bfloat16", runtime=forced(expert_path=path))(long_tokens))
    peer = transformers_logits(hub_checkpoint, long_tokens, torch.bfloat16)
    our_error = np.abs(ours - reference_fp32).mean()
    peer_error = np.abs(peer - reference_fp32).mean()
    assert 0 < our_error <= 1.5 * peer_error, (our_error, peer_error)


def test_positions_shift_rotary_phase_only_through_relative_distance(hub_checkpoint, long_tokens):
    # RoPE makes attention depend on relative positions only, so an offset leaves the logits unchanged
    # (up to float32 rounding of larger angles).
    model = gptoss_jax.load(hub_checkpoint, dtype="float32")
    positions = np.broadcast_to(np.arange(long_tokens.shape[1]) + 1000, long_tokens.shape)
    shifted = np.asarray(model(long_tokens, positions=positions))
    assert relative_error(shifted, np.asarray(model(long_tokens))) <= 1e-3


def count_equations(config: GptOssConfig) -> int:
    model = nnx.eval_shape(lambda: gptoss_jax.GptOss(config, dtype="float32", rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((1, 8), np.int32)
    return len(jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens).eqns)


def test_forward_program_does_not_grow_with_depth(tiny_config):
    # Layers are scanned, so a model four times deeper traces to the same number of operations.
    assert count_equations(tiny_config) == count_equations(tiny_config.replace(num_layers=16))
