"""Measure load, compile, prefill and decode speed, memory and a decode roofline; optionally beside a peer.

    python -m eval.bench --preset gpt-oss-20b --layers 4                     # random MXFP4 weights, no disk
    python -m eval.bench --preset gpt-oss-20b --layers 4 --compare transformers
    python -m eval.bench --preset gpt-oss-20b --layers 4 --compare llama.cpp --llama-cpp ~/llama.cpp/build/bin
    python -m eval.bench --checkpoint /models/gpt-oss-20b --batch 1 --batch 16
    python -m eval.bench --preset gpt-oss-20b --write-random /tmp/random-20b   # then --checkpoint it
    python -m eval.bench --plan --preset gpt-oss-120b --context 8192          # bytes per device, no weights
    python -m eval.bench --plan --train --preset gpt-oss-20b --context 2048   # a LoRA training step's bytes
    python -m eval.bench --plan --target v5e-8 --preset gpt-oss-120b --batch 16   # compiled for a TPU slice
    python -m eval.bench --plan --target h100 --program all --require-fit       # every program, on an H100
    python -m eval.bench --plan --matrix                                       # README's "Where it fits"
    python -m eval.bench --preset gpt-oss-20b --layers 4 --serve              # continuous vs static batching

The roofline divides the bytes one decode step must read (attention and router weights, the chosen
experts' packed bytes, the unembedding, the valid part of the KV cache) by a memory bandwidth measured
here (a streaming read of 256 MiB on every core, probed before, between and after each decode measurement;
the median is used), giving an upper bound on decode tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gptoss_jax
from eval import llama_cpp
from eval import plan as plans
from eval import serving_bench
from eval.plan import decode_step_bytes
from gptoss_jax import targets
from gptoss_jax.backends.cpu import huge_pages
from gptoss_jax.chat import harmony
from gptoss_jax.checkpoint.gguf import write_gguf
from gptoss_jax.checkpoint.load import from_tensors
from gptoss_jax.checkpoint.reader import MemorySource, open_checkpoint
from gptoss_jax.checkpoint.random_weights import random_hub_tensors, write_random_hub_checkpoint
from gptoss_jax.checkpoint.writer import write_hub_checkpoint
from gptoss_jax.config import GptOssConfig
from gptoss_jax.inference.engine import Generator
from gptoss_jax.inference.sampling import SamplingParams
from gptoss_jax.nn import GptOss
from gptoss_jax.nn.moe import PackedBytes

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
    parser.add_argument("--prompt-length", type=int, default=512, help="prefill prompt length (--serve: prompts of "
                        "half of it up to it, at most 128 tokens)")  # fmt: skip
    parser.add_argument("--new-tokens", type=int, default=33, help="tokens generated per decode measurement")
    parser.add_argument("--compare", choices=["transformers", "llama.cpp"],
                        help="run a peer on the same weights and prompts (llama.cpp: through a GGUF, eval/llama_cpp.py)")
    parser.add_argument("--llama-cpp", metavar="DIR", help=f"--compare llama.cpp: the folder of its llama-bench and "
                        f"llama-batched-bench (default ${llama_cpp.ENV_VAR}, else PATH)")  # fmt: skip
    parser.add_argument("--plan", action="store_true", help="compile programs on abstract shapes only (eval/plan.py)")
    parser.add_argument("--target", default="cpu", help="plan mode: the machine, e.g. v5e-8, v6e-1, h100, 8xh100, "
                        "t4 (gptoss_jax/targets.py), or a TPU topology such as v6e:4x4")  # fmt: skip
    parser.add_argument("--program", action="append", choices=[*plans.PROGRAMS, "all"],
                        help="plan mode: programs to compile (default prefill and decode; --train: sft)")  # fmt: skip
    parser.add_argument("--context", type=int, default=8192, help="plan mode: KV cache length (training: tokens a row)")
    parser.add_argument("--mesh", help="plan mode: a mesh such as expert=8 (default: chosen from the target's devices)")
    parser.add_argument("--train", action="store_true", help="plan mode: a LoRA fine-tuning step (--program sft)")
    parser.add_argument("--lora-rank", type=int, default=16, help="plan mode, training programs: adapter rank")
    parser.add_argument("--require-fit", action="store_true", help="plan mode: exit 2 if a program does not fit")
    parser.add_argument("--matrix", action="store_true", help="plan mode: plan every README row, rewrite its table "
                        "(plans already in eval/plans.json are reused: an interrupted run resumes)")  # fmt: skip
    parser.add_argument("--fresh", action="store_true", help="with --matrix: plan every cell again")
    parser.add_argument("--serve", action="store_true", help="replay requests through static and continuous "
                        "batching (eval/serving_bench.py)")  # fmt: skip
    parser.add_argument("--requests", type=int, default=64, help="serve mode: requests, all arriving at once")
    parser.add_argument("--concurrency", type=int, default=16, help="serve mode: static batch size and slots")
    parser.add_argument("--min-output", type=int, default=8, help="serve mode: shortest output (tokens)")
    parser.add_argument("--max-output", type=int, default=512, help="serve mode: longest output (tokens)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--write-random", metavar="DIR", help="write the random model of --preset/--layers to DIR (hub layout) and exit"
    )
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: a decode step's time is that of N tokens less that of 1")
    return args


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
    """Bytes per second that all cores together read: a streaming OR over 256 MiB (8x this machine's L3),
    a slice a core, reduced by numpy in threads (it lets go of the GIL), best of three. The kernels read
    weights on every core, and one core alone may draw much less than all do: on a 2-core Zen 4 here
    XLA's one-core sum read 22 GB/s and this 30-32, where a C++ loop on two threads reads 40-42 (so the
    roofline is still a little generous to us)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    data = np.ones(2**25, np.uint64)
    slices = np.array_split(data, cores)
    best = float("inf")
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(np.bitwise_or.reduce, slices))
        for _ in range(3):
            start = time.perf_counter()
            list(pool.map(np.bitwise_or.reduce, slices))
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best


