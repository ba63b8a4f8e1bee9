"""`eval.bench --serve`: the same replayed requests through static batching (Generator: a batch runs until
its longest row ends, the next batch waits for it) and continuous batching (Batcher: a request takes a
slot as soon as one frees), in one run: throughput, time to first token and inter-token latency.

All requests arrive at once; output lengths are long-tailed (log-uniform), as reasoning traces are,
and each request stops at its own length (greedy, no stop token: a random model's lengths would
be arbitrary). Prompts fall in one prompt bucket, so each engine compiles a fixed set of programs, and
both are warmed on those shapes before the clock starts.
"""

from __future__ import annotations

import time

import numpy as np

from gptoss_jax.inference.batching import Batcher, Request
from gptoss_jax.inference.engine import Generator, bucket
from gptoss_jax.inference.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


def workload(vocab: int, count: int, prompt_length: int, min_output: int, max_output: int, seed: int = 0) -> list[Request]:
    """`count` greedy requests: prompts of prompt_length/2..prompt_length tokens, outputs log-uniform over
    [min_output, max_output] (as many between 8 and 16 tokens as between 256 and 512: a long tail)."""
    rng = np.random.default_rng(seed)
    outputs = np.round(np.exp(rng.uniform(np.log(min_output), np.log(max_output), count))).astype(int)
    lengths = rng.integers(prompt_length // 2 + 1, prompt_length + 1, count)
    return [Request(rng.integers(0, vocab, n).tolist(), int(m), GREEDY) for n, m in zip(lengths, outputs)]


def _summary(start: float, arrivals: dict[int, list[float]]) -> dict:
    """Throughput and latency percentiles from each request's token arrival times."""
    end = max(times[-1] for times in arrivals.values())
    tokens = sum(len(times) for times in arrivals.values())
    first = np.array([times[0] - start for times in arrivals.values()])
    gaps = np.concatenate([np.diff(times) for times in arrivals.values() if len(times) > 1])
    return {
        "wall_s": end - start, "tokens": tokens, "tokens_per_s": tokens / (end - start),
        "ttft_p50_s": float(np.percentile(first, 50)), "ttft_p99_s": float(np.percentile(first, 99)),
        "itl_p50_s": float(np.percentile(gaps, 50)), "itl_p99_s": float(np.percentile(gaps, 99)),
    }  # fmt: skip


def run_static(model, requests: list[Request], concurrency: int) -> dict:
    """Batches of `concurrency` requests in arrival order; each batch decodes until its longest request
    is done (shorter ones' extra tokens are dropped, as a static server would)."""
    generator = Generator(model)
    groups = [requests[i : i + concurrency] for i in range(0, len(requests), concurrency)]
    for group in groups:  # warm: compile this group's prefill and decode shapes (two tokens suffice)
        stream = generator.stream([r.prompt for r in group], max_new_tokens=max(r.max_new_tokens for r in group),
                                  sampling=GREEDY)  # fmt: skip
        for _ in zip(range(2 * len(group) + 1), stream):
            pass
        stream.close()
    arrivals: dict[int, list[float]] = {}
    start = time.perf_counter()
    for offset, group in zip(range(0, len(requests), concurrency), groups):
        limit = max(r.max_new_tokens for r in group)
        for event in generator.stream([r.prompt for r in group], max_new_tokens=limit, sampling=GREEDY):
            times = arrivals.setdefault(offset + event.row, [])
            if len(times) < group[event.row].max_new_tokens:
                times.append(time.perf_counter())
    return _summary(start, arrivals) | {"compiled_programs": generator.compiled_programs()}


def run_continuous(model, requests: list[Request], concurrency: int, prefill_chunk: int | None = None) -> dict:
    """All requests submitted to a Batcher of `concurrency` slots, stepped until every one is done.

    prefill_chunk: prompt tokens a step may prefill; by default what the static engine prefills in one
    call (concurrency x the prompt bucket), so both batchings get the same prefill budget."""
    longest = max(len(r.prompt) + r.max_new_tokens for r in requests)
    prefill_chunk = prefill_chunk or concurrency * bucket(max(len(r.prompt) for r in requests), 16)
    batcher = Batcher(model, slots=concurrency, context=bucket(longest, 128), prefill_chunk=prefill_chunk)
    # Warm: every prompt chunk bucket the requests will use, and the decode step.
    buckets = {bucket(min(len(r.prompt), batcher.prefill_chunk), 16) for r in requests}
    batcher.run([Request([1] * n, 2, GREEDY) for n in sorted(buckets)])
    ids = [batcher.submit(request) for request in requests]
    index = {request_id: i for i, request_id in enumerate(ids)}
    arrivals: dict[int, list[float]] = {}
    start = time.perf_counter()
    while batcher.has_work():
        for event in batcher.step():
            arrivals.setdefault(index[event.request], []).append(time.perf_counter())
    return _summary(start, arrivals) | {"compiled_programs": batcher.compiled_programs(), "slots": concurrency,
                                        "prefill_chunk": batcher.prefill_chunk}  # fmt: skip


def bench_serving(model, count: int, concurrency: int, prompt_length: int, min_output: int, max_output: int,
                  prefill_chunk: int | None = None) -> dict:  # fmt: skip
    requests = workload(model.config.vocab_size, count, prompt_length, min_output, max_output)
    outputs = [r.max_new_tokens for r in requests]
    report = {
        "requests": count, "concurrency": concurrency, "prompt_length": prompt_length,
        "output_tokens": {"min": min(outputs), "median": float(np.median(outputs)), "max": max(outputs), "total": sum(outputs)},
        "static": run_static(model, requests, concurrency),
        "continuous": run_continuous(model, requests, concurrency, prefill_chunk),
    }  # fmt: skip
    report["throughput_ratio"] = report["continuous"]["tokens_per_s"] / report["static"]["tokens_per_s"]
    return report


def table(report: dict, device: str) -> str:
    out = report["output_tokens"]
    lines = [
        f"serving on {device}: {report['requests']} requests at once, {report['concurrency']} at a time, prompts "
        f"<= {report['prompt_length']} tokens, outputs {out['min']}..{out['max']} (median {out['median']:.0f}, "
        f"{out['total']} in all)",
        f"{'batching':<12}{'wall s':>8}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50 ms':>12}{'ITL p99 ms':>12}",
    ]
    for name in ("static", "continuous"):
        r = report[name]
        lines.append(f"{name:<12}{r['wall_s']:>8.1f}{r['tokens_per_s']:>9.1f}{r['ttft_p50_s']:>10.2f}{r['ttft_p99_s']:>10.2f}"
                     f"{r['itl_p50_s'] * 1e3:>12.1f}{r['itl_p99_s'] * 1e3:>12.1f}")  # fmt: skip
    lines.append(f"continuous / static throughput: {report['throughput_ratio']:.2f}x")
    return "\n".join(lines)
