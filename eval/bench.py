"""Measure load, compile, prefill and decode speed, memory and a decode roofline; optionally beside a peer.

    python -m eval.bench --preset gpt-oss-20b --layers 4                     # random MXFP4 weights, no disk
    python -m eval.bench --preset gpt-oss-20b --layers 4 --compare transformers
    python -m eval.bench --checkpoint /models/gpt-oss-20b --batch 1 --batch 16
    python -m eval.bench --preset gpt-oss-20b --write-random /tmp/random-20b   # then --checkpoint it
    python -m eval.bench --plan --preset gpt-oss-120b --context 8192          # bytes per device, no weights
    python -m eval.bench --plan --train --preset gpt-oss-20b --context 2048   # a LoRA training step's bytes

The roofline divides the bytes one decode step must read (attention and router weights, the chosen
experts' packed bytes, the unembedding, the valid part of the KV cache) by a memory bandwidth measured
here (a streaming reduction over 256 MiB, probed before, between and after each decode measurement;
the median is used), giving an upper bound on decode tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import gptoss_jax
from gptoss_jax.checkpoint import names
from gptoss_jax.checkpoint.load import from_tensors
from gptoss_jax.checkpoint.random_weights import random_hub_tensors, write_random_hub_checkpoint
from gptoss_jax.checkpoint.writer import write_hub_checkpoint
from gptoss_jax.config import FULL, GptOssConfig
from gptoss_jax.inference.engine import Generator
from gptoss_jax.nn import GptOss, KVCache
from gptoss_jax.nn.moe import PackedBytes
from gptoss_jax.inference.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.bench",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--checkpoint", help="a checkpoint folder or hub repo id (default: random weights)")
    parser.add_argument("--preset", default="gpt-oss-20b", help="shape of the random model or plan")
    parser.add_argument("--layers", type=int, help="override the number of layers")
    parser.add_argument("--vocab", type=int, help="override the vocabulary size")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, action="append", help="decode batch sizes (default 1 and 16)")
    parser.add_argument("--prompt-length", type=int, default=512, help="prefill prompt length")
    parser.add_argument("--new-tokens", type=int, default=33, help="tokens generated per decode measurement")
    parser.add_argument("--compare", choices=["transformers"], help="run a peer on the same weights and prompts")
    parser.add_argument("--plan", action="store_true", help="compile the decode step on abstract shapes only")
    parser.add_argument("--context", type=int, default=8192, help="plan mode: KV cache length")
    parser.add_argument("--mesh", help="plan mode: a mesh such as expert=8 (needs that many devices)")
    parser.add_argument("--train", action="store_true", help="plan mode: a LoRA fine-tuning step (--context tokens a row)")
    parser.add_argument("--lora-rank", type=int, default=16, help="plan mode with --train: adapter rank")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--write-random", metavar="DIR", help="write the random model of --preset/--layers to DIR (hub layout) and exit"
    )
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> GptOssConfig:
    config = GptOssConfig.preset(args.preset)
    if args.layers:
        config = config.replace(num_layers=args.layers)
    if args.vocab:
        config = config.replace(vocab_size=args.vocab)
    return config


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_bandwidth() -> float:
    """Bytes per second of a compiled streaming reduction over 256 MiB, 8x this machine's L3 (best of three)."""
    data = jnp.ones((2**26,), jnp.float32)
    reduce = jax.jit(jnp.sum)
    reduce(data).block_until_ready()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        reduce(data).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def decode_step_bytes(model: GptOss, batch: int, position: int) -> int:
    """What one decode step must read: every non-expert weight a token touches, the experts the batch
    chooses (at most all of them), the unembedding, and the valid part of the KV cache."""
    c = model.config
    state = nnx.state(model)
    total = 0
    for path, variable in nnx.to_flat_state(state):
        if path[0] == "embed":
            continue  # a step reads one row per token
        if "mlp1" in path or "mlp2" in path or path[-1] in ("mlp1_bias", "mlp2_bias"):
            continue  # counted per chosen expert below
        total += variable.get_value().nbytes
    expert_bytes = sum(
        variable.get_value().nbytes
        for path, variable in nnx.to_flat_state(state)
        if "mlp1" in path or "mlp2" in path or path[-1] in ("mlp1_bias", "mlp2_bias")
    )
    chosen = min(c.num_experts, batch * c.experts_per_token)
    total += expert_bytes * chosen // c.num_experts
    cache_itemsize = jnp.dtype(model.dtype).itemsize
    for kind in c.layer_types:
        visible = position if kind == FULL else min(position, c.sliding_window)
        total += 2 * batch * visible * c.num_kv_heads * c.head_dim * cache_itemsize
    return total


