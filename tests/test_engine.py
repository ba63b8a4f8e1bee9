"""Generation with the KV cache: equal to full recompute and to transformers, batch-invariant, few compiles."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import GptOssForCausalLM

import gptoss_jax
from gptoss_jax.inference.engine import GenerationError, Generator
from gptoss_jax.inference.sampling import SamplingParams

pytestmark = pytest.mark.peer  # compares with transformers / OpenAI's reference (torch on the CPU)

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model(hub_checkpoint):
    return gptoss_jax.load(hub_checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def generator(model):
    return Generator(model)


def prompt(length: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 512, length).tolist()


def greedy_by_recompute(model, tokens: list[int], steps: int) -> tuple[list[int], list[float]]:
    """argmax of model(tokens) step by step, with no cache: the definition the cache must meet.

    The sequence is zero-padded to its final length so one compiled forward serves every step; causal
    attention keeps the padding from touching the positions read.
    """
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    padded = np.zeros((1, len(tokens) + steps), np.int32)
    padded[0, : len(tokens)] = tokens
    new, logprobs = [], []
    for length in range(len(tokens), len(tokens) + steps):
        logits = np.asarray(forward(state, padded))[0, length - 1].astype(np.float64)
        token = int(logits.argmax())
        logprobs.append(float(logits[token] - logits.max() - np.log(np.exp(logits - logits.max()).sum())))
        padded[0, length] = token
        new.append(token)
    return new, logprobs


def test_cached_greedy_equals_full_recompute_for_three_windows(model, generator, tiny_config):
    steps = 3 * tiny_config.sliding_window + 2
    completion = generator.generate([prompt(9)], max_new_tokens=steps, sampling=GREEDY)[0]
    expected, expected_logprobs = greedy_by_recompute(model, prompt(9), steps)
    assert completion.tokens == expected
    np.testing.assert_allclose(completion.logprobs, expected_logprobs, atol=1e-4)
    assert completion.finish_reason == "length"


@pytest.mark.quick
def test_cached_greedy_equals_transformers_generate(hub_checkpoint, generator, tiny_config):
    steps = 3 * tiny_config.sliding_window + 2
    peer = GptOssForCausalLM.from_pretrained(hub_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        output = peer.generate(
            torch.tensor([prompt(20, seed=5)]),
            attention_mask=torch.ones(1, 20, dtype=torch.long),  # else it guesses padding from pad_token_id
            max_new_tokens=steps,
            do_sample=False,
        )
    expected = output[0, 20:].tolist()
    ours = gptoss_jax.generate(generator.model, [prompt(20, seed=5)], max_new_tokens=steps, temperature=0)[0]
    assert ours == expected


def test_batched_prompts_of_different_lengths_each_generate_what_they_would_alone(generator):
    prompts = [prompt(3, 1), prompt(17, 2), prompt(40, 3)]
    together = generator.generate(prompts, max_new_tokens=24, sampling=GREEDY)
    for one, completion in zip(prompts, together):
        alone = generator.generate([one], max_new_tokens=24, sampling=GREEDY)[0]
        assert completion.tokens == alone.tokens


def test_twenty_prompts_of_assorted_lengths_compile_a_bounded_number_of_programs(model):
    generator = Generator(model)
    lengths = np.random.default_rng(7).integers(1, 100, 20)
    for index, length in enumerate(lengths):
        generator.generate([prompt(int(length), index)], max_new_tokens=int(5 + index % 7), sampling=GREEDY)
    # Prompt buckets 16/32/64/128 and one cache bucket: prefill per prompt bucket, decode shared.
    assert generator.compiled_programs() <= 6


def test_a_stop_token_ends_the_row_and_is_kept(generator):
    free = generator.generate([prompt(12)], max_new_tokens=10, sampling=GREEDY)[0].tokens
    stop = free[4]
    first = free.index(stop)
    stopped = generator.generate([prompt(12)], max_new_tokens=10, sampling=GREEDY, stop_tokens=[stop])[0]
    assert stopped.tokens == free[: first + 1] and stopped.finish_reason == "stop"


@pytest.mark.quick
def test_streaming_yields_the_generated_tokens_in_order(generator):
    prompts = [prompt(5, 8), prompt(30, 9)]
    expected = generator.generate(prompts, max_new_tokens=12, sampling=GREEDY)
    streamed = [[], []]
    for event in generator.stream(prompts, max_new_tokens=12, sampling=GREEDY):
        streamed[event.row].append(event.token)
    assert streamed == [completion.tokens for completion in expected]


def test_a_fixed_seed_reproduces_a_sampled_generation_and_another_seed_differs(generator):
    sampled = SamplingParams(temperature=1.0)
    first = generator.generate([prompt(6)], max_new_tokens=20, sampling=sampled, seed=3)[0].tokens
    again = generator.generate([prompt(6)], max_new_tokens=20, sampling=sampled, seed=3)[0].tokens
    other = generator.generate([prompt(6)], max_new_tokens=20, sampling=sampled, seed=4)[0].tokens
    assert first == again and first != other


@pytest.mark.quick
@pytest.mark.parametrize(
    "prompts, message",
    [([[]], "prompt 0 is empty"), ([[1, 600]], "outside 0..511"), ([], "non-empty list")],
)
def test_bad_requests_are_refused_with_a_clear_error(generator, prompts, message):
    with pytest.raises(GenerationError, match=message):
        generator.generate(prompts, max_new_tokens=4)


@pytest.mark.quick
def test_a_prompt_longer_than_the_context_is_refused(model, tiny_config):
    with pytest.raises(GenerationError, match="context"):
        Generator(model).generate([[1] * (tiny_config.max_context + 1)], max_new_tokens=1)
