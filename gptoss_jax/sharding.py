"""One mesh and one table of rules: every parameter and cache array names logical axes, the rules map
them to mesh axes.

Mesh axes: 'data' (batch), 'expert' (experts: each device holds num_experts / n of them, packed bytes
included) and 'tensor' (attention heads and the experts' intermediate dimension). A logical axis with no
rule, or whose mesh axis the mesh lacks, is replicated.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gptoss_jax.errors import GptOssError

MESH_AXES = ("data", "expert", "tensor")

# Logical axis -> mesh axis. The one place that decides how the model is split.
RULES: dict[str, str] = {
    "batch": "data",
    "experts": "expert",
    "heads": "tensor",
    "kv_heads": "tensor",
    "expert_intermediate": "tensor",  # mlp1's output rows (gate/linear pairs stay together)
    "intermediate": "tensor",  # mlp2's input (dense experts)
    "intermediate_blocks": "tensor",  # mlp2's input, in MXFP4 blocks of 32
}
# Logical axes that must stay whole, and why: mlp1's outputs in the TPU form are gate / linear halves
# (gptoss_jax.backends.tpu.expert_form), which a split over 'tensor' would tear apart.
UNSPLIT: dict[str, tuple[str, str]] = {
    "gate_linear_halves": ("tensor", "the Pallas TPU expert kernels' form holds mlp1's outputs as gate / linear "
                           "halves; use a mesh without 'tensor', or GPTOSS_JAX_KERNELS=0"),
}  # fmt: skip

# The KV cache's axes, per layer group (stacked over groups). A slot's keys (or values) are one row of
# kv_heads x head_dim features, heads outermost, so splitting the last axis over 'tensor' splits whole
# heads, and a TPU keeps a slot dense (a [..., kv_heads, head_dim] = [..., 8, 64] slot is padded to
# 16 x 128 there).
CACHE_AXES = ("batch", "cache_slots", "kv_heads")


class ShardingError(GptOssError):
    """A mesh that does not fit the devices or the model."""


def parse_mesh(spec: str) -> dict[str, int]:
    """'expert=4,tensor=2' -> {'expert': 4, 'tensor': 2}."""
    sizes: dict[str, int] = {}
    for part in filter(None, (piece.strip() for piece in spec.split(","))):
        name, _, size = part.partition("=")
        if name not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise ShardingError(f"mesh {spec!r}: expected axis=size pairs with axes among {', '.join(MESH_AXES)}")
        sizes[name] = int(size)
    return sizes


# XLA:CPU's concurrency-optimized scheduler can order a program's independent collectives differently in
# each process, and gloo then pairs one process's message with another's ("Received data size doesn't
# match expected size"). XLA reads the flag once, when jax is imported: it must be in the environment.
CPU_PROCESSES_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Join a multi-process run (call first, before anything touches a device).

    On TPU pods, Slurm or Open MPI, jax finds its peers by itself (no arguments). Elsewhere pass the
    coordinator's host:port, the process count and this process's id. CPU processes talk through gloo.
    """
    if jax.config.jax_platforms in (None, "", "cpu") and not _has_accelerator():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if CPU_PROCESSES_FLAG not in os.environ.get("XLA_FLAGS", ""):
            print(f"warning: CPU processes should start with XLA_FLAGS={CPU_PROCESSES_FLAG} (without it "
                  "XLA may order collectives differently in each process and gloo fails)", file=sys.stderr)  # fmt: skip
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def _has_accelerator() -> bool:
    """Whether jax would pick a GPU or TPU, judged without starting a backend."""
    import importlib.util

    return any(importlib.util.find_spec(name) for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))


