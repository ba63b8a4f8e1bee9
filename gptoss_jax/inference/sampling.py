"""Next-token sampling: logits -> token, in pure jax.numpy, for use inside a jitted decode loop.

The knobs travel as per-row arrays (`SamplingParams.as_arrays`), so one compiled decode step serves
any mix of values and changing them never recompiles.

Order and semantics (the Hugging Face / vLLM conventions), applied to the temperature-scaled
distribution p = softmax(logits / temperature):

1. temperature: divide the logits by it; 0 means greedy (argmax of the raw logits, no randomness).
2. top-k: keep the k highest logits; tokens tied with the k-th value are kept too, so a row may keep
   more than k. 0 turns it off.
3. top-p (nucleus): of what top-k kept, renormalised, keep the smallest set of highest-probability
   tokens whose cumulative probability reaches top_p; always at least the top token. Tokens tied
   with the last kept one are kept too. 1 turns it off.
4. min-p: keep tokens with p >= min_p * max(p). Renormalising does not change ratios to the max, so
   this is the same before or after steps 2-3. 0 turns it off; 1 keeps the max and its ties.

Every step keeps a prefix of the row sorted in descending order, so their intersection is one
prefix too: one descending sort per row gives a single cutoff value, and the kept set is
`logits >= cutoff`. No argsort or scatter back is needed. Without a sort (`sort=False`, what a TPU
runs: its sort of a [B, V] block lays the batch out on lanes, 8x padded buffers of the whole
vocabulary), the same cutoffs are found by bisection over the float32 values' order (32 steps of a
count, or of a probability mass, over the row): the k-th largest value, and the largest value whose
tokens at or above it hold top_p of the mass.

Drawing (`categorical`): the inverse of the distribution function, in two levels over chunks of the
vocabulary, from two uniforms a row: one pass over the vocabulary, where Gumbel-max draws a random
number for every token (most of a CPU decode step's sampling time).

Reproducibility: a fixed key with a fixed batch (shape and row order) reproduces exactly. With one
key a row's uniforms are drawn with the whole batch's; with a key per row a row's draw does not depend
on the rows beside it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

# Tokens a chunk in `categorical`: about the square root of gpt-oss's vocabulary (201088), so that both
# levels, the chunks' masses and one chunk's tokens, are short.
SAMPLE_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling knobs for one request; `as_arrays` turns them into per-row arrays for jit."""

    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off

    def __post_init__(self):
        # Comparisons written so that NaN fails them.
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 means off), got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 means off), got {self.top_p!r}")
        if not (0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1] (0 means off), got {self.min_p!r}")

    def as_arrays(self, batch_size: int) -> dict[str, jax.Array]:
        """Per-row knobs, shape [batch_size]: float32 temperature/top_p/min_p, int32 top_k."""
        return {
            "temperature": jnp.full((batch_size,), self.temperature, jnp.float32),
            "top_k": jnp.full((batch_size,), self.top_k, jnp.int32),
            "top_p": jnp.full((batch_size,), self.top_p, jnp.float32),
            "min_p": jnp.full((batch_size,), self.min_p, jnp.float32),
        }


def greedy(logits: jax.Array) -> jax.Array:
    """Argmax over the vocabulary, int32 [B]; ties go to the lowest index (a NaN counts as the largest,
    as in jnp.argmax). Two plain reductions, the largest value then the first token holding it: XLA's
    argmax over a row reduces (value, index) pairs, 6x slower on a CPU than a plain max, and padding the
    row to read it in chunks copied the logits (16 rows of gpt-oss: 1.4 against 2.4 ms)."""
    top = logits.max(axis=-1, keepdims=True)
    hit = jnp.where(jnp.isnan(top), jnp.isnan(logits), logits == top)
    columns = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(hit, columns, logits.shape[-1] - 1), axis=-1)


