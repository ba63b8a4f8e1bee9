"""Config presets, files and the readers for both released config.json flavours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptoss_jax.config import FULL, PRESETS, SLIDING, GptOssConfig
from gptoss_jax.errors import ConfigError

pytestmark = pytest.mark.quick  # the day-to-day tier (scripts/test.sh -m quick)

CONFIGS = Path(__file__).parent.parent / "configs"

# The released gpt-oss-20b config.json, as published at the root of openai/gpt-oss-20b.
RELEASED_20B_HUB_CONFIG = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}

# The released original/config.json of gpt-oss-120b (exactly the keys OpenAI's reference reads).
RELEASED_120B_ORIGINAL_CONFIG = {
    "num_hidden_layers": 36,
    "num_experts": 128,
    "experts_per_token": 4,
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "swiglu_limit": 7.0,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "sliding_window": 128,
    "initial_context_length": 4096,
    "rope_theta": 150000,
    "rope_scaling_factor": 32.0,
    "rope_ntk_alpha": 1.0,
    "rope_ntk_beta": 32.0,
}


def test_released_hub_config_reads_as_the_20b_preset():
    assert GptOssConfig.from_hub_config(RELEASED_20B_HUB_CONFIG) == PRESETS["gpt-oss-20b"]


def test_released_original_config_reads_as_the_120b_preset():
    assert GptOssConfig.from_original_config(RELEASED_120B_ORIGINAL_CONFIG) == PRESETS["gpt-oss-120b"]


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
def test_preset_files_in_configs_equal_the_presets(name):
    assert GptOssConfig.from_file(CONFIGS / f"{name}.json") == GptOssConfig.preset(name)


def test_from_file_reads_both_released_flavours(tmp_path):
    (tmp_path / "hub.json").write_text(json.dumps(RELEASED_20B_HUB_CONFIG))
    (tmp_path / "original.json").write_text(json.dumps(RELEASED_120B_ORIGINAL_CONFIG))
    assert GptOssConfig.from_file(tmp_path / "hub.json") == PRESETS["gpt-oss-20b"]
    assert GptOssConfig.from_file(tmp_path / "original.json") == PRESETS["gpt-oss-120b"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_writing_and_reading_either_flavour_round_trips(name):
    config = PRESETS[name]
    assert GptOssConfig.from_hub_config(config.to_hub_config()) == config
    assert GptOssConfig.from_original_config(config.to_original_config()) == config


def test_layer_kinds_alternate_from_the_pattern_starting_with_sliding():
    config = PRESETS["gpt-oss-120b"]
    assert config.layer_types[:4] == (SLIDING, FULL, SLIDING, FULL)
    assert len(config.layer_types) == 36 and config.num_groups == 18


def test_hub_layer_types_give_the_smallest_repeating_pattern():
    hub = dict(RELEASED_20B_HUB_CONFIG, num_hidden_layers=6, layer_types=[SLIDING, SLIDING, FULL] * 2)
    config = GptOssConfig.from_hub_config(hub)
    assert config.layer_pattern == (SLIDING, SLIDING, FULL) and config.num_groups == 2


def test_yarn_concentration_is_the_spec_value():
    assert PRESETS["gpt-oss-20b"].rope_concentration == pytest.approx(1.34657, abs=1e-5)


def test_a_config_that_is_not_gpt_oss_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        GptOssConfig.from_hub_config(dict(RELEASED_20B_HUB_CONFIG, model_type="llama"))


def test_a_missing_key_is_named():
    hub = dict(RELEASED_20B_HUB_CONFIG)
    del hub["num_local_experts"]
    with pytest.raises(ConfigError, match="num_local_experts"):
        GptOssConfig.from_hub_config(hub)


def test_layers_that_do_not_repeat_the_pattern_whole_are_refused():
    with pytest.raises(ConfigError, match="num_layers=5"):
        GptOssConfig(num_layers=5)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="gpt-oss-20b"):
        GptOssConfig.preset("gpt-oss-7b")
