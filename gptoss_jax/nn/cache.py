"""The KV cache: a static-shape slot per position (full attention) or a ring (sliding window)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from gptoss_jax.backends.cpu.stacks import LayerOf
from gptoss_jax.config import SLIDING, GptOssConfig
from gptoss_jax.nn.ops import DTYPES
from gptoss_jax.sharding import CACHE_AXES, spec_for



@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["keys", "values", "positions"], meta_fields=["empty"]
)
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """Keys and values one attention layer keeps, with the position each slot holds (-1: empty).

    A token at position p lives in slot p % slots: full-attention layers get a slot per position of the
    context, sliding-window layers a ring of `sliding_window` slots (all the window can ever see).
    """

    keys: jax.Array  # [B, slots, kv_heads * head_dim] (or a LayerOf view of a stack of them: `group`)
    values: jax.Array  # [B, slots, kv_heads * head_dim]
    positions: jax.Array  # [B, slots] int32
    # Known empty at trace time (a fresh cache): a prefill then attends to its own tokens only.
    empty: bool = False

    def group(self, index: jax.Array, empty: bool, *, in_place: bool = False) -> "LayerCache":
        """One layer group's slice of a cache stacked over groups.

        in_place: as LayerOf views of the stacks instead (for `write_in_place` and a kernel that reads
        the group in place): slicing copies the group, and putting it back made XLA write (and count)
        the whole stack at every layer.
        """
        if in_place:
            return LayerCache(*(LayerOf(stack, index) for stack in (self.keys, self.values, self.positions)), empty)
        return LayerCache(self.keys[index], self.values[index], self.positions[index], empty)

    def with_group(self, index: jax.Array, one: "LayerCache") -> "LayerCache":
        """This stacked cache with group `index` replaced by `one` (in place under jit)."""
        if isinstance(one.keys, LayerOf):  # written in place: the stacks are the cache
            return LayerCache(one.keys.stack, one.values.stack, one.positions.stack)
        return LayerCache(
            self.keys.at[index].set(one.keys),
            self.values.at[index].set(one.values),
            self.positions.at[index].set(one.positions),
        )

    def heads(self, config: GptOssConfig) -> tuple[jax.Array, jax.Array]:
        """Keys and values as [B, slots, kv_heads, head_dim]."""
        return tuple(x.reshape(*x.shape[:2], config.num_kv_heads, config.head_dim) for x in (self.keys, self.values))

    def write_in_place(self, keys: jax.Array, values: jax.Array, positions: jax.Array) -> "LayerCache":
        """A decode step's token per row ([B, 1, kv_heads, head_dim]) stored into a `group(in_place=True)`
        view: a scatter of one slot per row into the stacks at the group's index."""
        stacks, index = (self.keys.stack, self.values.stack, self.positions.stack), self.keys.index
        batch, slots = self.positions.shape
        rows = jnp.arange(batch)
        slot = jnp.where(positions[:, 0] >= 0, positions[:, 0] % slots, slots)  # slot `slots` is dropped
        new = (keys.reshape(batch, -1), values.reshape(batch, -1), positions[:, 0])
        written = (stack.at[index, rows, slot].set(x.astype(stack.dtype), mode="drop") for stack, x in zip(stacks, new))
        return LayerCache(*(LayerOf(stack, index) for stack in written), self.empty)

    def write(self, keys: jax.Array, values: jax.Array, positions: jax.Array, *, select: bool = False) -> "LayerCache":
        """Store new tokens ([B, T, kv_heads, head_dim]; positions -1 are padding and stored nowhere); the
        latest token wins a slot.

        select: write a decode step's token by a select over the slots rather than a scatter. A TPU keeps
        the cache with its slots on lanes and would copy it to row-major and back around a scatter (about
        6x the cache's bytes a step); the select reads and writes it once, in that layout.
        """
        batch, slots = self.positions.shape
        keys, values = (x.reshape(*x.shape[:2], -1) for x in (keys, values))
        rows = jnp.arange(batch)[:, None]
        slot = jnp.where(positions >= 0, positions % slots, slots)  # slot `slots` is dropped
        if positions.shape[1] == 1 and select:
            here = jnp.arange(slots)[None, :] == slot  # [B, slots]
            return LayerCache(
                jnp.where(here[:, :, None], keys.astype(self.keys.dtype), self.keys),
                jnp.where(here[:, :, None], values.astype(self.values.dtype), self.values),
                jnp.where(here, positions, self.positions),
            )
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
            picked = jnp.take_along_axis(new, source[:, :, None], axis=1).astype(old.dtype)
            return jnp.where(taken[:, :, None], picked, old)

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
            shape = (config.num_groups, batch, slots, config.num_kv_heads * config.head_dim)
            layers.append(
                LayerCache(
                    filled(shape, 0, DTYPES[dtype], CACHE_AXES),
                    filled(shape, 0, DTYPES[dtype], CACHE_AXES),
                    filled(shape[:3], -1, jnp.int32, CACHE_AXES[:2]),
                    empty=True,
                )
            )
        return cls(tuple(layers))

