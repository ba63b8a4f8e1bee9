"""Evaluation tasks: reading data files, answer extraction from hand-written harmony completions, the interval."""

from __future__ import annotations

import json

import pytest
from scipy.stats import binomtest

from eval.run import summarize, wilson_interval
from eval.tasks import TASKS, Example, grade, read_examples
from gptoss_jax.chat import harmony
from gptoss_jax.chat.answers import extract_letter, extract_number
from gptoss_jax.errors import DataError

pytestmark = pytest.mark.quick  # the day-to-day tier (scripts/test.sh -m quick)

AIME, GPQA, CUSTOM = TASKS["aime"], TASKS["gpqa"], TASKS["custom"]


@pytest.fixture(scope="module")
def encoding(harmony_vocab_dir):
    return harmony.load_encoding()


def completion(encoding, text: str) -> list[harmony.ChatMessage]:
    """A hand-written completion in harmony text, tokenised and parsed as generated tokens would be."""
    return harmony.parse_completion(encoding, encoding.encode(text, allowed_special="all"))


def reasoned(final: str) -> str:
    return f"<|channel|>analysis<|message|>Let me think: 7, 12, 99.<|end|><|start|>assistant<|channel|>final<|message|>{final}<|return|>"


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


# Numeric answers (AIME).


@pytest.mark.parametrize(
    "final, expected",
    [
        ("So the count is \\boxed{16}. Hope this helps; I checked 3 cases.", "16"),
        ("First \\boxed{5}, corrected: $\\boxed{\\textbf{033}}$ and 2 more remarks", "33"),
        ("**Answer:** 42. It took 3 steps.", "42"),
        ("There are 7 ways, or maybe 12", "12"),
        ("1,000 exactly", "1000"),
        ("\\boxed{12.50}", "12.5"),
        ("No idea.", None),
    ],
)
def test_numbers_come_from_the_last_box_then_an_answer_line_then_the_last_number(final, expected):
    assert extract_number(final) == expected


def test_an_aime_answer_matches_whatever_the_spelling_of_the_gold_number(encoding, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"problem": "p", "answer": "033"}, {"question": "q", "answer": 7}])
    first, second = read_examples(AIME, tmp_path / "a.jsonl")
    assert (first.answer, second.answer) == ("33", "7")
    assert "put your final answer within \\boxed{}" in first.prompt
    assert grade(AIME, first, completion(encoding, reasoned("Thus \\boxed{33}."))).correct
    assert not grade(AIME, second, completion(encoding, reasoned("Thus \\boxed{33}."))).correct


# Multiple choice (GPQA).


@pytest.mark.parametrize(
    "final, expected",
    [
        ("Answer: C", "C"),
        ("**Answer:** (B)\n\nBecause the second one conserves energy. (D) is wrong.", "B"),
        ("The answer is option D.", "D"),
        ("After all that, \\boxed{\\text{A}}", "A"),
        ("C", "C"),
        ("**B**. Energy is conserved.", "B"),
        ("I would go with (D), since it fits.", "D"),
        ("Answer: Carbon dioxide", None),
        ("Answer: E", None),  # not one of the four options
        ("", None),
    ],
)
def test_letters_are_read_from_answer_lines_boxes_and_bare_options(final, expected):
    assert extract_letter(final, 4) == expected


def test_gpqa_columns_are_shuffled_by_the_seed_and_the_gold_letter_follows_the_right_answer(tmp_path):
    records = [
        {"Question": f"Q{i}", "Correct Answer": f"right{i}", **{f"Incorrect Answer {j}": f"wrong{i}{j}" for j in (1, 2, 3)}}
        for i in range(8)
    ]
    write_jsonl(tmp_path / "g.jsonl", records)
    examples = read_examples(GPQA, tmp_path / "g.jsonl", seed=0)
    for i, example in enumerate(examples):
        assert sorted(example.choices) == sorted([f"right{i}", f"wrong{i}1", f"wrong{i}2", f"wrong{i}3"])
        assert example.choices["ABCD".index(example.answer)] == f"right{i}"
        assert f"({example.answer}) right{i}" in example.prompt
    assert read_examples(GPQA, tmp_path / "g.jsonl", seed=0) == examples  # the same on every read
    assert {example.answer for example in examples} != {"A"}  # the right answer does not stay first
    assert [e.choices for e in read_examples(GPQA, tmp_path / "g.jsonl", seed=1)] != [e.choices for e in examples]


def test_choices_given_in_order_keep_it_and_take_a_letter_or_an_index(tmp_path, encoding):
    write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"question": "Pick one", "choices": ["x", "y", "z"], "answer": "b"},
            {"question": "Pick two", "choices": ["x", "y", "z", "w", "v"], "answer": 4},
        ],
    )
    three, five = read_examples(GPQA, tmp_path / "c.jsonl")
    assert (three.choices, three.answer, five.answer) == (("x", "y", "z"), "B", "E")
    assert "'A', 'B', or 'C'" in three.prompt
    assert grade(GPQA, five, completion(encoding, reasoned("Answer: E"))).correct
    assert grade(GPQA, three, completion(encoding, reasoned("Answer: E"))).extracted is None


def test_the_gpqa_csv_reads_with_quoted_newlines(tmp_path):
    (tmp_path / "gpqa.csv").write_text(
        'Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\n'
        '"Line one\nline two?",yes,no,maybe,never\n'
    )
    (example,) = read_examples(GPQA, tmp_path / "gpqa.csv")
    assert "Line one\nline two?" in example.prompt and example.choices["ABCD".index(example.answer)] == "yes"


def test_a_jsonl_line_may_hold_a_raw_line_separator_inside_a_string(tmp_path):
    # JSON allows U+2028 unescaped in a string; str.splitlines() would cut the line there.
    (tmp_path / "c.jsonl").write_text('{"prompt": "one\u2028two", "answer": "x"}\n', encoding="utf-8")
    (example,) = read_examples(CUSTOM, tmp_path / "c.jsonl")
    assert example.prompt == "one\u2028two"


# Custom exact match.


def test_custom_answers_match_exactly_after_normalisation(encoding, tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Capital of France?", "answer": "Paris", "id": "fr"}])
    (example,) = read_examples(CUSTOM, tmp_path / "c.jsonl")
    assert example.id == "fr" and example.prompt == "Capital of France?"
    assert grade(CUSTOM, example, completion(encoding, reasoned("  **PARIS.** "))).correct
    assert not grade(CUSTOM, example, completion(encoding, reasoned("Paris is the capital"))).correct


# No final channel.


@pytest.mark.parametrize(
    "text",
    [
        "<|channel|>analysis<|message|>The answer is \\boxed{16} but let me double-check",  # cut off while reasoning
        "<|channel|>analysis<|message|>It is \\boxed{16}.<|end|>",  # reasoning only
        "<|channel|>commentary to=functions.calc<|message|>{\"x\": 16}<|call|>",  # a tool call
        "\\boxed{16}",  # not harmony at all: raw text is not a final answer
        "",
    ],
)
def test_a_completion_without_a_final_channel_counts_as_wrong(encoding, text):
    example = Example("1", "How many?", "16")
    result = grade(AIME, example, completion(encoding, text))
    assert (result.final, result.extracted, result.correct) == (None, None, False)


# Bad data files.


@pytest.mark.parametrize(
    "task, lines, words",
    [
        (AIME, ['{"problem": "p", "answer": "1"}', "{not json"], ["x.jsonl:2", "not valid JSON"]),
        (AIME, ['{"problem": "p"}'], ["x.jsonl:1", "'answer'"]),
        (AIME, ['{"answer": "1"}'], ["x.jsonl:1", "'problem' or 'question'"]),
        (AIME, ['{"problem": "p", "answer": "seven"}'], ["x.jsonl:1", "must be a number", "seven"]),
        (AIME, ["[1, 2]"], ["x.jsonl:1", "JSON object"]),
        (GPQA, ['{"question": "q", "choices": ["a"], "answer": "A"}'], ["x.jsonl:1", "'choices'", "2 to 10"]),
        (GPQA, ['{"question": "q", "choices": ["a", "b"], "answer": "AB"}'], ["x.jsonl:1", "A, B"]),
        (CUSTOM, ['{"prompt": "p", "answer": ["a"]}'], ["x.jsonl:1", "'answer'"]),
        (CUSTOM, ["", "  "], ["x.jsonl", "no examples"]),
    ],
)
def test_bad_data_is_one_error_naming_the_file_line_and_key(tmp_path, task, lines, words):
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        read_examples(task, tmp_path / "x.jsonl")
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_the_bundled_samples_hold_five_examples_each():
    for task in TASKS.values():
        examples = read_examples(task, task.example_file)
        assert len(examples) == 5 and all(example.prompt and example.answer for example in examples)


# Accuracy and its interval.


@pytest.mark.parametrize("correct, n", [(0, 5), (3, 5), (5, 5), (37, 100), (1, 30)])
def test_the_wilson_interval_matches_scipy(correct, n):
    expected = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(correct / n, n) == pytest.approx((expected.low, expected.high), abs=1e-12)


def test_accuracy_averages_samples_and_the_interval_counts_examples_not_rows():
    rows = [
        {"correct": correct, "extracted": "1" if correct else None, "finish_reason": "stop", "completion_tokens": 10}
        for correct in [True, True, False, False]  # 2 examples x 2 samples
    ]
    summary = summarize(rows, examples=2)
    assert summary["accuracy"] == 0.5 and summary["rows"] == 4 and summary["no_answer"] == 0.5
    over_examples = binomtest(1, 2).proportion_ci(method="wilson")
    over_rows = binomtest(2, 4).proportion_ci(method="wilson")
    assert summary["ci95"] == pytest.approx([over_examples.low, over_examples.high], abs=1e-12)
    assert over_examples.high - over_examples.low > over_rows.high - over_rows.low
