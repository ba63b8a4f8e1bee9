"""Time a decode step's token draw: ours (`sampling.categorical`, the inverse of the distribution
function in two levels) beside jax's Gumbel-max (`jax.random.categorical`), and the whole `sample`
(draw, greedy argmax and logprobs) at temperature 0 and 1, and with top-p 0.95 (its cutoff by a sort or
by bisection), on random logits of gpt-oss's vocabulary.

    python -m eval.sampling_bench [--batch 1 --batch 16] [--vocab 201088]

Prints a JSON report: per batch size, median milliseconds of each (jitted, warmed), and jax's draw over
ours as `draw_speedup`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.inference.sampling import SamplingParams, categorical, sample

REPEATS = 11


def median_ms(fn, *args) -> float:
    jax.block_until_ready(fn(*args))  # compiled and warmed outside the clock
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench_sampling(batch: int, vocab: int) -> dict:
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((batch, vocab)) * 2, jnp.float32)
    keys = jax.random.split(jax.random.key(0), batch)  # a key a row, as continuous batching draws
    ours = jax.jit(lambda k, x: categorical(x, jax.vmap(lambda row: jax.random.uniform(row, (2,)))(k)))
    gumbel = jax.jit(lambda k, x: jax.vmap(jax.random.categorical)(k, x))
    greedy_params, sampled_params = SamplingParams(temperature=0).as_arrays(batch), SamplingParams().as_arrays(batch)
    top_p_params = SamplingParams(top_p=0.95).as_arrays(batch)
    whole = jax.jit(sample, static_argnums=3)
    report = {
        "ours_draw_ms": median_ms(ours, keys, logits),
        "jax_categorical_draw_ms": median_ms(gumbel, keys, logits),
        "sample_greedy_ms": median_ms(whole, logits, keys, greedy_params, True),
        "sample_temperature_1_ms": median_ms(whole, logits, keys, sampled_params, True),
        # top-p's cutoff by a sort of the vocabulary (a GPU's choice, Runtime.sampling_sorts) or by bisection
        "sample_top_p_sorted_ms": median_ms(whole, logits, keys, top_p_params, True),
        "sample_top_p_bisection_ms": median_ms(whole, logits, keys, top_p_params, False),
    }
    report["draw_speedup"] = report["jax_categorical_draw_ms"] / report["ours_draw_ms"]
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m eval.sampling_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 16)")
    parser.add_argument("--vocab", type=int, default=201088, help="vocabulary size (default gpt-oss's)")
    args = parser.parse_args(argv)
    if args.vocab < 1 or any(batch < 1 for batch in args.batch or []):
        parser.error("--vocab and --batch must be at least 1")
    report = {"device": jax.devices()[0].device_kind, "vocab": args.vocab,
              "batches": {batch: bench_sampling(batch, args.vocab) for batch in args.batch or [1, 16]}}  # fmt: skip
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
