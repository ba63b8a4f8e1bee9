"""Harmony conversations from JSONL, rendered for training, and the padded batches a step consumes.

A line is {"messages": [{"role", "content", "channel"?, "recipient"?, "content_type"?, "name"?}, ...]}
with optional "reasoning_effort". A leading "system" message sets the model identity, a "developer"
message the instructions; assistant messages carry "channel" (analysis / final; default final).
The order of examples is a seeded permutation per epoch, so the data position is one integer (examples
consumed) and a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np

from gptoss_jax.chat.harmony import ChatMessage, check_reasoning_effort, render_training
from gptoss_jax.datafile import read_jsonl
from gptoss_jax.errors import DataError

ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "channel", "recipient", "content_type", "name")
LENGTH_BUCKET = 64  # batches are padded to a multiple of this (few shapes, few compiles)


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 [T]
    learned: np.ndarray  # bool [T]: tokens the model is trained to write


@dataclasses.dataclass
class Dataset:
    examples: list[Example]
    skipped_no_assistant: int = 0
    skipped_too_long: int = 0

    def warnings(self, path: str, max_length: int) -> list[str]:
        out = []
        if self.skipped_no_assistant:
            out.append(f"{path}: skipped {self.skipped_no_assistant} conversation(s) with no assistant message")
        if self.skipped_too_long:
            out.append(f"{path}: skipped {self.skipped_too_long} conversation(s) longer than max_length={max_length}")
        return out


def read_conversations(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, parsed line) for each conversation; a malformed line is a DataError naming it."""
    out = read_jsonl(path, "data")
    for number, record in out:
        if not isinstance(record.get("messages"), list):
            raise DataError(f"{path}:{number}: expected an object with a 'messages' list")
    return out


def _messages(path, number: int, record: dict) -> tuple[list[ChatMessage], dict]:
    """Chat messages plus render options (system, developer, reasoning_effort) of one line."""
    options: dict = {}
    effort = record.get("reasoning_effort")
    if effort is not None:
        try:
            options["reasoning_effort"] = check_reasoning_effort(effort)
        except ValueError as error:
            raise DataError(f"{path}:{number}: {error}") from None
    messages = []
    for index, message in enumerate(record["messages"]):
        where = f"{path}:{number}: message {index}"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataError(f"{where}: expected an object with role one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: expected a string 'content'")
        unknown = [key for key in message if key not in MESSAGE_KEYS]
        if unknown:
            raise DataError(f"{where}: unknown key {unknown[0]!r}")
        if message["role"] in ("system", "developer"):
            options[message["role"]] = message["content"]
            continue
        messages.append(ChatMessage(**{key: message.get(key) for key in MESSAGE_KEYS}))
    return messages, options


def load_dataset(path: str | Path, encoding, max_length: int, reasoning_effort: str) -> Dataset:
    """Render every conversation; skip (and count) those with no assistant message or too long."""
    dataset = Dataset([])
    for number, record in read_conversations(path):
        messages, options = _messages(path, number, record)
        if not any(message.role == "assistant" for message in messages):
            dataset.skipped_no_assistant += 1
            continue
        options.setdefault("reasoning_effort", reasoning_effort)
        try:
            tokens, learned = render_training(encoding, messages, **options)
        except (ValueError, RuntimeError) as error:  # harmony's own complaints about a message
            raise DataError(f"{path}:{number}: cannot render ({error})") from None
        if len(tokens) > max_length:
            dataset.skipped_too_long += 1
            continue
        dataset.examples.append(Example(np.asarray(tokens, np.int32), np.asarray(learned, bool)))
    if not dataset.examples:
        raise DataError(f"{path}: no usable conversation (each needs an assistant message and <= {max_length} tokens)")
    return dataset


def example_order(count: int, seed: int, start: int, length: int) -> list[int]:
    """Indices of examples start..start+length-1 of the endless stream: a fresh permutation each epoch."""
    return [int(_permutation(count, seed, position // count)[position % count]) for position in range(start, start + length)]


@functools.lru_cache(maxsize=2)
def _permutation(count: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(count)


def make_batch(examples: list[Example], rows: int, max_length: int) -> dict[str, np.ndarray]:
    """Inputs, positions (-1: padding), next-token targets and loss weights, [rows // per, per, L]-shaped.

    Padded to a multiple of LENGTH_BUCKET (capped by max_length) so a run compiles few programs.
    """
    longest = max(len(example.tokens) for example in examples) - 1
    length = min(-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, max_length)
    inputs = np.zeros((len(examples), length), np.int32)
    positions = np.full((len(examples), length), -1, np.int32)
    targets = np.zeros((len(examples), length), np.int32)
    weights = np.zeros((len(examples), length), np.float32)
    for row, example in enumerate(examples):
        n = len(example.tokens) - 1
        inputs[row, :n] = example.tokens[:-1]
        positions[row, :n] = np.arange(n)
        targets[row, :n] = example.tokens[1:]
        weights[row, :n] = example.learned[1:]
    shape = (len(examples) // rows, rows, length)
    return {
        "inputs": inputs.reshape(shape),
        "positions": positions.reshape(shape),
        "targets": targets.reshape(shape),
        "weights": weights.reshape(shape),
    }
