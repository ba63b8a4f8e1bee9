"""Continuous batching: a fixed number of slots over one static-shape KV cache, requests joining and
leaving them one at a time.

A request waits in a queue until a slot frees; its prompt is then prefilled into that slot's row of the
cache, at most `prefill_chunk` tokens per scheduling step, while the other slots keep decoding (so a long prompt
delays the others' next token by one chunk, not by the whole prompt). Every decode step advances all
slots at once with one compiled program; a free slot rides along with position -1, so it stores nothing
and is cheap to ignore. A request leaves on its own stop token or token limit, or when cancelled, and its
slot is free for the next request at the following step.

Each request carries its own sampling knobs and seed (a key per row), so what a request generates does
not depend on the requests beside it: greedy rows equal `Generator.generate` on the prompt alone.

Several waiting prompts are prefilled in one call (rows x chunk length within `prefill_chunk` tokens),
so a burst of short prompts costs a few calls, not one each.

Programs compiled: one decode step, and per (rows, chunk length) bucket (powers of two, their product
at most `prefill_chunk`) one program for prompts' first chunks (attend to themselves only, blockwise)
and one for later chunks (attend to the slot's cache too).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from flax import nnx

from gptoss_jax.inference.engine import MIN_PROMPT_BUCKET, Completion, GenerationError, bucket, checked_prompt
from gptoss_jax.inference.sampling import SamplingParams, sample
from gptoss_jax.nn import GptOss, KVCache
from gptoss_jax.nn.cache import LayerCache
from gptoss_jax.sharding import host_array


@dataclasses.dataclass
class Request:
    """One generation request: a prompt of token ids and how to continue it."""

    prompt: Sequence[int]
    max_new_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stop_tokens: Sequence[int] = ()
    # A test hook: emit these tokens (then sample as usual) and feed them back as if sampled; their
    # logprobs are not computed (NaN). Lets a test put exact output through the code that reads it.
    forced_tokens: Sequence[int] = ()


@dataclasses.dataclass(frozen=True)
class Event:
    """One generated token of one request; `finish_reason` is set on its last one."""

    request: int
    token: int
    logprob: float
    finish_reason: str | None  # None, "stop" (a stop token), "length" (max_new_tokens), "error" (serving)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class _Slot:
    """What the host tracks of a slot's request."""

    request_id: int
    request: Request  # as submitted: its prompt a list of ints
    prefilled: int = 0  # prompt tokens already in the cache
    produced: int = 0  # tokens generated so far
    routes: list[np.ndarray] = dataclasses.field(default_factory=list)


