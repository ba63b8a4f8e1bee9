"""Plans: compile the programs a run compiles, for a target machine, on abstract weights, and read XLA's figures.

A plan builds the model with `jax.eval_shape` (no weights), places it on a mesh of the target's devices
(abstract TPU or GPU devices when the target is not this machine: gptoss_jax.targets), so the model's
runtime chooses every algorithm for the target's platform, then lowers and compiles the engine's and the
trainers' own programs:

  prefill  the engine's prefill of a prompt bucket (--batch rows of --prompt-length tokens) into a cache
           of --context positions
  decode   the engine's decode step with the cache at --context positions
  sft      train.sft's LoRA step on --batch rows of --context tokens
  grpo     train.grpo's LoRA step on --batch completions of --context tokens (a micro-batch: the step
           accumulates micro-batches, so memory does not grow with the group)

Per device it reports weights, KV cache (or adapters and optimizer state), XLA's temporaries and the
total against the device's memory, XLA's flops and bytes accessed where it gives them (TPU; see
`cost_analysis`), and for decode two bounds on tokens/s at the device's bandwidth: from XLA's bytes
accessed and from the bytes a step must read (`decode_step_bytes`). On TPU an over-size program fails
to compile, as on the chip; the plan says so with XLA's figure.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gptoss_jax import sharding, targets
from gptoss_jax.checkpoint import names
from gptoss_jax.config import FULL, GptOssConfig
from gptoss_jax.errors import GptOssError
from gptoss_jax.inference.engine import Generator
from gptoss_jax.inference.sampling import SamplingParams
from gptoss_jax.lora import LoRAConfig, add_lora
from gptoss_jax.nn import GptOss, KVCache
from gptoss_jax.nn.cache import CACHE_AXES
from gptoss_jax.rl import PolicyLoss, rl_loss
from gptoss_jax.runtime import Runtime
from gptoss_jax.targets import Target
from gptoss_jax.training import OptimizerConfig, TrainStep, sft_loss

PROGRAMS = ("prefill", "decode", "sft", "grpo")
TRAINING = ("sft", "grpo")


@dataclasses.dataclass(frozen=True)
class Workload:
    """What a program is compiled for: rows, the cache length (or tokens a training row), a prompt bucket."""

    program: str
    batch: int = 1
    context: int = 8192
    prompt_length: int = 512
    lora_rank: int = 16

    def __post_init__(self):
        if self.program not in PROGRAMS:
            raise ValueError(f"program must be one of {', '.join(PROGRAMS)}, got {self.program!r}")
        if self.program == "prefill" and self.prompt_length > self.context:
            raise ValueError(f"prompt length {self.prompt_length} exceeds the context {self.context}")


def auto_mesh(config: GptOssConfig, devices: int, batch: int) -> str:
    """A mesh over all `devices`: experts split as far as they divide, the rest over rows if the batch
    divides, else over attention heads and the experts' intermediate dimension."""
    expert = max(n for n in range(1, devices + 1) if devices % n == 0 and config.num_experts % n == 0)
    rest = devices // expert
    if rest == 1:
        return f"expert={expert}"
    return f"expert={expert},{'data' if batch % rest == 0 else 'tensor'}={rest}"


def device_bytes(leaf: Any) -> int:
    """Bytes one device holds of an array or abstract array (from its sharding, if it has one)."""
    shape = leaf.shape
    placed = getattr(leaf, "sharding", None)
    if placed is not None:
        shape = placed.shard_shape(shape)
    return math.prod(shape) * jnp.dtype(leaf.dtype).itemsize


def _tree_bytes(tree: Any) -> int:
    return sum(map(device_bytes, jax.tree.leaves(tree)))


def _is_expert(path: tuple) -> bool:
    return "mlp1" in path or "mlp2" in path or path[-1] in ("mlp1_bias", "mlp2_bias")


