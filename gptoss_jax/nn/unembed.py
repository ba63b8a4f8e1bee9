"""Log-probabilities of chosen tokens without holding every logit at once (training and RL)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def chunked_token_logprobs(
    logits: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array, chunk: int, with_entropy: bool
) -> tuple[jax.Array, jax.Array]:
    """(log p(targets), entropy or zeros), float32 [...], from hidden states [..., D].

    Tokens are unembedded `chunk` at a time by `logits` and the chunks are recomputed in a backward pass,
    so a training step never stores a [tokens, vocab] array (201088 floats a token for gpt-oss).
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    count = flat_hidden.shape[0]
    chunk = min(chunk, count)
    padded = -(-count // chunk) * chunk
    flat_hidden = jnp.pad(flat_hidden, ((0, padded - count), (0, 0)))
    flat_targets = jnp.pad(flat_targets, (0, padded - count))

    @jax.checkpoint
    def one_chunk(_, chunk_inputs):
        h, t = chunk_inputs
        chunk_logits = logits(h)
        normaliser = jax.nn.logsumexp(chunk_logits, axis=-1)
        chosen = jnp.take_along_axis(chunk_logits, t[:, None], axis=-1)[:, 0]
        if with_entropy:
            entropy = normaliser - (jax.nn.softmax(chunk_logits, axis=-1) * chunk_logits).sum(axis=-1)
        else:
            entropy = jnp.zeros_like(normaliser)
        return None, (chosen - normaliser, entropy)

    _, (out, entropy) = jax.lax.scan(
        one_chunk, None, (flat_hidden.reshape(-1, chunk, hidden.shape[-1]), flat_targets.reshape(-1, chunk))
    )
    return tuple(x.reshape(-1)[:count].reshape(targets.shape) for x in (out, entropy))
