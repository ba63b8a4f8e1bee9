"""gpt-oss as a Flax NNX module tree.

Parameters keep the checkpoint's (out, in) orientation, split into heads where that helps the einsums,
so loading is a reshape and never a transpose. Layers are stacked per repetition of the config's
layer pattern (a sliding + full pair for the released models) and the forward scans over the stack,
so compile time does not grow with depth. The residual stream, norms, softmaxes and routing run in
float32 whatever the compute dtype; matmuls take the compute dtype and accumulate in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gptoss_jax import kernels, mxfp4
from gptoss_jax.config import SLIDING, GptOssConfig
from gptoss_jax.sharding import MESH_AXES, spec_for

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
EXPERT_FORMATS = ("mxfp4", "bfloat16")


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["keys", "values", "positions"], meta_fields=["empty"]
)
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """Keys and values one attention layer keeps, with the position each slot holds (-1: empty).

    A token at position p lives in slot p % slots: full-attention layers get a slot per position of the
    context, sliding-window layers a ring of `sliding_window` slots (all the window can ever see).
    """

    keys: jax.Array  # [B, slots, kv_heads, head_dim]
    values: jax.Array  # [B, slots, kv_heads, head_dim]
    positions: jax.Array  # [B, slots] int32
    # Known empty at trace time (a fresh cache): a prefill then attends to its own tokens only.
    empty: bool = False

    def group(self, index: jax.Array, empty: bool) -> "LayerCache":
        """One layer group's slice of a cache stacked over groups."""
        return LayerCache(self.keys[index], self.values[index], self.positions[index], empty)

    def with_group(self, index: jax.Array, one: "LayerCache") -> "LayerCache":
        """This stacked cache with group `index` replaced by `one` (in place under jit)."""
        return LayerCache(
            self.keys.at[index].set(one.keys),
            self.values.at[index].set(one.values),
            self.positions.at[index].set(one.positions),
        )

    def write(self, keys: jax.Array, values: jax.Array, positions: jax.Array) -> "LayerCache":
        """Store new tokens (positions -1 are padding and stored nowhere); the latest token wins a slot."""
        batch, slots = self.positions.shape
        rows = jnp.arange(batch)[:, None]
        slot = jnp.where(positions >= 0, positions % slots, slots)  # slot `slots` is dropped
        if positions.shape[1] == 1:  # decode: one token per row, an in-place scatter
            return LayerCache(
                self.keys.at[rows, slot].set(keys.astype(self.keys.dtype), mode="drop"),
                self.values.at[rows, slot].set(values.astype(self.values.dtype), mode="drop"),
                self.positions.at[rows, slot].set(positions, mode="drop"),
            )
        # Several tokens may map to one ring slot: pick, per slot, the latest one, then gather.
        steps = jnp.broadcast_to(jnp.arange(positions.shape[1]), positions.shape)
        winner = jnp.full((batch, slots + 1), -1).at[rows, slot].max(jnp.where(positions >= 0, steps, -1))[:, :slots]
        taken = winner >= 0
        source = jnp.maximum(winner, 0)

        def gather(new: jax.Array, old: jax.Array) -> jax.Array:
            picked = jnp.take_along_axis(new, source[:, :, None, None], axis=1).astype(old.dtype)
            return jnp.where(taken[:, :, None, None], picked, old)

        return LayerCache(
            gather(keys, self.keys),
            gather(values, self.values),
            jnp.where(taken, jnp.take_along_axis(positions, source, axis=1), self.positions),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The whole model's cache: per position in the layer pattern, a LayerCache stacked over layer groups."""

    layers: tuple[LayerCache, ...]

    @classmethod
    def create(
        cls, config: GptOssConfig, batch: int, length: int, dtype: str = "bfloat16", mesh=None
    ) -> "KVCache":
        """An empty cache for sequences of at most `length` positions (sharded over `mesh` if given)."""

        def filled(shape, value, array_dtype, axes):
            device = None if mesh is None else NamedSharding(mesh, spec_for(axes, shape, mesh, "KV cache"))
            return jnp.full(shape, value, array_dtype, device=device)

        layers = []
        for kind in config.layer_pattern:
            slots = min(length, config.sliding_window) if kind == SLIDING else length
            shape = (config.num_groups, batch, slots, config.num_kv_heads, config.head_dim)
            layers.append(
                LayerCache(
                    filled(shape, 0, DTYPES[dtype], CACHE_AXES),
                    filled(shape, 0, DTYPES[dtype], CACHE_AXES),
                    filled(shape[:3], -1, jnp.int32, CACHE_AXES[:2]),
                    empty=True,
                )
            )
        return cls(tuple(layers))


KV_AXES = ("kv_heads", "head_dim", "embed")
CACHE_AXES = ("batch", "cache_slots", "kv_heads", "head_dim")  # per layer group; stacked over groups


class PackedBytes(nnx.Variable):
    """Frozen MXFP4 bytes (blocks or scales): kept as stored, never trained."""


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _matmul(equation: str, x: jax.Array, w: jax.Array, dtype, layer: jax.Array | None = None) -> jax.Array:
    """einsum in the compute dtype with float32 accumulation and a float32 result.

    layer: w is a stack over layers [L, ...] (see GptOss.forward) and this picks one.
    A product of a few rows with a weight (decoding), written as x [rows..., in...] and w [out..., in...],
    runs in the CPU matvec kernel, which reads the weight once at the memory's speed, in place in its
    stack. Without the kernels, XLA's CPU dot takes a path about 20x slower when the left operand
    contributes a single row: there the product runs on two copies of the row and one is kept.
    """
    x = x.astype(dtype)
    inputs, output = equation.split("->")
    lhs, rhs = inputs.split(",")
    rows = math.prod(size for label, size in zip(lhs, x.shape) if label not in rhs)
    # A layer of a stack goes to the kernel up to more rows: XLA would first copy it out and relayout it.
    max_rows = kernels.MATVEC_MAX_ROWS if layer is None else kernels.MATVEC_MAX_STACKED_ROWS
    if rows <= max_rows and jnp.dtype(dtype) == jnp.bfloat16 and kernels.available():
        contracted = "".join(label for label in lhs if label in rhs)
        free_x, free_w = lhs[: len(lhs) - len(contracted)], rhs[: len(rhs) - len(contracted)]
        contracts_trailing = lhs.endswith(contracted) and rhs.endswith(contracted)
        if contracts_trailing and output == free_x + free_w and not set(contracted) & set(output):
            out_shape = w.shape[-len(rhs) :][: len(free_w)]
            stack = w.reshape(*w.shape[: w.ndim - len(rhs)], math.prod(out_shape), -1)
            out = kernels.bf16_matvec(x.reshape(rows, -1), stack, layer)
            return out.reshape(*x.shape[: len(free_x)], *out_shape)
    w = kernels.layer_slice(w, layer).astype(dtype)
    if rows == 1 and jax.default_backend() == "cpu":
        twice = jnp.stack([x, x])
        return jnp.einsum(f"Z{lhs},{rhs}->Z{output}", twice, w, preferred_element_type=jnp.float32)[0]
    return jnp.einsum(equation, x, w, preferred_element_type=jnp.float32)


# einsum of each dense projection (input x, weight in checkpoint orientation): one place for the forward
# and for the shapes of the LoRA adapters that may ride on it.
QKV_EQUATION = "btd,hkd->bthk"
OUT_EQUATION = "bthk,dhk->btd"
ROUTER_EQUATION = "nd,ed->ne"


@jax.custom_vjp
def embedding_rows(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """table[tokens]. A bf16 table is gathered as its uint16 bits: XLA's CPU backend otherwise converts the
    whole table to float32 before gathering a few rows (2.3 GB written a step for gpt-oss's vocabulary)."""
    if table.dtype != jnp.bfloat16:
        return table[tokens]
    rows = jax.lax.bitcast_convert_type(table, jnp.uint16)[tokens]
    return jax.lax.bitcast_convert_type(rows, jnp.bfloat16)


def _embedding_rows_forward(table, tokens):
    return embedding_rows(table, tokens), (jnp.zeros((0,), table.dtype), table.shape, tokens)


def _embedding_rows_backward(saved, g):
    like, shape, tokens = saved  # the gather's transpose: each row's cotangent added at its token
    table_grad = jnp.zeros(shape, jnp.float32).at[tokens].add(g.astype(jnp.float32)).astype(like.dtype)
    return table_grad, None


embedding_rows.defvjp(_embedding_rows_forward, _embedding_rows_backward)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class LoRA(nnx.Module):
    """A trainable low-rank update riding on a frozen projection: out += scale * b(a(dropout(x))).

    Dense projections: a [rank, *in], b [*out, rank]. Experts: a [E, rank, in], b [E, out, rank] (one
    adapter per expert). `b` starts at zero, so an adapted model starts exactly equal to its base.
    """

    def __init__(
        self,
        a_shape: tuple[int, ...],
        a_axes: tuple[str, ...],
        b_shape: tuple[int, ...],
        b_axes: tuple[str, ...],
        *,
        fan_in: int,
        scale: float,
        dropout: float,
        rngs: nnx.Rngs,
    ):
        self.a = nnx.LoRAParam(_init(rngs, a_shape, jnp.float32, fan_in**-0.5), axes=a_axes)
        self.b = nnx.LoRAParam(jnp.zeros(b_shape, jnp.float32), axes=b_axes)
        self.scale = scale
        self.dropout = dropout

    def dense(self, equation: str, x: jax.Array, dtype, key: jax.Array | None) -> jax.Array:
        """The update for a dense projection written as `equation` (x, weight)."""
        inputs, output = equation.split("->")
        lhs, rhs = inputs.split(",")
        into = "".join(label for label in rhs if label in lhs)
        out = "".join(label for label in rhs if label not in lhs)
        rows = "".join(label for label in output if label not in rhs)
        low = _matmul(f"{lhs},R{into}->{rows}R", _dropout(x, self.dropout, key), self.a[...], dtype)
        return self.scale * _matmul(f"{rows}R,{out}R->{output}", low, self.b[...], dtype)


def _project(
    equation: str, x: jax.Array, weight: jax.Array, dtype, lora: LoRA | None, key: jax.Array | None, layer=None
) -> jax.Array:
    """A dense projection plus its adapter's update, if it has one (layer: see _matmul)."""
    out = _matmul(equation, x, weight, dtype, layer)
    return out if lora is None else out + lora.dense(equation, x, dtype, key)


def _site_key(key: jax.Array | None, site: int) -> jax.Array | None:
    """A dropout key of its own for each adapter site of a layer."""
    return None if key is None else jax.random.fold_in(key, site)


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, param_dtype):
        self.scale = nnx.Param(jnp.ones((size,), param_dtype), axes=("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * self.scale[...].astype(jnp.float32)


def rope_inverse_frequencies(config: GptOssConfig) -> np.ndarray:
    """YaRN inverse frequencies (NTK-by-parts, no rounding of the ramp ends), float32 like the reference."""
    half = config.head_dim // 2
    freq = np.float32(config.rope_theta) ** (np.arange(0, config.head_dim, 2, dtype=np.float32) / config.head_dim)
    if config.rope_scaling_factor <= 1.0:
        return (1.0 / freq).astype(np.float32)

    def ramp_end(beta: float) -> float:
        return half * np.log(config.rope_original_context / (beta * 2 * np.pi)) / np.log(config.rope_theta)

    low, high = ramp_end(config.rope_beta_fast), ramp_end(config.rope_beta_slow)
    ramp = np.clip((np.arange(half, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    interpolation = 1.0 / (config.rope_scaling_factor * freq)
    extrapolation = 1.0 / freq
    return (interpolation * ramp + extrapolation * (1 - ramp)).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, config: GptOssConfig) -> jax.Array:
    """Rotate half-split pairs (dimension j with j + head_dim/2); x: [B, T, heads, head_dim]; float32 out."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inverse_frequencies(config))
    cos = (jnp.cos(angles) * config.rope_concentration)[:, :, None, :]
    sin = (jnp.sin(angles) * config.rope_concentration)[:, :, None, :]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class Attention(nnx.Module):
    """Grouped-query attention with learned sinks; query head h reads kv head h // (num_heads / num_kv_heads)."""

    def __init__(self, config: GptOssConfig, param_dtype, dtype, rngs: nnx.Rngs):
        c = config
        std = c.hidden_size**-0.5
        self.q_proj = nnx.Param(
            _init(rngs, (c.num_heads, c.head_dim, c.hidden_size), param_dtype, std), axes=("heads", "head_dim", "embed")
        )
        self.q_bias = nnx.Param(jnp.zeros((c.num_heads, c.head_dim), param_dtype), axes=("heads", "head_dim"))
        self.k_proj = nnx.Param(_init(rngs, (c.num_kv_heads, c.head_dim, c.hidden_size), param_dtype, std), axes=KV_AXES)
        self.k_bias = nnx.Param(jnp.zeros((c.num_kv_heads, c.head_dim), param_dtype), axes=KV_AXES[:2])
        self.v_proj = nnx.Param(_init(rngs, (c.num_kv_heads, c.head_dim, c.hidden_size), param_dtype, std), axes=KV_AXES)
        self.v_bias = nnx.Param(jnp.zeros((c.num_kv_heads, c.head_dim), param_dtype), axes=KV_AXES[:2])
        self.o_proj = nnx.Param(
            _init(rngs, (c.hidden_size, c.num_heads, c.head_dim), param_dtype, (c.num_heads * c.head_dim) ** -0.5),
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

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        sliding: bool,
        cache: LayerCache | None = None,
        dropout_key: jax.Array | None = None,
        layer: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x: [B, T, D]; positions: [B, T] (-1 marks padding). Attends to `cache` and the new tokens.

        layer: this layer's index when the projection weights are whole stacks over layers (GptOss.forward).
        """
        c, dtype = self.config, self.dtype
        batch, length, _ = x.shape

        def project(weight, bias, lora, site):
            out = _project(QKV_EQUATION, x, weight[...], dtype, lora, _site_key(dropout_key, site), layer)
            return out + bias[...].astype(jnp.float32)

        q = project(self.q_proj, self.q_bias, self.q_lora, 0)
        k = project(self.k_proj, self.k_bias, self.k_lora, 1)
        v = project(self.v_proj, self.v_bias, self.v_lora, 2)
        q, k = apply_rope(q, positions, c), apply_rope(k, positions, c)

        if cache is None or cache.empty:
            keys, values, key_positions = k, v, positions
            cache = None if cache is None else cache.write(k, v, positions)
        elif length == 1:  # decode: the new token's slot held nothing this query may see, so write first
            cache = cache.write(k, v, positions)
            keys, values, key_positions = cache.keys, cache.values, cache.positions
        else:  # prefill: attend to what was cached and to the new tokens, then cache them
            keys = jnp.concatenate([cache.keys.astype(jnp.float32), k], axis=1)
            values = jnp.concatenate([cache.values.astype(jnp.float32), v], axis=1)
            key_positions = jnp.concatenate([cache.positions, positions], axis=1)
            cache = cache.write(k, v, positions)

        group = c.num_heads // c.num_kv_heads
        q = q.reshape(batch, length, c.num_kv_heads, group, c.head_dim)
        sinks = self.sinks[...].astype(jnp.float32).reshape(c.num_kv_heads, group)
        if keys is k and length > ATTENTION_BLOCK:  # a long run of new tokens attending to themselves
            out = _attend_blockwise(q, k, v, positions, sinks, sliding, c, dtype)
        else:
            out = _attend(q, keys, values, positions, key_positions, sinks, sliding, c, dtype)
        out = out.reshape(batch, length, c.num_heads, c.head_dim)
        out = _project(OUT_EQUATION, out, self.o_proj[...], dtype, self.o_lora, _site_key(dropout_key, 3), layer)
        return out + self.o_bias[...].astype(jnp.float32), cache


# A long sequence attending to itself runs this many queries a block: a block's scores stay in cache
# (on a CPU, 32 queries of a 512-token prompt ran attention over 2x faster than 256).
ATTENTION_BLOCK = 32
# Full-attention layers walk the keys this many at a time (an online softmax): memory stays bounded
# however long the sequence.
KEY_BLOCK = 256


def _allowed(query_positions, key_positions, sliding: bool, config: GptOssConfig) -> jax.Array:
    """[B, T, S]: which keys each query sees (causal, -1 is padding, sliding layers within the window)."""
    query_at, key_at = query_positions[:, :, None], key_positions[:, None, :]
    allowed = (key_at >= 0) & (key_at <= query_at)
    return allowed & (query_at - key_at < config.sliding_window) if sliding else allowed


def _attend(q, keys, values, positions, key_positions, sinks, sliding: bool, config, dtype) -> jax.Array:
    """Softmax attention with sinks. q [B, T, kv_heads, group, head_dim]; keys, values [B, S, kv_heads,
    head_dim]; sinks [kv_heads, group]. Returns float32 [B, T, kv_heads, group, head_dim]."""
    scores = _matmul("btngk,bsnk->bngts", q, keys, dtype) * config.head_dim**-0.5
    allowed = _allowed(positions, key_positions, sliding, config)
    scores = jnp.where(allowed[:, None, None], scores, -jnp.inf)
    # The sink is one more logit per (head, query) that takes probability mass and is then dropped: it
    # joins the max and the normaliser only. Normalising after the product divides [T, head_dim], not [T, S].
    sinks = sinks[None, :, :, None]
    top = jnp.maximum(scores.max(axis=-1), sinks)
    weights = jnp.exp(scores - top[..., None])
    total = weights.sum(axis=-1) + jnp.exp(sinks - top)
    out = _matmul("bngts,bsnk->btngk", weights, values, dtype)
    return out / jnp.moveaxis(total, -1, 1)[..., None]


def _attend_blockwise(q, k, v, positions, sinks, sliding: bool, config, dtype) -> jax.Array:
    """`_attend` of a sequence to itself, a block of queries at a time (rematerialised in a backward pass).

    Sliding layers: a block sees only the keys from `sliding_window` before it (this assumes positions
    grow by at least one per token, as they do with right padding). Full layers: an online softmax over
    KEY_BLOCK keys at a time, skipping those after the block's queries. Memory per step: one block of scores.
    """
    batch, length = positions.shape
    block = ATTENTION_BLOCK
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
            return _attend(rows, span[0], span[1], at, span[2], sinks, True, config, dtype)

    else:
        key_block = KEY_BLOCK
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
                    scores = _matmul("btngk,bsnk->bngts", rows, keys, dtype) * scale
                    scores = jnp.where(_allowed(at, key_at, False, config)[:, None, None], scores, -jnp.inf)
                    new_top = jnp.maximum(top, scores.max(axis=-1))
                    weights = jnp.exp(scores - new_top[..., None])
                    shrink = jnp.exp(top - new_top)
                    total = total * shrink + weights.sum(axis=-1)
                    acc = acc * jnp.moveaxis(shrink, -1, 1)[..., None] + _matmul("bngts,bsnk->btngk", weights, values, dtype)
                    return new_top, total, acc

                # Key blocks after the block's last query hold nothing it may see.
                needed = key_index * key_block < start + block
                return jax.lax.cond(needed, update, lambda carry: carry, carry), None

            (top, total, acc), _ = jax.lax.scan(step, init, jnp.arange(key_blocks))
            return acc / jnp.moveaxis(total, -1, 1)[..., None]

    out = jax.lax.map(jax.checkpoint(one_block), jnp.arange(blocks))  # [blocks, B, block, n, g, head_dim]
    out = jnp.moveaxis(out, 0, 1).reshape(batch, blocks * block, *out.shape[3:])
    return out[:, :length]


class PackedExpertWeights(nnx.Module):
    """One projection of every expert, kept as MXFP4 bytes: [E, out, in/32, 16] blocks, [E, out, in/32] scales."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, out_axis: str, in_axis: str, rngs):
        groups = in_features // mxfp4.BLOCK_SIZE
        shape = (num_experts, out_features, groups)
        axes = ("experts", out_axis, in_axis + "_blocks")
        self.blocks = PackedBytes(
            jax.random.randint(rngs.params(), (*shape, mxfp4.BYTES_PER_BLOCK), 0, 256, jnp.int32).astype(jnp.uint8),
            axes=(*axes, "block_bytes"),
        )
        # Scale 2**-6 on fp4 values of RMS ~2.9 gives weights of RMS ~0.05, a sensible random init.
        self.scales = PackedBytes(jnp.full(shape, mxfp4.SCALE_BIAS - 6, jnp.uint8), axes=axes)

    def arrays(self) -> dict[str, jax.Array]:
        return {"blocks": self.blocks[...], "scales": self.scales[...]}


class DenseExpertWeights(nnx.Module):
    """One projection of every expert as a dense [E, out, in] array (for full fine-tuning)."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, out_axis: str, in_axis: str, rngs):
        self.weight = nnx.Param(
            _init(rngs, (num_experts, out_features, in_features), jnp.bfloat16, 0.05), axes=("experts", out_axis, in_axis)
        )

    def arrays(self) -> dict[str, jax.Array]:
        return {"weight": self.weight[...]}


def decode_experts(weights: dict[str, jax.Array], dtype, experts: jax.Array | None = None, layer=None) -> jax.Array:
    """[E, out, in] weights from either form, or [*experts.shape, out, in] for just the chosen experts.

    layer: packed bytes come stacked over layers ([L, E, ...], see GptOss.forward) and this picks one.
    """
    if "weight" in weights:
        weight = weights["weight"]
        return (weight if experts is None else weight[experts]).astype(dtype)
    blocks, scales = weights["blocks"], weights["scales"]
    if experts is not None and experts.ndim == 0 and kernels.available():
        return kernels.mxfp4_dequantize(blocks, scales, experts, dtype, layer)
    if experts is None:
        blocks, scales = kernels.layer_slice(blocks, layer), kernels.layer_slice(scales, layer)
    elif layer is None:
        blocks, scales = blocks[experts], scales[experts]
    else:  # one gather of the chosen experts of one layer, no copy of the whole layer
        blocks, scales = blocks[layer, experts], scales[layer, experts]
    return mxfp4.dequantize(blocks, scales, dtype)


def _weight_specs(module: nnx.Module, mesh) -> dict[str, Any]:
    """PartitionSpecs of a module's direct arrays, from their declared axes."""
    return {
        name: spec_for(variable.axes, variable.shape, mesh, name)
        for name, variable in vars(module).items()
        if isinstance(variable, nnx.Variable)
    }


class MoE(nnx.Module):
    """Top-k routed experts with the clamped SwiGLU of gpt-oss (interleaved gate/linear columns, `+1`).

    On a mesh (see gptoss_jax.sharding.shard_model) the experts run in `shard_map`: each device holds num_experts / n
    experts and a 1/t slice of their intermediate dimension, computes the tokens' contributions from
    what it holds, and a psum over the 'expert' and 'tensor' axes adds them up.
    """

    def __init__(self, config: GptOssConfig, param_dtype, dtype, experts: str, rngs: nnx.Rngs):
        c = config
        e, h, i = c.num_experts, c.hidden_size, c.intermediate_size
        self.router = nnx.Param(_init(rngs, (e, h), param_dtype, h**-0.5), axes=("router", "embed"))
        self.router_bias = nnx.Param(jnp.zeros((e,), param_dtype), axes=("router",))
        weights = PackedExpertWeights if experts == "mxfp4" else DenseExpertWeights
        self.mlp1 = weights(e, 2 * i, h, "expert_intermediate", "embed", rngs=rngs)
        self.mlp2 = weights(e, h, i, "embed", "intermediate", rngs=rngs)
        self.mlp1_bias = nnx.Param(jnp.zeros((e, 2 * i), param_dtype), axes=("experts", "expert_intermediate"))
        self.mlp2_bias = nnx.Param(jnp.zeros((e, h), param_dtype), axes=("experts", "embed"))
        self.router_lora: LoRA | None = nnx.data(None)  # adapters, attached by gptoss_jax.lora.add_lora
        self.mlp1_lora: LoRA | None = nnx.data(None)  # one adapter per expert
        self.mlp2_lora: LoRA | None = nnx.data(None)
        self.config = config
        self.dtype = dtype
        self.mesh = None  # set by gptoss_jax.sharding.shard_model

    def __call__(
        self,
        x: jax.Array,
        dropout_key: jax.Array | None = None,
        route: jax.Array | None = None,
        layer: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """(output [B, T, D], the chosen experts int32 [B, T, k]).

        route: replay these experts [B, T, k] instead of the router's top-k (router replay in RL); their
        weights are still the softmax of the router's logits for them, so the router keeps its gradient.
        layer: this layer's index when the packed expert bytes are the whole stack over layers
        (GptOss.forward passes them so, since slicing a layer out inside the scan would copy it).
        """
        c, dtype = self.config, self.dtype
        batch, length, hidden = x.shape
        tokens = x.reshape(batch * length, hidden)
        router_logits = _project(
            ROUTER_EQUATION, tokens, self.router[...], dtype, self.router_lora, _site_key(dropout_key, 4)
        )
        router_logits = router_logits + self.router_bias[...].astype(jnp.float32)
        if route is None:
            top_logits, experts = jax.lax.top_k(router_logits, c.experts_per_token)
        else:
            experts = route.reshape(batch * length, c.experts_per_token).astype(jnp.int32)
            top_logits = jnp.take_along_axis(router_logits, experts, axis=-1)
        weights = jax.nn.softmax(top_logits, axis=-1)  # over the k chosen experts only
        params = {
            "mlp1": self.mlp1.arrays(),
            "mlp2": self.mlp2.arrays(),
            "mlp1_bias": self.mlp1_bias[...],
            "mlp2_bias": self.mlp2_bias[...],
        }
        adapters = {name: getattr(self, f"{name}_lora") for name in ("mlp1", "mlp2")}
        adapters = {name: lora for name, lora in adapters.items() if lora is not None}
        params.update({f"{name}_lora": {"a": lora.a[...], "b": lora.b[...]} for name, lora in adapters.items()})
        if layer is not None and isinstance(self.mlp1, PackedExpertWeights):
            params["layer"] = jnp.asarray(layer, jnp.int32)
        if adapters and dropout_key is not None:
            params["dropout_key"] = _site_key(dropout_key, 5)
        apply = functools.partial(
            expert_outputs,
            config=c,
            dtype=dtype,
            lora={name: (lora.scale, lora.dropout) for name, lora in adapters.items()},
        )
        mesh = self.mesh
        if mesh is None:
            out = apply(tokens, experts, weights, params, sharded=False)
        else:
            own = _weight_specs(self, mesh)
            specs = {
                "mlp1": _weight_specs(self.mlp1, mesh),
                "mlp2": _weight_specs(self.mlp2, mesh),
                "mlp1_bias": own["mlp1_bias"],
                "mlp2_bias": own["mlp2_bias"],
            }
            specs.update({f"{name}_lora": _weight_specs(lora, mesh) for name, lora in adapters.items()})
            for replicated in ("dropout_key", "layer"):
                if replicated in params:
                    specs[replicated] = PartitionSpec()
            rows = PartitionSpec("data")
            out = jax.shard_map(
                functools.partial(apply, sharded=True),
                mesh=mesh,
                in_specs=(rows, rows, rows, specs),
                out_specs=rows,
            )(tokens, experts, weights, params)
        return out.reshape(batch, length, hidden), experts.reshape(batch, length, c.experts_per_token)


def expert_outputs(
    tokens, experts, weights, params, *, config: GptOssConfig, dtype, sharded: bool, lora=None
) -> jax.Array:
    """sum_k weight_k * expert_k(token) over the experts held here (all of them when not sharded).

    tokens [N, D]; experts, weights [N, k]. Sharded, this device holds experts offset..offset+E_local
    and one slice of the intermediate dimension; its partial sums are added across devices (an expert
    adapter's update is linear in that slice too, so the same sum completes it).
    params may hold "mlp1_lora"/"mlp2_lora" ({"a", "b"} per expert) with lora[name] = (scale, dropout),
    and a "dropout_key".
    """
    local_count = params["mlp1_bias"].shape[0]
    if sharded:
        offset = jax.lax.axis_index("expert") * local_count
        first_tensor_shard = jax.lax.axis_index("tensor") == 0
    else:
        offset, first_tensor_shard = 0, True
    local = experts - offset
    held = (local >= 0) & (local < local_count)
    weights = jnp.where(held, weights, 0.0)
    local = jnp.clip(local, 0, local_count - 1)
    # The down projection's bias is added once, by the first slice of the intermediate dimension.
    bias2 = params["mlp2_bias"] * first_tensor_shard
    adapters = _ExpertAdapters(params, lora or {}, dtype)
    path = expert_path(
        tokens.shape[0] * config.experts_per_token,
        config.num_experts,
        packed="blocks" in params["mlp1"],
        bf16=jnp.dtype(dtype) == jnp.bfloat16,
        adapters=bool(lora),
    )
    if path == "fused":
        out = _fused(tokens, jnp.where(held, local, local_count), weights, params, bias2, adapters, config, dtype)
    elif path == "sorted":
        out = _sorted(tokens, jnp.where(held, local, local_count), weights, params, bias2, config)
    elif path == "gathered":
        out = _gathered(tokens, local, weights, params, bias2, adapters, config, dtype)
    elif path == "tiled":
        out = _tiled(tokens, jnp.where(held, local, local_count), weights, params, bias2, adapters, config, dtype, sharded)
    else:
        out = _grouped(tokens, jnp.where(held, local, local_count), weights, params, bias2, adapters, config, dtype)
    return jax.lax.psum(out, ("expert", "tensor")) if sharded else out


def expert_path(pairs: int, num_experts: int, packed: bool = True, bf16: bool = True, adapters: bool = False) -> str:
    """How the experts run for `pairs` (token, chosen expert) pairs: the one place that decides.

    fused: CPU with its kernels, MXFP4 weights, decode-sized batches; one kernel reads each chosen
      expert's packed bytes once and applies them to every token that chose it.
    sorted: CPU with its kernels built with AVX512-BF16, MXFP4 weights, bf16, more pairs (prefill,
      training without expert adapters). Pairs sorted by expert; one kernel call a projection decodes each expert's weights a
      cache-sized panel at a time and multiplies all of that expert's rows by it: no padding.
    gathered: few pairs elsewhere; each pair decodes its expert's weights.
    tiled: CPU otherwise (float32, expert adapters, no kernels). Pairs sorted by expert in tiles of one
      expert each; a tile decodes its expert's weights and runs the whole expert MLP. (XLA's CPU
      ragged_dot computes every group against every row.)
    grouped: other backends. jax.lax.ragged_dot over all experts' decoded weights.
    """
    cpu = jax.default_backend() == "cpu"
    with_kernels = cpu and packed and kernels.available()
    bf16_kernels = with_kernels and bf16 and kernels.bf16_products()  # AVX512-BF16 builds only
    if with_kernels and pairs <= (FUSED_MAX_PAIRS_PER_EXPERT_BF16 if bf16_kernels else FUSED_MAX_PAIRS_PER_EXPERT) * num_experts:
        return "fused"
    if bf16_kernels and not adapters:
        return "sorted"
    if pairs <= num_experts:
        return "gathered"
    return "tiled" if cpu else "grouped"


# Up to this many pairs per expert on average, reading packed bytes beats decoding them for a matmul
# (float32 rows against the tiled path; bf16 rows, two products an instruction, against the sorted one:
# measured even at 8 here).
FUSED_MAX_PAIRS_PER_EXPERT = 2
FUSED_MAX_PAIRS_PER_EXPERT_BF16 = 6


class _ExpertAdapters:
    """The per-expert LoRA updates of mlp1 / mlp2 (zero where a projection has no adapter)."""

    def __init__(self, params: dict, settings: dict[str, tuple[float, float]], dtype):
        self.params, self.settings, self.dtype = params, settings, dtype

    def _input(self, name: str, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        key = self.params.get("dropout_key") if key is None else key
        key = None if key is None else jax.random.fold_in(key, name == "mlp2")
        return _dropout(x, self.settings[name][1], key)

    def gathered(self, name: str, equation: str, x: jax.Array, experts: jax.Array) -> jax.Array | float:
        """Update for tokens applied to their chosen experts; `equation` maps x and a[experts] to [n, k, rank]."""
        if name not in self.settings:
            return 0.0
        a, b = self.params[f"{name}_lora"]["a"][experts], self.params[f"{name}_lora"]["b"][experts]
        low = _matmul(equation, self._input(name, x), a, self.dtype)
        return self.settings[name][0] * _matmul("nkr,nkor->nko", low, b, self.dtype)

    def tile(self, name: str, x: jax.Array, expert: jax.Array, index: jax.Array) -> jax.Array | float:
        """Update for a tile of rows [T, in] that all go to `expert` (tile `index` of the scan)."""
        if name not in self.settings:
            return 0.0
        adapter = self.params[f"{name}_lora"]
        key = self.params.get("dropout_key")
        x = self._input(name, x, None if key is None else jax.random.fold_in(key, index))
        low = _matmul("ti,ri->tr", x, adapter["a"][expert], self.dtype)
        return self.settings[name][0] * _matmul("tr,or->to", low, adapter["b"][expert], self.dtype)

    def grouped(self, name: str, x: jax.Array, group_sizes: jax.Array) -> jax.Array | float:
        """Update for rows sorted by expert, as two grouped matmuls through the rank."""
        if name not in self.settings:
            return 0.0
        adapter, dtype = self.params[f"{name}_lora"], self.dtype
        a, b = jnp.swapaxes(adapter["a"], 1, 2).astype(dtype), jnp.swapaxes(adapter["b"], 1, 2).astype(dtype)
        low = jax.lax.ragged_dot(self._input(name, x).astype(dtype), a, group_sizes, preferred_element_type=jnp.float32)
        update = jax.lax.ragged_dot(low.astype(dtype), b, group_sizes, preferred_element_type=jnp.float32)
        return self.settings[name][0] * update


def _swiglu(h: jax.Array, config: GptOssConfig) -> jax.Array:
    gate, linear = h[..., 0::2], h[..., 1::2]
    gate = jnp.minimum(gate, config.swiglu_limit)
    linear = jnp.clip(linear, -config.swiglu_limit, config.swiglu_limit)
    return gate * jax.nn.sigmoid(config.swiglu_alpha * gate) * (linear + 1)


def _gathered(tokens, experts, weights, params, bias2, adapters, config, dtype) -> jax.Array:
    """Few tokens: decode only the chosen experts' weights and apply them token by token."""
    h = _matmul("nd,nkod->nko", tokens, decode_experts(params["mlp1"], dtype, experts, params.get("layer")), dtype)
    h = h + adapters.gathered("mlp1", "nd,nkrd->nkr", tokens, experts)
    h = _swiglu(h + params["mlp1_bias"][experts].astype(jnp.float32), config)
    y = _matmul("nki,nkdi->nkd", h, decode_experts(params["mlp2"], dtype, experts, params.get("layer")), dtype)
    y = y + adapters.gathered("mlp2", "nki,nkri->nkr", h, experts)
    y = y + bias2[experts].astype(jnp.float32)
    return jnp.einsum("nkd,nk->nd", y, weights)


def _fused(tokens, experts, weights, params, bias2, adapters, config, dtype) -> jax.Array:
    """Decode-sized batches on CPU: the MXFP4 kernel reads each chosen expert's bytes once.

    experts holds local expert ids, or local_count for pairs held elsewhere (the kernel gives them zeros).
    """
    held = experts < params["mlp1_bias"].shape[0]
    index = jnp.minimum(experts, params["mlp1_bias"].shape[0] - 1)
    x = tokens.astype(dtype)  # the same rounding of the input as the matmul paths
    layer = params.get("layer")
    h = kernels.mxfp4_expert_matvec(x, experts, params["mlp1"]["blocks"], params["mlp1"]["scales"], layer)
    h = h + adapters.gathered("mlp1", "nd,nkrd->nkr", tokens, index)
    h = _swiglu(h + params["mlp1_bias"][index].astype(jnp.float32), config)
    pairs = h.reshape(-1, h.shape[-1]).astype(dtype)  # each pair's own input to mlp2
    y = kernels.mxfp4_expert_matvec(pairs, experts.reshape(-1, 1), params["mlp2"]["blocks"], params["mlp2"]["scales"], layer)
    y = y.reshape(*h.shape[:2], -1) + adapters.gathered("mlp2", "nki,nkri->nkr", h, index)
    y = y + bias2[index].astype(jnp.float32)
    return jnp.einsum("nkd,nk->nd", y, jnp.where(held, weights, 0.0))


def _sort_by_expert(experts: jax.Array, local_count: int):
    """(order, token_of, sorted_experts, sizes) for (token, expert) pairs sorted by expert.

    experts [N, k] holds local ids, or local_count for pairs held elsewhere (they sort last and are in
    no group); pair order[i] is token token_of[i]'s choice of sorted_experts[i] (clipped to a local id);
    sizes [local_count] int32 counts each expert's pairs.
    """
    flat_experts = experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    sorted_experts = jnp.minimum(flat_experts[order], local_count - 1)
    sizes = jnp.bincount(flat_experts, length=local_count + 1)[:local_count].astype(jnp.int32)
    return order, order // experts.shape[-1], sorted_experts, sizes


def _sorted(tokens, experts, weights, params, bias2, config) -> jax.Array:
    """Many pairs on CPU in bf16: each projection is one grouped kernel call over rows sorted by expert.

    experts holds local expert ids, or local_count for pairs held elsewhere: those sort last, fall in no
    group (the kernel gives them zeros) and have weight 0.
    """
    order, token_of, sorted_experts, sizes = _sort_by_expert(experts, params["mlp1_bias"].shape[0])
    layer = params.get("layer")
    mlp1, mlp2 = params["mlp1"], params["mlp2"]
    h = kernels.mxfp4_grouped_matmul(tokens[token_of].astype(jnp.bfloat16), sizes, mlp1["blocks"], mlp1["scales"], layer)
    h = _swiglu(h + params["mlp1_bias"][sorted_experts].astype(jnp.float32), config)
    y = kernels.mxfp4_grouped_matmul(h.astype(jnp.bfloat16), sizes, mlp2["blocks"], mlp2["scales"], layer)
    y = (y + bias2[sorted_experts].astype(jnp.float32)) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((tokens.shape[0], tokens.shape[1]), jnp.float32).at[token_of].add(y)


def _tile_rows(pairs: int, num_experts: int) -> int:
    """Rows a tile: about the mean pairs an expert gets (a power of two, 8..256), so padding stays small."""
    mean = max(1, pairs // num_experts)
    return min(256, max(8, 1 << (mean - 1).bit_length()))


def _weights_first(equation: str, w: jax.Array, x: jax.Array, dtype) -> jax.Array:
    """einsum(equation, w, x) -> [out, rows] in float32, kept in that orientation.

    XLA's CPU dot runs [out, in] x [rows, in] -> [out, rows] about twice as fast as x against w for a few
    dozen rows (it packs its right operand, here the small one); the barrier stops XLA from folding the
    caller's transpose back into the dot and undoing that.
    """
    out = jnp.einsum(equation, w.astype(dtype), x.astype(dtype), preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(out)


def _tiled(tokens, experts, weights, params, bias2, adapters, config, dtype, sharded: bool) -> jax.Array:
    """Many tokens on CPU: sort (token, expert) pairs by expert, pad each expert's run to whole tiles, and
    scan over tiles; each tile decodes one expert's weights and applies its MLP.

    experts holds local expert ids, or local_count for pairs held elsewhere (they get no tile and weight 0).
    The scan body is rematerialised, so a backward pass keeps each tile's input, not its decoded weights.
    """
    k = config.experts_per_token
    local_count = params["mlp1_bias"].shape[0]
    pairs, hidden = tokens.shape[0] * k, tokens.shape[1]
    tile = _tile_rows(pairs, local_count)
    tiles = -(-pairs // tile) + local_count  # enough for every expert's run rounded up to whole tiles
    flat_experts = experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    sorted_experts = flat_experts[order]
    sizes = jnp.bincount(flat_experts, length=local_count + 1)[:local_count]
    padded = -(-sizes // tile) * tile
    padded_end = jnp.cumsum(padded)
    expert_of_row = jnp.minimum(sorted_experts, local_count - 1)
    rank_in_run = jnp.arange(pairs) - (jnp.cumsum(sizes) - sizes)[expert_of_row]
    slot = jnp.where(sorted_experts < local_count, padded_end[expert_of_row] - padded[expert_of_row] + rank_in_run, tiles * tile)
    rows = jnp.zeros((tiles * tile, hidden), tokens.dtype).at[slot].set(tokens[order // k], mode="drop")
    tile_start = jnp.arange(tiles) * tile
    tile_expert = jnp.minimum(jnp.searchsorted(padded_end, tile_start, side="right"), local_count - 1)
    in_use = tile_start < padded_end[-1]

    @jax.checkpoint
    def one_tile(_, scanned):
        x, expert, used, index = scanned

        def mlp(x):
            w1 = decode_experts(params["mlp1"], dtype, expert, params.get("layer"))
            h = _weights_first("od,td->ot", w1, x, dtype).T
            h = h + adapters.tile("mlp1", x, expert, index)
            h = _swiglu(h + params["mlp1_bias"][expert].astype(jnp.float32), config)
            w2 = decode_experts(params["mlp2"], dtype, expert, params.get("layer"))
            y = _weights_first("di,ti->dt", w2, h, dtype).T
            y = y + adapters.tile("mlp2", h, expert, index)
            return y + bias2[expert].astype(jnp.float32)

        def skip(x):  # a tile past the last expert's run; in shard_map, zeros vary like the MLP's output
            zeros = jnp.zeros((tile, hidden), jnp.float32)
            return jax.lax.pcast(zeros, MESH_AXES, to="varying") if sharded else zeros

        return None, jax.lax.cond(used, mlp, skip, x)

    scanned = (rows.reshape(tiles, tile, hidden), tile_expert, in_use, jnp.arange(tiles))
    _, outputs = jax.lax.scan(one_tile, None, scanned)
    y = outputs.reshape(tiles * tile, hidden).at[slot].get(mode="fill", fill_value=0.0)
    y = y * weights.reshape(-1)[order][:, None]
    return jnp.zeros((tokens.shape[0], hidden), jnp.float32).at[order // k].add(y)


def _grouped(tokens, experts, weights, params, bias2, adapters, config, dtype) -> jax.Array:
    """Many tokens: sort (token, expert) pairs by expert and run one grouped matmul per projection.

    experts holds local expert ids, or local_count for pairs held elsewhere: those sort last, fall in no
    group (ragged_dot gives them zeros) and have weight 0.
    """
    order, token_of, sorted_experts, group_sizes = _sort_by_expert(experts, params["mlp1_bias"].shape[0])

    rows = tokens[token_of]
    w1 = jnp.swapaxes(decode_experts(params["mlp1"], dtype, None, params.get("layer")), 1, 2)  # [E, in, out]
    h = jax.lax.ragged_dot(rows.astype(dtype), w1, group_sizes, preferred_element_type=jnp.float32)
    h = h + adapters.grouped("mlp1", rows, group_sizes)
    h = _swiglu(h + params["mlp1_bias"][sorted_experts].astype(jnp.float32), config)
    w2 = jnp.swapaxes(decode_experts(params["mlp2"], dtype, None, params.get("layer")), 1, 2)
    y = jax.lax.ragged_dot(h.astype(dtype), w2, group_sizes, preferred_element_type=jnp.float32)
    y = y + adapters.grouped("mlp2", h, group_sizes)
    y = (y + bias2[sorted_experts].astype(jnp.float32)) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((tokens.shape[0], tokens.shape[1]), jnp.float32).at[token_of].add(y)


class Block(nnx.Module):
    """One pre-norm transformer layer: attention then mixture of experts, each added to the residual."""

    def __init__(self, config: GptOssConfig, param_dtype, dtype, experts: str, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        self.attn = Attention(config, param_dtype, dtype, rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        self.mlp = MoE(config, param_dtype, dtype, experts, rngs)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        sliding: bool,
        cache: LayerCache | None = None,
        dropout_key: jax.Array | None = None,
        route: jax.Array | None = None,
        layer: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None, jax.Array]:
        """(new residual stream, updated cache, the experts chosen for each token); layer: see MoE."""
        attended, cache = self.attn(self.attn_norm(x), positions, sliding, cache, dropout_key, layer)
        x = x + attended
        mixed, experts = self.mlp(self.mlp_norm(x), dropout_key, route, layer)
        return x + mixed, cache, experts


class LayerGroup(nnx.Module):
    """One repetition of the layer pattern (for gpt-oss: a sliding-window layer then a full one)."""

    def __init__(self, config: GptOssConfig, param_dtype, dtype, experts: str, rngs: nnx.Rngs):
        self.layers = nnx.List([Block(config, param_dtype, dtype, experts, rngs) for _ in config.layer_pattern])
        self.sliding = tuple(kind == SLIDING for kind in config.layer_pattern)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        caches: tuple[LayerCache, ...] | None = None,
        dropout_key: jax.Array | None = None,
        routes: jax.Array | None = None,
        group: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[LayerCache, ...] | None, jax.Array]:
        """routes: [pattern, B, T, k] experts to replay, one entry per layer of the group; the experts
        chosen are returned in the same shape. group: this group's index when the packed expert bytes
        are the whole stack over groups (see GptOss.forward)."""
        updated, chosen = [], []
        for index, (layer, sliding) in enumerate(zip(self.layers, self.sliding)):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
            cache = None if caches is None else caches[index]
            route = None if routes is None else routes[index]
            x, cache, experts = layer(x, positions, sliding, cache, key, route, group)
            updated.append(cache)
            chosen.append(experts)
        return x, None if caches is None else tuple(updated), jnp.stack(chosen)


# The stacked weights GptOss.forward passes whole into its scan over layer groups (with the group's index).
WHOLE_STACKS = nnx.Any(PackedBytes, *(nnx.PathContains(name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")))


class GptOss(nnx.Module):
    """The gpt-oss transformer. Call with int32 tokens [B, T] for float32 logits [B, T, vocab]."""

    def __init__(
        self,
        config: GptOssConfig,
        *,
        dtype: str = "bfloat16",
        experts: str = "mxfp4",
        rngs: nnx.Rngs,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if experts not in EXPERT_FORMATS:
            raise ValueError(f"experts must be one of {list(EXPERT_FORMATS)}, got {experts!r}")
        c = config
        compute = DTYPES[dtype]
        self.config = config
        self.dtype = dtype
        self.experts = experts
        self.checkpoint_dir: str | None = None  # set by gptoss_jax.load; tokenizer files may lie there
        self.mesh = None  # set by gptoss_jax.sharding.shard_model
        self.embed = nnx.Param(_init(rngs, (c.vocab_size, c.hidden_size), compute, 1.0), axes=("vocab", "embed"))

        @nnx.split_rngs(splits=c.num_groups)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_groups(rngs: nnx.Rngs) -> LayerGroup:
            return LayerGroup(config, compute, compute, experts, rngs)

        self.groups = make_groups(rngs)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, compute)
        self.unembed = nnx.Param(
            _init(rngs, (c.vocab_size, c.hidden_size), compute, c.hidden_size**-0.5), axes=("vocab", "embed")
        )

    def __call__(
        self, tokens: jax.Array, positions: jax.Array | None = None, cache: KVCache | None = None
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Logits float32 [B, T, vocab]; with a cache, (logits, updated cache).

        tokens: int [B, T]. positions: int [B, T], default 0..T-1; -1 marks padding, which no token
        attends to and the cache does not store.
        """
        hidden, cache_out = self.hidden(tokens, positions, cache)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, cache_out)

    def hidden(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        *,
        dropout_key: jax.Array | None = None,
        routes: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """The final-normed hidden states float32 [B, T, D] (and the updated cache, if one is given).

        dropout_key: turns on the LoRA adapters' dropout (training); without it the forward is deterministic.
        routes: experts to replay instead of the routers' choices (see `forward`).
        """
        hidden, cache, _ = self.forward(tokens, positions, cache, dropout_key=dropout_key, routes=routes)
        return hidden, cache

    def forward(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        *,
        dropout_key: jax.Array | None = None,
        routes: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None, jax.Array]:
        """(final-normed hidden states [B, T, D], updated cache or None, experts chosen).

        Experts are int32 [num_groups, pattern, B, T, k]: layer g * pattern + p is [g, p]. Passing them
        back as `routes` replays them (router replay: the same tokens through the same experts).
        """
        tokens = jnp.asarray(tokens, jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        positions = jnp.asarray(positions, jnp.int32)
        x = embedding_rows(self.embed[...], tokens).astype(jnp.float32)
        # The scan slices each group's weights out of the stack, which copies them; the big ones (packed
        # expert bytes, attention projections) are instead passed whole, with the group's index, to code
        # that reads just what it needs of them in place.
        graphdef, packed, stacked = nnx.split(self.groups, WHOLE_STACKS, ...)
        keys = None if dropout_key is None else jax.random.split(dropout_key, self.config.num_groups)
        indices = jnp.arange(self.config.num_groups)

        if cache is None:
            # Rematerialised: a backward pass keeps each group's input only, not its activations.
            @jax.checkpoint
            def run_group(x, scanned):
                group_state, index, key, route = scanned
                group = nnx.merge(graphdef, packed, group_state)
                x, _, chosen = group(x, positions, dropout_key=key, routes=route, group=index)
                return x, chosen

            x, chosen = jax.lax.scan(run_group, x, (stacked, indices, keys, routes))
            return self.norm(x), None, chosen

        # The cache rides in the carry and is updated in place at each group's index. Whether it starts
        # empty is static, so it is told to each layer but not carried.
        empty = tuple(layer.empty for layer in cache.layers)
        carried = tuple(dataclasses.replace(layer, empty=False) for layer in cache.layers)

        def run_cached_group(carry, scanned):
            x, layers = carry
            group_state, index, key, route = scanned
            mine = tuple(layer.group(index, was_empty) for layer, was_empty in zip(layers, empty))
            x, mine, chosen = nnx.merge(graphdef, packed, group_state)(x, positions, mine, key, route, index)
            return (x, tuple(layer.with_group(index, new) for layer, new in zip(layers, mine))), chosen

        (x, layers), chosen = jax.lax.scan(run_cached_group, (x, carried), (stacked, indices, keys, routes))
        return self.norm(x), KVCache(layers), chosen

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Unembed final-normed hidden states: float32 [..., vocab]."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = _matmul("nd,vd->nv", flat, self.unembed[...], DTYPES[self.dtype])
        return logits.reshape(*hidden.shape[:-1], -1)

    def token_logprobs(self, hidden: jax.Array, targets: jax.Array, chunk: int = 1024) -> jax.Array:
        """log p(targets) float32 [...] from hidden states [..., D], without holding every logit at once.

        Tokens are unembedded `chunk` at a time and the chunks are recomputed in a backward pass, so a
        training step never stores a [tokens, vocab] array (201088 floats a token for gpt-oss).
        """
        return self._unembed_chunks(hidden, targets, chunk, with_entropy=False)[0]

    def token_logprobs_and_entropy(
        self, hidden: jax.Array, targets: jax.Array, chunk: int = 1024
    ) -> tuple[jax.Array, jax.Array]:
        """`token_logprobs` and the entropy of each next-token distribution (float32 [...], in nats)."""
        return self._unembed_chunks(hidden, targets, chunk, with_entropy=True)

    def _unembed_chunks(self, hidden, targets, chunk: int, with_entropy: bool) -> tuple[jax.Array, jax.Array]:
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        flat_targets = targets.reshape(-1)
        count = flat_hidden.shape[0]
        chunk = min(chunk, count)
        padded = -(-count // chunk) * chunk
        flat_hidden = jnp.pad(flat_hidden, ((0, padded - count), (0, 0)))
        flat_targets = jnp.pad(flat_targets, (0, padded - count))

        @jax.checkpoint
        def one_chunk(_, chunk_inputs):
            h, t = chunk_inputs
            logits = self.logits(h)
            normaliser = jax.nn.logsumexp(logits, axis=-1)
            chosen = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
            if with_entropy:
                entropy = normaliser - (jax.nn.softmax(logits, axis=-1) * logits).sum(axis=-1)
            else:
                entropy = jnp.zeros_like(normaliser)
            return None, (chosen - normaliser, entropy)

        _, (out, entropy) = jax.lax.scan(
            one_chunk, None, (flat_hidden.reshape(-1, chunk, hidden.shape[-1]), flat_targets.reshape(-1, chunk))
        )
        return tuple(x.reshape(-1)[:count].reshape(targets.shape) for x in (out, entropy))
