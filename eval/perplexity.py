"""Perplexity of a text under a model: a quick check that real weights load and predict sensibly.

    python -m eval.perplexity --text wiki.txt                                  # openai/gpt-oss-20b
    python -m eval.perplexity --text wiki.txt --checkpoint /models/gpt-oss-120b --window 4096 --json

The text is tokenised with the harmony encoding (o200k; special-token text is read as plain text) and cut
into windows of --window tokens that are scored independently: each token is predicted from the tokens
before it in its window, so a window's first token is not scored.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gptoss_jax
from gptoss_jax.cli import UsageError, add_checkpoint_args, check_checkpoint_args, checkpoint_directory, run_command
from gptoss_jax.datafile import read_text
from gptoss_jax import sharding
from gptoss_jax.chat import harmony
from gptoss_jax.inference.engine import MIN_PROMPT_BUCKET, bucket
from gptoss_jax.nn import GptOss

LOGIT_CHUNK = 128  # positions unembedded at a time: a full window of 201088-wide logits would not fit


def _window_nll(graphdef, state, tokens: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed negative log-likelihood of tokens[:, 1:] and how many were scored (padding has position -1)."""
    model = nnx.merge(graphdef, state)
    hidden, _ = model.hidden(tokens, positions)
    batch, length, width = hidden.shape
    chunks = -(-(length - 1) // LOGIT_CHUNK)
    pad = chunks * LOGIT_CHUNK - (length - 1)
    # Position t predicts token t + 1; it counts when both are real tokens.
    inputs = jnp.pad(hidden[:, :-1], ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad)))
    scored = jnp.pad(positions[:, 1:] >= 0, ((0, 0), (0, pad)))

    def chunk_nll(chunk):
        h, target = chunk
        logits = model.logits(h)
        picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked

    def split(x):  # [B, chunks * C, ...] -> [chunks, B, C, ...]
        return jnp.moveaxis(x.reshape(batch, chunks, LOGIT_CHUNK, *x.shape[2:]), 1, 0)

    nll = jax.lax.map(chunk_nll, (split(inputs), split(targets)))
    nll = jnp.moveaxis(nll, 0, 1).reshape(batch, -1)
    return jnp.sum(jnp.where(scored, nll, 0.0)), jnp.sum(scored)


def perplexity(model: GptOss, tokens: list[int], window: int = 2048) -> dict[str, float]:
    """Mean negative log-likelihood (nats a token) and perplexity of `tokens`, scored in independent windows."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if len(tokens) < 2:
        raise ValueError(f"the text must have at least 2 tokens, got {len(tokens)}")
    if window > model.config.max_context:
        raise ValueError(f"window {window} exceeds the context of {model.config.max_context} tokens")
    length = min(window, bucket(len(tokens), MIN_PROMPT_BUCKET))  # one compiled shape for every window
    graphdef, state = nnx.split(model)
    score = jax.jit(_window_nll, static_argnums=(0,))
    total, count = 0.0, 0
    for start in range(0, len(tokens), window):
        piece = tokens[start : start + window]
        if len(piece) < 2:  # a lone last token has nothing before it in its window
            break
        padded = np.zeros((1, length), np.int32)
        padded[0, : len(piece)] = piece
        positions = np.where(np.arange(length) < len(piece), np.arange(length), -1).astype(np.int32)[None]
        nll, scored = score(graphdef, state, padded, positions)
        total += float(nll)
        count += int(scored)
    mean = total / count
    return {"tokens": len(tokens), "scored": count, "mean_nll": mean, "perplexity": math.exp(mean)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.perplexity",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--text", required=True, help="a UTF-8 text file")
    add_checkpoint_args(parser)
    parser.add_argument("--window", type=int, default=2048, help="tokens per independently scored window")
    parser.add_argument("--json", action="store_true", help="print one JSON object, nothing else")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, scratch: Path) -> int:
    check_checkpoint_args(args)
    if args.window < 2:
        raise UsageError(f"--window must be at least 2 tokens, got {args.window}")
    path = Path(args.text)
    text = read_text(path, "text")
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    directory = checkpoint_directory(args.checkpoint, scratch)
    encoding = harmony.load_encoding(directory)
    tokens = encoding.encode(text, disallowed_special=())
    if len(tokens) < 2:
        raise UsageError(f"{path}: the text must have at least 2 tokens, it has {len(tokens)}")
    model = gptoss_jax.load(directory, dtype=args.dtype, mesh=mesh)
    result = perplexity(model, tokens, args.window)
    if args.json:
        print(json.dumps({"text": str(path), "checkpoint": args.checkpoint, "window": args.window, **result}))
    else:
        print(f"{path}: {result['scored']} tokens scored of {result['tokens']} (windows of {args.window})")
        print(f"mean NLL {result['mean_nll']:.4f} nats/token, perplexity {result['perplexity']:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
