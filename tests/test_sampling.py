"""Sampling: filters against a numpy reference written from the definitions, greedy rows, keys, jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.inference.sampling import SAMPLE_CHUNK, SamplingParams, categorical, filter_logits, greedy, sample

pytestmark = pytest.mark.quick  # the day-to-day tier (scripts/test.sh -m quick)

# Compiled once per shape; the eager path dispatches op by op and is far slower.
sample_jit = jax.jit(sample)
filter_jit = jax.jit(filter_logits)


def reference_keep(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Kept-set mask of one row, in float64, straight from the definitions (ties at a cutoff are kept)."""
    z = np.asarray(logits, np.float64) / (temperature if temperature > 0 else 1.0)
    keep = np.ones(z.shape, bool)
    if top_k > 0:
        kth = np.sort(z)[::-1][min(top_k, z.size) - 1]
        keep &= z >= kth
    if top_p < 1:
        p = np.where(keep, np.exp(z - z.max()), 0.0)
        p /= p.sum()
        desc = np.sort(p)[::-1]
        n = int(np.argmax(np.cumsum(desc) >= top_p)) + 1  # smallest prefix reaching top_p
        keep &= p >= desc[n - 1]
    if min_p > 0:
        p = np.exp(z - z.max())  # unnormalised is fine: only ratios to the max matter
        keep &= p >= min_p * p.max()
    return keep


def reference_rows(logits: np.ndarray, params: list[SamplingParams]) -> np.ndarray:
    """reference_keep for every row, each with its own params."""
    return np.stack([reference_keep(row, p.temperature, p.top_k, p.top_p, p.min_p) for row, p in zip(logits, params)])


def kept_by_filter(scaled: np.ndarray, arrays: dict[str, jax.Array]) -> np.ndarray:
    """The mask filter_logits keeps (finite entries)."""
    return np.isfinite(np.asarray(filter_jit(scaled, arrays["top_k"], arrays["top_p"], arrays["min_p"])))


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def rows_params(params: list[SamplingParams]) -> dict[str, jax.Array]:
    """Per-row knob arrays for a batch whose rows use different params."""
    fields = {"temperature": np.float32, "top_k": np.int32, "top_p": np.float32, "min_p": np.float32}
    return {name: jnp.asarray(np.array([getattr(p, name) for p in params], dtype)) for name, dtype in fields.items()}


def random_logits(seed: int, batch: int, vocab: int, scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, vocab)) * scale).astype(np.float32)


FILTER_CASES = [
    SamplingParams(top_k=5),
    SamplingParams(top_k=1),
    SamplingParams(top_p=0.6),
    SamplingParams(top_p=0.95),
    SamplingParams(min_p=0.2),
    SamplingParams(temperature=0.7, top_k=10, top_p=0.8, min_p=0.05),
    SamplingParams(temperature=1.5, top_k=30, top_p=0.5),
    SamplingParams(temperature=2.0, top_p=0.9, min_p=0.1),
]


@pytest.mark.parametrize("case", range(len(FILTER_CASES)), ids=[repr(p) for p in FILTER_CASES])
def test_filters_keep_exactly_the_reference_set_and_never_sample_outside_it(case):
    params = FILTER_CASES[case]
    rows, vocab, draws = 8, 64, 200
    logits = random_logits(seed=100 + case, batch=rows, vocab=vocab)
    expected = reference_rows(logits, [params] * rows)

    scaled = logits / params.temperature
    arrays = params.as_arrays(rows)
    kept = kept_by_filter(scaled, arrays)
    np.testing.assert_array_equal(kept, expected)

    # 200 draws of every row at once: the batch is the 8 rows tiled 200 times.
    tiled = np.tile(logits, (draws, 1))
    tokens, _ = sample_jit(tiled, jax.random.key(7), params.as_arrays(rows * draws))
    tokens = np.asarray(tokens)
    assert np.all(np.tile(expected, (draws, 1))[np.arange(rows * draws), tokens])


def test_each_row_uses_its_own_knobs_in_a_mixed_batch():
    logits = random_logits(seed=3, batch=len(FILTER_CASES), vocab=64)
    arrays = rows_params(FILTER_CASES)
    scaled = logits / np.asarray(arrays["temperature"])[:, None]
    kept = kept_by_filter(scaled, arrays)
    expected = reference_rows(logits, FILTER_CASES)
    np.testing.assert_array_equal(kept, expected)

    # sample() too: 200 draws of the mixed batch, each row within its own kept set.
    draws, rows = 200, len(FILTER_CASES)
    tokens, _ = sample_jit(np.tile(logits, (draws, 1)), jax.random.key(3), rows_params(FILTER_CASES * draws))
    assert np.all(np.tile(expected, (draws, 1))[np.arange(rows * draws), np.asarray(tokens)])


