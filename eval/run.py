"""Evaluate a model on a task: batched harmony chat, answers read from the final channel, accuracy with a 95% CI.

    python -m eval.run --task aime --data aime2025.jsonl --reasoning-effort high --samples 4
    python -m eval.run --task gpqa --data gpqa_diamond.csv --reasoning-effort low
    python -m eval.run --task custom --data my_questions.jsonl --checkpoint /models/gpt-oss-120b
    python -m eval.run --task aime --checkpoint random --max-new-tokens 16      # the bundled sample, a random model

Writes OUTPUT_DIR/TASK-EFFORT.jsonl (one line per example and sample: prompt, analysis, final, extracted,
correct, ...) and OUTPUT_DIR/TASK-EFFORT.summary.json, and prints the summary as a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import gptoss_jax
from gptoss_jax.cli import (
    UsageError,
    add_checkpoint_args,
    add_generation_args,
    atomic_text_file,
    check_checkpoint_args,
    check_generation_args,
    checkpoint_directory,
    run_command,
)
from eval.tasks import TASKS, Example, Task, grade, read_examples
from gptoss_jax import sharding
from gptoss_jax.chat import Chat, harmony
from gptoss_jax.inference.sampling import SamplingParams

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.run",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    parser.add_argument("--data", help="a .jsonl (or .csv) file of examples (default: the task's bundled 5 examples)")
    add_checkpoint_args(parser)
    add_generation_args(parser, max_new_tokens=8192)
    parser.add_argument("--samples", type=int, default=1, help="samples per example; accuracy is pass@1 averaged")
    parser.add_argument("--batch-size", type=int, default=16, help="rows generated together")
    parser.add_argument("--limit", type=int, help="only the first N examples")
    parser.add_argument("--output-dir", default="runs/eval", help="where the log and the summary go")
    return parser.parse_args(argv)


def wilson_interval(accuracy: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion observed over n independent trials."""
    denominator = 1 + z * z / n
    center = (accuracy + z * z / (2 * n)) / denominator
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def summarize(rows: list[dict[str, Any]], examples: int) -> dict[str, Any]:
    """Accuracy over all rows (pass@1 averaged over samples) with a 95% Wilson interval over the examples.

    Samples of one example are not independent trials, so the interval counts examples, not rows; a mean
    of values in [0, 1] has at most the variance of a proportion, so it stays valid (conservative) for
    several samples and is the exact Wilson interval for one.
    """
    accuracy = sum(row["correct"] for row in rows) / len(rows)
    low, high = wilson_interval(accuracy, examples)
    return {
        "accuracy": accuracy,
        "ci95": [low, high],
        "correct": sum(row["correct"] for row in rows),
        "rows": len(rows),
        "examples": examples,
        "no_answer": sum(row["extracted"] is None for row in rows) / len(rows),
        "cut_off": sum(row["finish_reason"] == "length" for row in rows) / len(rows),
        "mean_completion_tokens": sum(row["completion_tokens"] for row in rows) / len(rows),
    }


def evaluate(
    chat: Chat,
    task: Task,
    examples: list[Example],
    *,
    samples: int,
    batch_size: int,
    max_new_tokens: int,
    sampling: SamplingParams,
    seed: int,
    log: TextIO,
    progress: TextIO = sys.stderr,
) -> list[dict[str, Any]]:
    """Generate `samples` completions per example in batches, grade each, write one JSON line per row."""
    jobs = [(example, sample) for sample in range(samples) for example in examples]
    rows: list[dict[str, Any]] = []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        replies = chat.reply(
            [example.prompt for example, _ in batch],
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            seed=seed + start // batch_size,  # each batch draws fresh randomness
        )
        for (example, sample), reply in zip(batch, replies):
            result = grade(task, example, reply.messages)
            row = {
                "id": example.id,
                "sample": sample,
                "prompt": example.prompt,
                "answer": example.answer,
                "analysis": reply.analysis,
                "final": result.final,
                "extracted": result.extracted,
                "correct": result.correct,
                "finish_reason": reply.finish_reason,
                "completion_tokens": len(reply.tokens),
            }
            log.write(json.dumps(row) + "\n")
            rows.append(row)
        done = sum(row["correct"] for row in rows)
        print(f"[{len(rows)}/{len(jobs)}] {done} correct", file=progress, flush=True)
    return rows


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a two-line table a person can read."""
    low, high = summary["ci95"]
    columns = {
        "task": summary["task"],
        "effort": summary["reasoning_effort"],
        "examples": str(summary["examples"]),
        "samples": str(summary["samples"]),
        "accuracy": f"{summary['accuracy']:.1%}",
        "95% CI (Wilson)": f"{low:.1%} - {high:.1%}",
        "no answer": f"{summary['no_answer']:.1%}",
        "cut off": f"{summary['cut_off']:.1%}",
        "tokens/answer": f"{summary['mean_completion_tokens']:.0f}",
        "seconds": f"{summary['generate_s']:.1f}",
    }
    widths = [max(len(name), len(value)) for name, value in columns.items()]
    header = "  ".join(name.ljust(width) for name, width in zip(columns, widths))
    values = "  ".join(value.ljust(width) for value, width in zip(columns.values(), widths))
    return f"{header}\n{values}"


def run(args: argparse.Namespace, scratch: Path) -> int:
    sampling = check_generation_args(args)
    check_checkpoint_args(args)
    if args.task not in TASKS:
        raise UsageError(f"--task must be one of {', '.join(TASKS)}, got {args.task!r}")
    for name in ("samples", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    task = TASKS[args.task]
    data = Path(args.data) if args.data else task.example_file
    examples = read_examples(task, data, seed=args.seed)[: args.limit]
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None

    # The data, then the checkpoint, then the vocabulary, then the load: each failure comes before the long part.
    directory = checkpoint_directory(args.checkpoint, scratch)
    encoding = harmony.load_encoding(directory)
    model = gptoss_jax.load(directory, dtype=args.dtype, mesh=mesh)
    chat = Chat(model, reasoning_effort=args.reasoning_effort, encoding=encoding)

    stem = Path(args.output_dir) / f"{task.name}-{args.reasoning_effort}"
    log_path, summary_path = stem.with_name(stem.name + ".jsonl"), stem.with_name(stem.name + ".summary.json")
    start = time.perf_counter()
    with atomic_text_file(log_path) as log:
        rows = evaluate(
            chat,
            task,
            examples,
            samples=args.samples,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            sampling=sampling,
            seed=args.seed,
            log=log,
        )
    summary = {
        "task": task.name,
        "data": str(data),
        "checkpoint": args.checkpoint,
        "reasoning_effort": args.reasoning_effort,
        "samples": args.samples,
        **summarize(rows, len(examples)),
        "max_new_tokens": args.max_new_tokens,
        "sampling": {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p},
        "seed": args.seed,
        "generate_s": time.perf_counter() - start,
        "log": str(log_path),
    }
    with atomic_text_file(summary_path) as file:
        file.write(json.dumps(summary, indent=2) + "\n")
    print(format_table(summary))
    print(f"log: {log_path}\nsummary: {summary_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