# Decode timings take the median of this many runs, for us and for the peer alike: this machine's speed
# drifts (neighbours), and a decode rate is a difference of two timings, which a single disturbed run of
# either would skew.
DECODE_REPEATS = 3


def time_generation(run, repeats: int = 2, summary=min) -> tuple[float, float]:
    """(first call seconds, summary (default: best) of the later calls' seconds)."""
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return first, summary(times)


def bench_ours(model: GptOss, args: argparse.Namespace, bandwidth: float) -> dict:
    generator = Generator(model)
    vocab = model.config.vocab_size
    results: dict = {}
    prompt = [(17 * i) % vocab for i in range(args.prompt_length)]
    first, warm = time_generation(lambda: generator.generate([prompt], max_new_tokens=1, sampling=GREEDY))
    results["prefill"] = {
        "prompt_tokens": args.prompt_length,
        "compile_s": first - warm,
        "time_to_first_token_s": warm,
        "tokens_per_s": args.prompt_length / warm,
    }
    for batch in args.batch or [1, 16]:
        prompts = [[(7 * row + i) % vocab for i in range(16)] for row in range(batch)]
        # The bandwidth is probed around these timings too (this machine drifts): the roofline uses the
        # median of the probes taken before, between and after them.
        probes = [bandwidth, measure_bandwidth()]
        _, short = time_generation(
            lambda: generator.generate(prompts, max_new_tokens=1, sampling=GREEDY),
            repeats=DECODE_REPEATS,
            summary=statistics.median,
        )
        probes.append(measure_bandwidth())
        long_first, long = time_generation(
            lambda: generator.generate(prompts, max_new_tokens=args.new_tokens, sampling=GREEDY),
            repeats=DECODE_REPEATS,
            summary=statistics.median,
        )
        probes.append(measure_bandwidth())
        seconds_per_step = max(long - short, 1e-9) / (args.new_tokens - 1)
        step_bytes = decode_step_bytes(model, batch, 16 + args.new_tokens // 2)
        roofline = batch * statistics.median(probes) / step_bytes
        results[f"decode_batch_{batch}"] = {
            "compile_s": long_first - long,  # the prefill program was compiled by the short run
            "tokens_per_s": batch / seconds_per_step,
            "step_bytes": step_bytes,
            "bandwidth_bytes_per_s": statistics.median(probes),
            "roofline_tokens_per_s": roofline,
            "roofline_fraction": (batch / seconds_per_step) / roofline,
        }
    return results


def bench_transformers(checkpoint: Path, args: argparse.Namespace, vocab: int) -> dict:
    import torch
    from transformers import GptOssForCausalLM

    start = time.perf_counter()
    model = GptOssForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    results: dict = {"load_s": time.perf_counter() - start}

    def generate(prompts, new_tokens):
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False,
            )

    prompt = [[(17 * i) % vocab for i in range(args.prompt_length)]]
    _, warm = time_generation(lambda: generate(prompt, 1))
    results["prefill"] = {"time_to_first_token_s": warm, "tokens_per_s": args.prompt_length / warm}
    for batch in args.batch or [1, 16]:
        prompts = [[(7 * row + i) % vocab for i in range(16)] for row in range(batch)]
        _, short = time_generation(lambda: generate(prompts, 1), repeats=DECODE_REPEATS, summary=statistics.median)
        _, long = time_generation(lambda: generate(prompts, args.new_tokens), repeats=DECODE_REPEATS, summary=statistics.median)
        results[f"decode_batch_{batch}"] = {"tokens_per_s": batch * (args.new_tokens - 1) / max(long - short, 1e-9)}
    return results