def decode_step_bytes(model_state: nnx.State, config: GptOssConfig, batch: int, position: int,
                      cache_bytes_per_slot: float) -> int:  # fmt: skip
    """What one decode step must read, per device: every non-expert weight a token touches, the share of
    expert bytes the batch chooses (at most all of them), the unembedding, and the valid part of the KV
    cache (`cache_bytes_per_slot`: bytes a device holds per cached position of one layer)."""
    weights, experts = 0, 0
    for path, variable in nnx.to_flat_state(model_state):
        if path[0] == "embed":
            continue  # a step reads one row per token
        value = variable.get_value()
        if _is_expert(path):
            experts += device_bytes(value)
        else:
            weights += device_bytes(value)
    chosen = min(config.num_experts, batch * config.experts_per_token)
    cache = sum(
        cache_bytes_per_slot * (position if kind == FULL else min(position, config.sliding_window))
        for kind in config.layer_types
    )
    return int(weights + experts * chosen // config.num_experts + cache)


def _placed(tree: Any, shardings: Any) -> Any:
    """Abstract arrays carrying the given shardings (what `lower` needs to compile for a mesh)."""
    return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), tree, shardings)


def _replicated(tree: Any, mesh) -> Any:
    return _placed(tree, jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), tree))


def abstract_model(config: GptOssConfig, mesh, dtype: str, lora_rank: int | None) -> GptOss:
    """The model as shapes only, placed on `mesh`: its runtime is the mesh's platform's."""
    runtime = Runtime.for_devices(list(mesh.devices.flat))

    def build():
        model = GptOss(config, dtype=dtype, runtime=runtime, rngs=nnx.Rngs(0))
        return model if lora_rank is None else add_lora(model, LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank))

    model = nnx.eval_shape(build)
    sharding.set_mesh(model, mesh)
    graphdef, state = nnx.split(model)
    # A training run splits its dense weights fully too (FSDP, as train.model loads them).
    placement = None if lora_rank is None else "frozen"
    placed = jax.tree.map(
        lambda variable, where: variable.replace(jax.ShapeDtypeStruct(variable.shape, variable.dtype, sharding=where)),
        state,
        sharding.state_shardings(state, mesh, placement),
        is_leaf=lambda leaf: isinstance(leaf, nnx.Variable),
    )
    return nnx.merge(graphdef, placed)


def _cache(config: GptOssConfig, batch: int, length: int, dtype: str, mesh, filled: bool) -> KVCache:
    abstract = jax.eval_shape(lambda: KVCache.create(config, batch, length, dtype))
    placed = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(
            mesh, sharding.spec_for(CACHE_AXES[: leaf.ndim - 1], leaf.shape, mesh, "KV cache"))),
        abstract,
    )
    # A decode step runs on a cache a prefill has filled (a fresh one tells attention it is empty).
    return KVCache(tuple(dataclasses.replace(layer, empty=not filled) for layer in placed.layers))


def _rows(mesh, shape: tuple[int, ...], dtype, axis: int = 0) -> jax.ShapeDtypeStruct:
    """An abstract input whose `axis` holds batch rows: split over 'data' when they divide, as a run does."""
    data = mesh.shape["data"]
    spec = [None] * len(shape)
    if data > 1 and shape[axis] % data == 0:
        spec[axis] = "data"
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec(*spec)))


