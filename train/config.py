"""Run configs: YAML files read into frozen dataclasses, any key overridable as `dotted.key=value`.

An unknown key is an error naming it (a typo must not silently train with the default); values are
checked against the field's type ("1e-3" is a string to YAML 1.1, so numbers written that way are read
as numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gptoss_jax.chat.harmony import check_reasoning_effort
from gptoss_jax.cli import add_distributed_args
from gptoss_jax.config import check_experts
from gptoss_jax.errors import ConfigError
from gptoss_jax.lora import LoRAConfig
from gptoss_jax.training import OptimizerConfig

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on harmony conversations (see configs/sft-*.yaml for annotated examples)."""

    checkpoint: str  # a checkpoint folder, a hub repo id, or "random" (a tiny random model written in run_dir)
    data: str  # JSONL, one {"messages": [...]} conversation a line
    run_dir: str
    steps: int = 100
    batch_size: int = 8  # conversations per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 2048  # longer conversations are skipped (and counted)
    dtype: str = "bfloat16"  # compute dtype and frozen weights; trained weights are float32
    experts: str = "auto"  # as the checkpoint stores them (MXFP4 stays packed), or "bfloat16" / "mxfp4"
    reasoning_effort: str = "medium"  # the system message's, for conversations that do not set their own
    lora: LoRAConfig | None = LoRAConfig()  # null: full fine-tuning (every weight; experts held in bf16)
    optimizer: OptimizerConfig = OptimizerConfig()
    save_every: int = 50
    keep: int = 3  # checkpoints kept
    seed: int = 0
    mesh: str = ""  # e.g. "data=2,expert=4"; empty: one device

    def __post_init__(self):
        try:
            check_reasoning_effort(self.reasoning_effort)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        for name in ("steps", "batch_size", "grad_accum", "max_length", "save_every", "keep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_full_run_experts(self.lora is None, check_experts(self.experts))


def check_full_run_experts(full: bool, experts: str) -> None:
    """Full fine-tuning trains the experts, which packed MXFP4 bytes cannot be."""
    if full and experts == "mxfp4":
        raise ConfigError("full fine-tuning (lora: null) needs experts: bfloat16 or auto (MXFP4 bytes cannot be trained)")


def run_arguments(argv: list[str] | None, prog: str, doc: str, example: str) -> argparse.Namespace:
    """What every training command takes: --config FILE, `key=value` overrides, --no-progress,
    --stop-after, and the multi-process options."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    parser.add_argument("--config", help="a YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"override any config key, e.g. {example}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")
    parser.add_argument("--stop-after", type=int, metavar="STEP",
                        help="leave after this step, checkpointed (a time-boxed job; rerun to resume)")  # fmt: skip
    add_distributed_args(parser)
    return parser.parse_args(argv)


def read_config(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """`cls` from a YAML file (optional) with `dotted.key=value` overrides applied on top."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as error:
            raise ConfigError(f"{path}: cannot read config ({error.strerror})") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected key=value")
        target = data
        *parents, leaf = key.split(".")
        for parent in parents:
            if not isinstance(target.get(parent), dict):
                target[parent] = {}
            target = target[parent]
        target[leaf] = yaml.safe_load(value) if value else ""  # `mesh=` is the empty string, not null
    return from_dict(cls, data)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, recursing into nested dataclass fields."""
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise ConfigError(f"unknown config key {prefix + str(unknown[0])!r} (known: {', '.join(fields)})")
    missing = [
        name
        for name, field in fields.items()
        if name not in data and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing config key {prefix + missing[0]!r}")
    values = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    return cls(**values)


def _coerce(kind: Any, value: Any, key: str) -> Any:
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"config key {key!r} cannot be null")
    kind = next(option for option in options if option is not type(None))
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping")
        return from_dict(kind, value, key + ".")
    if kind is dict or typing.get_origin(kind) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping")
        return dict(value)
    if typing.get_origin(kind) is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list")
        return tuple(str(item) for item in items)
    if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif kind is bool and isinstance(value, bool):
        return value
    elif kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"config key {key!r}: expected {kind.__name__}, got {value!r}")


# Keys a resumed run may change; any other difference means the checkpoints are another run's.
RESUMABLE_KEYS = ("run_dir", "steps", "save_every", "keep", "mesh")


def check_resumable(config: Any) -> None:
    """Refuse to resume, with one line naming the first differing key, a run directory whose checkpoints
    were trained under another config (another base model, adapters, data or optimizer)."""
    run_dir = Path(config.run_dir)
    saved_file = run_dir / "config.yaml"
    if not saved_file.exists() or not any((run_dir / "checkpoints").glob("*")):
        return
    try:
        saved = yaml.safe_load(saved_file.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{saved_file}: not valid YAML (the run's own config)") from None
    saved = _flat(saved)
    for key, value in _flat(to_dict(config)).items():
        old = saved.get(key, value)  # a key newer than the run's config is not a difference
        if key.split(".")[0] not in RESUMABLE_KEYS and old != value:
            raise ConfigError(
                f"{run_dir} holds checkpoints of a run with {key}={old!r}, not {value!r}: "
                "resume with that config, or use a new run_dir"
            )


def _flat(mapping: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def write_run_config(config: Any) -> None:
    """The resolved config as run_dir/config.yaml (by the first process of a multi-process run)."""
    import jax

    if jax.process_index() == 0:
        (Path(config.run_dir) / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def to_dict(config: Any) -> dict[str, Any]:
    """A plain mapping (tuples as lists) for writing the resolved config next to a run."""
    def plain(value):
        if isinstance(value, tuple):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    return plain(dataclasses.asdict(config))
