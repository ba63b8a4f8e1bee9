"""What the commands (python -m eval.*, python -m train.*) share: model and sampling options, the `random`
checkpoint, one `error:` line for a failure, atomic files."""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, TextIO

from gptoss_jax.chat import harmony
from gptoss_jax.checkpoint.random_weights import random_hub_tensors
from gptoss_jax.checkpoint.reader import open_checkpoint
from gptoss_jax.checkpoint.writer import write_hub_checkpoint
from gptoss_jax.config import GptOssConfig
from gptoss_jax.errors import GptOssError
from gptoss_jax.inference.sampling import SamplingParams

RANDOM = "random"


class UsageError(Exception):
    """Bad command-line input, reported as one line."""


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --dtype, --mesh."""
    parser.add_argument(
        "--checkpoint",
        default="openai/gpt-oss-20b",
        help="a checkpoint folder (hub or original layout), a hub repo id, or 'random' for a tiny random model",
    )
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 or float32")
    parser.add_argument("--mesh", help="shard over devices, e.g. expert=4,tensor=2 or data=2,expert=4 (default: one)")


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """--distributed, or --coordinator with --num-processes and --process-id: a multi-process run."""
    parser.add_argument("--distributed", action="store_true", help="join a multi-process run (TPU pod, Slurm)")
    parser.add_argument("--coordinator", help="multi-process run: the coordinator's host:port")
    parser.add_argument("--num-processes", type=int, help="multi-process run: how many processes")
    parser.add_argument("--process-id", type=int, help="multi-process run: this process's index")


def join_distributed(args: argparse.Namespace) -> None:
    """Join the multi-process run the arguments describe, if any (before anything touches a device).
    Every process computes; only the first one prints to stdout."""
    if args.distributed or args.coordinator:
        import jax

        from gptoss_jax import sharding

        sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        if jax.process_index() != 0:
            sys.stdout = open(os.devnull, "w")


def add_generation_args(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """--reasoning-effort, --max-new-tokens and the sampling options."""
    parser.add_argument("--reasoning-effort", default="medium", help="low, medium or high")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0, as OpenAI advises)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)


def check_checkpoint_args(args: argparse.Namespace) -> None:
    """Refuse a --dtype the model does not take."""
    if args.dtype not in ("bfloat16", "float32"):
        raise UsageError(f"--dtype must be bfloat16 or float32, got {args.dtype!r}")


def check_generation_args(args: argparse.Namespace) -> SamplingParams:
    """Refuse bad generation options; the sampling parameters they give."""
    try:
        harmony.check_reasoning_effort(args.reasoning_effort, "--reasoning-effort")
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    try:
        return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
    except ValueError as error:
        raise UsageError(str(error)) from None


def write_random_checkpoint(directory: Path) -> Path:
    """A tiny random model with the full harmony vocabulary, plus the vocabulary file if bpe-openai has it."""
    config = GptOssConfig.preset("tiny").replace(vocab_size=201088)
    path = write_hub_checkpoint(directory / "tiny-random", config, random_hub_tensors(config, seed=0))
    try:
        import bpe_openai  # optional: ships o200k_base.tiktoken, so chat works with no network

        packed = Path(bpe_openai.__file__).parent / "data" / "o200k_base.tiktoken.gz"
        with gzip.open(packed) as source, open(path / harmony.VOCAB_FILE, "wb") as target:
            shutil.copyfileobj(source, target)
    except (ImportError, OSError):
        pass
    return path


def checkpoint_directory(checkpoint: str, scratch: Path) -> Path:
    """The folder of a checkpoint given as a path, a hub repo id (fetched), or `random` (written into scratch)."""
    if checkpoint == RANDOM:
        print(RANDOM_NOTICE, file=sys.stderr)
        return open_checkpoint(write_random_checkpoint(scratch)).directory
    return open_checkpoint(checkpoint).directory


# What a first-time user of `--checkpoint random` (the demo) needs to know, in one line.
RANDOM_NOTICE = (
    "note: this is a tiny random model (gpt-oss's vocabulary, random weights): its replies are gibberish. "
    "For the real one: --checkpoint openai/gpt-oss-20b (a 13 GB download) or a local checkpoint folder"
)


def run_command(run: Callable[[argparse.Namespace, Path], int], args: argparse.Namespace) -> int:
    """Call run(args, scratch folder); a failure becomes one `error:` line on stderr and a non-zero exit code."""
    try:
        with tempfile.TemporaryDirectory() as scratch:
            return run(args, Path(scratch))
    except (UsageError, GptOssError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    except KeyboardInterrupt:
        return 130


@contextlib.contextmanager
def atomic_text_file(path: Path) -> Iterator[TextIO]:
    """A text file written under a temporary name and renamed onto `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            yield file
        os.chmod(temp, 0o644)  # mkstemp makes it private
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise
