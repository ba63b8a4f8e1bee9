"""Evaluation tasks: read a data file into examples, phrase the user prompt, extract and grade the answer.

The answer is read from the harmony final channel only: a completion that never reached it (cut off while
reasoning, or not harmony at all) has no answer and counts as wrong.

    aime     numeric answers: `problem` (or `question`) and `answer`; the last \\boxed{} in the final answer,
             else "Answer: N", else its last number; compared as numbers (033 = 33 = 33.0)
    gpqa     multiple choice, a letter: GPQA's columns `Question`, `Correct Answer`, `Incorrect Answer 1..3`
             (choices shuffled by a seeded generator), or `question`, `choices` (a list, kept in order) and
             `answer` (a letter or a 0-based index)
    custom   `prompt` and `answer`: the whole final answer must equal `answer` after normalisation
             (case, spacing, surrounding punctuation and markdown)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
import re
from pathlib import Path
from typing import Any, Callable

from gptoss_jax.chat.answers import (
    LETTERS,
    NUMBER,
    canonical_number,
    extract_letter,
    extract_number,
    final_answer,
    normalize_text,
)
from gptoss_jax.chat.harmony import ChatMessage
from gptoss_jax.errors import DataError
from gptoss_jax.datafile import read_jsonl, read_text

DATA_DIR = Path(__file__).parent / "data"

# The prompts of OpenAI's own gpt-oss evals (gpt_oss/evals/aime_eval.py, gpqa_eval.py).
AIME_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
CHOICE_TEMPLATE = "{question}\n\n{options}\n\nExpress your final answer as the corresponding option {letters}."


@dataclasses.dataclass(frozen=True)
class Example:
    """One question: the user prompt, the gold answer (normalised as extracted answers are), the options shown."""

    id: str
    prompt: str
    answer: str
    choices: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Grade:
    """The final-channel text (None when the completion has none), the answer read from it, and whether it is right."""

    final: str | None
    extracted: str | None
    correct: bool


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    example_file: Path  # a tiny bundled sample in the task's format
    # (record, "file:line" for error messages, example id, generator for shuffling choices) -> Example
    read: Callable[[dict[str, Any], str, str, random.Random], Example]
    # (final answer text, example) -> the extracted answer, or None when there is none.
    extract: Callable[[str, Example], str | None]


# Reading records.


def _field(record: dict[str, Any], where: str, *names: str) -> Any:
    """The first of `names` the record has; a missing or empty value is a DataError naming the key."""
    for name in names:
        if name in record and record[name] not in (None, ""):
            return record[name]
    wanted = " or ".join(repr(name) for name in names)
    raise DataError(f"{where}: missing key {wanted}")


def _text(record: dict[str, Any], where: str, *names: str) -> str:
    value = _field(record, where, *names)
    if isinstance(value, (dict, list, bool)):
        raise DataError(f"{where}: {names[0]!r} must be text or a number, got {json.dumps(value)}")
    return str(value).strip()


def _read_aime(record: dict[str, Any], where: str, example_id: str, rng: random.Random) -> Example:
    question = _text(record, where, "problem", "question")
    raw = _text(record, where, "answer")
    answer = canonical_number(raw) if re.fullmatch(NUMBER, raw) else None
    if answer is None:
        raise DataError(f"{where}: 'answer' must be a number, got {raw!r}")
    return Example(example_id, AIME_TEMPLATE.format(question=question), answer)


def _read_gpqa(record: dict[str, Any], where: str, example_id: str, rng: random.Random) -> Example:
    if "Correct Answer" in record:  # GPQA's own columns: the right answer first, so shuffle
        question = _text(record, where, "Question")
        correct = _text(record, where, "Correct Answer")
        wrong = [_text(record, where, f"Incorrect Answer {i}") for i in (1, 2, 3)]
        choices = [correct, *wrong]
        rng.shuffle(choices)
        answer = LETTERS[choices.index(correct)]
    else:
        question = _text(record, where, "question")
        choices = _field(record, where, "choices")
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
            raise DataError(f"{where}: 'choices' must be a list of 2 to {len(LETTERS)} options")
        choices = [str(choice).strip() for choice in choices]
        answer = _gold_letter(_field(record, where, "answer"), len(choices), where)
    letters = LETTERS[: len(choices)]
    prompt = CHOICE_TEMPLATE.format(
        question=question,
        options="\n".join(f"({letter}) {choice}" for letter, choice in zip(letters, choices)),
        letters=", ".join(f"'{letter}'" for letter in letters[:-1]) + f", or '{letters[-1]}'",
    )
    return Example(example_id, prompt, answer, tuple(choices))


def _gold_letter(value: Any, count: int, where: str) -> str:
    letters = LETTERS[:count]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count:
        return letters[value]
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in letters:
        return value.strip().upper()
    raise DataError(f"{where}: 'answer' must be one of {', '.join(letters)} or an index 0..{count - 1}, got {value!r}")


def _read_custom(record: dict[str, Any], where: str, example_id: str, rng: random.Random) -> Example:
    prompt = _text(record, where, "prompt")
    return Example(example_id, prompt, normalize_text(_text(record, where, "answer")))


def read_examples(task: Task, path: Path, seed: int = 0) -> list[Example]:
    """The examples of a .jsonl file (one JSON object a line) or a .csv file with a header row.

    An example's id is its record's "id", else its line number. `seed` and the line number seed the shuffle
    of the choices, so a file gives the same prompts on every run and wherever it lies.
    """
    if path.suffix == ".csv":
        # newline="": quoted fields may hold newlines
        rows = csv.DictReader(io.StringIO(read_text(path, "examples"), newline=""))
        records = [(rows.line_num, record) for record in rows]
    else:
        records = read_jsonl(path, "examples")
    if not records:
        raise DataError(f"{path}: no examples")
    return [
        task.read(record, f"{path}:{line}", str(record.get("id", line)), random.Random(f"{seed}:{line}"))
        for line, record in records
    ]


# Grading.


def grade(task: Task, example: Example, messages: list[ChatMessage]) -> Grade:
    """Read the answer from a parsed completion and compare it with the gold answer."""
    final = final_answer(messages)
    extracted = task.extract(final, example) if final is not None else None
    return Grade(final, extracted, extracted is not None and extracted == example.answer)


TASKS: dict[str, Task] = {
    "aime": Task("aime", DATA_DIR / "aime_example.jsonl", _read_aime, lambda text, example: extract_number(text)),
    "gpqa": Task(
        "gpqa", DATA_DIR / "gpqa_example.jsonl", _read_gpqa, lambda text, example: extract_letter(text, len(example.choices))
    ),
    "custom": Task(
        "custom", DATA_DIR / "custom_example.jsonl", _read_custom, lambda text, example: normalize_text(text) or None
    ),
}