def categorical(logits: jax.Array, uniforms: jax.Array) -> jax.Array:
    """One token a row of softmax(logits) [B, V] (-inf never drawn), int32 [B], from two uniforms a row
    in [0, 1) [B, 2], by inverting the distribution function in two levels: the first uniform picks a
    chunk of SAMPLE_CHUNK tokens by its mass, the second a token inside it by theirs (the token given its
    chunk has that distribution, so a fresh uniform is exact, and each level resolves its own 2**24
    steps). It reads the vocabulary once, an exponential a token, where Gumbel-max
    (jax.random.categorical) draws a random number and two logarithms for every token: on a CPU, 0.52 ms
    a row of gpt-oss's vocabulary against 6.3 (`python -m eval.sampling_bench`)."""
    weights = _in_chunks(jnp.exp(logits - logits.max(axis=-1, keepdims=True)), 0.0)  # the top token weighs 1
    mass = weights.sum(axis=-1)  # [B, chunks]
    running = jnp.cumsum(mass, axis=-1)
    # The first chunk whose running mass passes the target: it has mass (running grew there). Rounding
    # can leave the target at or past the total: then the last chunk with mass.
    chunk = _first_past(running, uniforms[:, 0] * running[:, -1], mass > 0)
    inside = jnp.take_along_axis(weights, chunk[:, None, None], axis=1)[:, 0]  # [B, SAMPLE_CHUNK]
    chunk_mass = jnp.take_along_axis(mass, chunk[:, None], axis=1)[:, 0]
    token = _first_past(jnp.cumsum(inside, axis=-1), uniforms[:, 1] * chunk_mass, inside > 0)
    return (chunk * SAMPLE_CHUNK + token).astype(jnp.int32)


