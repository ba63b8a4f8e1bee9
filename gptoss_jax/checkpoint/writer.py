"""Write gpt-oss checkpoints in the two released layouts (spec section 3), atomically.

Everything is written into a temporary sibling directory which is then renamed into place, so a failure
leaves neither a half-written checkpoint nor a stray temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from gptoss_jax.checkpoint.names import BF16, check_tensors, hub_to_original, hub_tensor_shapes
from gptoss_jax.config import GptOssConfig

# transformers refuses safetensors files whose metadata does not say format "pt".
_METADATA = {"format": "pt"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


def shard_file_name(index: int, count: int) -> str:
    """`model-00000-of-00002.safetensors`: 0-indexed, and "of" names the last index (count - 1)."""
    return f"model-{index:05d}-of-{count - 1:05d}.safetensors"


def _as_numpy(tensors: Mapping[str, Any], expected: Mapping[str, tuple[tuple[int, ...], str]]) -> dict[str, np.ndarray]:
    """numpy arrays in the expected order; float arrays meant to be bf16 are rounded to bf16."""
    out = {}
    for name, value in tensors.items():
        array = np.asarray(value)
        if name in expected and expected[name][1] == BF16 and array.dtype != ml_dtypes.bfloat16:
            if np.issubdtype(array.dtype, np.floating):
                array = array.astype(ml_dtypes.bfloat16)
        out[name] = array
    ordered = {name: out[name] for name in expected if name in out}
    ordered.update({name: out[name] for name in out if name not in ordered})
    return ordered


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _save(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    save_file({name: np.ascontiguousarray(t) for name, t in tensors.items()}, str(path), metadata=_METADATA)


def hub_config_json(config: GptOssConfig) -> dict[str, Any]:
    hub = config.to_hub_config()
    # The released token ids (pad 199999, eos 200002) do not exist in a small test vocabulary, and
    # transformers' nn.Embedding rejects a padding_idx outside it: leave such ids out.
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        token = hub.get(key)
        if isinstance(token, int) and token >= config.vocab_size:
            hub[key] = None
    return hub


class _AtomicDirectory:
    """A temporary sibling of `target`, renamed onto it on success and deleted on failure."""

    def __init__(self, target: str | os.PathLike, overwrite: bool):
        self.target = Path(target)
        if self.target.exists():
            if not self.target.is_dir():
                raise ValueError(f"{self.target}: exists and is not a directory")
            if any(self.target.iterdir()) and not overwrite:
                raise ValueError(
                    f"{self.target}: directory exists and is not empty (pass overwrite=True to replace it)"
                )
        self.target.parent.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Path:
        self.temp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.temp

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            return
        try:
            self.temp.chmod(0o755)  # mkdtemp makes it 0700
            old = None
            if self.target.exists():
                if any(self.target.iterdir()):
                    old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.target.parent))
                    os.replace(self.target, old / "dir")
                else:
                    self.target.rmdir()
            os.replace(self.temp, self.target)
        except BaseException:
            shutil.rmtree(self.temp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_hub_checkpoint(
    directory: str | os.PathLike,
    config: GptOssConfig,
    tensors: Mapping[str, Any],
    *,
    max_shard_bytes: int | None = None,
    single_file: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the Hugging Face hub layout: `config.json` plus safetensors shards and their index.

    `tensors` must hold exactly the names, shapes and dtypes of `names.hub_tensor_shapes(config)` (float
    arrays are rounded to bf16 where bf16 is expected). With `single_file` everything goes into
    `model.safetensors`; otherwise the tensors are split greedily, in `hub_tensor_shapes` order, into shards
    of at most `max_shard_bytes` (a larger tensor gets a shard of its own) named
    `model-0000i-of-0000K.safetensors`, with `model.safetensors.index.json`. By default there are two
    shards, split where the running size passes half the total. Returns the directory.
    """
    expected = hub_tensor_shapes(config)
    arrays = _as_numpy(tensors, expected)
    check_tensors(arrays, expected, "write_hub_checkpoint")
    total = sum(int(a.nbytes) for a in arrays.values())
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")

    shards: list[dict[str, np.ndarray]] = []
    if single_file:
        shards.append(arrays)
    elif max_shard_bytes is None:
        # Two shards: the tensors that start before the halfway mark, and the rest.
        shards = [{}, {}]
        offset = 0
        for name, array in arrays.items():
            shards[0 if 2 * offset < total else 1][name] = array
            offset += array.nbytes
        shards = [shard for shard in shards if shard]
    else:
        size = 0
        for name, array in arrays.items():
            if not shards or (size and size + array.nbytes > max_shard_bytes):
                shards.append({})
                size = 0
            shards[-1][name] = array
            size += array.nbytes

    with _AtomicDirectory(directory, overwrite) as temp:
        _write_json(temp / CONFIG_FILE, hub_config_json(config))
        if single_file:
            _save(temp / SINGLE_FILE, arrays)
        else:
            weight_map = {}
            for index, shard in enumerate(shards):
                file_name = shard_file_name(index, len(shards))
                _save(temp / file_name, shard)
                weight_map.update({name: file_name for name in shard})
            _write_json(temp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return Path(directory)


def write_hub_shards(
    directory: str | os.PathLike,
    config_json: Mapping[str, Any],
    shards: Mapping[str, Callable[[], Mapping[str, np.ndarray]]],
    *,
    copy_files: Sequence[Path] = (),
    overwrite: bool = False,
) -> Path:
    """Write a hub-layout checkpoint one shard at a time: `shards` maps each file name to a function that
    makes its tensors, called when that file is written (so one shard is in memory at once). With more
    than one file an index is written. `copy_files` (tokenizer files, ...) are copied alongside.
    """
    with _AtomicDirectory(directory, overwrite) as temp:
        _write_json(temp / CONFIG_FILE, dict(config_json))
        weight_map, total = {}, 0
        for file_name, make in shards.items():
            tensors = make()
            _save(temp / file_name, tensors)
            weight_map.update({name: file_name for name in tensors})
            total += sum(int(np.asarray(t).nbytes) for t in tensors.values())
        if len(shards) > 1:
            _write_json(temp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        for path in copy_files:
            shutil.copy2(path, temp / Path(path).name)
    return Path(directory)


def write_original_checkpoint(
    directory: str | os.PathLike,
    config: GptOssConfig,
    hub_tensors: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write OpenAI's original layout (what `gpt_oss.torch.model.Transformer.from_checkpoint` loads):
    `config.json` from `config.to_original_config()` and one `model.safetensors` with original names.

    Takes hub-named tensors (as `write_hub_checkpoint` does) and renames them via `names.hub_to_original`.
    """
    original_json = config.to_original_config()  # raises ConfigError for layer patterns it cannot describe
    arrays = _as_numpy(hub_tensors, hub_tensor_shapes(config))
    original = hub_to_original(arrays, config)
    with _AtomicDirectory(directory, overwrite) as temp:
        _write_json(temp / CONFIG_FILE, original_json)
        _save(temp / SINGLE_FILE, original)
    return Path(directory)
