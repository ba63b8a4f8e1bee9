"""Grouped-query attention with learned sinks, a sliding window on alternate layers, and a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax.backends import cpu as cpu_kernels
from gptoss_jax.backends.cpu.stacks import LayerOf
from gptoss_jax.backends.tpu import attention as tpu_attention
from gptoss_jax.config import GptOssConfig
from gptoss_jax.nn.cache import LayerCache
from gptoss_jax.nn.lora import LoRA, project
from gptoss_jax.nn.ops import OUT_EQUATION, QKV_EQUATION, init, matmul, site_key
from gptoss_jax.nn.rope import apply_rope
from gptoss_jax.runtime import Runtime
from gptoss_jax.sharding import constrain

KV_AXES = ("kv_heads", "head_dim", "embed")
# Activations' logical axes, for their layout on a mesh (gptoss_jax.sharding.constrain).
Q_AXES = ("batch", None, "heads", None)
KV_ACTIVATION_AXES = ("batch", None, "kv_heads", None)


class Attention(nnx.Module):
    """Grouped-query attention with learned sinks; query head h reads kv head h // (num_heads / num_kv_heads)."""

    def __init__(self, config: GptOssConfig, param_dtype, dtype, rngs: nnx.Rngs):
        c = config
        std = c.hidden_size**-0.5
        self.q_proj = nnx.Param(
            init(rngs, (c.num_heads, c.head_dim, c.hidden_size), param_dtype, std), axes=("heads", "head_dim", "embed")
        )
        self.q_bias = nnx.Param(jnp.zeros((c.num_heads, c.head_dim), param_dtype), axes=("heads", "head_dim"))
        self.k_proj = nnx.Param(init(rngs, (c.num_kv_heads, c.head_dim, c.hidden_size), param_dtype, std), axes=KV_AXES)
        self.k_bias = nnx.Param(jnp.zeros((c.num_kv_heads, c.head_dim), param_dtype), axes=KV_AXES[:2])
        self.v_proj = nnx.Param(init(rngs, (c.num_kv_heads, c.head_dim, c.hidden_size), param_dtype, std), axes=KV_AXES)
        self.v_bias = nnx.Param(jnp.zeros((c.num_kv_heads, c.head_dim), param_dtype), axes=KV_AXES[:2])
        self.o_proj = nnx.Param(
            init(rngs, (c.hidden_size, c.num_heads, c.head_dim), param_dtype, (c.num_heads * c.head_dim) ** -0.5),
            axes=("embed", "heads", "head_dim"),
        )
        self.o_bias = nnx.Param(jnp.zeros((c.hidden_size,), param_dtype), axes=("embed",))
        self.sinks = nnx.Param(jnp.zeros((c.num_heads,), param_dtype), axes=("heads",))
        self.q_lora: LoRA | None = nnx.data(None)  # adapters, attached by gptoss_jax.lora.add_lora
        self.k_lora: LoRA | None = nnx.data(None)
        self.v_lora: LoRA | None = nnx.data(None)
        self.o_lora: LoRA | None = nnx.data(None)
        self.config = config
        self.dtype = dtype
        self.mesh = None  # set by gptoss_jax.sharding.set_mesh: the TPU attention kernel runs in shard_map

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        sliding: bool,
        runtime: Runtime,
        cache: LayerCache | None = None,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x: [B, T, D]; positions: [B, T] (-1 marks padding). Attends to `cache` and the new tokens."""
        c, dtype = self.config, self.dtype
        batch, length, _ = x.shape

        def input_projection(weight, bias, lora, site):
            out = project(QKV_EQUATION, x, weight[...], dtype, lora, site_key(dropout_key, site), runtime)
            return out + bias[...].astype(jnp.float32)

        q = constrain(input_projection(self.q_proj, self.q_bias, self.q_lora, 0), Q_AXES, self.mesh)
        k = constrain(input_projection(self.k_proj, self.k_bias, self.k_lora, 1), KV_ACTIVATION_AXES, self.mesh)
        v = constrain(input_projection(self.v_proj, self.v_bias, self.v_lora, 2), KV_ACTIVATION_AXES, self.mesh)
        q, k = apply_rope(q, positions, c), apply_rope(k, positions, c)

        group = c.num_heads // c.num_kv_heads
        q = q.reshape(batch, length, c.num_kv_heads, group, c.head_dim)
        sinks = self.sinks[...].astype(jnp.float32).reshape(c.num_kv_heads, group)
        window = c.sliding_window if sliding else None
        in_place = cache is not None and isinstance(cache.keys, LayerOf)  # see GptOss.forward
        if cache is None or cache.empty:
            keys, values, key_positions = k, v, positions
            cache = None if cache is None else cache.write(k, v, positions)
        elif in_place and runtime.pallas == "tpu":  # the kernel reads the group of the stacked cache it was written to
            cache = cache.write_in_place(k, v, positions)
            out = tpu_attention.decode_attention(q[:, 0], cache, positions[:, 0], sinks, window,
                                                 interpret=runtime.interpret, mesh=self.mesh)[:, None]
            keys = None
        elif in_place:  # decode on the CPU: the kernel writes and reads the group in place in the stacked cache
            out, cache = cpu_kernels.decode_attention(q[:, 0], k[:, 0], v[:, 0], cache, positions[:, 0], sinks, window)
            out = out[:, None]
            keys = None
        elif length == 1:  # decode: the new token's slot held nothing this query may see, so write first
            cache = cache.write(k, v, positions, select=runtime.writes_cache_by_select)
            (keys, values), key_positions = cache.heads(c), cache.positions
        else:  # prefill: attend to what was cached and to the new tokens, then cache them
            cached_keys, cached_values = cache.heads(c)
            keys = jnp.concatenate([cached_keys.astype(jnp.float32), k], axis=1)
            values = jnp.concatenate([cached_values.astype(jnp.float32), v], axis=1)
            key_positions = jnp.concatenate([cache.positions, positions], axis=1)
            cache = cache.write(k, v, positions)

        if keys is None:
            pass  # attended above
        elif keys is k and length > runtime.attention_block and runtime.pallas == "tpu":
            out = tpu_attention.self_attention(q, k, v, sinks, window, dtype,
                                               interpret=runtime.interpret, mesh=self.mesh)
        elif keys is k and length > runtime.attention_block:  # a long run of new tokens attending to themselves
            out = _attend_blockwise(q, k, v, positions, sinks, sliding, c, dtype, runtime)
        else:
            out = _attend(q, keys, values, positions, key_positions, sinks, sliding, c, dtype, runtime)
        out = out.reshape(batch, length, c.num_heads, c.head_dim)
        out = project(OUT_EQUATION, out, self.o_proj[...], dtype, self.o_lora, site_key(dropout_key, 3), runtime)
        return out + self.o_bias[...].astype(jnp.float32), cache


def _allowed(query_positions, key_positions, sliding: bool, config: GptOssConfig) -> jax.Array:
    """[B, T, S]: which keys each query sees (causal, -1 is padding, sliding layers within the window)."""
    query_at, key_at = query_positions[:, :, None], key_positions[:, None, :]
    allowed = (key_at >= 0) & (key_at <= query_at)
    return allowed & (query_at - key_at < config.sliding_window) if sliding else allowed


def _attend(q, keys, values, positions, key_positions, sinks, sliding: bool, config, dtype, runtime) -> jax.Array:
    """Softmax attention with sinks. q [B, T, kv_heads, group, head_dim]; keys, values [B, S, kv_heads,
    head_dim]; sinks [kv_heads, group]. Returns float32 [B, T, kv_heads, group, head_dim]."""
    scores = matmul("btngk,bsnk->bngts", q, keys, dtype, runtime) * config.head_dim**-0.5
    allowed = _allowed(positions, key_positions, sliding, config)
    scores = jnp.where(allowed[:, None, None], scores, -jnp.inf)
    # The sink is one more logit per (head, query) that takes probability mass and is then dropped: it
    # joins the max and the normaliser only. Normalising after the product divides [T, head_dim], not [T, S].
    sinks = sinks[None, :, :, None]
    top = jnp.maximum(scores.max(axis=-1), sinks)
    weights = jnp.exp(scores - top[..., None])
    total = weights.sum(axis=-1) + jnp.exp(sinks - top)
    out = matmul("bngts,bsnk->btngk", weights, values, dtype, runtime)
    return out / jnp.moveaxis(total, -1, 1)[..., None]


def _attend_blockwise(q, k, v, positions, sinks, sliding: bool, config, dtype, runtime) -> jax.Array:
    """`_attend` of a sequence to itself, a block of queries at a time (rematerialised in a backward pass).

    Sliding layers: a block sees only the keys from `sliding_window` before it (this assumes positions
    grow by at least one per token, as they do with right padding). Full layers: an online softmax over
    runtime.key_block keys at a time, skipping those after the block's queries. Memory per step: one block of scores.
    """
    batch, length = positions.shape
    block = runtime.attention_block
    blocks = -(-length // block)
    pad = blocks * block - length
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    query_positions = jnp.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
    scale = config.head_dim**-0.5

    if sliding:
        reach = -(-config.sliding_window // block) * block  # keys before a block its queries may see
        k = jnp.pad(k, ((0, 0), (reach, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (reach, pad), (0, 0), (0, 0)))
        key_positions = jnp.pad(positions, ((0, 0), (reach, pad)), constant_values=-1)

        def one_block(index):
            start = index * block
            rows = jax.lax.dynamic_slice_in_dim(q, start, block, axis=1)
            at = jax.lax.dynamic_slice_in_dim(query_positions, start, block, axis=1)
            span = [jax.lax.dynamic_slice_in_dim(x, start, reach + block, axis=1) for x in (k, v, key_positions)]
            return _attend(rows, span[0], span[1], at, span[2], sinks, True, config, dtype, runtime)

    else:
        key_block = runtime.key_block
        key_blocks = -(-length // key_block)
        key_pad = key_blocks * key_block - length
        k = jnp.pad(k, ((0, 0), (0, key_pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, key_pad), (0, 0), (0, 0)))
        key_positions = jnp.pad(positions, ((0, 0), (0, key_pad)), constant_values=-1)

        def one_block(index):
            start = index * block
            rows = jax.lax.dynamic_slice_in_dim(q, start, block, axis=1)
            at = jax.lax.dynamic_slice_in_dim(query_positions, start, block, axis=1)
            # Running max, normaliser and weighted sum, started from the sink logit alone.
            top = jnp.broadcast_to(sinks[None, :, :, None], (batch, *sinks.shape, block))
            init = (top, jnp.ones_like(top), jnp.zeros(rows.shape, jnp.float32))

            def step(carry, key_index):
                def update(carry):
                    top, total, acc = carry
                    begin = key_index * key_block
                    keys, values, key_at = (
                        jax.lax.dynamic_slice_in_dim(x, begin, key_block, axis=1) for x in (k, v, key_positions)
                    )
                    scores = matmul("btngk,bsnk->bngts", rows, keys, dtype, runtime) * scale
                    scores = jnp.where(_allowed(at, key_at, False, config)[:, None, None], scores, -jnp.inf)
                    new_top = jnp.maximum(top, scores.max(axis=-1))
                    weights = jnp.exp(scores - new_top[..., None])
                    shrink = jnp.exp(top - new_top)
                    total = total * shrink + weights.sum(axis=-1)
                    acc = acc * jnp.moveaxis(shrink, -1, 1)[..., None] + matmul("bngts,bsnk->btngk", weights, values, dtype, runtime)
                    return new_top, total, acc

                # Key blocks after the block's last query hold nothing it may see.
                needed = key_index * key_block < start + block
                return jax.lax.cond(needed, update, lambda carry: carry, carry), None

            (top, total, acc), _ = jax.lax.scan(step, init, jnp.arange(key_blocks))
            return acc / jnp.moveaxis(total, -1, 1)[..., None]

    out = jax.lax.map(jax.checkpoint(one_block), jnp.arange(blocks))  # [blocks, B, block, n, g, head_dim]
    out = jnp.moveaxis(out, 0, 1).reshape(batch, blocks * block, *out.shape[3:])
    return out[:, :length]

