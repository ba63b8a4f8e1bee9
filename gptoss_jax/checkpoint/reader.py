"""Find a checkpoint (hub layout, original layout, or a hub repo id) and read its tensors one at a time.

Every tensor is addressed by its hub-layout name whatever the layout on disk, and checked against the
shape and dtype the config implies before anyone uses it. Every failure is a CheckpointError or a
ConfigError whose one-line message names the path, file or tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from gptoss_jax import mxfp4
from gptoss_jax.checkpoint import names
from gptoss_jax.config import GptOssConfig
from gptoss_jax.errors import CheckpointError, ConfigError

HUB_INDEX = "model.safetensors.index.json"
HUB_SINGLE = "model.safetensors"
# What to fetch of a hub repo: the hub layout and the tokenizer files, not the duplicate original/ folder.
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    HUB_INDEX,
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template.jinja",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class TensorSource:
    """Tensors of one checkpoint by hub name, read lazily from safetensors files.

    Expert weights are addressed by their MXFP4 names (`*_blocks`, `*_scales`) whatever the storage; a
    checkpoint that stores them as bf16 (`dense_experts`) quantizes them on read, and
    `read_dense_experts` gives the float weights of either storage.
    """

    layout: str
    dense_experts = False

    def __init__(self, directory: Path, config: GptOssConfig, files: dict[str, Path]):
        self.directory = directory
        self.config = config
        self._file_of = files  # stored tensor name -> file
        self._expected = names.hub_tensor_shapes(config)
        self._quantized: tuple[str, tuple[np.ndarray, np.ndarray]] | None = None  # blocks and scales come together

    def check_complete(self, stored: names.Shapes) -> "TensorSource":
        """Fail early, naming the first stored tensor the config needs that no file holds."""
        missing = [name for name in stored if name not in self._file_of]
        if missing:
            raise CheckpointError(
                f"{self.directory}: tensor {missing[0]!r} is missing from the checkpoint "
                f"({len(missing)} missing in all)"
            )
        return self

    def shards(self) -> dict[str, list[str]]:
        """Hub tensor names grouped by the hub-layout file that holds (or would hold) them, in layout order.

        A sharded hub checkpoint keeps its own files; anything else is one `model.safetensors`.
        """
        out: dict[str, list[str]] = {}
        for name in self._expected:
            file = self._describe(name).name if self.layout == "hub" else HUB_SINGLE
            out.setdefault(file, []).append(name)
        return out

    def read_dense_experts(self, blocks_name: str) -> np.ndarray:
        """The float32 weights [E, out, in] of the expert tensor pair `blocks_name` (and its `_scales`)."""
        if self.dense_experts:
            return np.swapaxes(self._read_dense(blocks_name), 1, 2).astype(np.float32)
        return mxfp4.dequantize_experts(self.read(blocks_name), self.read(blocks_name.removesuffix("_blocks") + "_scales"))

    def _read_dense(self, blocks_name: str) -> np.ndarray:
        stored = names.dense_expert_name(blocks_name)
        value = self._read_stored(stored)
        shape, dtype = names.dense_expert_hub_shapes(self.config)[stored]
        if tuple(value.shape) != shape or value.dtype.name != dtype:
            raise CheckpointError(
                f"{self._file_of[stored]}: tensor {stored!r} is {value.dtype.name}{list(value.shape)}, "
                f"expected {dtype}{list(shape)} for this config"
            )
        return value

    def read(self, name: str) -> np.ndarray:
        """The hub tensor `name`, checked against the shape and dtype the config implies."""
        if self.dense_experts and name.endswith(("_blocks", "_scales")):
            blocks_name = name.removesuffix("_scales") + "_blocks" if name.endswith("_scales") else name
            if self._quantized is None or self._quantized[0] != blocks_name:
                self._quantized = (blocks_name, mxfp4.quantize_experts(np.swapaxes(self._read_dense(blocks_name), 1, 2)))
            return self._quantized[1][name.endswith("_scales")]
        value = self._read_hub(name)
        shape, dtype = self._expected[name]
        if tuple(value.shape) != shape or value.dtype.name != dtype:
            raise CheckpointError(
                f"{self._describe(name)}: tensor {name!r} is {value.dtype.name}{list(value.shape)}, "
                f"expected {dtype}{list(shape)} for this config"
            )
        return value

    def _read_hub(self, name: str) -> np.ndarray:
        return self._read_stored(name)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of the hub tensor `name`, so that a big one need not be in memory twice (as
        read and as placed). Read from the file alone in the hub layout; the other layouts slice `read`."""
        if self.layout != "hub":
            return self.read(name)[start:stop]
        shape, dtype = self._expected[name]
        path = self._describe(name)
        try:
            with safe_open(str(path), framework="numpy") as handle:
                piece = handle.get_slice(name)
                if tuple(piece.get_shape()) != shape:
                    raise CheckpointError(f"{path}: tensor {name!r} is {list(piece.get_shape())}, expected {list(shape)}")
                rows = piece[start:stop]
        except (SafetensorError, OSError, ValueError, TypeError) as bad:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({_first_line(bad)})") from None
        if rows.dtype.name != dtype:
            raise CheckpointError(f"{path}: tensor {name!r} is {rows.dtype.name}, expected {dtype}")
        return rows

    def _describe(self, name: str) -> Path:
        if self.dense_experts and name.endswith(("_blocks", "_scales")):
            name = names.dense_expert_name(name.removesuffix("_scales") + "_blocks")
        return self._file_of.get(name, self.directory)

    def _read_stored(self, stored: str) -> np.ndarray:
        if stored not in self._file_of:
            raise CheckpointError(f"{self.directory}: tensor {stored!r} is missing from the checkpoint")
        path = self._file_of[stored]
        # Open per tensor: a handle kept open keeps its memory-mapped pages resident, which would hold a
        # second copy of the checkpoint in memory while loading.
        try:
            with safe_open(str(path), framework="numpy") as handle:
                if stored not in handle.keys():
                    raise CheckpointError(f"{path}: tensor {stored!r} is not in this file although the index names it")
                return handle.get_tensor(stored)
        except (SafetensorError, OSError, ValueError, TypeError) as bad:
            raise CheckpointError(f"{path}: cannot read tensor {stored!r} ({_first_line(bad)})") from None