def make_mesh(sizes: dict[str, int] | str, devices: list | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with the named axis sizes; absent axes have size 1."""
    if isinstance(sizes, str):
        sizes = parse_mesh(sizes)
    devices = jax.devices() if devices is None else devices
    shape = tuple(sizes.get(axis, 1) for axis in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ShardingError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, there are {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def spec_for(
    axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, what: str = "array", fully: bool = False
) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes on `mesh`, checking that sizes divide.

    fully: also split the array over the mesh axes its logical axes leave unused (see `fully_sharded`).
    """
    if len(axes) < len(shape):  # stacked over layer groups: a leading axis that is never split
        axes = ("layers",) * (len(shape) - len(axes)) + tuple(axes)
    spec: list = []
    for axis, size in zip(axes, shape):
        if axis in UNSPLIT and mesh.shape.get(UNSPLIT[axis][0], 1) > 1:
            mesh_axis, why = UNSPLIT[axis]
            raise ShardingError(f"{what}: its {axis} axis does not split over mesh axis {mesh_axis}={mesh.shape[mesh_axis]} ({why})")
        mesh_axis = RULES.get(axis)
        if mesh_axis is None or mesh.shape.get(mesh_axis, 1) == 1:
            spec.append(None)
            continue
        if size % mesh.shape[mesh_axis]:
            raise ShardingError(
                f"{what}: its {axis} axis of size {size} does not split over mesh axis "
                f"{mesh_axis}={mesh.shape[mesh_axis]}"
            )
        spec.append(mesh_axis)
    return PartitionSpec(*(fully_sharded(axes, shape, spec, mesh) if fully else spec))


def fully_sharded(axes: tuple, shape: tuple[int, ...], spec: list, mesh: Mesh) -> list:
    """FSDP (ZeRO-3) for what training keeps: the array's largest dimension the rules leave whole is split
    over every mesh axis the array does not use yet (or as many of them, in MESH_AXES order, as divide
    it), so each device holds 1/n of it. Inside the step XLA gathers a weight where it is used and
    scatters its gradient back. The layer stack's axis stays whole: the layer scan slices it."""
    used = {name for entry in spec if entry is not None for name in (entry if isinstance(entry, tuple) else (entry,))}
    free = [name for name in MESH_AXES if name not in used and mesh.shape.get(name, 1) > 1]
    while free:
        ways = math.prod(mesh.shape[name] for name in free)
        whole = [i for i, (axis, size) in enumerate(zip(axes, shape))
                 if spec[i] is None and axis != "layers" and size % ways == 0]  # fmt: skip
        if whole:
            widest = max(whole, key=lambda i: shape[i])
            return [*spec[:widest], tuple(free) if len(free) > 1 else free[0], *spec[widest + 1:]]
        free.pop()
    return spec


def state_shardings(state: nnx.State, mesh: Mesh, training: str | None = None) -> Any:
    """NamedShardings for every variable of a model state, from each variable's declared `axes`.

    training: None places the state for inference. "trained" (weights being trained, and their optimizer
    state) splits every array fully over the mesh (FSDP, see `fully_sharded`); "frozen" does so for the
    dense weights only: frozen experts stay split over 'expert' and 'tensor' alone, as expert
    parallelism already divides them and gathering them each step would move their whole size.
    """

    def sharding(path, variable):
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        axes = getattr(variable, "axes", None)
        if axes is None:
            raise ShardingError(f"parameter {name} declares no logical axes")
        return NamedSharding(mesh, spec_for(axes, variable.shape, mesh, name, fully=fsdp(training, axes)))

    return jax.tree_util.tree_map_with_path(
        sharding, state, is_leaf=lambda leaf: isinstance(leaf, nnx.Variable)
    )


def constrain(x: jax.Array, axes: tuple[str | None, ...], mesh: Mesh | None) -> jax.Array:
    """Pin an activation's layout inside a program on `mesh` (no mesh: nothing to do) by the rules: rows
    over 'data', heads over 'tensor'; an axis that does not divide stays whole. Where weights are split
    fully (training), this keeps XLA gathering the weights instead of re-splitting the activations."""
    if mesh is None:
        return x
    spec = []
    for axis, size in zip(axes, x.shape):
        mesh_axis = RULES.get(axis)
        divides = mesh_axis is not None and mesh.shape.get(mesh_axis, 1) > 1 and size % mesh.shape[mesh_axis] == 0
        spec.append(mesh_axis if divides else None)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def fsdp(training: str | None, axes: tuple) -> bool:
    """Whether a training run splits an array with these logical axes fully (see `state_shardings`)."""
    if training not in (None, "trained", "frozen"):
        raise ValueError(f"training must be None, 'trained' or 'frozen', got {training!r}")
    return training == "trained" or (training == "frozen" and "experts" not in axes)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every parameter of `model` in its sharding on `mesh` (in place) and return the model."""
    state = nnx.state(model)
    placed = jax.device_put(state, variable_values(state_shardings(state, mesh)))
    nnx.update(model, placed)
    return set_mesh(model, mesh)


def set_mesh(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Tell the model and its modules that need it (the MoE layers' shard_map) which mesh it lives on;
    the model's runtime moves to the mesh's devices (their platform decides the algorithms)."""
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "mesh"):
            module.mesh = mesh
        if hasattr(module, "runtime"):
            module.runtime = module.runtime.on(list(mesh.devices.flat))
    return model


def variable_values(shardings: Any) -> Any:
    """The same tree with each nnx.Variable replaced by what it holds (for jax.device_put and jit)."""
    return jax.tree.map(
        lambda variable: variable.value if isinstance(variable, nnx.Variable) else variable,
        shardings,
        is_leaf=lambda leaf: isinstance(leaf, nnx.Variable),
    )


def host_array(x: jax.Array) -> np.ndarray:
    """The whole of a device array on this host. In a multi-process run an array split over 'data'
    spans hosts; each process then receives the others' parts (every process must call this alike)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def device_bytes(tree: Any) -> dict[Any, int]:
    """Bytes each device holds of the arrays in `tree` (from their shardings)."""
    per_device: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return per_device