def _lower(model: GptOss, workload: Workload, mesh, dtype: str):
    """(lowered program, per-device bytes of its state parts) for one workload."""
    w, config = workload, model.config
    key = _replicated(jax.eval_shape(lambda: jax.random.key(0)), mesh)
    if w.program in ("prefill", "decode"):
        generator = Generator(model)
        state = generator.state
        sampling = {name: _rows(mesh, (w.batch,), value.dtype) for name, value in SamplingParams().as_arrays(w.batch).items()}
        rows = _rows(mesh, (w.batch,), jnp.int32)
        cache = _cache(config, w.batch, w.context, dtype, mesh, filled=w.program == "decode")
        parts = {"weights": _tree_bytes(state), "cache": _tree_bytes(cache)}
        if w.program == "prefill":
            tokens = _rows(mesh, (w.batch, w.prompt_length), jnp.int32)
            return generator._prefill.lower(state, tokens, rows, cache, sampling, key), parts
        return generator._decode.lower(state, (cache, rows, rows, key), sampling, 1), parts
    step = TrainStep(model, nnx.LoRAParam, OptimizerConfig(), 1000,
                     sft_loss if w.program == "sft" else rl_loss(PolicyLoss()))  # fmt: skip
    # Adapters and optimizer state where a sharded run keeps them (gptoss_jax.training.TrainStep).
    params = _placed(step.initial_params, step.param_shardings)
    abstract_opt_state = jax.eval_shape(step.optimizer.init, step.initial_params)
    opt_state = _placed(abstract_opt_state, step.opt_state_shardings(abstract_opt_state))
    tokens = _rows(mesh, (1, w.batch, w.context), jnp.int32, axis=1)  # [micro-batches, rows, tokens]
    if w.program == "sft":
        batch = {"inputs": tokens, "positions": tokens, "targets": tokens,
                 "weights": _rows(mesh, tokens.shape, jnp.float32, axis=1)}  # fmt: skip
    else:  # every row is completion but its first token: the largest window a row can have
        window = _rows(mesh, (1, w.batch, w.context), jnp.float32, axis=1)
        # With router replay (train.grpo's default) every input token carries the experts the rollout chose.
        routes = (1, config.num_groups, len(config.layer_pattern), w.batch, w.context, config.experts_per_token)
        batch = {"inputs": tokens, "positions": tokens, "targets": tokens, "mask": window, "old_logprobs": window,
                 "advantages": _rows(mesh, (1, w.batch), jnp.float32, axis=1),
                 "window_start": _rows(mesh, (1, w.batch), jnp.int32, axis=1),
                 "routes": _rows(mesh, routes, jnp.int32, axis=3)}  # fmt: skip
    parts = {
        "weights": _tree_bytes(step.frozen),
        "adapters": _tree_bytes(params),
        "optimizer": _tree_bytes(opt_state),
    }
    out_shardings = (step.param_shardings, step.opt_state_shardings(abstract_opt_state), step.replicated())
    program = jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)
    return program.lower(params, opt_state, step.frozen, batch, key), parts


# XLA's one line when a TPU program does not fit, e.g. "... HLO temporaries (56.00G) exceeds available HBM (15.75G)"
_OVERFLOW = re.compile(r"RESOURCE_EXHAUSTED[^\n]*")


