"""Rewards for RL: plug-ins named `module:function`, built-ins, and the arithmetic task.

A reward function is called once per batch as

    reward(prompts: list[str], completions: list[Sample], fields: list[dict], **reward_kwargs) -> list[float]

with one entry per completion (each prompt appears once per sample of its group): the prompt text,
the completion (token ids, raw text, parsed harmony messages, its final-channel text or None, why it
ended) and the example's JSONL fields. It returns one float per completion.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import random
from typing import Any, Callable

from gptoss_jax.chat.answers import extract_letter, extract_number
from gptoss_jax.chat.harmony import ChatMessage
from gptoss_jax.errors import ConfigError, GptOssError

RewardFn = Callable[..., list[float]]


class RewardError(GptOssError):
    """A reward function that failed or returned the wrong thing, named with the batch."""


@dataclasses.dataclass(frozen=True)
class Sample:
    tokens: list[int]
    text: str  # the completion decoded as raw text
    messages: list[ChatMessage]  # parsed harmony messages (raw text as one message if it is not harmony)
    final: str | None  # the final channel's text (gptoss_jax.chat.answers.final_answer), None if it has none
    finish_reason: str  # "stop" or "length"


def load_reward(spec: str) -> RewardFn:
    """`package.module:function`, imported; a clear error if either part is missing."""
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise ConfigError(f"reward {spec!r}: expected module:function, e.g. train.rewards:numeric_answer")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"reward {spec!r}: cannot import {module_name} ({error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"reward {spec!r}: {module_name} has no function {function_name}")
    return function


def score(reward: RewardFn, name: str, prompts: list[str], samples: list[Sample], fields: list[dict],
          kwargs: dict[str, Any], step: int) -> list[float]:  # fmt: skip
    """Call a reward function and check what it returns."""
    where = f"reward {name} on the batch of step {step} ({len(samples)} completions)"
    try:
        values = reward(prompts, samples, fields, **kwargs)
    except Exception as error:  # a user's function may raise anything: report it as the reward's failure
        raise RewardError(f"{where} raised {type(error).__name__}: {error}") from None
    try:
        values = [float(value) for value in values]
    except (TypeError, ValueError):
        raise RewardError(f"{where} returned {type(values).__name__}, not a list of numbers") from None
    if len(values) != len(samples):
        raise RewardError(f"{where} returned {len(values)} values, expected {len(samples)}")
    if not all(math.isfinite(value) for value in values):
        raise RewardError(f"{where} returned a value that is not finite")
    return values


# Built-in rewards.


def numeric_answer(prompts, completions: list[Sample], fields, key: str = "answer") -> list[float]:
    """1 when the final channel's number equals the example's `key` field, else 0."""
    out = []
    for sample, example in zip(completions, fields):
        given = None if sample.final is None else extract_number(sample.final)
        out.append(float(given is not None and given == extract_number(str(example[key]))))
    return out


def choice_answer(prompts, completions: list[Sample], fields, key: str = "answer", choices: int = 4) -> list[float]:
    """1 when the final channel names the example's letter (A, B, ...), else 0."""
    return [
        float(sample.final is not None and extract_letter(sample.final, choices) == str(example[key]).strip().upper())
        for sample, example in zip(completions, fields)
    ]


def harmony_format(prompts, completions: list[Sample], fields) -> list[float]:
    """1 for a completion that ends on a stop token with a final-channel message, else 0."""
    return [float(sample.finish_reason == "stop" and sample.final is not None) for sample in completions]


def token_fraction(prompts, completions: list[Sample], fields, low: int = 0, high: int = 1) -> list[float]:
    """The fraction of completion tokens with ids in [low, high): a toy reward learnable from scratch."""
    return [sum(low <= token < high for token in s.tokens) / max(1, len(s.tokens)) for s in completions]


# The built-in task.


def arithmetic_task(count: int, seed: int = 0) -> list[dict]:
    """`count` problems {"prompt", "answer"}: sums, differences and products of two numbers below 100."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice("+-*")
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        out.append({"prompt": f"What is {a} {op} {b}? Reply with the number only.", "answer": answer})
    return out
