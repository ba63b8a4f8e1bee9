"""One layer of a weight stacked over layers, read in place.

The model scans over its layer groups. A scan slices each step's weights out of their stacks, which
copies them; on the CPU the big ones (packed expert bytes, attention projections) are instead handed to
each step whole, as a `LayerOf` view, and the CPU kernels read the layer they need in place. Code that
is not a CPU kernel asks for `whole(w)` (one copy of the layer, by a kernel: XLA's CPU slice of a bf16
stack converts the whole stack to float32 first) or `take(w, index)` (a gather of a few rows).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerOf:
    """Layer `index` of `stack` [L, ...] (what a Flax variable holds inside the CPU layer scan)."""

    stack: jax.Array
    index: jax.Array  # int32 scalar

    def __getitem__(self, key):
        if key is Ellipsis:  # variable[...] reads the value: the view itself
            return self
        raise TypeError("index a stacked layer through gptoss_jax.backends.cpu.stacks.take")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack.shape[1:]

    @property
    def ndim(self) -> int:
        return self.stack.ndim - 1

    @property
    def dtype(self):
        return self.stack.dtype


def unstack(weight) -> tuple[jax.Array, jax.Array | None]:
    """(stack, layer index) of a LayerOf; (array, None) of a plain array."""
    return (weight.stack, weight.index) if isinstance(weight, LayerOf) else (weight, None)


def whole(weight) -> jax.Array:
    """The layer as an array of its own."""
    from gptoss_jax.backends.cpu import layer_slice

    stack, layer = unstack(weight)
    return layer_slice(stack, layer)


def take(weight, index) -> jax.Array:
    """weight[index] along its first axis, without a copy of the whole layer."""
    stack, layer = unstack(weight)
    return stack[index] if layer is None else stack[layer, index]


def views(state, index: jax.Array):
    """Every array of a (Flax) state as a LayerOf view of layer `index`."""
    return jax.tree.map(lambda stack: LayerOf(stack, jnp.asarray(index, jnp.int32)), state)