def _in_chunks(x: jax.Array, fill: float) -> jax.Array:
    """[B, V] -> [B, chunks, SAMPLE_CHUNK], the last chunk padded with `fill`."""
    batch, vocab = x.shape
    chunks = -(-vocab // SAMPLE_CHUNK)
    return jnp.pad(x, ((0, 0), (0, chunks * SAMPLE_CHUNK - vocab)), constant_values=fill).reshape(batch, chunks, SAMPLE_CHUNK)


def _first_past(running: jax.Array, target: jax.Array, positive: jax.Array) -> jax.Array:
    """Per row, the first index whose running sum [B, N] exceeds target [B], or the last positive one."""
    n = running.shape[-1]
    last_positive = n - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
    return jnp.minimum(jnp.sum(running <= target[:, None], axis=-1), last_positive)


def filter_logits(
    logits: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array, sort: bool = True
) -> jax.Array:
    """Top-k, then top-p, then min-p on (already temperature-scaled) logits [B, V]; knobs are [B].

    Returns the logits with -inf outside the kept set (see the module docstring for semantics).
    sort=False finds the same cutoffs by bisection instead of a sort of the vocabulary.
    """
    logits = jnp.asarray(logits, jnp.float32)
    batch, vocab = logits.shape
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (batch,))[:, None]
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (batch,))[:, None]
    min_p = jnp.broadcast_to(jnp.asarray(min_p, jnp.float32), (batch,))[:, None]
    if not sort:
        return _filter_by_bisection(logits, top_k, top_p, min_p)

    # The one full sort: values only, descending.
    desc = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)

    # top-k: compare against the k-th value (not the position) so ties with it are kept.
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(desc, k - 1, axis=-1)
    keep = desc >= kth

    # top-p on the renormalised top-k distribution: token i stays while the mass strictly before it
    # is < top_p, which keeps the smallest prefix reaching top_p (and always position 0).
    probs = jax.nn.softmax(jnp.where(keep, desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # top_p >= 1 is "off": do not let float32 rounding of the cumsum drop the far tail.
    keep &= (mass_before < top_p) | (top_p >= 1)

    # min-p in log space: p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p); exact at min_p = 1,
    # and log(0) = -inf keeps everything.
    keep &= desc >= desc[:, :1] + jnp.log(min_p)

    # All three masks are prefixes of the sorted row, so the kept set is everything >= one cutoff.
    n_kept = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(desc, n_kept - 1, axis=-1)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def _ordered(values: jax.Array) -> jax.Array:
    """int32 keys in the order of the float32 values (-inf lowest)."""
    bits = jax.lax.bitcast_convert_type(values, jnp.int32)
    return jnp.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def _value_of(keys: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.where(keys >= 0, keys, keys ^ 0x7FFFFFFF), jnp.float32)


def _largest_key(enough, low: jax.Array, high: jax.Array) -> jax.Array:
    """The largest key t in [low, high] ([B, 1] int32) with enough(t) true, for enough true at low and
    false from some key on (32 halvings cover every int32)."""

    def halve(_, bounds):
        low, high = bounds
        middle = (low >> 1) + (high >> 1) + ((low | high) & 1)  # ceil((low + high) / 2) without overflow
        middle = jnp.where(low < high, middle, low)
        ok = enough(middle)
        return jnp.where(ok, middle, low), jnp.where(ok, high, middle - 1)

    return jax.lax.fori_loop(0, 32, halve, (low, high))[0]


def _filter_by_bisection(logits, top_k, top_p, min_p) -> jax.Array:
    """filter_logits without a sort: each cutoff by bisection over the values' order."""
    keys = _ordered(logits)
    low, high = keys.min(axis=-1, keepdims=True), keys.max(axis=-1, keepdims=True)
    # Each bisection runs only where some row asks for it (each reads the whole row 32 times).
    # top-k: the k-th largest value is the largest t with at least k values >= t.
    k_cut = jax.lax.cond(
        jnp.any(top_k > 0),
        lambda: _largest_key(lambda t: jnp.sum(keys >= t, axis=-1, keepdims=True) >= top_k, low, high),
        lambda: low,
    )
    k_cut = jnp.where(top_k > 0, k_cut, low)
    # top-p over what top-k kept: the largest t whose tokens >= t hold at least top_p of the mass.
    top = logits.max(axis=-1, keepdims=True)

    def top_p_cut():
        weights = jnp.where(keys >= k_cut, jnp.exp(logits - top), 0.0)
        goal = top_p * weights.sum(axis=-1, keepdims=True)
        return _largest_key(lambda t: jnp.sum(jnp.where(keys >= t, weights, 0.0), axis=-1, keepdims=True) >= goal, k_cut, high)

    p_cut = jax.lax.cond(jnp.any(top_p < 1), top_p_cut, lambda: k_cut)
    p_cut = jnp.where(top_p < 1, p_cut, k_cut)
    # min-p as in the sorted version: logit >= max + log(min_p).
    cutoff = jnp.maximum(_value_of(p_cut), top + jnp.log(min_p))
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def sample(
    logits: jax.Array, key: jax.Array, params_arrays: dict[str, jax.Array], sort: bool = True
) -> tuple[jax.Array, jax.Array]:
    """Next tokens int32 [B] and their logprobs float32 [B] under the raw (unscaled, unfiltered) logits.

    key: one key for the batch, or a key per row [B] (continuous batching: each request its own seed).
    sort: filter with a sort of the vocabulary (False: by bisection; see the module docstring).

    Rows with temperature 0 take the argmax; others sample softmax(filtered logits / temperature).
    """
    logits = jnp.asarray(logits, jnp.float32)
    temperature = params_arrays["temperature"]
    top_k, top_p, min_p = params_arrays["top_k"], params_arrays["top_p"], params_arrays["min_p"]
    is_greedy = temperature <= 0

    def draw(logits):
        # Greedy rows divide by 1 so they stay finite; their sample is discarded below.
        scaled = logits / jnp.where(is_greedy, 1.0, temperature)[:, None]
        # Skip the vocabulary sort when no sampling row filters anything (the common plain-sampling case).
        needs_filter = jnp.any(~is_greedy & ((top_k > 0) | (top_p < 1) | (min_p > 0)))
        filtered = jax.lax.cond(
            needs_filter, lambda x: filter_logits(x, top_k, top_p, min_p, sort), lambda x: x, scaled
        )
        if key.ndim == 0:  # one key: two uniforms a row, drawn for the whole batch
            uniforms = jax.random.uniform(key, (logits.shape[0], 2))
        else:  # a key per row: a row's draw does not depend on the rows beside it
            uniforms = jax.vmap(lambda row_key: jax.random.uniform(row_key, (2,)))(key)
        return categorical(filtered, uniforms)

    # An all-greedy batch skips the random draw over the vocabulary (a few ms a step on a CPU); the argmax,
    # which greedy rows of any batch need, is taken once outside the branch.
    drawn = jax.lax.cond(jnp.all(is_greedy), lambda x: jnp.zeros(x.shape[:1], jnp.int32), draw, logits)
    tokens = jnp.where(is_greedy, greedy(logits), drawn)

    # log_softmax at one token, without materialising the full [B, V] log_softmax.
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    logprobs = chosen - jax.nn.logsumexp(logits, axis=-1)
    return tokens, logprobs