def plan(args: argparse.Namespace) -> dict:
    """Compile one decode step on abstract shapes and read XLA's memory analysis (per device)."""
    from gptoss_jax import sharding

    config = config_from(args)
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    abstract = nnx.eval_shape(lambda: GptOss(config, dtype=args.dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    batch = (args.batch or [1])[0]
    cache = jax.eval_shape(lambda: KVCache.create(config, batch, args.context, args.dtype))
    if mesh is not None:
        sharding.set_mesh(abstract, mesh)
        graphdef, _ = nnx.split(abstract)
        state = jax.tree.map(
            lambda variable, placed: variable.replace(jax.ShapeDtypeStruct(variable.shape, variable.dtype, sharding=placed)),
            state,
            sharding.state_shardings(state, mesh),
            is_leaf=lambda leaf: isinstance(leaf, nnx.Variable),
        )

    def decode_step(state, cache, tokens, positions):
        model = nnx.merge(graphdef, state)
        logits, cache = model(tokens[:, None], positions[:, None], cache)
        return jnp.argmax(logits[:, 0], axis=-1), cache

    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32)
    start = time.perf_counter()
    compiled = jax.jit(decode_step, donate_argnums=(1,)).lower(state, cache, tokens, tokens).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    # The cache splits over 'data' (rows) and 'tensor' (kv heads) and is replicated over 'expert'.
    cache_split = 1 if mesh is None else mesh.shape["data"] * mesh.shape["tensor"]
    weights = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
    cache_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))
    per_device_weights = memory.argument_size_in_bytes - cache_bytes // cache_split - 2 * batch * 4
    return {
        "preset": args.preset,
        "layers": config.num_layers,
        "batch": batch,
        "context": args.context,
        "mesh": args.mesh or "one device",
        "compile_s": compile_s,
        "weights_bytes_total": weights,
        "per_device": {
            "weights_bytes": per_device_weights,
            "cache_bytes": cache_bytes // cache_split,
            "temp_bytes": memory.temp_size_in_bytes,
            "total_bytes": memory.argument_size_in_bytes + memory.temp_size_in_bytes
            + memory.output_size_in_bytes - memory.alias_size_in_bytes,
        },
    }


