"""One mesh and one table of rules: every parameter and cache array names logical axes, the rules map
them to mesh axes.

Mesh axes: 'data' (batch), 'expert' (experts: each device holds num_experts / n of them, packed bytes
included) and 'tensor' (attention heads and the experts' intermediate dimension). A logical axis with no
rule, or whose mesh axis the mesh lacks, is replicated.
"""

from __future__ import annotations

import math
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


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Join a multi-process run (call first, before anything touches a device).

    On TPU pods, Slurm or Open MPI, jax finds its peers by itself (no arguments). Elsewhere pass the
    coordinator's host:port, the process count and this process's id. CPU processes talk through gloo.
    """
    if jax.config.jax_platforms in (None, "", "cpu") and not _has_accelerator():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
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


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, what: str = "array") -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes on `mesh`, checking that sizes divide."""
    if len(axes) < len(shape):  # stacked over layer groups: a leading axis that is never split
        axes = ("layers",) * (len(shape) - len(axes)) + tuple(axes)
    spec = []
    for axis, size in zip(axes, shape):
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
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh) -> Any:
    """NamedShardings for every variable of a model state, from each variable's declared `axes`."""

    def sharding(path, variable):
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        axes = getattr(variable, "axes", None)
        if axes is None:
            raise ShardingError(f"parameter {name} declares no logical axes")
        return NamedSharding(mesh, spec_for(axes, variable.shape, mesh, name))

    return jax.tree_util.tree_map_with_path(
        sharding, state, is_leaf=lambda leaf: isinstance(leaf, nnx.Variable)
    )


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


def device_bytes(tree: Any) -> dict[Any, int]:
    """Bytes each device holds of the arrays in `tree` (from their shardings)."""
    per_device: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return per_device

