"""Write a fine-tuned model back to the Hugging Face hub layout, loadable by transformers, vLLM or us.

    python -m train.export --base openai/gpt-oss-20b --adapters runs/sft-20b --out gpt-oss-20b-sft
    python -m train.export --base <ckpt> --adapters <run dir> --out <dir> --experts bfloat16 --step 200

LoRA runs: each adapted weight gets its adapter's update merged in (experts re-quantized to MXFP4 with the
same block format, or written as bf16 with --experts bfloat16); every other tensor is copied from the
base unchanged, byte for byte. Full fine-tuning runs: every weight comes from the run. The output keeps
the base's shard files (one model.safetensors for an original-layout base), is written one shard at a
time, and appears only when complete. Tokenizer files next to the base are copied.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
import yaml
from flax import nnx

import gptoss_jax
from gptoss_jax import mxfp4
from gptoss_jax.chat import harmony
from gptoss_jax.cli import run_command
from gptoss_jax.checkpoint import names
from gptoss_jax.checkpoint.names import DENSE_EXPERTS, PER_LAYER, TOP_LEVEL
from gptoss_jax.checkpoint.reader import HUB_INDEX, HUB_PATTERNS, TensorSource, open_checkpoint
from gptoss_jax.checkpoint.writer import hub_config_json, write_hub_shards
from gptoss_jax.config import AUTO, EXPERT_CHOICES, check_experts
from gptoss_jax.errors import ConfigError
from gptoss_jax.lora import LoRAConfig, add_lora, merged_update
from gptoss_jax.nn import GptOss
from train.config import from_dict
from train.loop import restore_params
from train.model import experts_to_load

# The weight each LoRA target adapts, as a model parameter path (the loader's tables name its tensors).
TARGET_PARAMS = {
    "q": ("attn", "q_proj"),
    "k": ("attn", "k_proj"),
    "v": ("attn", "v_proj"),
    "o": ("attn", "o_proj"),
    "router": ("mlp", "router"),
    "mlp1": ("mlp", "mlp1", "blocks"),
    "mlp2": ("mlp", "mlp2", "blocks"),
}
_NOT_COPIED = ("config.json", "model*.safetensors", HUB_INDEX)


def _run_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    try:
        values = yaml.safe_load(path.read_text())
    except OSError:
        raise ConfigError(f"{path}: missing (not a training run directory?)") from None
    if not isinstance(values, dict) or "lora" not in values:
        raise ConfigError(f"{path}: not a training run config (no 'lora' key)")
    return values


def _run_lora(run_dir: Path) -> LoRAConfig | None:
    """The run's adapter settings; None for a full fine-tuning run."""
    lora = _run_config(run_dir)["lora"]
    return None if lora is None else from_dict(LoRAConfig, lora, "lora.")


def _restore_run(model: GptOss, run_dir: Path, lora: LoRAConfig | None, step: int | None) -> tuple[GptOss, dict, int]:
    """`model` with the run's trained weights (adapters attached first for a LoRA run), the weights, the step."""
    if lora is not None:
        model = add_lora(model, lora)
    graphdef, trained, rest = nnx.split(model, nnx.Param if lora is None else nnx.LoRAParam, ...)
    params, step = restore_params(run_dir, nnx.to_pure_dict(trained), step)
    nnx.replace_by_pure_dict(trained, params)
    return nnx.merge(graphdef, trained, rest), params, step


def load_trained(
    base: str | Path, run_dir: str | Path, *, dtype: str = "bfloat16", step: int | None = None, mesh=None
) -> GptOss:
    """The base model with a run's training applied (adapters kept separate, not merged): to chat with or
    evaluate a fine-tuned model without exporting it."""
    lora = _run_lora(Path(run_dir))
    # As the run held them: a LoRA run's frozen experts in its `experts` setting; a full run trains them dense.
    experts = experts_to_load(lora is None, _run_config(Path(run_dir)).get("experts", AUTO))
    # A full run's weights are restored over the model's: its unembedding in the form training kept.
    runtime = None if lora is not None else gptoss_jax.Runtime.default().for_training()
    model = gptoss_jax.load(base, dtype=dtype, experts=experts, mesh=mesh, runtime=runtime)
    return _restore_run(model, Path(run_dir), lora, step)[0]


