"""Continuous batching: each request generates what it would alone, whatever joins or leaves beside it."""

from __future__ import annotations

import numpy as np
import pytest

import gptoss_jax
from gptoss_jax.inference.batching import Batcher, Request
from gptoss_jax.inference.engine import GenerationError, Generator
from gptoss_jax.inference.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model(hub_checkpoint):
    return gptoss_jax.load(hub_checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def generator(model):
    return Generator(model, record_routes=True)


def prompt(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 512, length).tolist()


@pytest.mark.quick
def test_greedy_rows_equal_generate_alone_as_they_join_and_leave(model, generator):
    # Six requests over three slots: later ones join as earlier ones end, at different steps; prompts of
    # 40 and 70 tokens take two and three chunks of 32, prefilled while other slots decode.
    lengths, limits = (5, 40, 17, 70, 3, 33), (9, 4, 12, 7, 20, 5)
    requests = [Request(prompt(n, seed), limit, GREEDY) for seed, (n, limit) in enumerate(zip(lengths, limits))]
    batcher = Batcher(model, slots=3, context=256, prefill_chunk=32)
    completions = batcher.run(requests)
    for request, completion in zip(requests, completions):
        alone = generator.generate([request.prompt], max_new_tokens=request.max_new_tokens, sampling=GREEDY)[0]
        assert completion.tokens == alone.tokens
        np.testing.assert_allclose(completion.logprobs, alone.logprobs, rtol=1e-5, atol=1e-5)
        assert completion.finish_reason == "length"
    assert not batcher.has_work() and batcher.busy_slots == 0


def test_stop_tokens_routes_and_sampled_rows_do_not_depend_on_their_neighbours(model, generator):
    stop_prompt = prompt(12, 7)
    alone = generator.generate([stop_prompt], max_new_tokens=6, sampling=GREEDY)[0]
    stop = alone.tokens[2]  # the third token ends this request
    sampled = Request(prompt(9, 8), 8, SamplingParams(temperature=1.0, top_p=0.9), seed=11)
    requests = [Request(stop_prompt, 6, GREEDY, stop_tokens=[stop]), sampled, Request(prompt(21, 9), 5, GREEDY)]
    batcher = Batcher(model, slots=2, context=128, prefill_chunk=16, record_routes=True)
    first, second, third = batcher.run(requests)
    assert first.tokens == alone.tokens[: alone.tokens.index(stop) + 1] and first.finish_reason == "stop"
    # Router replay: every token fed (the prompt, then each generated one but the last) went through
    # the same experts as in the static engine.
    truncated = alone.routes[:, :, : len(stop_prompt) + len(first.tokens) - 1]
    np.testing.assert_array_equal(first.routes, truncated)
    assert third.routes.shape[2] == 21 + len(third.tokens) - 1
    # A sampled request, alone in a batcher of different width: the same tokens (its key is its own).
    assert Batcher(model, slots=1, context=128).run([sampled])[0].tokens == second.tokens
    assert Batcher(model, slots=1, context=128).run([Request(**{**sampled.__dict__, "seed": 12})])[0].tokens != second.tokens


def test_programs_stay_bounded_over_a_hundred_requests(model):
    rng = np.random.default_rng(3)
    batcher = Batcher(model, slots=4, context=128, prefill_chunk=32)
    requests = [Request(prompt(int(rng.integers(1, 90)), i), int(rng.integers(1, 9)), GREEDY) for i in range(100)]
    completions = batcher.run(requests)
    assert [len(c.tokens) for c in completions] == [r.max_new_tokens for r in requests]
    # One decode step; first chunks and later chunks each in (rows, width) buckets within 32 tokens:
    # (1, 16), (2, 16), (1, 32).
    assert batcher.compiled_programs() <= 1 + 2 * 3


def test_cancel_frees_the_slot_for_the_next_request(model):
    batcher = Batcher(model, slots=1, context=128)
    long_one = batcher.submit(Request(prompt(8, 1), 50, GREEDY))
    waiting = batcher.submit(Request(prompt(8, 2), 3, GREEDY))
    for _ in range(3):
        assert {event.request for event in batcher.step()} == {long_one}
    assert batcher.slot_of(long_one) == 0 and batcher.queued == 1
    assert batcher.cancel(long_one)
    assert batcher.slot_of(long_one) is None and not batcher.cancel(long_one)
    made = []
    while batcher.has_work():
        made += batcher.step()
    assert {event.request for event in made} == {waiting} and len(made) == 3 and made[-1].finish_reason == "length"


def test_requests_the_batcher_cannot_serve_say_why(model):
    batcher = Batcher(model, slots=2, context=64)
    with pytest.raises(GenerationError, match="exceeds the context of 64 tokens"):
        batcher.submit(Request(prompt(60, 0), 8))
    with pytest.raises(GenerationError, match="outside 0..511"):
        batcher.submit(Request([1, 512]))
    with pytest.raises(GenerationError, match="empty"):
        batcher.submit(Request([]))
    assert not batcher.has_work()