def test_temperatures_apply_per_row_in_a_mixed_batch():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
    n = 20000
    temps = [0.5, 2.0]
    arrays = rows_params([SamplingParams(temperature=t) for t in temps] * n)
    tokens, _ = sample_jit(np.tile(logits, (2 * n, 1)), jax.random.key(4), arrays)
    tokens = np.asarray(tokens)
    for i, t in enumerate(temps):
        counts = np.bincount(tokens[i::2], minlength=logits.size)
        expected = np.exp(log_softmax64(logits[None] / t)[0]) * n
        chi2 = float(np.sum((counts - expected) ** 2 / expected))
        assert chi2 < CHI2_LIMIT, (t, chi2, counts, expected)


def test_filter_with_every_knob_off_keeps_the_whole_vocabulary_even_at_gpt_oss_size():
    logits = random_logits(seed=4, batch=2, vocab=201088, scale=8.0)
    arrays = SamplingParams().as_arrays(2)
    out = np.asarray(filter_jit(logits, arrays["top_k"], arrays["top_p"], arrays["min_p"]))
    np.testing.assert_array_equal(out, logits)


def test_top_k_keeps_tokens_tied_with_the_kth_value():
    logits = np.array([[1.0, 2.0, 2.0, 0.0, 2.0]], np.float32)
    out = filter_jit(logits, jnp.array([1]), jnp.array([1.0]), jnp.array([0.0]))
    np.testing.assert_array_equal(np.isfinite(np.asarray(out))[0], [False, True, True, False, True])


def test_tiny_top_p_keeps_only_the_top_token():
    logits = random_logits(seed=5, batch=6, vocab=100, scale=0.5)
    arrays = SamplingParams(top_p=1e-6).as_arrays(6)
    kept = kept_by_filter(logits, arrays)
    np.testing.assert_array_equal(kept, np.eye(100, dtype=bool)[logits.argmax(-1)])
    for seed in range(5):
        tokens, _ = sample_jit(logits, jax.random.key(seed), arrays)
        np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))


def test_min_p_one_keeps_only_the_max_and_its_ties():
    logits = np.tile(np.array([[3.0, 1.0, 3.0, 0.0, 2.9]], np.float32), (400, 1))
    arrays = SamplingParams(min_p=1.0).as_arrays(400)
    kept = kept_by_filter(logits[:1], {name: value[:1] for name, value in arrays.items()})
    np.testing.assert_array_equal(kept[0], [True, False, True, False, False])
    tokens, _ = sample_jit(logits, jax.random.key(0), arrays)
    assert set(np.asarray(tokens).tolist()) == {0, 2}  # both tied maxima drawn, nothing else


def test_temperature_zero_is_argmax_whatever_the_key_or_filters():
    logits = random_logits(seed=6, batch=5, vocab=300)
    for params in [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.3)]:
        for seed in range(10):
            tokens, _ = sample_jit(logits, jax.random.key(seed), params.as_arrays(5))
            np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))


def test_greedy_is_argmax_with_ties_to_the_lowest_index():
    logits = np.array([[1.0, 3.0, 3.0], [5.0, 5.0, 5.0], [0.0, -1.0, 2.0]], np.float32)
    tokens = greedy(logits)
    assert tokens.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(tokens), [1, 0, 2])
    # Over several chunks (a padded last one): ties across and inside chunks, a row all -inf, a single
    # largest value in the padded chunk.
    rows = np.full((4, EDGES_VOCAB), -np.inf, np.float32)
    rows[0, [3, SAMPLE_CHUNK + 1, 2 * SAMPLE_CHUNK]] = 7.0
    rows[1, [SAMPLE_CHUNK + 9, SAMPLE_CHUNK + 4]] = 2.0
    rows[3] = np.random.default_rng(0).standard_normal(EDGES_VOCAB)
    rows[3, EDGES_VOCAB - 1] = 9.0
    np.testing.assert_array_equal(np.asarray(greedy(rows)), np.argmax(rows, axis=-1))
    assert np.argmax(rows, axis=-1).tolist() == [3, SAMPLE_CHUNK + 4, 0, EDGES_VOCAB - 1]


