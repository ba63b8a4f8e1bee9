"""Build a GptOss model from a checkpoint, streaming tensors one at a time.

The model is first built abstractly (shapes only). Each parameter is then filled from the checkpoint:
unstacked ones directly, stacked ones (one slice per layer group) into a preallocated array updated in
place, so host memory peaks near the size of the loaded model plus one tensor, never two copies.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptoss_jax import mxfp4
from gptoss_jax.backends.cpu import huge_pages
from gptoss_jax.backends.cpu.blocks import BLOCK, to_blocks
from gptoss_jax.backends.tpu.expert_form import STORED, variable_from_checkpoint
from gptoss_jax.checkpoint import converted
from gptoss_jax.checkpoint.names import DENSE_EXPERTS, PER_LAYER, TOP_LEVEL
from gptoss_jax.checkpoint.reader import MemorySource, TensorSource, open_checkpoint
from gptoss_jax.config import AUTO, GptOssConfig, check_experts
from gptoss_jax.nn import GptOss
from gptoss_jax.runtime import Runtime
from gptoss_jax.sharding import fsdp, set_mesh, spec_for

def load(
    path_or_repo_id: str | Path,
    dtype: str = "bfloat16",
    experts: str = AUTO,
    mesh: Mesh | None = None,
    runtime: Runtime | None = None,
    training: bool = False,
) -> GptOss:
    """Load a gpt-oss checkpoint: a hub-layout folder, an original-layout folder, a hub repo id, or a
    folder `python -m gptoss_jax.convert` wrote (orbax: each process reads only its devices' parts).

    dtype: "float32" (for exactness checks) or "bfloat16" (for speed): the dense weights and compute.
    experts: "auto" (the default) keeps them as the checkpoint stores them: MXFP4 stays packed (decoded
    inside the forward), bf16 stays bf16. "bfloat16" decodes MXFP4 at load (exact); "mxfp4" quantizes bf16
    experts at load (lossy: only when asked for).
    mesh: place every tensor straight into its sharding (gptoss_jax.sharding); each device receives only
    its shard of each tensor as it is read.
    training: place for a training run on `mesh`: the dense weights are also split over the mesh axes
    their logical axes leave unused (FSDP, gptoss_jax.sharding.fully_sharded); experts as for inference.
    runtime: where the model runs and which algorithms it uses (gptoss_jax.Runtime); default: decided
    from the devices it is placed on.
    """
    if converted.is_converted(path_or_repo_id):  # an orbax checkpoint (python -m gptoss_jax.convert)
        return converted.load_converted(path_or_repo_id, dtype, experts, mesh, runtime, training)
    return load_source(open_checkpoint(path_or_repo_id), dtype, experts, mesh, runtime, training)


def from_tensors(
    config: GptOssConfig, tensors: dict[str, np.ndarray], dtype: str = "bfloat16", experts: str = AUTO, mesh=None
) -> GptOss:
    """A model from hub-named tensors in memory (e.g. `random_hub_tensors(config)`), as `load` builds it."""
    return load_source(MemorySource(config, tensors), dtype, experts, mesh)


def load_source(
    source: TensorSource, dtype: str, experts: str, mesh: Mesh | None, runtime: Runtime | None = None,
    training: bool = False,
) -> GptOss:
    """Build the model abstractly, then stream each parameter in from `source`."""
    config = source.config
    if check_experts(experts) == AUTO:
        experts = stored_experts(source)
    runtime = Runtime.default() if runtime is None else runtime  # decided here, outside any trace
    runtime = runtime.for_training() if training else runtime
    abstract = nnx.eval_shape(lambda: GptOss(config, dtype=dtype, experts=experts, runtime=runtime, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def fill(path: tuple, variable: nnx.Variable) -> nnx.Variable:
        return variable.replace(read_variable(source, converted.variable_key(path), variable, mesh, training))

    state = jax.tree_util.tree_map_with_path(fill, state, is_leaf=lambda leaf: isinstance(leaf, nnx.Variable))
    model = nnx.merge(graphdef, state)
    huge_pages.advise(jax.tree.leaves(state))  # the CPU's weights onto 2 MiB pages: decoding streams them
    if source.layout != "memory":
        model.checkpoint_dir = str(source.directory)  # where tokenizer files next to the weights can be found
    return model if mesh is None else set_mesh(model, mesh)


def read_variable(source: TensorSource, key: tuple, variable: nnx.Variable, mesh: Mesh | None = None,
                  training: bool = False) -> jax.Array:  # fmt: skip
    """The value of the model variable at `key` (its path in the model's state), read from `source` and
    placed in its sharding on `mesh` (see `load`)."""
    config = source.config
    sharding = _sharding(mesh, variable.axes, variable.shape, "/".join(map(str, key)), training)
    if key[0] != "groups":
        if sharding is None and _nbytes(variable) > BIG_TENSOR_BYTES:
            return _read_in_pieces(source, TOP_LEVEL[key], variable)
        return _place(_in_form(source.read(TOP_LEVEL[key]), variable.shape), variable.dtype, sharding)
    # groups/layers/<position in pattern>/<module path>: slice g of the stack is layer g * P + position.
    position, inner = key[2], key[3:]
    layer_sharding = None if sharding is None else NamedSharding(mesh, PartitionSpec(*sharding.spec[1:]))
    stacked = jnp.zeros(variable.shape, variable.dtype, device=sharding)
    for group in range(config.num_groups):
        layer = group * len(config.layer_pattern) + position
        stacked = _set_slice(stacked, group, _read_layer_param(source, inner, layer, variable, layer_sharding))
    return stacked


def stored_experts(source: TensorSource) -> str:
    """The expert format `source` stores: "bfloat16" for dense experts, else "mxfp4"."""
    return "bfloat16" if source.dense_experts else "mxfp4"


def _sharding(mesh: Mesh | None, axes: tuple, shape: tuple, name: str, training: bool) -> NamedSharding | None:
    if mesh is None:
        return None
    return NamedSharding(mesh, spec_for(axes, shape, mesh, name, fully=fsdp("frozen" if training else None, axes)))


def _read_layer_param(
    source: TensorSource, inner: tuple, layer: int, variable: nnx.Variable, sharding: NamedSharding | None
) -> jax.Array:
    shape, dtype = variable.shape[1:], variable.dtype
    if inner in DENSE_EXPERTS:
        prefix = PER_LAYER[DENSE_EXPERTS[inner] + ("blocks",)].format(n=layer)
        if source.dense_experts:
            return _place(source.read_dense_experts(prefix), dtype, sharding)
        blocks = source.read(prefix)
        scales = source.read(prefix.removesuffix("_blocks") + "_scales")
        if sharding is not None:  # decode each device's share only: blocks split like the weight's rows
            spec = sharding.spec
            blocks = jax.device_put(blocks, NamedSharding(sharding.mesh, PartitionSpec(*spec, None)))
            scales = jax.device_put(scales, sharding)
        return _dequantize(blocks, scales, dtype, sharding)
    if inner[-1] in STORED:  # packed experts laid out for the Pallas kernels: converted on the host
        stored = source.read(PER_LAYER[(*inner[:-1], STORED[inner[-1]])].format(n=layer))
        return _place(variable_from_checkpoint(inner[-1], inner[-2], stored), dtype, sharding)
    return _place(source.read(PER_LAYER[inner].format(n=layer)).reshape(shape), dtype, sharding)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _dequantize(blocks: jax.Array, scales: jax.Array, dtype, sharding: NamedSharding | None) -> jax.Array:
    weights = mxfp4.dequantize(blocks, scales, dtype)
    return weights if sharding is None else jax.lax.with_sharding_constraint(weights, sharding)


def _in_form(value: np.ndarray, shape: tuple) -> np.ndarray:
    """A checkpoint's top-level tensor (or rows of it) in the form the model holds: zero columns up to the
    variable's width (a TPU model's embedding, see Runtime.embedding_width), or in blocks of 16 rows (a
    CPU model's unembedding, see Runtime.unembedding_in_blocks)."""
    if len(shape) == 3 and value.ndim == 2:
        return to_blocks(value)
    extra = shape[-1] - value.shape[-1]
    return value if extra <= 0 else np.pad(value, [(0, 0)] * (value.ndim - 1) + [(0, extra)])


def _place(value: np.ndarray, dtype, sharding: NamedSharding | None) -> jax.Array:
    """A host array on the device(s): with a sharding, each device receives only its slice."""
    value = value if value.dtype == dtype else value.astype(dtype)
    return jnp.asarray(value) if sharding is None else jax.device_put(value, sharding)


# Tensors bigger than this (the embedding and unembedding: 1.16 GB each at 20b) are read a block of rows at
# a time into their place, so loading never holds one twice.
BIG_TENSOR_BYTES = 256 * 2**20


def _nbytes(variable: nnx.Variable) -> int:
    return math.prod(variable.shape) * jnp.dtype(variable.dtype).itemsize


def _read_in_pieces(source: TensorSource, name: str, variable: nnx.Variable) -> jax.Array:
    per_row = BLOCK if len(variable.shape) == 3 else 1  # the checkpoint's rows a row of the variable holds
    rows = variable.shape[0] * per_row
    step = max(1, rows * BIG_TENSOR_BYTES // (4 * _nbytes(variable)))  # pieces of a quarter of the threshold
    step = max(per_row, step // per_row * per_row)  # whole blocks
    out = jnp.zeros(variable.shape, variable.dtype)
    for start in range(0, rows, step):
        piece = _in_form(source.read_rows(name, start, min(rows, start + step)), variable.shape)
        out = _set_rows(out, start // per_row, jnp.asarray(piece.astype(variable.dtype, copy=False)))
    return out


_set_rows = jax.jit(lambda whole, start, rows: jax.lax.dynamic_update_slice_in_dim(whole, rows, start, 0), donate_argnums=0)

# Donating the stack lets XLA write the slice in place instead of copying the whole stack per layer.
_set_slice = jax.jit(lambda stacked, index, value: stacked.at[index].set(value), donate_argnums=0)


def resident_bytes(model: GptOss) -> int:
    """Bytes held by the model's arrays (parameters and packed expert bytes)."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model)))

