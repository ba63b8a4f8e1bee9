"""Generation: prefill then decode under jax.jit with a static-shape KV cache.

Shapes are bucketed so a session compiles a handful of programs, not one per prompt: the batch is
padded to a power of two, prompts are right-padded to a power-of-two length, and the cache length is
a power of two covering prompt plus new tokens. Padding has position -1, so no real token attends to
it and the cache never stores it; each row generates exactly what it would alone.

Decoding runs one step per call (`stream(chunk=N)` scans N steps in one call), with the next call
dispatched before the current one's tokens are read, so the host's work overlaps the device's. (On the
CPU a scan of several steps was slower per step: XLA hoists and materialises loop-invariant views of
the weights.) Rows that hit a stop token keep stepping (shapes are static) but their later tokens are
discarded.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.errors import GptOssError
from gptoss_jax.nn import GptOss, KVCache
from gptoss_jax.inference.sampling import SamplingParams, sample
from gptoss_jax.sharding import host_array

MIN_PROMPT_BUCKET = 16
MIN_CACHE_BUCKET = 128
DECODE_CHUNK = 1


class GenerationError(GptOssError):
    """A generation request the model cannot serve (empty prompt, too long, bad token id)."""


@dataclasses.dataclass
class Completion:
    """What one prompt generated: token ids (stop token included), their log-probabilities, and why it ended."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)
    # With Generator(record_routes=True): the experts each fed token went through, int32
    # [num_groups, pattern, len(prompt) + len(tokens) - 1, k] (prompt, then every token but the last).
    routes: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token of one row, as streaming yields it."""

    row: int
    token: int
    logprob: float
    finished: bool


def bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


class Generator:
    """Compiled prefill/decode for one model; reuse it across calls to reuse the compiled programs."""

    def __init__(self, model: GptOss, record_routes: bool = False):
        """record_routes: also return which experts every token went through (for RL's router replay)."""
        self.model = model
        self.config = model.config
        self.record_routes = record_routes
        self.graphdef, self.state = nnx.split(model)
        self._prefill = jax.jit(self._prefill_impl, donate_argnums=(3,))
        self._decode = jax.jit(self._decode_impl, static_argnums=(3,), donate_argnums=(1,))

    def update(self, model: GptOss) -> None:
        """Use `model`'s weights from now on (same structure: the compiled programs are reused)."""
        self.model = model
        self.state = nnx.state(model)

    def compiled_programs(self) -> int:
        """How many programs have been compiled so far (prefill and decode shapes)."""
        return self._prefill._cache_size() + self._decode._cache_size()

    # The two jitted programs.

    def _prefill_impl(self, state, tokens, lengths, cache, sampling, key):
        model = nnx.merge(self.graphdef, state)
        steps = jnp.arange(tokens.shape[1], dtype=jnp.int32)
        positions = jnp.where(steps[None, :] < lengths[:, None], steps[None, :], -1)
        hidden, cache, routes = model.forward(tokens, positions, cache)
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
        key, step_key = jax.random.split(key)
        token, logprob = sample(model.logits(last), step_key, sampling, model.runtime.sampling_sorts)
        return (cache, token, lengths, key), token, logprob, routes if self.record_routes else None

    def _decode_impl(self, state, carry, sampling, num_steps):
        model = nnx.merge(self.graphdef, state)

        def step(carry, _):
            cache, token, position, key = carry
            hidden, cache, routes = model.forward(token[:, None], position[:, None], cache)
            key, step_key = jax.random.split(key)
            token, logprob = sample(model.logits(hidden[:, 0]), step_key, sampling, model.runtime.sampling_sorts)
            return (cache, token, position + 1, key), (token, logprob, routes[..., 0, :] if self.record_routes else None)

        carry, (tokens, logprobs, routes) = jax.lax.scan(step, carry, None, length=num_steps)
        return carry, tokens.T, logprobs.T, routes  # routes: [steps, groups, pattern, B, k]

    # Public API.

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 256,
        sampling: SamplingParams = SamplingParams(),
        seed: int = 0,
        stop_tokens: Sequence[int] = (),
        chunk: int = 1,
    ) -> Iterator[TokenEvent]:
        """Yield each row's tokens as they are made (in steps of `chunk` tokens)."""
        return self._stream(prompts, max_new_tokens, sampling, seed, stop_tokens, chunk, None)

    def _stream(self, prompts, max_new_tokens, sampling, seed, stop_tokens, chunk, routes_out: list | None):
        """`stream`; with record_routes, appends the prefill's then each decode chunk's routes to routes_out."""
        prompts = self._check(prompts, max_new_tokens, stop_tokens)
        rows = len(prompts)
        data_parallel = 1 if self.model.mesh is None else self.model.mesh.shape["data"]
        batch = -(-bucket(rows, 1) // data_parallel) * data_parallel  # rows split evenly over 'data'
        longest = max(len(prompt) for prompt in prompts)
        prompt_bucket = bucket(longest, MIN_PROMPT_BUCKET)
        steps_needed = -(-(max_new_tokens - 1) // chunk) * chunk
        cache_length = min(bucket(prompt_bucket + steps_needed + 1, MIN_CACHE_BUCKET), self.config.max_context)
        if longest + max_new_tokens > self.config.max_context:
            raise GenerationError(
                f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the context of "
                f"{self.config.max_context} tokens"
            )

        tokens = np.zeros((batch, prompt_bucket), np.int32)
        lengths = np.ones(batch, np.int32)  # filler rows: a one-token prompt, discarded
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = prompt
            lengths[row] = len(prompt)
        sampling_arrays = sampling.as_arrays(batch)
        cache = KVCache.create(self.config, batch, cache_length, self.model.dtype, self.model.mesh)

        carry, token, logprob, routes = self._prefill(
            self.state, tokens, lengths, cache, sampling_arrays, jax.random.key(seed)
        )
        token, logprob = host_array(token), host_array(logprob)
        if routes_out is not None:
            routes_out.append(host_array(routes))
        # Which rows have ended is tracked here only: a finished row keeps stepping on the device (shapes
        # are static) and its later tokens are dropped.
        finished = np.isin(token, list(stop_tokens)) | (max_new_tokens == 1)
        for row in range(rows):
            yield TokenEvent(row, int(token[row]), float(logprob[row]), bool(finished[row]))
        produced = 1
        # The device runs one chunk ahead of the host: the next chunk is dispatched (it needs only the
        # carry, which stays on the device) before this one's tokens are read, so the host's reading and
        # yielding overlaps the device's work. At most one chunk past a stop is computed and dropped.
        pending = None
        if produced < max_new_tokens and not finished[:rows].all():
            pending = self._decode(self.state, carry, sampling_arrays, chunk)
        while pending is not None:
            carry, tokens_out, logprobs_out, routes = pending
            pending = None
            if produced + chunk < max_new_tokens:
                pending = self._decode(self.state, carry, sampling_arrays, chunk)
            tokens_out, logprobs_out = host_array(tokens_out), host_array(logprobs_out)
            if routes_out is not None:
                routes_out.append(host_array(routes))
            for step in range(chunk):
                if produced >= max_new_tokens:
                    break
                produced += 1
                for row in range(rows):
                    if finished[row]:
                        continue
                    token = int(tokens_out[row, step])
                    finished[row] = token in stop_tokens or produced == max_new_tokens
                    yield TokenEvent(row, token, float(logprobs_out[row, step]), bool(finished[row]))
            if finished[:rows].all():
                break  # a chunk already dispatched is dropped

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 256,
        sampling: SamplingParams = SamplingParams(),
        seed: int = 0,
        stop_tokens: Sequence[int] = (),
    ) -> list[Completion]:
        """Generate for every prompt at once; one Completion per prompt, in order."""
        completions = [Completion([], [], "length") for _ in prompts]
        routes: list | None = [] if self.record_routes else None
        for event in self._stream(prompts, max_new_tokens, sampling, seed, stop_tokens, DECODE_CHUNK, routes):
            completion = completions[event.row]
            completion.tokens.append(event.token)
            completion.logprobs.append(event.logprob)
            if event.token in stop_tokens:
                completion.finish_reason = "stop"
        if routes is not None:
            prompt_routes = routes[0]  # [groups, pattern, batch, prompt bucket, k]
            decoded = np.concatenate(routes[1:], axis=0) if len(routes) > 1 else prompt_routes[:, :, :, :0][None]
            decoded = np.moveaxis(decoded, 0, 3)  # [groups, pattern, batch, steps, k]
            for row, (prompt, completion) in enumerate(zip(prompts, completions)):
                fed = len(completion.tokens) - 1  # every generated token but the last went through the model
                completion.routes = np.concatenate(
                    [prompt_routes[:, :, row, : len(prompt)], decoded[:, :, row, :fed]], axis=2
                )
        return completions

    def _check(self, prompts, max_new_tokens: int, stop_tokens) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not len(prompts):
            raise GenerationError("prompts must be a non-empty list of token-id lists")
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        checked = []
        for row, prompt in enumerate(prompts):
            prompt = checked_prompt(prompt, self.config.vocab_size, f"prompt {row}")
            if len(prompt) >= self.config.max_context:
                raise GenerationError(
                    f"prompt {row} has {len(prompt)} tokens; the context holds {self.config.max_context}"
                )
            checked.append(prompt)
        return checked


def checked_prompt(prompt: Sequence[int], vocab_size: int, name: str) -> list[int]:
    """The prompt as ints, or a GenerationError naming it when it is empty or holds an id outside the vocabulary."""
    prompt = [int(token) for token in prompt]
    if not prompt:
        raise GenerationError(f"{name} is empty")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise GenerationError(f"{name} has a token id outside 0..{vocab_size - 1}")
    return prompt


def generate(
    model: GptOss,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int = 0,
    stop_tokens: Sequence[int] = (),
) -> list[list[int]]:
    """Generated token ids for each prompt (stop token included when one ended it).

    temperature 0 is greedy. The defaults (temperature 1, top_p 1) are OpenAI's recommendation for gpt-oss.
    For repeated calls, build a `Generator(model)` once: it keeps the compiled programs.
    """
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    generator = _generator_for(model)
    completions = generator.generate(
        prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_tokens=stop_tokens
    )
    return [completion.tokens for completion in completions]


_GENERATORS: dict[int, Generator] = {}


def _generator_for(model: GptOss) -> Generator:
    """One Generator per live model, so `generate` called in a loop compiles once."""
    generator = _GENERATORS.get(id(model))
    if generator is None or generator.model is not model:
        _GENERATORS.clear()  # keep at most one: a Generator holds the model's arrays
        generator = _GENERATORS[id(model)] = Generator(model)
    return generator
