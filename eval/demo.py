"""A first look at a model: load it, report what it holds, and continue a prompt greedily.

    python -m eval.demo                                   # a tiny random checkpoint, written to a temp folder
    python -m eval.demo --checkpoint openai/gpt-oss-20b   # a real one (a folder or a hub repo id)

Greedy continuation here recomputes the whole sequence per token (no KV cache); it shows the model
works end to end, not how fast it can go.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gptoss_jax
from gptoss_jax.checkpoint.random_weights import random_hub_tensors
from gptoss_jax.checkpoint.writer import write_hub_checkpoint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint folder or hub repo id (default: a tiny random one)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--experts", default="mxfp4", choices=["mxfp4", "bfloat16"])
    parser.add_argument("--prompt-ids", default="1,2,3,4,5,6,7,8", help="comma-separated token ids")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    return parser.parse_args(argv)


def greedy_continue(model: gptoss_jax.GptOss, prompt: list[int], steps: int) -> list[int]:
    """Append `steps` argmax tokens, recomputing the padded sequence each step (one compile)."""
    graphdef, state = nnx.split(model)
    total = len(prompt) + steps

    @jax.jit
    def next_token(state, tokens, length):
        logits = nnx.merge(graphdef, state)(tokens[None])[0]
        return jnp.argmax(logits[length - 1])

    tokens = np.zeros(total, np.int32)
    tokens[: len(prompt)] = prompt
    for length in range(len(prompt), total):
        tokens[length] = int(next_token(state, tokens, length))
    return tokens[len(prompt) :].tolist()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prompt = [int(token) for token in args.prompt_ids.split(",")]
    except ValueError:
        print(f"error: --prompt-ids must be comma-separated integers, got {args.prompt_ids!r}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint
        if checkpoint is None:
            config = gptoss_jax.GptOssConfig.preset("tiny")
            checkpoint = write_hub_checkpoint(f"{scratch}/tiny", config, random_hub_tensors(config, seed=0))
            print(f"no --checkpoint given: wrote a tiny random gpt-oss checkpoint to {checkpoint}")
        try:
            start = time.perf_counter()
            model = gptoss_jax.load(checkpoint, dtype=args.dtype, experts=args.experts)
            load_seconds = time.perf_counter() - start
        except gptoss_jax.GptOssError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        config = model.config
        if max(prompt) >= config.vocab_size or min(prompt) < 0:
            print(f"error: --prompt-ids must lie in 0..{config.vocab_size - 1}", file=sys.stderr)
            return 2
        print(
            f"loaded in {load_seconds:.1f} s: {config.num_layers} layers "
            f"({' + '.join(kind.split('_')[0] for kind in config.layer_pattern)} x {config.num_groups}), "
            f"{config.num_experts} experts (top {config.experts_per_token}), vocab {config.vocab_size}; "
            f"{gptoss_jax.resident_bytes(model) / 2**20:.1f} MiB resident, experts {args.experts}, "
            f"compute {args.dtype}"
        )
        start = time.perf_counter()
        continuation = greedy_continue(model, prompt, args.max_new_tokens)
        print(f"prompt ids:       {prompt}")
        print(f"greedy next ids:  {continuation}  ({time.perf_counter() - start:.1f} s with compile)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