def test_same_key_reproduces_and_different_keys_differ():
    logits = random_logits(seed=8, batch=16, vocab=1000, scale=0.1)
    arrays = SamplingParams(temperature=1.0, top_p=0.9).as_arrays(16)
    a, _ = sample_jit(logits, jax.random.key(1), arrays)
    b, _ = sample_jit(logits, jax.random.key(1), arrays)
    c, _ = sample_jit(logits, jax.random.key(2), arrays)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.sum(np.asarray(a) != np.asarray(c)) >= 8  # near-flat over 1000 tokens: almost every row differs


def test_greedy_row_and_sampling_row_in_one_batch_behave_per_row():
    row = random_logits(seed=9, batch=1, vocab=50, scale=0.3)
    logits = np.concatenate([row, row])
    arrays = rows_params([SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)])
    firsts, seconds = [], []
    for seed in range(40):
        tokens, _ = sample_jit(logits, jax.random.key(seed), arrays)
        firsts.append(int(tokens[0]))
        seconds.append(int(tokens[1]))
    assert set(firsts) == {int(row.argmax())}
    assert len(set(seconds)) > 10  # near-flat over 50 tokens: the sampling row really samples


def test_changing_knob_values_under_jit_does_not_recompile():
    traces = []

    def step(logits, key, arrays):
        traces.append(1)  # runs only while tracing
        return sample_jit(logits, key, arrays)

    jitted = jax.jit(step)
    logits = random_logits(seed=10, batch=3, vocab=40)
    settings = [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.5, top_k=3),
        SamplingParams(top_p=0.3, min_p=0.5),
    ]
    for i, params in enumerate(settings):
        jax.block_until_ready(jitted(logits, jax.random.key(i), params.as_arrays(3)))
    mixed = rows_params(settings[1:])
    jax.block_until_ready(jitted(logits, jax.random.key(9), mixed))
    assert len(traces) == 1
    assert jitted._cache_size() == 1


# Chi-square critical value for 5 degrees of freedom at p = 1e-4 is about 25.7; the seeds are fixed.
CHI2_LIMIT = 25.7


@pytest.mark.parametrize(
    "params, seed",
    [
        (SamplingParams(), 0),
        (SamplingParams(temperature=2.0), 1),
        (SamplingParams(temperature=0.5, top_k=4), 2),
        (SamplingParams(top_p=0.9), 3),
    ],
    ids=repr,
)
def test_empirical_frequencies_match_the_filtered_softmax(params, seed):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
    n = 40000
    keep = reference_keep(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    z = np.where(keep, logits.astype(np.float64) / params.temperature, -np.inf)
    probs = np.exp(log_softmax64(z[None])[0])

    tokens, _ = sample_jit(np.tile(logits, (n, 1)), jax.random.key(seed), params.as_arrays(n))
    counts = np.bincount(np.asarray(tokens), minlength=logits.size)
    assert np.all(counts[~keep] == 0)
    expected = probs[keep] * n
    chi2 = float(np.sum((counts[keep] - expected) ** 2 / expected))
    assert chi2 < CHI2_LIMIT, (chi2, counts, expected)


def test_frequency_check_would_catch_an_ignored_temperature():
    # The same statistic against the temperature-1 softmax must reject temperature-2 samples.
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
    n = 40000
    tokens, _ = sample_jit(np.tile(logits, (n, 1)), jax.random.key(1), SamplingParams(temperature=2.0).as_arrays(n))
    counts = np.bincount(np.asarray(tokens), minlength=logits.size)
    expected = np.exp(log_softmax64(logits[None])[0]) * n
    assert float(np.sum((counts - expected) ** 2 / expected)) > 100 * CHI2_LIMIT


# A vocabulary of two whole chunks and a padded third; kept tokens at the chunks' edges, the rest masked.
EDGES_VOCAB = 2 * SAMPLE_CHUNK + 37
EDGES_KEPT = [0, SAMPLE_CHUNK - 1, SAMPLE_CHUNK, 2 * SAMPLE_CHUNK + 5, EDGES_VOCAB - 1]


def edges_logits() -> np.ndarray:
    logits = np.full(EDGES_VOCAB, -np.inf, np.float32)
    logits[EDGES_KEPT] = [1.0, 0.0, 0.5, -1.0, 2.0]
    return logits


def test_the_draw_across_chunks_matches_the_softmax_and_never_takes_a_masked_token():
    logits, n = edges_logits(), 40000
    tokens = jax.jit(categorical)(jnp.broadcast_to(logits, (n, EDGES_VOCAB)), jax.random.uniform(jax.random.key(5), (n, 2)))
    counts = np.bincount(np.asarray(tokens), minlength=EDGES_VOCAB)
    assert counts.sum() == n and counts[EDGES_KEPT].sum() == n  # nothing masked, nothing past the vocabulary
    expected = np.exp(log_softmax64(logits[EDGES_KEPT][None])[0]) * n
    chi2 = float(np.sum((counts[EDGES_KEPT] - expected) ** 2 / expected))
    assert chi2 < CHI2_LIMIT, (chi2, counts[EDGES_KEPT], expected)


def test_the_extreme_uniforms_draw_the_first_and_last_kept_tokens():
    below_one = np.nextafter(np.float32(1), np.float32(0))  # the largest uniform jax draws
    uniforms = jnp.asarray([[0, 0], [below_one, below_one], [0, below_one], [below_one, 0]], jnp.float32)
    tokens = np.asarray(categorical(jnp.broadcast_to(edges_logits(), (4, EDGES_VOCAB)), uniforms))
    # The first uniform picks the chunk, the second the token in it: chunk 0 holds tokens 0 and
    # SAMPLE_CHUNK - 1, the padded last chunk 2 * SAMPLE_CHUNK + 5 and the last token.
    assert tokens.tolist() == [0, EDGES_VOCAB - 1, SAMPLE_CHUNK - 1, 2 * SAMPLE_CHUNK + 5]


def test_logprobs_are_log_softmax_of_the_raw_logits_at_the_chosen_tokens():
    logits = random_logits(seed=11, batch=4, vocab=500, scale=3.0)
    arrays = rows_params([
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.5, top_k=5),
        SamplingParams(temperature=1.7, top_p=0.7),
        SamplingParams(min_p=0.1),
    ])
    tokens, logprobs = sample_jit(logits, jax.random.key(0), arrays)
    assert tokens.dtype == jnp.int32 and tokens.shape == (4,)
    assert logprobs.dtype == jnp.float32 and logprobs.shape == (4,)
    expected = log_softmax64(logits)[np.arange(4), np.asarray(tokens)]
    np.testing.assert_allclose(np.asarray(logprobs), expected, rtol=1e-5, atol=1e-5)