class _Trained:
    """New values of the tensors a run changed, by hub name; the rest is read from the base."""

    def __init__(self, source: TensorSource, run_dir: Path, step: int | None):
        self.source, self.config = source, source.config
        self.lora = _run_lora(run_dir)
        experts = "mxfp4" if self.lora is not None else "bfloat16"
        # Shapes only: the base's weights are read tensor by tensor as the shards are written.
        abstract = nnx.eval_shape(lambda: GptOss(self.config, dtype="float32", experts=experts, rngs=nnx.Rngs(0)))
        self.model, self.params, self.step = _restore_run(abstract, run_dir, self.lora, step)
        # hub name -> a function making the (unquantized, float32) weight it should now hold, or None
        self.changed: dict[str, Callable[[], np.ndarray | None]] = {}
        # Whether the run changed expert weights (a full run, or adapters on mlp1/mlp2).
        self.trained_experts = self.lora is None or bool({"mlp1", "mlp2"} & set(self.lora.targets))
        if self.lora is None:
            self._map_full_run()
        else:
            self._map_adapters()

    def _map_adapters(self) -> None:
        for layer in range(self.config.num_layers):
            for target in self.lora.targets:
                name = PER_LAYER[TARGET_PARAMS[target]].format(n=layer)
                self.changed[name] = lambda name=name, layer=layer, target=target: self._merged(name, layer, target)

    def new_value(self, name: str) -> np.ndarray | None:
        """The float32 weight tensor `name` should now hold, or None if the run left it unchanged."""
        make = self.changed.get(name)
        return None if make is None else make()

    def _merged(self, name: str, layer: int, target: str) -> np.ndarray | None:
        update = merged_update(self.model, layer, target)
        if not update.any():  # an adapter that never trained: keep the base's bytes (and its -0.0s)
            return None
        if target in ("mlp1", "mlp2"):
            base = self.source.read_dense_experts(name)
        else:
            base = self.source.read(name).astype(np.float32)
        return base + update.reshape(base.shape)

    def _map_full_run(self) -> None:
        pattern = len(self.config.layer_pattern)
        for path, name in TOP_LEVEL.items():
            self.changed[name] = lambda path=path: self._value(path)
        dense = {hub_path: model_path for model_path, hub_path in DENSE_EXPERTS.items()}
        for inner, template in PER_LAYER.items():
            if inner[-1] == "scales":
                continue
            inner = dense.get(inner[:-1], inner) if inner[-1] == "blocks" else inner
            for layer in range(self.config.num_layers):
                group, position = divmod(layer, pattern)
                path = ("groups", "layers", position, *inner)
                self.changed[template.format(n=layer)] = lambda path=path, group=group: self._value(path)[group]

    def _value(self, path: tuple) -> np.ndarray:
        value = self.params
        for key in path:
            value = value[key]
        return np.asarray(value, np.float32)


def _output_shards(trained: _Trained, experts: str) -> dict[str, Callable[[], dict[str, np.ndarray]]]:
    """File name -> a function making that file's tensors, following the base's files."""
    source = trained.source
    expected = names.hub_tensor_shapes(source.config)

    def expert_pair(blocks_name: str):
        """MXFP4 (blocks, scales), or the dense float weights for --experts bfloat16."""
        new = trained.new_value(blocks_name)
        if experts == "bfloat16":
            return source.read_dense_experts(blocks_name) if new is None else new
        if new is None:  # unchanged: the base's bytes
            return source.read(blocks_name), source.read(blocks_name.removesuffix("_blocks") + "_scales")
        return mxfp4.quantize_experts(new)

    def make(file_names: list[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        pairs: dict[str, tuple[np.ndarray, np.ndarray] | np.ndarray] = {}  # blocks and scales come together
        for name in file_names:
            is_scales = name.endswith("_scales")
            blocks_name = name.removesuffix("_scales") + "_blocks" if is_scales else name
            if blocks_name.endswith("_blocks"):
                if blocks_name not in pairs:
                    pairs[blocks_name] = expert_pair(blocks_name)
                if experts == "mxfp4":
                    out[name] = pairs[blocks_name][int(is_scales)]
                elif not is_scales:  # the hub's dense layout stores experts [E, in, out]
                    dense = np.swapaxes(pairs[blocks_name], 1, 2).astype(ml_dtypes.bfloat16)
                    out[names.dense_expert_name(name)] = dense
                continue
            new = trained.new_value(name)
            if new is None:
                out[name] = source.read(name)  # unchanged: the base's bytes
            else:  # a model parameter split into heads goes back to the hub's flat shape
                out[name] = new.reshape(expected[name][0]).astype(ml_dtypes.bfloat16)
        return out

    return {file: (lambda file_names=file_names: make(file_names)) for file, file_names in source.shards().items()}


def _config_json(source: TensorSource, experts: str) -> dict:
    if source.layout == "hub":
        values = json.loads((source.directory / "config.json").read_text())
    else:
        values = hub_config_json(source.config)
    if experts == "bfloat16":
        values.pop("quantization_config", None)
    return values


def _tokenizer_files(directory: Path) -> list[Path]:
    patterns = [pattern for pattern in HUB_PATTERNS if pattern not in _NOT_COPIED] + [harmony.VOCAB_FILE]
    return sorted(path for path in directory.iterdir() if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in patterns))


def export(
    base: str | Path,
    run_dir: str | Path,
    out: str | Path,
    *,
    experts: str = AUTO,
    step: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the base checkpoint with the run's training applied to `out` (hub layout); returns `out`.

    experts: "auto" (default) stores them as the base does (MXFP4 for the released checkpoints, bf16 for a
    bf16 base); "bfloat16" keeps trained experts exact; "mxfp4" quantizes (a notice says when that rounds
    weights the run trained)."""
    source = open_checkpoint(base)
    if check_experts(experts) == AUTO:
        experts = "bfloat16" if source.dense_experts else "mxfp4"
    trained = _Trained(source, Path(run_dir), step)
    if experts == "mxfp4" and trained.trained_experts:
        print(
            "note: the run's trained expert weights are rounded to MXFP4 (the base's format); "
            "--experts bfloat16 keeps them exact",
            file=sys.stderr,
        )
    return write_hub_shards(
        out,
        _config_json(source, experts),
        _output_shards(trained, experts),
        copy_files=_tokenizer_files(source.directory),
        overwrite=overwrite,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the checkpoint the run started from (folder or hub repo id)")
    parser.add_argument("--adapters", required=True, help="the run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    parser.add_argument(
        "--experts", default=AUTO, choices=EXPERT_CHOICES,
        help="auto: as the base stores them (MXFP4 for the released models); bfloat16 keeps trained experts exact",
    )  # fmt: skip
    parser.add_argument("--step", type=int, help="which checkpoint of the run (default: the latest)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, scratch: Path) -> int:
    out = export(args.base, args.adapters, args.out, experts=args.experts, step=args.step, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
