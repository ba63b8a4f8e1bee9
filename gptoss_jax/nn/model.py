"""gpt-oss as a Flax NNX module tree, composed of the parts in this package.

Parameters keep the checkpoint's (out, in) orientation, split into heads where that helps the einsums,
so loading is a reshape, not a transpose (but for the unembedding in blocks of 16 rows on CPUs whose
kernels read it so, Runtime.unembedding_in_blocks). Layers are stacked per repetition of the config's
layer pattern (a sliding + full pair for the released models) and the forward scans over the stack,
so compile time does not grow with depth. The residual stream, norms, softmaxes and routing run in
float32 whatever the compute dtype; matmuls take the compute dtype and accumulate in float32. Which
algorithm runs is the model's `runtime`'s choice (gptoss_jax/runtime.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax.backends.cpu.blocks import to_blocks
from gptoss_jax.backends.cpu.stacks import views
from gptoss_jax.config import EXPERT_FORMATS, SLIDING, GptOssConfig
from gptoss_jax.nn.attention import Attention
from gptoss_jax.nn.cache import KVCache, LayerCache
from gptoss_jax.nn.moe import MoE, PackedBytes
from gptoss_jax.nn.ops import DTYPES, RMSNorm, embedding_rows, init, unembedding
from gptoss_jax.nn.unembed import chunked_token_logprobs
from gptoss_jax.runtime import Runtime
from gptoss_jax.sharding import constrain

RESIDUAL_AXES = ("batch", None, None)  # the residual stream [B, T, D] on a mesh: rows over 'data'


class Block(nnx.Module):
    """One pre-norm transformer layer: attention then mixture of experts, each added to the residual."""

    def __init__(self, config: GptOssConfig, param_dtype, dtype, experts: str, rngs: nnx.Rngs, expert_form: str):
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        self.attn = Attention(config, param_dtype, dtype, rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        self.mlp = MoE(config, param_dtype, dtype, experts, rngs, expert_form)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        sliding: bool,
        cache: LayerCache | None = None,
        dropout_key: jax.Array | None = None,
        route: jax.Array | None = None,
        *,
        runtime: Runtime,
    ) -> tuple[jax.Array, LayerCache | None, jax.Array]:
        """(new residual stream, updated cache, the experts chosen for each token)."""
        mesh = self.attn.mesh
        attended, cache = self.attn(self.attn_norm(x), positions, sliding, runtime, cache, dropout_key)
        x = constrain(x + attended, RESIDUAL_AXES, mesh)
        mixed, experts = self.mlp(self.mlp_norm(x), dropout_key, route, runtime=runtime)
        return constrain(x + mixed, RESIDUAL_AXES, mesh), cache, experts


class LayerGroup(nnx.Module):
    """One repetition of the layer pattern (for gpt-oss: a sliding-window layer then a full one)."""

    def __init__(self, config: GptOssConfig, param_dtype, dtype, experts: str, rngs: nnx.Rngs, expert_form: str):
        self.layers = nnx.List(
            [Block(config, param_dtype, dtype, experts, rngs, expert_form) for _ in config.layer_pattern]
        )
        self.sliding = tuple(kind == SLIDING for kind in config.layer_pattern)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        caches: tuple[LayerCache, ...] | None = None,
        dropout_key: jax.Array | None = None,
        routes: jax.Array | None = None,
        *,
        runtime: Runtime,
    ) -> tuple[jax.Array, tuple[LayerCache, ...] | None, jax.Array]:
        """routes: [pattern, B, T, k] experts to replay, one entry per layer of the group; the experts
        chosen are returned in the same shape."""
        updated, chosen = [], []
        for index, (layer, sliding) in enumerate(zip(self.layers, self.sliding)):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
            cache = None if caches is None else caches[index]
            route = None if routes is None else routes[index]
            x, cache, experts = layer(x, positions, sliding, cache, key, route, runtime=runtime)
            updated.append(cache)
            chosen.append(experts)
        return x, None if caches is None else tuple(updated), jnp.stack(chosen)


# The stacked weights the layer scan passes whole, as views of one layer, when the runtime reads layers
# in place (see gptoss_jax/backends/cpu/stacks.py).
WHOLE_STACKS = {
    "experts": PackedBytes,
    "attention": nnx.Any(*(nnx.PathContains(name) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))),
}


class GptOss(nnx.Module):
    """The gpt-oss transformer. Call with int32 tokens [B, T] for float32 logits [B, T, vocab]."""

    def __init__(
        self,
        config: GptOssConfig,
        *,
        dtype: str = "bfloat16",
        experts: str = "mxfp4",
        runtime: Runtime | None = None,
        rngs: nnx.Rngs,
    ):
        """runtime: where the model runs and which algorithms it uses (default: jax's default devices)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if experts not in EXPERT_FORMATS:
            raise ValueError(f"experts must be one of {list(EXPERT_FORMATS)}, got {experts!r}")
        c = config
        compute = DTYPES[dtype]
        self.config = config
        self.dtype = dtype
        self.experts = experts
        self.runtime = Runtime.default() if runtime is None else runtime
        self.checkpoint_dir: str | None = None  # set by gptoss_jax.load; tokenizer files may lie there
        self.mesh = None  # set by gptoss_jax.sharding.shard_model
        # Stored with zero columns past hidden_size where the runtime says so (Runtime.embedding_width).
        width = self.runtime.embedding_width(c.hidden_size)
        self.embed = nnx.Param(init(rngs, (c.vocab_size, width), compute, 1.0), axes=("vocab", "embed"))

        @nnx.split_rngs(splits=c.num_groups)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_groups(rngs: nnx.Rngs) -> LayerGroup:
            return LayerGroup(config, compute, compute, experts, rngs, self.runtime.expert_form)

        self.groups = make_groups(rngs)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, compute)
        unembed = init(rngs, (c.vocab_size, c.hidden_size), compute, c.hidden_size**-0.5)
        if self.runtime.unembedding_in_blocks(c.vocab_size, compute):  # [V/16, D, 16]: the same values
            self.unembed = nnx.Param(to_blocks(unembed), axes=("vocab", "embed", None))
        else:
            self.unembed = nnx.Param(unembed, axes=("vocab", "embed"))

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
        runtime = self.runtime
        x = embedding_rows(self.embed[...], tokens, runtime.gathers_bits)[..., : self.config.hidden_size]
        x = x.astype(jnp.float32)
        # The scan slices each group's weights out of the stack. Where that copy is avoidable (the CPU
        # kernels read a layer in place), the big weights are passed whole, as views of the group's layer.
        if runtime.whole_stacks:
            passed_whole = nnx.Any(*(WHOLE_STACKS[kind] for kind in runtime.whole_stacks))
            graphdef, whole, stacked = nnx.split(self.groups, passed_whole, ...)

            def group_at(state, index) -> LayerGroup:
                return nnx.merge(graphdef, views(whole, index), state)

        else:
            graphdef, stacked = nnx.split(self.groups)

            def group_at(state, index) -> LayerGroup:
                return nnx.merge(graphdef, state)

        keys = None if dropout_key is None else jax.random.split(dropout_key, self.config.num_groups)
        indices = jnp.arange(self.config.num_groups)

        if cache is None:
            # Rematerialised: a backward pass keeps each group's input only, not its activations.
            @jax.checkpoint
            def run_group(x, scanned):
                group_state, index, key, route = scanned
                group = group_at(group_state, index)
                x, _, chosen = group(x, positions, dropout_key=key, routes=route, runtime=runtime)
                return x, chosen

            x, chosen = jax.lax.scan(run_group, x, (stacked, indices, keys, routes), unroll=runtime.unroll_layers)
            return self.norm(x), None, chosen

        # The cache rides in the carry and is updated in place at each group's index. Whether it starts
        # empty is static, so it is told to each layer but not carried.
        empty = tuple(layer.empty for layer in cache.layers)
        carried = tuple(dataclasses.replace(layer, empty=False) for layer in cache.layers)

        # A decode step's kernel may write and read each group's cache in place in the stack (LayerCache.group).
        in_place = tokens.shape[1] == 1 and runtime.decodes_in_place(cache.layers[0].keys.dtype, self.mesh)

        def run_cached_group(carry, scanned):
            x, layers = carry
            group_state, index, key, route = scanned
            mine = tuple(
                layer.group(index, was_empty, in_place=in_place and not was_empty)
                for layer, was_empty in zip(layers, empty)
            )
            x, mine, chosen = group_at(group_state, index)(x, positions, mine, key, route, runtime=runtime)
            return (x, tuple(layer.with_group(index, new) for layer, new in zip(layers, mine))), chosen

        (x, layers), chosen = jax.lax.scan(
            run_cached_group, (x, carried), (stacked, indices, keys, routes), unroll=runtime.unroll_layers
        )
        return self.norm(x), KVCache(layers), chosen

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Unembed final-normed hidden states: float32 [..., vocab]."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = unembedding(flat, self.unembed[...], DTYPES[self.dtype], self.runtime)
        return logits.reshape(*hidden.shape[:-1], -1)

    def token_logprobs(self, hidden: jax.Array, targets: jax.Array, chunk: int | None = None) -> jax.Array:
        """log p(targets) float32 [...] from hidden states [..., D], `chunk` tokens unembedded at a time
        (default: the runtime's logprob_chunk)."""
        chunk = chunk or self.runtime.logprob_chunk
        return chunked_token_logprobs(self.logits, hidden, targets, chunk, with_entropy=False)[0]

    def token_logprobs_and_entropy(
        self, hidden: jax.Array, targets: jax.Array, chunk: int | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """`token_logprobs` and the entropy of each next-token distribution (float32 [...], in nats)."""
        chunk = chunk or self.runtime.logprob_chunk
        return chunked_token_logprobs(self.logits, hidden, targets, chunk, with_entropy=True)
