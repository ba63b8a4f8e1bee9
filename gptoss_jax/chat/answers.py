"""Reading a model's answer: the final-channel text of an assistant turn, and the number, letter or
text in it. The eval tasks grade with these and the RL rewards score with them, so both read alike.

The answer is the harmony final channel only: a turn that never reached it (cut off while reasoning, a
tool call, output that is not harmony at all) has no answer.
"""

from __future__ import annotations

import re
import string
from decimal import Decimal

from gptoss_jax.chat.harmony import ChatMessage

LETTERS = string.ascii_uppercase[:10]  # multiple choice takes 2 to 10 options
NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?"

_ANSWER_NUMBER = re.compile(r"(?i:\banswer\b)(?:\s+is)?[\s:*_$=]*(" + NUMBER + ")")
# "Answer: C", "**Answer:** (C)", "The answer is option C".
_ANSWER_LETTER = re.compile(r"(?i:\banswers?\b)(?:\s+is)?[\s:*_\-–—(\[]*(?i:option\s+)?([A-J])\b")
# A line that starts with the letter: "C", "**C**", "(C) 42 K", "C. the second".
_LINE_LETTER = re.compile(r"^[\s*_(\[]*([A-J])(?:[*_)\]]*\s*(?:[.):\-–]|$))", re.MULTILINE)
_BRACKETED_LETTER = re.compile(r"(?<![A-Za-z0-9])\(([A-J])\)")


def final_answer(messages: list[ChatMessage], *, raw_text: bool = False) -> str | None:
    """The text of the assistant's final-channel messages; None when there is none.

    raw_text=True also takes assistant text with no channel (output that was not harmony): what a chat
    shows as the reply, never what is graded.
    """
    kept = [
        m.content
        for m in messages
        if m.role == "assistant" and (m.channel == "final" or (raw_text and m.channel is None))
    ]
    return "".join(kept) if kept else None


def last_boxed(text: str) -> str | None:
    """The content of the last complete \\boxed{...} (or \\fbox{...}), nested braces included."""
    starts = [match.end() for match in re.finditer(r"\\(?:boxed|fbox|framebox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for index in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            if depth == 0:
                return text[start:index]
    return None


def canonical_number(text: str) -> str:
    """One spelling per number: '033' and '33.0' are '33', '1,000' is '1000', '0.50' is '0.5'."""
    value = Decimal(text.replace(",", ""))
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_number(text: str) -> str | None:
    """The last \\boxed{} number, else the number after "answer", else the last number; canonical."""
    boxed = last_boxed(text)
    candidates = [re.findall(NUMBER, boxed)] if boxed is not None else []
    candidates += [_ANSWER_NUMBER.findall(text), re.findall(NUMBER, text)]
    for found in candidates:
        if found:
            return canonical_number(found[-1])
    return None


def extract_letter(text: str, count: int = 4) -> str | None:
    """The option letter (among the first `count`) the text declares, by the first pattern that finds one:
    "Answer: C", then \\boxed{C}, then a line starting with the letter, then a bare "(C)"; the last match wins."""
    letters = LETTERS[:count]
    boxed = last_boxed(text)
    boxed_letter = re.sub(r"\\text(?:bf)?\{([^}]*)\}", r"\1", boxed).strip(" ()$") if boxed is not None else ""
    patterns = [
        _ANSWER_LETTER.findall(text),
        [boxed_letter[0]] if re.match(r"[A-J](?![A-Za-z])", boxed_letter) else [],
        _LINE_LETTER.findall(text),
        _BRACKETED_LETTER.findall(text),
    ]
    for found in patterns:
        found = [letter for letter in found if letter in letters]
        if found:
            return found[-1]
    return None


def normalize_text(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace, quotes, markdown or final full stop."""
    return " ".join(text.split()).casefold().strip(" \"'`*_.")