# Decode timings take the median of this many runs, for us and for the peer alike: this machine's speed
# drifts (neighbours), and a decode rate is a difference of two timings, which a single disturbed run of
# either would skew.
DECODE_REPEATS = 3


def seconds_per_decode_step(short: float, long: float, new_tokens: int, what: str) -> float:
    """A decode step's time from a generation of 1 token (`short`, prefill included) and one of `new_tokens`
    (`long`). On a busy machine the difference can drown in noise: a rate from it would be nonsense."""
    if not long > short:
        raise ValueError(f"{what}: {new_tokens} new tokens took {long:.4f} s, no longer than 1 token ({short:.4f} s); "
                         f"the decode steps drowned in timing noise: use more --new-tokens")  # fmt: skip
    return (long - short) / (new_tokens - 1)


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
        seconds_per_step = seconds_per_decode_step(short, long, args.new_tokens, f"decode batch {batch}")
        per_slot = 2 * batch * model.config.num_kv_heads * model.config.head_dim * jnp.dtype(model.dtype).itemsize
        step_bytes = decode_step_bytes(nnx.state(model), model.config, batch, 16 + args.new_tokens // 2, per_slot)
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
    import transformers
    from transformers import GptOssForCausalLM

    start = time.perf_counter()
    model = GptOssForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    results: dict = {"name": f"transformers {transformers.__version__} (bf16)", "load_s": time.perf_counter() - start}

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
        seconds_per_step = seconds_per_decode_step(short, long, args.new_tokens, f"transformers' decode batch {batch}")
        results[f"decode_batch_{batch}"] = {"tokens_per_s": batch / seconds_per_step}
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plan and "JAX_PLATFORMS" not in os.environ:
        # A plan only compiles: this process's own devices may be the host's, and then the TPU and GPU
        # compilers (gptoss_jax[plan]) need no driver.
        jax.config.update("jax_platforms", "cpu")
    try:
        if args.write_random:
            path = write_random_hub_checkpoint(args.write_random, config_from(args))
            print(f"wrote a random {args.preset} ({config_from(args).num_layers} layers) to {path}")
            return 0
        if args.plan and args.matrix:
            return plans.write_matrix(fresh=args.fresh, progress=sys.stderr)
        if args.plan:
            report = plan(args)
        else:
            report = run(args)
    except (gptoss_jax.GptOssError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    elif args.plan:
        print(plans.table(report))
    elif args.serve:
        print(serving_bench.table(report["serving"], f"{report['device']}, {report['dtype']}, "
                                  f"{report['model']['layers']} layers"))  # fmt: skip
    else:
        print(table(report))
    if args.plan and args.require_fit and not all(one["fits"] for one in report["plans"]):
        return 2
    return 0


def plan(args: argparse.Namespace) -> dict:
    """Plan the chosen programs on the target (eval/plan.py); one report each."""
    config = config_from(args)
    target = targets.target(args.target)
    programs = args.program or (["sft"] if args.train else ["prefill", "decode"])
    programs = list(plans.PROGRAMS) if "all" in programs else list(dict.fromkeys(programs))
    batch = (args.batch or [1])[0]
    reports = []
    for program in programs:
        workload = plans.Workload(program, batch, args.context, min(args.prompt_length, args.context), args.lora_rank)
        reports.append(plans.plan(config, target, workload, args.mesh, args.dtype))
    return {"preset": args.preset, "dtype": args.dtype, "description": target.description, "plans": reports}


def run(args: argparse.Namespace) -> dict:
    report: dict = {"device": str(jax.devices()[0].device_kind), "dtype": args.dtype}
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint, tensors, gguf = args.checkpoint, None, None
        if checkpoint is None:
            config = config_from(args)
            tensors = random_hub_tensors(config, seed=0)
        if args.compare == "llama.cpp":  # written before loading: the random tensors are dropped once loaded
            programs = llama_cpp.find_programs(args.llama_cpp)
            source = MemorySource(config, tensors) if tensors is not None else open_checkpoint(checkpoint)
            vocabulary = harmony.vocabulary_file(source.directory if tensors is None else None)
            if vocabulary is None:
                raise ValueError(f"--compare llama.cpp needs the o200k vocabulary for the GGUF: {harmony.WHERE}")
            start = time.perf_counter()
            gguf = write_gguf(Path(scratch) / "model.gguf", source, vocabulary)
            report["gguf_write_s"] = time.perf_counter() - start
            del source
        if args.compare == "transformers" and tensors is not None:  # the peer loads from files
            checkpoint = write_hub_checkpoint(Path(scratch) / "random", config, tensors)
            tensors = None
        start = time.perf_counter()
        if tensors is not None:
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
            "huge_page_bytes": huge_pages.resident_huge_bytes(),  # this process's memory on 2 MiB pages
            "packed_expert_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model, PackedBytes))),
        }
        if args.serve:
            prompt = min(args.prompt_length, 128)
            report["serving"] = serving_bench.bench_serving(model, args.requests, args.concurrency, prompt,
                                                            args.min_output, args.max_output)  # fmt: skip
            report["peak_rss_bytes"] = peak_rss_bytes()
            return report
        report["bandwidth_bytes_per_s"] = measure_bandwidth()
        report["ours"] = bench_ours(model, args, report["bandwidth_bytes_per_s"])
        report["peak_rss_bytes"] = peak_rss_bytes()
        if args.compare:
            del model
            if gguf is not None:
                threads = len(os.sched_getaffinity(0))
                report["peer"] = llama_cpp.bench(gguf, programs, args.prompt_length, args.batch or [1, 16],
                                                 args.new_tokens - 1, threads)  # fmt: skip
            else:
                report["peer"] = bench_transformers(Path(checkpoint), args, config.vocab_size)
            report["ratio_ours_over_peer"] = {
                phase: report["ours"][phase]["tokens_per_s"] / report["peer"][phase]["tokens_per_s"]
                for phase in report["peer"]
                if phase in report["ours"]
            }
    return report


def table(report: dict) -> str:
    """A readable summary of a report."""
    model = report["model"]
    lines = [
        f"{report['device']}, {report['dtype']}: {model['layers']} layers, {model['experts']} experts, vocab "
        f"{model['vocab']}; resident {model['resident_bytes'] / 2**30:.2f} GiB "
        f"({model['huge_page_bytes'] / 2**30:.2f} GiB of the process on 2 MiB pages); load {report['load_s']:.1f} s; "
        f"peak RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB; bandwidth {report['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s",
        *([f"peer: {report['peer']['name']}"] if "peer" in report else []),
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