def plan(config: GptOssConfig, target: Target, workload: Workload, mesh_spec: str | None = None,
         dtype: str = "bfloat16", compile_if_inputs_overflow: bool = True, costs: bool = True) -> dict:  # fmt: skip
    """Compile `workload`'s program for `target` and report its per-device figures (see the module doc).

    compile_if_inputs_overflow=False: when the program's inputs alone (weights, cache, adapters,
    optimizer state) exceed the device's memory, report that without compiling (the matrix's shortcut:
    a doomed compile of a large program takes minutes).
    costs: also report XLA's flops and bytes accessed, from a second compile with the layer scan
    unrolled (XLA's cost analysis counts a loop's body once); the matrix needs memory only."""
    devices = target.abstract_devices()
    mesh_spec = mesh_spec or auto_mesh(config, len(devices), workload.batch)
    mesh = sharding.make_mesh(mesh_spec, devices)
    training = workload.program in TRAINING
    model = abstract_model(config, mesh, dtype, workload.lora_rank if training else None)
    tokens = workload.batch * {"decode": 1, "prefill": workload.prompt_length}.get(workload.program, workload.context)
    pairs_per_device = tokens * config.experts_per_token // mesh.shape["data"]
    report: dict = {
        "target": target.name,
        "platform": model.runtime.platform,
        "devices": len(devices),
        "mesh": mesh_spec,
        "program": workload.program,
        **dataclasses.asdict(workload),
        "layers": config.num_layers,
        "expert_path": model.runtime.expert_path_for(
            pairs_per_device, config.num_experts, packed=True, bf16=dtype == "bfloat16", adapters=training,
            tpu_form=model.runtime.expert_form == "tpu",
        ),
        "memory_bytes": target.memory_bytes,
    }
    start = time.perf_counter()
    lowered, parts = _lower(model, workload, mesh, dtype)
    inputs = sum(parts.values())
    if not compile_if_inputs_overflow and target.memory_bytes is not None and inputs > target.memory_bytes:
        report.update(compile_s=time.perf_counter() - start, fits=False, per_device=parts, inputs_overflow=True,
                      error=f"its inputs alone need {inputs / 2**30:.2f} GiB a device (weights, cache, adapters, "
                            f"optimizer state), the device has {target.memory_bytes / 2**30:.2f} GiB")  # fmt: skip
        return report
    try:
        compiled = lowered.compile()
    except Exception as error:  # XLA's own verdict on a device that is too small (TPU)
        found = _OVERFLOW.search(str(error))
        if found is None:
            raise
        report.update(compile_s=time.perf_counter() - start, fits=False, error=found.group(0), per_device=parts)
        return report
    report["compile_s"] = time.perf_counter() - start
    memory = compiled.memory_analysis()
    total = (memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes)  # fmt: skip
    report["per_device"] = dict(parts, temp=memory.temp_size_in_bytes, total=total)
    report["fits"] = target.memory_bytes is None or total <= target.memory_bytes
    if not report["fits"]:
        report["error"] = f"needs {total / 2**30:.2f} GiB a device (XLA's memory analysis), the device has {target.memory_bytes / 2**30:.2f} GiB"
    cost = _costs(config, mesh, dtype, workload, compiled) if costs else None
    report["flops"] = cost.get("flops") if cost else None
    report["bytes_accessed"] = cost.get("bytes accessed") if cost else None
    if workload.program == "decode":
        report["decode"] = _decode_bounds(model, workload, mesh, dtype, target, report["bytes_accessed"])
    if training:
        # What the same weights take with the experts decoded to bf16, the usual way to fine-tune gpt-oss.
        report["bf16_weights_bytes"] = sum(math.prod(s) * 2 for s, _ in names.dense_expert_hub_shapes(config).values())
    return report


# On TPU, XLA's memory-space assignment copies operands into VMEM ahead of their use, and its cost
# analysis counts each copy's read, its write into VMEM and the user's read from VMEM: by that count a
# chain of two layers' attention projections reads 4.1x its weights' bytes (1.02x with no such copies),
# though the chip reads them from HBM once either way. The cost compile leaves operands in HBM, so its
# bytes accessed are the bytes the program's operations read and write there.
COST_COMPILER_OPTIONS = {"tpu": {"xla_msa_enable": False}}


def cost_analysis(lowered, platform: str) -> dict | None:
    """XLA's cost analysis of a lowered program, compiled with `COST_COMPILER_OPTIONS` for `platform`."""
    cost = lowered.compile(compiler_options=COST_COMPILER_OPTIONS.get(platform)).cost_analysis()
    return cost[0] if isinstance(cost, (list, tuple)) else cost


