"""What every expert algorithm shares: the activation, sorting pairs by expert, decoding weights, and
the experts' LoRA updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptoss_jax import mxfp4
from gptoss_jax.backends.cpu import experts as cpu_experts
from gptoss_jax.backends.cpu.stacks import take, whole
from gptoss_jax.backends.tpu.expert_form import GATE_LINEAR, from_tpu_form, halves_order
from gptoss_jax.config import GptOssConfig
from gptoss_jax.nn.ops import dropout, matmul
from gptoss_jax.runtime import Runtime


def swiglu(h: jax.Array, config: GptOssConfig, halves: bool = False) -> jax.Array:
    """gpt-oss's clamped SwiGLU over interleaved (gate, linear) columns, with the `+1` on linear; halves:
    every gate, then every linear (the TPU form's mlp1, see gptoss_jax.backends.tpu.expert_form)."""
    if halves:
        # Slices, not jnp.split (lax.split, whose gradient is a concatenation): a v6e LoRA step of 20b at
        # 8k tokens held 12.66 GiB of temporaries with the split, 11.02 with the slices.
        half = h.shape[-1] // 2
        gate, linear = h[..., :half], h[..., half:]
    else:
        # Pairs by a reshape, not strided slices: on TPU the gradient of a lane-strided slice compiles in
        # time that grows with the rows (a 4k-token training step's took most of its compile).
        pairs = h.reshape(*h.shape[:-1], h.shape[-1] // 2, 2)
        gate, linear = pairs[..., 0], pairs[..., 1]
    gate = jnp.minimum(gate, config.swiglu_limit)
    linear = jnp.clip(linear, -config.swiglu_limit, config.swiglu_limit)
    return gate * jax.nn.sigmoid(config.swiglu_alpha * gate) * (linear + 1)


def sort_by_expert(experts: jax.Array, local_count: int):
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


def decode_experts(params: dict, name: str, dtype, runtime: Runtime, experts: jax.Array | None = None) -> jax.Array:
    """Projection `name`'s [E, out, in] weights from either form, or [*experts.shape, out, in] for just the
    chosen experts (outputs in the checkpoint's order)."""
    weights = params[name]
    if "weight" in weights:
        weight = weights["weight"]
        return (weight if experts is None else weight[experts]).astype(dtype)
    if "tpu_blocks" in weights:  # the TPU form, on an XLA path (the Pallas kernels turned off)
        blocks, scales = weights["tpu_blocks"], weights["tpu_scales"]
        if experts is None:
            blocks, scales = whole(blocks), whole(scales)
        else:
            blocks, scales = take(blocks, experts), take(scales, experts)
        return mxfp4.dequantize(*from_tpu_form(blocks, scales, halves=name == GATE_LINEAR), dtype)
    blocks, scales = weights["blocks"], weights["scales"]
    if experts is not None and experts.ndim == 0 and runtime.cpu_kernels is not None:
        return cpu_experts.dequantize_one(blocks, scales, experts, dtype)
    if experts is None:
        return mxfp4.dequantize(whole(blocks), whole(scales), dtype)
    return mxfp4.dequantize(take(blocks, experts), take(scales, experts), dtype)


class ExpertAdapters:
    """The per-expert LoRA updates of mlp1 / mlp2 (zero where a projection has no adapter).

    params may hold "mlp1_lora"/"mlp2_lora" ({"a", "b"} per expert) and a "dropout_key"; settings[name]
    is that adapter's (scale, dropout).
    """

    def __init__(self, params: dict, settings: dict[str, tuple[float, float]], dtype, runtime: Runtime):
        self.params, self.settings, self.dtype, self.runtime = params, settings, dtype, runtime

    def in_halves(self) -> "ExpertAdapters":
        """The same adapters with mlp1's outputs in halves, as the TPU form's kernels give them."""
        if "mlp1_lora" not in self.params:
            return self
        lora = self.params["mlp1_lora"]
        params = dict(self.params, mlp1_lora=dict(lora, b=halves_order(lora["b"], axis=1)))
        return ExpertAdapters(params, self.settings, self.dtype, self.runtime)

    def _input(self, name: str, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        key = self.params.get("dropout_key") if key is None else key
        key = None if key is None else jax.random.fold_in(key, name == "mlp2")
        return dropout(x, self.settings[name][1], key)

    def _matmul(self, equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
        return matmul(equation, x, w, self.dtype, self.runtime)

    def gathered(self, name: str, equation: str, x: jax.Array, experts: jax.Array) -> jax.Array | float:
        """Update for tokens applied to their chosen experts; `equation` maps x and a[experts] to [n, k, rank]."""
        if name not in self.settings:
            return 0.0
        a, b = self.params[f"{name}_lora"]["a"][experts], self.params[f"{name}_lora"]["b"][experts]
        low = self._matmul(equation, self._input(name, x), a)
        return self.settings[name][0] * self._matmul("nkr,nkor->nko", low, b)

    def tile(self, name: str, x: jax.Array, expert: jax.Array, index: jax.Array) -> jax.Array | float:
        """Update for a tile of rows [T, in] that all go to `expert` (tile `index` of the scan)."""
        if name not in self.settings:
            return 0.0
        adapter = self.params[f"{name}_lora"]
        key = self.params.get("dropout_key")
        x = self._input(name, x, None if key is None else jax.random.fold_in(key, index))
        low = self._matmul("ti,ri->tr", x, adapter["a"][expert])
        return self.settings[name][0] * self._matmul("tr,or->to", low, adapter["b"][expert])

    def rows(self, name: str, x: jax.Array, experts: jax.Array) -> jax.Array | float:
        """Update for rows [rows, in], row r going to expert experts[r] (a decode batch's pairs)."""
        if name not in self.settings:
            return 0.0
        adapter = self.params[f"{name}_lora"]
        low = self._matmul("ri,rki->rk", self._input(name, x), adapter["a"][experts])
        return self.settings[name][0] * self._matmul("rk,rok->ro", low, adapter["b"][experts])

    def tiles(self, name: str, x: jax.Array, tile_experts: jax.Array) -> jax.Array | float:
        """Update for rows [tiles * tile, in] in whole tiles, tile t going to expert tile_experts[t]: a
        batched product over tiles with each tile's adapter gathered (a ragged_dot here would compute every
        expert for every row on a GPU)."""
        if name not in self.settings:
            return 0.0
        adapter = self.params[f"{name}_lora"]
        tiles = self._input(name, x).reshape(tile_experts.shape[0], -1, x.shape[-1])
        low = self._matmul("tri,tki->trk", tiles, adapter["a"][tile_experts])
        update = self._matmul("trk,tok->tro", low, adapter["b"][tile_experts])
        return self.settings[name][0] * update.reshape(x.shape[0], -1)

    def grouped(self, name: str, x: jax.Array, group_sizes: jax.Array) -> jax.Array | float:
        """Update for rows sorted by expert, as two grouped matmuls through the rank."""
        if name not in self.settings:
            return 0.0
        adapter, dtype = self.params[f"{name}_lora"], self.dtype
        # The weights stay float32 (ragged_dot takes them beside bf16 rows): cast inside the layer scan,
        # XLA hoists the cast out of the loop and keeps a bf16 copy of every layer's adapters through the
        # backward pass (0.35 GB for 20b at rank 16).
        a, b = jnp.swapaxes(adapter["a"], 1, 2), jnp.swapaxes(adapter["b"], 1, 2)
        low = jax.lax.ragged_dot(self._input(name, x).astype(dtype), a, group_sizes, preferred_element_type=jnp.float32)
        update = jax.lax.ragged_dot(low.astype(dtype), b, group_sizes, preferred_element_type=jnp.float32)
        return self.settings[name][0] * update
