"""LoRA adapters: fresh ones change nothing, trained ones apply exactly the update merged weights would."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss_jax
from gptoss_jax.errors import ConfigError
from gptoss_jax.lora import TARGETS, LoRAConfig, adapter_targets, add_lora, merged_update
from gptoss_jax.runtime import Runtime

ALL = LoRAConfig(rank=4, alpha=8.0, targets=TARGETS)


def _randomize_adapters(model, seed: int = 0, std: float = 0.05):
    """Give every adapter a non-zero b, as training would."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [leaf + std * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(tree, leaves))


def _merge_into_weights(model, base):
    """Add the adapters' updates to a plain fp32 model's weights (dense experts), layer by layer."""
    pattern = len(model.config.layer_pattern)
    for layer, target in itertools.product(range(model.config.num_layers), adapter_targets(model)):
        update = merged_update(model, layer, target)
        group, position = divmod(layer, pattern)
        block = base.groups.layers[position]
        if target in ("mlp1", "mlp2"):
            weight = getattr(block.mlp, target).weight
        elif target == "router":
            weight = block.mlp.router
        else:
            weight = getattr(block.attn, f"{target}_proj")
        value = weight[...].astype(jnp.float32)
        weight.set_value(value.at[group].add(jnp.asarray(update).reshape(value.shape[1:])))


@pytest.mark.quick
def test_fresh_adapters_leave_logits_unchanged_exactly(hub_checkpoint, long_tokens):
    model = gptoss_jax.load(hub_checkpoint, dtype="float32")
    before = np.asarray(model(long_tokens))
    add_lora(model, ALL, seed=3)
    assert len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) == 2 * len(TARGETS) * len(model.config.layer_pattern)
    np.testing.assert_array_equal(np.asarray(model(long_tokens)), before)


@pytest.mark.parametrize("length, path", [(1, "gathered"), (72, "tiled"), (72, "grouped")])
def test_adapters_apply_the_merged_update(hub_checkpoint, long_tokens, length, path):
    runtime = Runtime.default().replace(expert_path=path)
    model = add_lora(gptoss_jax.load(hub_checkpoint, dtype="float32", experts="bfloat16", runtime=runtime), ALL)
    _randomize_adapters(model)
    base = gptoss_jax.load(hub_checkpoint, dtype="float32", experts="bfloat16")
    tokens = long_tokens[:1, :length]
    adapted, plain = np.asarray(model(tokens)), np.asarray(base(tokens))
    _merge_into_weights(model, base)
    merged = np.asarray(base(tokens))
    assert np.abs(adapted - plain).max() > 1e-2 * np.abs(plain).max()  # the adapters do something
    np.testing.assert_allclose(adapted, merged, atol=2e-5 * np.abs(merged).max())


def test_gradients_reach_every_adapter_over_packed_experts(hub_checkpoint, long_tokens):
    model = add_lora(gptoss_jax.load(hub_checkpoint, dtype="float32"), ALL)
    _randomize_adapters(model)

    def gradients(model):
        graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)

        def loss(adapters):
            m = nnx.merge(graphdef, adapters, frozen)
            hidden, _ = m.hidden(long_tokens[:, :-1])
            return -m.token_logprobs(hidden, long_tokens[:, 1:], chunk=32).mean()

        return jax.grad(loss)(adapters)

    grads = gradients(model)
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        assert np.abs(np.asarray(grad)).max() > 0, jax.tree_util.keystr(path)
    # The same gradients through the blockwise attention long sequences take (blocks of 16 tokens here).
    model.runtime = model.runtime.replace(attention_block=16)
    for dense, blockwise in zip(jax.tree.leaves(grads), jax.tree.leaves(gradients(model))):
        np.testing.assert_allclose(np.asarray(blockwise), np.asarray(dense), rtol=1e-4, atol=1e-4 * np.abs(dense).max())


@pytest.mark.quick
def test_token_logprobs_match_log_softmax(hub_checkpoint, long_tokens):
    model = gptoss_jax.load(hub_checkpoint, dtype="float32")
    hidden, _ = model.hidden(long_tokens)
    targets = np.roll(long_tokens, -1, axis=1)
    expected = jax.nn.log_softmax(model.logits(hidden), axis=-1)
    expected = np.take_along_axis(np.asarray(expected), targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(model.token_logprobs(hidden, targets, chunk=50)), expected, atol=1e-5)


def test_dropout_needs_a_key_and_changes_the_training_forward(hub_checkpoint, long_tokens):
    model = add_lora(gptoss_jax.load(hub_checkpoint, dtype="float32"), LoRAConfig(rank=4, dropout=0.5))
    _randomize_adapters(model)
    plain, _ = model.hidden(long_tokens)
    again, _ = model.hidden(long_tokens)
    dropped, _ = model.hidden(long_tokens, dropout_key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(again))
    assert np.abs(np.asarray(dropped) - np.asarray(plain)).max() > 1e-3


def test_bad_lora_settings_are_named():
    with pytest.raises(ConfigError, match="unknown target 'gate'"):
        LoRAConfig(targets=("q", "gate"))
    with pytest.raises(ConfigError, match="lora.rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="lora.dropout"):
        LoRAConfig(dropout=1.0)