def _costs(config: GptOssConfig, mesh, dtype: str, workload: Workload, compiled) -> dict | None:
    """XLA's cost analysis of the program, from a second compile (`cost_analysis`) with the layer scan
    unrolled when the model has more than one layer group (XLA counts a loop's body once, not once an
    iteration); the program compiled to run gives it where neither applies."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    platform = mesh.devices.flat[0].platform
    if not cost or (config.num_groups == 1 and platform not in COST_COMPILER_OPTIONS):
        return cost
    model = abstract_model(config, mesh, dtype, workload.lora_rank if workload.program in TRAINING else None)
    model.runtime = model.runtime.replace(unroll_layers=True)
    try:
        return cost_analysis(_lower(model, workload, mesh, dtype)[0], platform)
    except Exception as error:  # the unrolled program can outgrow the device where the rolled one fits
        if _OVERFLOW.search(str(error)) is None:
            raise
        return None


def _decode_bounds(model: GptOss, workload: Workload, mesh, dtype: str, target: Target, xla_bytes: float | None) -> dict:
    config = model.config
    cache_split = mesh.shape["data"] * mesh.shape["tensor"]
    per_slot = 2 * workload.batch * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize / cache_split
    step = decode_step_bytes(nnx.state(model), config, workload.batch, workload.context, per_slot)
    bounds = {"step_bytes": step}
    if target.bandwidth_bytes_per_s:
        bounds["roofline_tokens_per_s"] = workload.batch * target.bandwidth_bytes_per_s / step
        if xla_bytes:
            bounds["xla_tokens_per_s"] = workload.batch * target.bandwidth_bytes_per_s / xla_bytes
            bounds["xla_over_step_bytes"] = xla_bytes / step
    return bounds


# The README's "Where it fits" table: each model on each target, for these workloads (a column each).
MATRIX_PRESETS = ("gpt-oss-20b", "gpt-oss-120b")
MATRIX_TARGETS = ("t4", "l4", "a100-40gb", "a100-80gb", "h100", "h200", "8xh100",
                  "v5e-1", "v5e-4", "v5e-8", "v6e-1", "v6e-4", "v6e-8", "v5p-8")  # fmt: skip
PROMPT = 2048  # the prompt bucket an inference column prefills
MATRIX_COLUMNS = {
    "serve 8k x 1": (Workload("prefill", 1, 8192, PROMPT), Workload("decode", 1, 8192)),
    "serve 8k x 32": (Workload("prefill", 32, 8192, PROMPT), Workload("decode", 32, 8192)),
    "serve 128k x 1": (Workload("prefill", 1, 131072, PROMPT), Workload("decode", 1, 131072)),
    "serve 128k x 32": (Workload("prefill", 32, 131072, PROMPT), Workload("decode", 32, 131072)),
    "LoRA SFT 2k": (Workload("sft", 1, 2048),),
    "LoRA SFT 8k": (Workload("sft", 1, 8192),),
    "GRPO step 4k": (Workload("grpo", 1, 4096),),
}
README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- plans: written by python -m eval.bench --plan --matrix -->", "<!-- plans end -->"


def matrix_cell(reports: list[dict]) -> str:
    """One column's verdict: the largest per-device total of its programs, or why it does not fit."""
    failed = [report for report in reports if not report["fits"]]
    if failed:
        device = failed[0]["per_device"]
        if failed[0].get("inputs_overflow"):
            return f"no (inputs {sum(device.values()) / 2**30:.1f} GiB)"
        total = device.get("total")
        return f"no ({_gib(total)} GiB)" if total else "no (XLA: " + _xla_figure(failed[0]["error"]) + ")"
    return f"{max(report['per_device']['total'] for report in reports) / 2**30:.1f} GiB"


def _xla_figure(error: str) -> str:
    found = re.search(r"\(([\d.]+G)\) exceeds available HBM \(([\d.]+G)\)", error)
    return f"{found.group(1)} > {found.group(2)}" if found else "out of HBM"


RESULTS = Path(__file__).with_name("plans.json")  # the matrix's plans, kept so a run can resume


def _key(preset: str, target: str, workload: Workload) -> str:
    w = workload
    return f"{preset} {target} {w.program} batch={w.batch} context={w.context} prompt={w.prompt_length} rank={w.lora_rank}"


def matrix(presets=MATRIX_PRESETS, target_names=MATRIX_TARGETS, columns=MATRIX_COLUMNS, results=None,
           save=lambda results: None, progress=None) -> str:  # fmt: skip
    """The "Where it fits" table in Markdown: per model and target, each column's per-device memory
    (the largest of its programs) or "no", the mesh, and decode at 8k x 1's bound on tokens/s.

    `results` holds plans already made (by key); each new plan is added to it and `save`d at once."""
    results = {} if results is None else results
    lines = [
        "| model | target | mesh | " + " | ".join(columns) + " | decode 8k x 1 bound |",
        "|---" * (len(columns) + 4) + "|",
    ]
    for preset in presets:
        config = GptOssConfig.preset(preset)
        for name in target_names:
            target = targets.target(name)
            cells, meshes, bound = [], set(), "-"
            for column, workloads in columns.items():
                reports = []
                for workload in workloads:
                    key = _key(preset, name, workload)
                    if key not in results:
                        results[key] = plan(config, target, workload, compile_if_inputs_overflow=False, costs=False)
                        save(results)
                    reports.append(results[key])
                meshes.update(report["mesh"] for report in reports)
                cells.append(matrix_cell(reports))
                for report in reports:
                    if column == "serve 8k x 1" and report["program"] == "decode" and report["fits"]:
                        bound = f"{report['decode']['roofline_tokens_per_s']:.0f} tok/s"
                if progress is not None:
                    print(f"{preset} {name} {column}: {cells[-1]}", file=progress, flush=True)
            lines.append(f"| {preset} | {target.description} | {', '.join(sorted(meshes))} | " + " | ".join(cells) + f" | {bound} |")
    return "\n".join(lines)


