"""Model configuration: one frozen dataclass, presets, and readers for both released config.json flavours."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from gptoss_jax.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
# How expert weights are held: packed as released (decoded inside the forward), or dense bf16.
EXPERT_FORMATS = ("mxfp4", "bfloat16")
# What loading, training and export accept: "auto" keeps the format the checkpoint stores (nothing lossy
# unless asked for: MXFP4 stays packed, bf16 experts stay bf16).
AUTO = "auto"
EXPERT_CHOICES = (AUTO, *EXPERT_FORMATS)


def check_experts(experts: str, name: str = "experts") -> str:
    """`experts` if it is one of EXPERT_CHOICES, else a ConfigError naming the field."""
    if experts not in EXPERT_CHOICES:
        raise ConfigError(f"{name} must be one of {', '.join(EXPERT_CHOICES)}, got {experts!r}")
    return experts


@dataclasses.dataclass(frozen=True)
class GptOssConfig:
    """Shapes and constants of a gpt-oss model (names follow the hub config where one exists)."""

    num_layers: int = 24
    num_experts: int = 32
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_heads: int = 64
    num_kv_heads: int = 8
    head_dim: int = 64
    sliding_window: int = 128
    # Layer kinds repeat this pattern; the forward scans over one repetition at a time.
    layer_pattern: tuple[str, ...] = (SLIDING, FULL)
    max_context: int = 131072
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_original_context: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "layer_pattern", tuple(self.layer_pattern))
        for kind in self.layer_pattern:
            if kind not in (SLIDING, FULL):
                raise ConfigError(f"layer_pattern: unknown layer kind {kind!r} (expected {SLIDING!r} or {FULL!r})")
        if not self.layer_pattern or self.num_layers % len(self.layer_pattern):
            raise ConfigError(
                f"num_layers={self.num_layers} is not a whole number of repetitions of layer_pattern "
                f"{list(self.layer_pattern)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                raise ConfigError(f"{name}={getattr(self, name)} must be a multiple of 32 (the MXFP4 block size)")
        if not 0 < self.experts_per_token <= self.num_experts:
            raise ConfigError(f"experts_per_token={self.experts_per_token} must be in 1..num_experts={self.num_experts}")

    # Derived quantities.

    @property
    def layer_types(self) -> tuple[str, ...]:
        """The kind of every layer, from the repeated pattern."""
        return self.layer_pattern * self.num_groups

    @property
    def num_groups(self) -> int:
        """How many repetitions of `layer_pattern` make the model (the scan length)."""
        return self.num_layers // len(self.layer_pattern)

    @property
    def rope_concentration(self) -> float:
        """YaRN's attention scaling: cos and sin are both multiplied by it."""
        if self.rope_scaling_factor <= 1.0:
            return 1.0
        return 0.1 * math.log(self.rope_scaling_factor) + 1.0

    def replace(self, **changes: Any) -> "GptOssConfig":
        return dataclasses.replace(self, **changes)

    # Presets and files.

    @classmethod
    def preset(cls, name: str) -> "GptOssConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GptOssConfig":
        """Build from this dataclass's own field names (the format of the files in configs/)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["layer_pattern"] = list(self.layer_pattern)
        return values

    @classmethod
    def from_hub_config(cls, hub: dict[str, Any], source: str = "config.json") -> "GptOssConfig":
        """Read the Hugging Face `config.json` of a gpt-oss checkpoint."""
        if hub.get("model_type") != "gpt_oss":
            raise ConfigError(f"{source}: model_type is {hub.get('model_type')!r}, expected 'gpt_oss'")
        try:
            num_layers = int(hub["num_hidden_layers"])
            rope = hub.get("rope_scaling") or hub.get("rope_parameters") or {}
            rope_theta = hub.get("rope_theta", rope.get("rope_theta", cls.rope_theta))
            if rope and rope.get("rope_type", "yarn") != "yarn":
                raise ConfigError(f"{source}: rope type {rope.get('rope_type')!r} is not supported (expected 'yarn')")
            if rope.get("truncate", False):
                raise ConfigError(f"{source}: rope truncate=true is not what gpt-oss uses")
            layer_types = hub.get("layer_types") or [SLIDING if i % 2 == 0 else FULL for i in range(num_layers)]
            return cls(
                num_layers=num_layers,
                num_experts=int(hub["num_local_experts"]),
                experts_per_token=int(hub.get("num_experts_per_tok", hub.get("experts_per_token"))),
                vocab_size=int(hub["vocab_size"]),
                hidden_size=int(hub["hidden_size"]),
                intermediate_size=int(hub["intermediate_size"]),
                num_heads=int(hub["num_attention_heads"]),
                num_kv_heads=int(hub["num_key_value_heads"]),
                head_dim=int(hub.get("head_dim", hub["hidden_size"] // hub["num_attention_heads"])),
                sliding_window=int(hub["sliding_window"]),
                layer_pattern=_smallest_period(layer_types, source),
                max_context=int(hub.get("max_position_embeddings", cls.max_context)),
                rope_theta=float(rope_theta),
                rope_scaling_factor=float(rope.get("factor", 1.0)),
                rope_original_context=int(rope.get("original_max_position_embeddings", cls.rope_original_context)),
                rope_beta_fast=float(rope.get("beta_fast", cls.rope_beta_fast)),
                rope_beta_slow=float(rope.get("beta_slow", cls.rope_beta_slow)),
                swiglu_limit=float(hub.get("swiglu_limit", cls.swiglu_limit)),
                rms_norm_eps=float(hub.get("rms_norm_eps", cls.rms_norm_eps)),
            )
        except KeyError as missing:
            raise ConfigError(f"{source}: missing key {missing.args[0]!r}") from None
        except (TypeError, ValueError) as bad:
            raise ConfigError(f"{source}: {bad}") from None

    def to_hub_config(self) -> dict[str, Any]:
        """The Hugging Face `config.json` for this model, as the released checkpoints write it."""
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": 200002,
            "pad_token_id": 199999,
            "experts_per_token": self.experts_per_token,
            "num_experts_per_tok": self.experts_per_token,
            "num_local_experts": self.num_experts,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.rope_original_context,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_context,
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "output_router_logits": False,
            "quantization_config": {
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
            },
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope_scaling_factor,
                "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow,
                "original_max_position_embeddings": self.rope_original_context,
                "truncate": False,
            },
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_original_config(cls, original: dict[str, Any], source: str = "original/config.json") -> "GptOssConfig":
        """Read the `config.json` of OpenAI's original layout (layers alternate sliding, full)."""
        try:
            return cls(
                num_layers=int(original["num_hidden_layers"]),
                num_experts=int(original["num_experts"]),
                experts_per_token=int(original["experts_per_token"]),
                vocab_size=int(original["vocab_size"]),
                hidden_size=int(original["hidden_size"]),
                intermediate_size=int(original["intermediate_size"]),
                num_heads=int(original["num_attention_heads"]),
                num_kv_heads=int(original["num_key_value_heads"]),
                head_dim=int(original["head_dim"]),
                sliding_window=int(original["sliding_window"]),
                rope_theta=float(original["rope_theta"]),
                rope_scaling_factor=float(original["rope_scaling_factor"]),
                rope_original_context=int(original["initial_context_length"]),
                rope_beta_fast=float(original.get("rope_ntk_beta", cls.rope_beta_fast)),
                rope_beta_slow=float(original.get("rope_ntk_alpha", cls.rope_beta_slow)),
                swiglu_limit=float(original["swiglu_limit"]),
            )
        except KeyError as missing:
            raise ConfigError(f"{source}: missing key {missing.args[0]!r}") from None
        except (TypeError, ValueError) as bad:
            raise ConfigError(f"{source}: {bad}") from None

    def to_original_config(self) -> dict[str, Any]:
        """The original layout's `config.json` (the exact keys OpenAI's reference reads)."""
        if self.layer_pattern != (SLIDING, FULL):
            raise ConfigError("the original layout only describes alternating sliding, full layers")
        return {
            "num_hidden_layers": self.num_layers,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.rope_original_context,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_beta_slow,
            "rope_ntk_beta": self.rope_beta_fast,
        }

    @classmethod
    def from_file(cls, path: str | Path) -> "GptOssConfig":
        """Read any of the three flavours: hub config.json, original config.json, or a file from configs/."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (OSError, json.JSONDecodeError) as bad:
            raise ConfigError(f"{path}: not a readable JSON config ({bad})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        if "model_type" in values:
            return cls.from_hub_config(values, str(path))
        if "num_experts" in values and "experts_per_token" in values and "num_hidden_layers" in values:
            return cls.from_original_config(values, str(path))
        try:
            return cls.from_dict(values)
        except ConfigError as bad:
            raise ConfigError(f"{path}: {bad}") from None


def _smallest_period(layer_types: list[str], source: str) -> tuple[str, ...]:
    """The shortest pattern whose repetition gives `layer_types` (the scan unit)."""
    n = len(layer_types)
    for period in range(1, n + 1):
        if n % period == 0 and list(layer_types[:period]) * (n // period) == list(layer_types):
            return tuple(layer_types[:period])
    raise ConfigError(f"{source}: layer_types is empty")


PRESETS: dict[str, GptOssConfig] = {
    "gpt-oss-20b": GptOssConfig(num_layers=24, num_experts=32),
    "gpt-oss-120b": GptOssConfig(num_layers=36, num_experts=128),
    # Small enough to write, load and run in seconds on a CPU; every mechanism of the real models is exercised
    # (GQA, sliding window, several scan groups, top-k > 1, MXFP4 blocks).
    "tiny": GptOssConfig(
        num_layers=4,
        num_experts=8,
        experts_per_token=2,
        vocab_size=512,
        hidden_size=128,
        intermediate_size=64,
        num_heads=8,
        num_kv_heads=2,
        head_dim=32,
        sliding_window=16,
    ),
}
