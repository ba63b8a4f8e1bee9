"""Converted checkpoints: the model's arrays as one orbax checkpoint, experts still packed, so that loading
onto a mesh restores each array straight into its sharding and each process reads only the parts its
devices hold (a pod's hosts do not each read the whole safetensors).

    python -m gptoss_jax.convert openai/gpt-oss-20b gpt-oss-20b-orbax
    model = gptoss_jax.load("gpt-oss-20b-orbax", mesh=mesh)

A converted folder holds config.json (the hub config), the source's tokenizer files, gptoss_jax.json
(what was converted) and state/, one orbax checkpoint per array, written one at a time. The arrays are
stored in one canonical form, the checkpoint's (MXFP4 blocks [E, out, G, 16] and scales, the embedding
at its own width, dense weights bf16); the form a platform runs (the TPU's expert layout, a padded embedding, another dtype) is made on its devices after
restoring. Converting back to safetensors is train.export's job.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from gptoss_jax import mxfp4
from gptoss_jax.backends.cpu import huge_pages
from gptoss_jax.backends.cpu.blocks import to_blocks
from gptoss_jax.backends.tpu.expert_form import STORED, variable_from_checkpoint
from gptoss_jax.checkpoint.reader import open_checkpoint
from gptoss_jax.checkpoint.writer import CONFIG_FILE, hub_config_json
from gptoss_jax.config import AUTO, GptOssConfig, check_experts
from gptoss_jax.errors import CheckpointError, ConfigError
from gptoss_jax.nn import GptOss
from gptoss_jax.runtime import Runtime
from gptoss_jax.sharding import fsdp, set_mesh, spec_for

MARKER = "gptoss_jax.json"
FORMAT = "gptoss_jax orbax checkpoint"
STATE = "state"
# The form stored: what a CPU model without kernels holds (checkpoint expert layout, unpadded embedding).
CANONICAL = Runtime("cpu")
WEIGHT_FILES = (".safetensors", ".safetensors.index.json", CONFIG_FILE)


def is_converted(path: str | Path) -> bool:
    return (Path(path).expanduser() / MARKER).is_file()


def convert(source: str | Path, destination: str | Path) -> Path:
    """Write `source` (a checkpoint folder in either layout, or a hub repo id) as a converted checkpoint
    in `destination`, a new or empty folder; written under a temporary name and renamed into place."""
    destination = Path(destination).expanduser()
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise ConfigError(f"{destination}: already exists and is not an empty folder (convert writes a new one)")
    checkpoint = open_checkpoint(source)
    from gptoss_jax.checkpoint.load import read_variable, stored_experts

    experts = stored_experts(checkpoint)
    _remove_abandoned(destination)
    partial = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
    try:
        partial.mkdir(parents=True)
        # One array at a time, each its own orbax checkpoint: orbax copies what it saves, and a copy of
        # the whole model at once would not fit beside it (20b: 13 GB; peak RSS 15.8 GB measured).
        with ocp.StandardCheckpointer() as checkpointer:
            for key, variable in _by_path(nnx.state(_canonical_model(checkpoint.config, experts))).items():
                value = np.asarray(read_variable(checkpoint, key, variable))
                checkpointer.save((partial / STATE / _name(key)).absolute(), {"value": value})
                checkpointer.wait_until_finished()
                del value
        (partial / CONFIG_FILE).write_text(json.dumps(hub_config_json(checkpoint.config), indent=2) + "\n")
        for file in sorted(checkpoint.directory.iterdir()):  # the tokenizer and chat template travel along
            if file.is_file() and not file.name.endswith(WEIGHT_FILES):
                shutil.copy2(file, partial / file.name)
        marker = {"format": FORMAT, "version": 1, "experts": experts, "source": str(source)}
        (partial / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if destination.exists():
            destination.rmdir()
        os.replace(partial, destination)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return destination


def _remove_abandoned(destination: Path) -> None:
    """Remove what conversions into `destination` that were killed (no cleanup possible) left behind."""
    for partial in destination.parent.glob(f".{destination.name}.partial-*"):
        pid = partial.name.rpartition("-")[2]
        try:
            os.kill(int(pid), 0)  # still running: its conversion, not ours to touch
        except (ValueError, ProcessLookupError):
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:
            pass


def read_marker(path: Path) -> dict:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as bad:
        raise CheckpointError(f"{path / MARKER}: not readable JSON ({bad})") from None
    if marker.get("format") != FORMAT or marker.get("experts") not in ("mxfp4", "bfloat16"):
        raise CheckpointError(f"{path / MARKER}: not a {FORMAT} marker")
    return marker


def load_converted(
    path: str | Path, dtype: str, experts: str, mesh: Mesh | None, runtime: Runtime | None, training: bool
) -> GptOss:
    """The model of a converted checkpoint (see gptoss_jax.load for the arguments). Each array is
    restored straight into its sharding on `mesh`, then put in the form the runtime runs."""
    path = Path(path).expanduser()
    stored = read_marker(path)["experts"]
    config_file = path / CONFIG_FILE
    config = GptOssConfig.from_hub_config(json.loads(config_file.read_text()), str(config_file))
    experts = stored if check_experts(experts) == AUTO else experts
    if experts == "mxfp4" and stored == "bfloat16":
        raise ConfigError(f"{path}: stores bf16 experts; quantizing them (experts='mxfp4') needs the safetensors source")
    runtime = Runtime.default() if runtime is None else runtime
    runtime = runtime.for_training() if training else runtime
    device = jax.devices()[0]

    def placement(variable: nnx.Variable, name: str) -> jax.sharding.Sharding:
        if mesh is None:
            return jax.sharding.SingleDeviceSharding(device)
        fully = fsdp("frozen" if training else None, variable.axes)
        return NamedSharding(mesh, spec_for(variable.axes, variable.shape, mesh, name, fully=fully))

    saved = _by_path(nnx.state(_canonical_model(config, stored)))
    target = nnx.eval_shape(lambda: GptOss(config, dtype=dtype, experts=experts, runtime=runtime, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(target)

    with ocp.StandardCheckpointer() as checkpointer:

        def restore(key: tuple) -> jax.Array:
            """One stored array, restored straight into its sharding (each process reads its part)."""
            item, variable = path / STATE / _name(key), saved[key]
            where = jax.ShapeDtypeStruct(variable.shape, variable.dtype, sharding=placement(variable, _name(key)))
            try:
                return checkpointer.restore(item.absolute(), {"value": where})["value"]
            except (ValueError, FileNotFoundError, KeyError) as bad:
                raise CheckpointError(f"{item}: cannot be restored into this model ({str(bad).splitlines()[0]})") from None

        def fill(key_path: tuple, variable: nnx.Variable) -> nnx.Variable:  # one variable at a time
            key = variable_key(key_path)
            return variable.replace(_in_form(key, variable, saved, restore, placement(variable, _name(key)), path))

        state = jax.tree_util.tree_map_with_path(fill, state, is_leaf=lambda leaf: isinstance(leaf, nnx.Variable))
    model = nnx.merge(graphdef, state)
    huge_pages.advise(jax.tree.leaves(state))  # the CPU's weights onto 2 MiB pages: decoding streams them
    model.checkpoint_dir = str(path)
    return model if mesh is None else set_mesh(model, mesh)


def _in_form(key: tuple, variable: nnx.Variable, saved: dict, restore, sharding, path: Path) -> jax.Array:
    """The target variable's value made from the stored arrays, on its devices."""
    *module, leaf = key
    if key in saved and saved[key].shape == variable.shape:
        value = restore(key)
        if value.dtype == variable.dtype:
            return value
        make = lambda x: x  # noqa: E731
    elif key in saved and key == ("embed",):  # a TPU model's embedding: zero columns up to its width
        value = restore(key)
        make = lambda x: jnp.pad(x, ((0, 0), (0, variable.shape[-1] - x.shape[-1])))  # noqa: E731
    elif key in saved and key == ("unembed",) and variable.ndim == 3:  # a CPU model's, in blocks of 16 rows
        value, make = restore(key), to_blocks
    elif leaf in STORED and (*module, STORED[leaf]) in saved:  # packed experts in the TPU form
        value, make = restore((*module, STORED[leaf])), functools.partial(variable_from_checkpoint, leaf, module[-1])
    elif leaf == "weight" and (*module, "blocks") in saved:  # experts decoded to bf16 (exact)
        value = (restore((*module, "blocks")), restore((*module, "scales")))
        make = lambda pair: mxfp4.dequantize(*pair, jnp.float32)  # noqa: E731
    else:
        raise CheckpointError(f"{path}: holds no array for {_name(key)} {list(variable.shape)}")
    convert = jax.jit(lambda x: make(x).astype(variable.dtype), out_shardings=sharding)
    return convert(value)


def _canonical_model(config: GptOssConfig, experts: str) -> GptOss:
    """The stored form's model, as shapes: bf16, experts as stored, laid out as the checkpoint has them."""
    return nnx.eval_shape(lambda: GptOss(config, dtype="bfloat16", experts=experts, runtime=CANONICAL, rngs=nnx.Rngs(0)))


def variable_key(key_path: tuple) -> tuple:
    """A state path as plain keys: ('groups', 'layers', 0, 'mlp', 'mlp1', 'blocks')."""
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in key_path)


def _name(key: tuple) -> str:
    """A variable's name, also its item's folder in state/: "groups.layers.0.mlp.mlp1.blocks"."""
    return ".".join(map(str, key))


def _by_path(state: nnx.State) -> dict[tuple, nnx.Variable]:
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda leaf: isinstance(leaf, nnx.Variable))[0]
    return {variable_key(key_path): variable for key_path, variable in leaves}