def plan_training(args: argparse.Namespace) -> dict:
    """Compile one LoRA fine-tuning step (train.sft's) on abstract shapes: bytes held while training."""
    from gptoss_jax.lora import LoRAConfig, add_lora
    from gptoss_jax.training import OptimizerConfig, TrainStep, sft_loss

    config = config_from(args)
    lora = LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
    abstract = nnx.eval_shape(lambda: add_lora(GptOss(config, dtype=args.dtype, rngs=nnx.Rngs(0)), lora))
    step = TrainStep(abstract, nnx.LoRAParam, OptimizerConfig(), 1000, sft_loss)
    opt_state = jax.eval_shape(step.optimizer.init, step.initial_params)
    rows = (args.batch or [1])[0]
    tokens = jax.ShapeDtypeStruct((1, rows, args.context), jnp.int32)
    batch = {"inputs": tokens, "positions": tokens, "targets": tokens,
             "weights": jax.ShapeDtypeStruct(tokens.shape, jnp.float32)}  # fmt: skip
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        step.initial_params, opt_state, step.frozen, batch, jax.random.key(0)
    ).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()

    def size(tree) -> int:
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))

    # What the same weights take with the experts decoded to bf16, the usual way to fine-tune gpt-oss.
    bf16_bytes = sum(math.prod(shape) * 2 for shape, _ in names.dense_expert_hub_shapes(config).values())
    return {
        "preset": args.preset,
        "layers": config.num_layers,
        "batch": rows,
        "context": args.context,
        "lora_rank": args.lora_rank,
        "compile_s": compile_s,
        "training": {
            "frozen_weights_bytes": size(step.frozen),
            "adapter_bytes": size(step.initial_params),
            "optimizer_bytes": size(opt_state),
            "temp_bytes": memory.temp_size_in_bytes,
            "total_bytes": memory.argument_size_in_bytes + memory.temp_size_in_bytes
            + memory.output_size_in_bytes - memory.alias_size_in_bytes,
            "bf16_weights_bytes": bf16_bytes,
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.write_random:
            path = write_random_hub_checkpoint(args.write_random, config_from(args))
            print(f"wrote a random {args.preset} ({config_from(args).num_layers} layers) to {path}")
            return 0
        if args.plan:
            report = plan_training(args) if args.train else plan(args)
        else:
            report = run(args)
    except (gptoss_jax.GptOssError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


def run(args: argparse.Namespace) -> dict:
    report: dict = {"device": str(jax.devices()[0].device_kind), "dtype": args.dtype}
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint
        if checkpoint is None:
            config = config_from(args)
            tensors = random_hub_tensors(config, seed=0)
            if args.compare:  # the peer loads from files: write the same weights once
                checkpoint = write_hub_checkpoint(Path(scratch) / "random", config, tensors)
                del tensors
        start = time.perf_counter()
        if checkpoint is None:
            model = from_tensors(config, tensors, dtype=args.dtype)
            del tensors
        else:
            model = gptoss_jax.load(checkpoint, dtype=args.dtype)
        report["load_s"] = time.perf_counter() - start
        config = model.config
        report["model"] = {
            "layers": config.num_layers,
            "experts": config.num_experts,
            "vocab": config.vocab_size,
            "resident_bytes": gptoss_jax.resident_bytes(model),
            "packed_expert_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model, PackedBytes))),
        }
        report["bandwidth_bytes_per_s"] = measure_bandwidth()
        report["ours"] = bench_ours(model, args, report["bandwidth_bytes_per_s"])
        report["peak_rss_bytes"] = peak_rss_bytes()
        if args.compare:
            del model
            report["peer"] = bench_transformers(Path(checkpoint), args, config.vocab_size)
            report["ratio_ours_over_peer"] = {
                phase: report["ours"][phase]["tokens_per_s"] / report["peer"][phase]["tokens_per_s"]
                for phase in report["peer"]
                if phase in report["ours"]
            }
    return report


def table(report: dict) -> str:
    """A readable summary of a report."""
    if "training" in report:
        memory = {name: value / 2**30 for name, value in report["training"].items()}
        return "\n".join(
            [
                f"plan: LoRA rank {report['lora_rank']} fine-tuning step of {report['preset']} ({report['layers']} "
                f"layers), batch {report['batch']} x {report['context']} tokens; compiled in {report['compile_s']:.1f} s",
                f"  frozen weights {memory['frozen_weights_bytes']:.2f} GiB (MXFP4 experts), adapters "
                f"{memory['adapter_bytes']:.3f} GiB, optimizer {memory['optimizer_bytes']:.3f} GiB, temporaries "
                f"{memory['temp_bytes']:.2f} GiB: total {memory['total_bytes']:.2f} GiB "
                f"(the weights alone with bf16 experts: {memory['bf16_weights_bytes']:.2f} GiB)",
            ]
        )
    if "per_device" in report:
        device = report["per_device"]
        return "\n".join(
            [
                f"plan: {report['preset']} ({report['layers']} layers), batch {report['batch']}, "
                f"context {report['context']}, {report['mesh']}; compiled in {report['compile_s']:.1f} s",
                f"  per device: weights {device['weights_bytes'] / 2**30:.2f} GiB, cache "
                f"{device['cache_bytes'] / 2**30:.2f} GiB, temporaries {device['temp_bytes'] / 2**30:.2f} GiB, "
                f"total {device['total_bytes'] / 2**30:.2f} GiB",
            ]
        )
    model = report["model"]
    lines = [
        f"{report['device']}, {report['dtype']}: {model['layers']} layers, {model['experts']} experts, vocab "
        f"{model['vocab']}; resident {model['resident_bytes'] / 2**30:.2f} GiB; load {report['load_s']:.1f} s; "
        f"peak RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB; bandwidth {report['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s",
        f"{'phase':<18}{'ours tok/s':>12}{'peer tok/s':>12}{'ratio':>8}{'roofline':>10}{'fraction':>10}"
        f"{'at GB/s':>9}{'compile s':>11}",
    ]
    for phase, ours in report["ours"].items():
        peer = report.get("peer", {}).get(phase, {}).get("tokens_per_s")
        ratio = report.get("ratio_ours_over_peer", {}).get(phase)
        lines.append(
            f"{phase:<18}{_cell(ours['tokens_per_s'], '.2f'):>12}{_cell(peer, '.2f'):>12}{_cell(ratio, '.2f'):>8}"
            f"{_cell(ours.get('roofline_tokens_per_s'), '.2f'):>10}{_cell(ours.get('roofline_fraction'), '.0%'):>10}"
            f"{_cell(ours.get('bandwidth_bytes_per_s', 0) / 1e9 or None, '.1f'):>9}{_cell(ours['compile_s'], '.1f'):>11}"
        )
    return "\n".join(lines)


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    sys.exit(main())