def _write_whole(path: Path, text: str) -> None:
    written = path.with_name(path.name + ".tmp")
    written.write_text(text)
    os.replace(written, path)  # whole or not at all


def write_matrix(fresh: bool = False, progress=None) -> int:
    """Plan every cell (reusing eval/plans.json unless `fresh`), then rewrite the README's table."""
    results = {} if fresh or not RESULTS.exists() else json.loads(RESULTS.read_text())
    table_text = matrix(results=results, save=lambda done: _write_whole(RESULTS, json.dumps(done, indent=1)),
                        progress=progress)  # fmt: skip
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise GptOssError(f"{README}: the markers {BEGIN!r} and {END!r} are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    _write_whole(README, head + BEGIN + "\n" + table_text + "\n" + END + tail)
    print(table_text)
    return 0


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def _shape(report: dict) -> str:
    if report["program"] == "decode":
        return f"{report['batch']} x 1 @{report['context']}"
    if report["program"] == "prefill":
        return f"{report['batch']} x {report['prompt_length']} @{report['context']}"
    return f"{report['batch']} x {report['context']}"


def table(summary: dict) -> str:
    """A readable table of a plan run: one row per program, figures per device."""
    first = summary["plans"][0]
    lines = [
        f"plan: {summary['preset']} ({first['layers']} layers, {summary['dtype']}) on {first['target']} "
        f"({summary['description']}), {first['platform']}, mesh {first['mesh']}; GiB per device",
        f"{'program':<9}{'rows x tokens':>20}{'experts':>9}{'weights':>9}{'cache':>7}{'adapt+opt':>10}"
        f"{'temps':>8}{'total':>8}{'of':>8}{'fits':>6}{'TFLOP':>8}{'GB read':>9}{'tok/s XLA':>11}"
        f"{'tok/s min':>11}{'ratio':>7}{'compile s':>10}",
    ]
    notes = []
    for report in summary["plans"]:
        device, decode = report["per_device"], report.get("decode", {})
        training = (device.get("adapters") or 0) + (device.get("optimizer") or 0)
        flops, accessed = report.get("flops"), report.get("bytes_accessed")
        lines.append(
            f"{report['program']:<9}{_shape(report):>20}{report['expert_path']:>9}{_gib(device['weights']):>9}"
            f"{_gib(device.get('cache')):>7}{_gib(training or None):>10}{_gib(device.get('temp')):>8}"
            f"{_gib(device.get('total')):>8}{_gib(report['memory_bytes']):>8}{'yes' if report['fits'] else 'NO':>6}"
            f"{'-' if flops is None else f'{flops / 1e12:.2f}':>8}{'-' if accessed is None else f'{accessed / 1e9:.1f}':>9}"
            f"{_cell(decode.get('xla_tokens_per_s')):>11}{_cell(decode.get('roofline_tokens_per_s')):>11}"
            f"{_cell(decode.get('xla_over_step_bytes'), '.2f'):>7}{report['compile_s']:>10.1f}"
        )
        if not report["fits"]:
            notes.append(f"{report['program']} does not fit: {report['error']}")
    lines += notes
    if any("decode" in report for report in summary["plans"]):
        lines.append("decode bounds at the device's bandwidth: from XLA's bytes accessed (XLA), from the bytes a step "
                     "must read (min); ratio = XLA's bytes / the bytes a step must read")  # fmt: skip
    return "\n".join(lines)


def _cell(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)