def test_as_arrays_gives_per_row_float32_and_int32_arrays():
    arrays = SamplingParams(temperature=0.3, top_k=7, top_p=0.5, min_p=0.25).as_arrays(3)
    assert set(arrays) == {"temperature", "top_k", "top_p", "min_p"}
    expected = {
        "temperature": (jnp.float32, 0.3), "top_k": (jnp.int32, 7), "top_p": (jnp.float32, 0.5), "min_p": (jnp.float32, 0.25)
    }
    for name, (dtype, value) in expected.items():
        assert arrays[name].shape == (3,) and arrays[name].dtype == dtype
        np.testing.assert_allclose(np.asarray(arrays[name]), value, rtol=1e-6)


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.01),
        ("min_p", 1.01),
    ],
)
def test_invalid_params_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value})
    assert "\n" not in str(info.value)


@pytest.mark.quick
def test_the_sort_free_filter_keeps_what_the_sorted_one_keeps():
    # What a TPU runs (bisection over the values' order) against the sort, row by row: ties at the
    # cutoffs, -inf entries, every knob on and off in one batch; and against the float64 reference.
    rng = np.random.default_rng(5)
    bisect_jit = jax.jit(lambda x, k, p, m: filter_logits(x, k, p, m, sort=False))
    for trial in range(12):
        logits = (rng.standard_normal((8, 257)) * rng.uniform(0.5, 6)).astype(np.float32)
        if trial % 3 == 0:
            logits[:, :20] = logits[:, :1]
        if trial % 4 == 0:
            logits[:, -5:] = -np.inf
        top_k = rng.integers(0, 40, 8).astype(np.int32)
        top_p = np.where(np.arange(8) % 3 == 0, 1.0, rng.uniform(0.05, 1.0, 8)).astype(np.float32)
        min_p = np.where(np.arange(8) % 2 == 0, 0.0, rng.uniform(0, 0.3, 8)).astype(np.float32)
        sorted_keep = np.isfinite(np.asarray(filter_jit(logits, top_k, top_p, min_p)))
        bisected_keep = np.isfinite(np.asarray(bisect_jit(logits, top_k, top_p, min_p)))
        np.testing.assert_array_equal(bisected_keep, sorted_keep)
    for params in FILTER_CASES:
        logits = random_logits(seed=7, batch=4, vocab=300)
        arrays = params.as_arrays(4)
        kept = np.isfinite(np.asarray(bisect_jit(logits / params.temperature, arrays["top_k"], arrays["top_p"], arrays["min_p"])))
        np.testing.assert_array_equal(kept, reference_rows(logits, [params] * 4))