class HubSource(TensorSource):
    layout = "hub"


class MemorySource(TensorSource):
    """Hub-named tensors already in memory (random weights for benchmarks, weights from another library)."""

    layout = "memory"

    def __init__(self, config: GptOssConfig, tensors: dict[str, np.ndarray]):
        super().__init__(Path("<memory>"), config, {name: Path("<memory>") for name in tensors})
        self._tensors = tensors
        self.check_complete(names.hub_tensor_shapes(config))

    def _read_stored(self, stored: str) -> np.ndarray:
        return self._tensors[stored]


class OriginalSource(TensorSource):
    """OpenAI's original layout: renamed tensors, and q, k, v stacked in one qkv tensor per layer."""

    layout = "original"

    def __init__(self, directory: Path, config: GptOssConfig, files: dict[str, Path]):
        super().__init__(directory, config, files)
        self._last: tuple[str, np.ndarray] | None = None  # q, k and v come from the same qkv tensor

    def _read_hub(self, name: str) -> np.ndarray:
        stored, rows = names.original_location(name, self.config)
        if self._last is None or self._last[0] != stored:
            self._last = (stored, self._read_stored(stored))
        value = self._last[1]
        return value if rows is None else value[rows[0] : rows[1]]

    def _describe(self, name: str) -> Path:
        return self._file_of.get(names.original_location(name, self.config)[0], self.directory)


def open_checkpoint(path_or_repo_id: str | Path) -> TensorSource:
    """Detect the layout of a folder (or fetch a hub repo id) and index its tensors."""
    directory = _resolve(path_or_repo_id)
    config_path = directory / "config.json"
    if config_path.is_file():
        values = _read_json(config_path)
        if "model_type" in values:
            return _open_hub(directory, GptOssConfig.from_hub_config(values, str(config_path)))
        if "num_experts" in values and "experts_per_token" in values:
            return _open_original(directory, GptOssConfig.from_original_config(values, str(config_path)))
        raise ConfigError(f"{config_path}: neither a hub config (no model_type) nor an original-layout config")
    if (directory / "original" / "config.json").is_file():
        return open_checkpoint(directory / "original")
    raise CheckpointError(
        f"{directory}: no checkpoint found (expected config.json with {HUB_INDEX} or {HUB_SINGLE}, "
        "or an original/ folder)"
    )


def _resolve(path_or_repo_id: str | Path) -> Path:
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint folder, got a file")
    if isinstance(path_or_repo_id, str) and _REPO_ID.match(path_or_repo_id):
        return _download(path_or_repo_id)
    raise CheckpointError(f"{path}: no such file or directory")


def _download(repo_id: str) -> Path:
    """Fetch (or find in the local cache) the hub layout of `repo_id` through huggingface_hub."""
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as bad:  # the hub raises many types (offline, not found, gated, HTTP); all mean the same here
        raise CheckpointError(
            f"{repo_id}: not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(bad).__name__}: {_first_line(bad)})"
        ) from None


def _open_hub(directory: Path, config: GptOssConfig) -> HubSource:
    index_path = directory / HUB_INDEX
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no weight_map")
        files = {name: directory / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise CheckpointError(f"{index_path}: names shard {file.name!r}, which is missing from {directory}")
    elif (directory / HUB_SINGLE).is_file():
        files = {name: directory / HUB_SINGLE for name in _keys(directory / HUB_SINGLE)}
    else:
        raise CheckpointError(f"{directory}: has config.json but neither {HUB_INDEX} nor {HUB_SINGLE}")
    source = HubSource(directory, config, files)
    # bf16 experts (e.g. what transformers saves after dequantizing) instead of MXFP4 pairs
    source.dense_experts = names.dense_expert_name("model.layers.0.mlp.experts.gate_up_proj_blocks") in files
    stored = names.dense_expert_hub_shapes(config) if source.dense_experts else names.hub_tensor_shapes(config)
    return source.check_complete(stored)


def _open_original(directory: Path, config: GptOssConfig) -> OriginalSource:
    index_path = next(iter(sorted(directory.glob("*.safetensors.index.json"))), None)
    if index_path is not None:
        weight_map = _read_json(index_path).get("weight_map") or {}
        files = {name: directory / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise CheckpointError(f"{index_path}: names shard {file.name!r}, which is missing from {directory}")
    else:
        files = {name: path for path in sorted(directory.glob("*.safetensors")) for name in _keys(path)}
    if not files:
        raise CheckpointError(f"{directory}: has an original-layout config.json but no *.safetensors files")
    return OriginalSource(directory, config, files).check_complete(names.original_tensor_shapes(config))


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, ValueError) as bad:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(bad)})") from None


def _read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as bad:
        raise CheckpointError(f"{path}: not readable JSON ({_first_line(bad)})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return values


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