class Batcher:
    """Slots over one KV cache; `submit` requests, then call `step` (or `run`) to make their tokens."""

    def __init__(self, model: GptOss, slots: int = 8, context: int | None = None, prefill_chunk: int = 512,
                 record_routes: bool = False):  # fmt: skip
        """slots: rows of the cache (requests decoding at once); context: positions a slot holds, prompt
        and generated tokens together (default: the model's); prefill_chunk: prompt tokens prefilled per
        step; record_routes: keep the experts every token of a request went through (RL's router replay)."""
        self.model, self.config = model, model.config
        self.slots = slots
        self.context = min(context or self.config.max_context, self.config.max_context)
        self.prefill_chunk = bucket(prefill_chunk, MIN_PROMPT_BUCKET)
        self.record_routes = record_routes
        data_parallel = 1 if model.mesh is None else model.mesh.shape["data"]
        if slots % data_parallel:
            raise GenerationError(f"slots ({slots}) must be a multiple of the mesh's data axis ({data_parallel})")
        self.graphdef, self.state = nnx.split(model)
        cache = KVCache.create(self.config, slots, self.context, model.dtype, model.mesh)
        self._cache = KVCache(tuple(dataclasses.replace(layer, empty=False) for layer in cache.layers))
        # Every process of a multi-process run holds the same slots' state: replicated over the mesh.
        where = None if model.mesh is None else NamedSharding(model.mesh, PartitionSpec())
        self._token = jnp.zeros(slots, jnp.int32, device=where)
        self._position = jnp.zeros(slots, jnp.int32, device=where)  # the position each slot feeds next
        self._keys = jax.device_put(jax.random.key_data(jax.random.split(jax.random.key(0), slots)), where)
        self._sampling = {name: np.array(value) for name, value in SamplingParams().as_arrays(slots).items()}
        self._step_program = jax.jit(self._step_impl, donate_argnums=(1,))
        self._chunk_program = jax.jit(self._chunk_impl, static_argnums=(5,), donate_argnums=(1,))
        self._ids = itertools.count()
        self._queue: collections.OrderedDict[int, Request] = collections.OrderedDict()
        self._active: list[_Slot | None] = [None] * slots
        self._done_routes: dict[int, np.ndarray] = {}

    def update(self, model: GptOss) -> None:
        """Use `model`'s weights from now on (same structure: the compiled programs are reused)."""
        self.model = model
        self.state = nnx.state(model)

    # Bookkeeping a server reads.

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def busy_slots(self) -> int:
        return sum(slot is not None for slot in self._active)

    def slot_of(self, request_id: int) -> int | None:
        """The slot a request occupies (None while queued or once finished)."""
        return next((i for i, slot in enumerate(self._active) if slot and slot.request_id == request_id), None)

    def compiled_programs(self) -> int:
        return self._step_program._cache_size() + self._chunk_program._cache_size()

    def has_work(self) -> bool:
        return bool(self._queue) or self.busy_slots > 0

    # Requests.

    def submit(self, request: Request) -> int:
        """Queue a request; returns its id (events carry it)."""
        prompt = self.check(request)
        request_id = next(self._ids)
        self._queue[request_id] = dataclasses.replace(
            request, prompt=prompt, stop_tokens=tuple(request.stop_tokens), forced_tokens=tuple(request.forced_tokens)
        )
        return request_id

    def check(self, request: Request) -> list[int]:
        """The request's prompt as ints, or a GenerationError saying why it cannot be served."""
        prompt = checked_prompt(request.prompt, self.config.vocab_size, "the prompt")
        if request.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        if len(prompt) + request.max_new_tokens > self.context:
            raise GenerationError(
                f"prompt of {len(prompt)} tokens + max_new_tokens {request.max_new_tokens} exceeds the context "
                f"of {self.context} tokens"
            )
        return prompt

    def cancel(self, request_id: int) -> bool:
        """Drop a request, queued or running; its slot is free at once. False if it is not known."""
        if self._queue.pop(request_id, None) is not None:
            return True
        index = self.slot_of(request_id)
        if index is None:
            return False
        self._active[index] = None
        return True

    # Scheduling.

    def step(self) -> list[Event]:
        """One scheduling step: fill free slots from the queue, prefill the next chunk of the longest-waiting
        prompts, then one decode step of every slot that is generating. Returns the tokens made."""
        for index, slot in enumerate(self._active):
            if slot is None and self._queue:
                request_id, request = self._queue.popitem(last=False)
                self._active[index] = _Slot(request_id, request)
        events: list[Event] = []
        decoding = [slot is not None and slot.prefilled == len(slot.request.prompt) for slot in self._active]
        prefilling = [i for i, slot in enumerate(self._active) if slot is not None and not decoding[i]]
        if prefilling:
            events += self._prefill_chunks(self._prefill_batch(prefilling))
        if any(decoding):
            events += self._decode(decoding)
        return events

    def _prefill_batch(self, prefilling: list[int]) -> list[int]:
        """The slots whose next chunks go in this step: the longest-waiting one, and others of the same
        kind (first chunk or not) while rows x chunk length stays within `prefill_chunk` tokens."""
        prefilling = sorted(prefilling, key=lambda index: self._active[index].request_id)
        first = self._active[prefilling[0]].prefilled == 0
        chosen, longest = [], 0
        for index in prefilling:
            slot = self._active[index]
            if (slot.prefilled == 0) != first:
                continue
            piece = min(len(slot.request.prompt) - slot.prefilled, self.prefill_chunk)
            width = bucket(max(longest, piece), MIN_PROMPT_BUCKET)
            if chosen and bucket(len(chosen) + 1, 1) * width > self.prefill_chunk:
                break
            chosen.append(index)
            longest = max(longest, piece)
        return chosen

    def run(self, requests: Iterable[Request]) -> list[Completion]:
        """Serve `requests` to the end; one Completion per request, in order."""
        ids = [self.submit(request) for request in requests]
        completions = {request_id: Completion([], [], "length") for request_id in ids}
        while self.has_work():
            for event in self.step():
                completion = completions[event.request]
                completion.tokens.append(event.token)
                completion.logprobs.append(event.logprob)
                if event.finished:
                    completion.finish_reason = event.finish_reason
        for request_id, completion in completions.items():
            completion.routes = self._done_routes.pop(request_id, None)
        return [completions[request_id] for request_id in ids]

    # Host side of the two programs.

    def _prefill_chunks(self, indices: list[int]) -> list[Event]:
        """One chunk of each of these slots' prompts in one call (all first chunks, or all later ones)."""
        slots = [self._active[index] for index in indices]
        pieces = [slot.request.prompt[slot.prefilled : slot.prefilled + self.prefill_chunk] for slot in slots]
        rows = bucket(len(indices), 1)
        # Rows up to the bucket repeat the first: the same inputs write the same values to the same slot.
        padded = list(range(len(indices))) + [0] * (rows - len(indices))
        tokens = np.zeros((rows, bucket(max(map(len, pieces)), MIN_PROMPT_BUCKET)), np.int32)
        for row, i in enumerate(padded):
            tokens[row, : len(pieces[i])] = pieces[i]
        where = np.array([indices[i] for i in padded], np.int32)
        for index, slot in zip(indices, slots):
            self._set_sampling(index, slot.request.sampling)
        chunk = (
            tokens,
            np.array([slots[i].prefilled for i in padded], np.int32),
            np.array([len(pieces[i]) for i in padded], np.int32),
            np.array([slots[i].request.seed for i in padded], np.uint32),
        )
        sampling = {name: value[where] for name, value in self._sampling.items()}
        carry = (self._cache, self._token, self._position, self._keys)
        first = slots[0].prefilled == 0
        carry, token, logprob, routes = self._chunk_program(self.state, carry, sampling, where, chunk, first)
        self._cache, self._token, self._position, self._keys = carry
        token, logprob = host_array(token), host_array(logprob)
        routes = host_array(routes) if self.record_routes else None
        events = []
        for row, (index, slot, piece) in enumerate(zip(indices, slots, pieces)):
            slot.prefilled += len(piece)
            if routes is not None:
                slot.routes.append(routes[:, :, row, : len(piece)])
            if slot.prefilled == len(slot.request.prompt):
                events.append(self._emit(index, *self._forced(index, int(token[row]), float(logprob[row]))))
        return events

    def _forced(self, index: int, token: int, logprob: float) -> tuple[int, float]:
        """The token a slot emits: its request's next forced token (fed back in place of the sample), if any."""
        forced = self._active[index].request.forced_tokens
        produced = self._active[index].produced
        if produced >= len(forced):
            return token, logprob
        self._token = self._token.at[index].set(forced[produced])
        return int(forced[produced]), float("nan")

    def _decode(self, decoding: list[bool]) -> list[Event]:
        carry = (self._cache, self._token, self._position, self._keys)
        carry, tokens, logprobs, routes = self._step_program(self.state, carry, self._sampling, np.asarray(decoding))
        self._cache, self._token, self._position, self._keys = carry
        tokens, logprobs = host_array(tokens), host_array(logprobs)
        routes = host_array(routes) if self.record_routes else None
        events = []
        for index, is_decoding in enumerate(decoding):
            if is_decoding and self._active[index] is not None:
                if routes is not None:
                    self._active[index].routes.append(routes[:, :, index, None])
                events.append(self._emit(index, *self._forced(index, int(tokens[index]), float(logprobs[index]))))
        return events

    def _emit(self, index: int, token: int, logprob: float) -> Event:
        slot = self._active[index]
        slot.produced += 1
        reason = None
        if token in slot.request.stop_tokens:
            reason = "stop"
        elif slot.produced >= slot.request.max_new_tokens:
            reason = "length"
        if reason is not None:
            if self.record_routes:
                # Every generated token but the last went through the model.
                self._done_routes[slot.request_id] = np.concatenate(slot.routes, axis=2)
            self._active[index] = None  # free from the next step on
        return Event(slot.request_id, token, logprob, reason)

    def _set_sampling(self, index: int, sampling: SamplingParams) -> None:
        for name, value in sampling.as_arrays(1).items():
            self._sampling[name][index] = np.asarray(value)[0]

    # The two jitted programs.

    def _step_impl(self, state, carry, sampling, active):
        """One decode step of the `active` slots; the others feed position -1 (stored nowhere) and keep
        their state (a slot between prompt chunks, or free)."""
        model = nnx.merge(self.graphdef, state)
        cache, token, position, keys = carry
        fed = jnp.where(active, position, -1)
        hidden, cache, routes = model.forward(token[:, None], fed[:, None], cache)
        split = jax.vmap(jax.random.split)(jax.random.wrap_key_data(keys))
        new_token, logprob = sample(model.logits(hidden[:, 0]), split[:, 1], sampling, model.runtime.sampling_sorts)
        carry = (
            cache,
            jnp.where(active, new_token, token),
            jnp.where(active, position + 1, position),
            jnp.where(active[:, None], jax.random.key_data(split[:, 0]), keys),
        )
        return carry, new_token, logprob, routes[..., 0, :] if self.record_routes else None

    def _chunk_impl(self, state, carry, sampling, slots, chunk, first: bool):
        """Prefill one chunk of a prompt into each of `slots` [R] and sample the token after it (used once a
        prompt's last chunk is in). `first` (static): prompts' first chunks, which clear their slots and
        attend to themselves only."""
        model = nnx.merge(self.graphdef, state)
        cache, token, position, keys = carry
        tokens, starts, lengths, seeds = chunk
        steps = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        positions = jnp.where(steps < lengths[:, None], starts[:, None] + steps, -1)
        rows = KVCache(tuple(_rows(layer, slots, clear=first) for layer in cache.layers))
        hidden, rows, routes = model.forward(tokens, positions, rows)
        cache = KVCache(tuple(_with_rows(layer, slots, new) for layer, new in zip(cache.layers, rows.layers)))
        key = jax.vmap(jax.random.key)(seeds) if first else jax.random.wrap_key_data(keys[slots])
        split = jax.vmap(jax.random.split)(key)
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
        next_token, logprob = sample(model.logits(last), split[:, 1], sampling, model.runtime.sampling_sorts)
        carry = (
            cache,
            token.at[slots].set(next_token),
            position.at[slots].set(starts + lengths),
            keys.at[slots].set(jax.random.key_data(split[:, 0])),
        )
        return carry, next_token, logprob, routes if self.record_routes else None


def _rows(layer: LayerCache, slots, clear: bool) -> LayerCache:
    """These slots' rows of a cache layer ([groups, R, ...]); `clear` empties them for new prompts (whose
    first chunks then attend to themselves only)."""
    positions = layer.positions[:, slots]
    if clear:
        positions = jnp.full_like(positions, -1)
    return LayerCache(layer.keys[:, slots], layer.values[:, slots], positions, empty=clear)


def _with_rows(layer: LayerCache, slots, rows: LayerCache) -> LayerCache:
    return LayerCache(layer.keys.at[:, slots].set(rows.keys), layer.values.at[:, slots].set(rows.values),
                      layer.positions.at[:, slots].set(rows.positions))  # fmt: skip
