"""Chat with gpt-oss (harmony format) or complete raw text, streaming to the terminal.

    python -m eval.generate --prompt "Why is the sky blue?"                  # openai/gpt-oss-20b
    python -m eval.generate --checkpoint random --prompt hi                  # a tiny random model, real vocabulary
    python -m eval.generate --prompt "2+2?" --prompt "3+3?" --json           # a batch, one JSON line each
    python -m eval.generate --prompt-ids 1,2,3 --max-new-tokens 8            # raw token ids, no chat format
    python -m eval.generate                                                  # interactive chat on a terminal
    python -m eval.generate --mesh expert=4,tensor=2 --prompt hi             # sharded over 8 devices
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import gptoss_jax
from gptoss_jax.cli import (
    UsageError,
    add_checkpoint_args,
    add_distributed_args,
    add_generation_args,
    check_checkpoint_args,
    check_generation_args,
    checkpoint_directory,
    join_distributed,
    run_command,
)
from gptoss_jax import sharding
from gptoss_jax.chat import Chat, ChatReply, harmony
from gptoss_jax.inference.engine import Generator
from gptoss_jax.chat.harmony import ChatMessage


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.generate",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    add_checkpoint_args(parser)
    add_generation_args(parser, max_new_tokens=1024)
    parser.add_argument("--prompt", action="append", help="a user prompt; repeat for a batch (default: stdin)")
    parser.add_argument("--system", help="replace the model identity line of the system message")
    parser.add_argument("--developer", help="developer instructions")
    parser.add_argument("--show-reasoning", action="store_true", help="print the analysis channel too")
    parser.add_argument("--raw", action="store_true", help="complete the prompt text as is, with no chat format")
    parser.add_argument("--prompt-ids", help="comma-separated token ids to complete (implies --raw)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt, nothing else")
    add_distributed_args(parser)
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str] | None:
    """The prompts to run, or None for an interactive chat."""
    if args.prompt is not None:
        prompts = args.prompt
    elif args.prompt_ids is not None:
        return []
    elif sys.stdin.isatty():
        return None
    else:
        prompts = [sys.stdin.read()]
    for prompt in prompts:
        if not prompt.strip():
            raise UsageError("the prompt is empty")
    return prompts


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv))


def run(args: argparse.Namespace, scratch: Path) -> int:
    sampling = check_generation_args(args)
    check_checkpoint_args(args)
    join_distributed(args)
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    prompts = read_prompts(args)
    raw = args.raw or args.prompt_ids is not None
    # Find the checkpoint, then the vocabulary (perhaps next to it), then load: each failure comes before
    # the long part.
    directory = checkpoint_directory(args.checkpoint, scratch)
    encoding = None if args.prompt_ids is not None else harmony.load_encoding(directory)
    start = time.perf_counter()
    model = gptoss_jax.load(directory, dtype=args.dtype, mesh=mesh)
    load_seconds = time.perf_counter() - start
    generator = Generator(model)
    options = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)

    if raw:
        if args.prompt_ids is not None:
            try:
                token_lists = [[int(token) for token in args.prompt_ids.split(",")]]
            except ValueError:
                raise UsageError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        else:
            token_lists = [encoding.encode(prompt, allowed_special=set()) for prompt in prompts]
        return complete_raw(generator, encoding, token_lists, args, options, load_seconds)

    chat = Chat(
        model,
        reasoning_effort=args.reasoning_effort,
        system=args.system,
        developer=args.developer,
        encoding=encoding,
        generator=generator,
    )
    if prompts is None:
        return interactive(chat, args, options)
    if args.json or len(prompts) > 1:
        start = time.perf_counter()
        replies = chat.reply(prompts, **options)
        seconds = time.perf_counter() - start
        for prompt, reply in zip(prompts, replies):
            print_reply(prompt, reply, args, {"load_s": load_seconds, "generate_s": seconds})
        return 0
    stream_reply(chat, prompts[0], args, options)
    return 0


def complete_raw(generator, encoding, token_lists, args, options, load_seconds) -> int:
    start = time.perf_counter()
    completions = generator.generate(token_lists, **options)
    seconds = time.perf_counter() - start
    for prompt, completion in zip(token_lists, completions):
        text = harmony.decode_text(encoding, completion.tokens) if encoding is not None else ""
        if args.json:
            record = {
                "prompt_tokens": prompt,
                "tokens": completion.tokens,
                "logprobs": completion.logprobs,
                "text": text,
                "final": text,
                "analysis": "",
                "finish_reason": completion.finish_reason,
                "timings": {"load_s": load_seconds, "generate_s": seconds},
            }
            print(json.dumps(record))
        else:
            print(text if encoding is not None else ",".join(map(str, completion.tokens)))
    return 0


def print_reply(prompt: str, reply: ChatReply, args, timings: dict) -> None:
    if args.json:
        record = {
            "prompt": prompt,
            "tokens": reply.tokens,
            "logprobs": reply.logprobs,
            "text": _text_of(reply),
            "final": reply.final,
            "analysis": reply.analysis,
            "messages": [message.__dict__ for message in reply.messages],
            "finish_reason": reply.finish_reason,
            "prompt_tokens": reply.prompt_tokens,
            "timings": timings,
        }
        print(json.dumps(record))
        return
    if args.show_reasoning and reply.analysis:
        print(f"[reasoning] {reply.analysis}")
    print(reply.final)


def _text_of(reply: ChatReply) -> str:
    return "".join(message.content for message in reply.messages)


def stream_reply(chat: Chat, conversation, args, options) -> ChatReply:
    """Print the reply as it streams: reasoning (if asked) dimmed, then the final answer."""
    current = None
    reply = None
    for piece in chat.stream(conversation, **options):
        if isinstance(piece, ChatReply):
            reply = piece
            continue
        if piece.channel == "analysis" and not args.show_reasoning:
            continue
        if piece.channel != current:
            if current is not None:
                print()
            label = {"analysis": "[reasoning] ", "commentary": "[commentary] "}.get(piece.channel, "")
            print(label, end="")
            current = piece.channel
        print(piece.text, end="", flush=True)
    print()
    return reply


def interactive(chat: Chat, args, options) -> int:
    """A terminal chat; the conversation keeps the final answers of earlier turns."""
    conversation: list[ChatMessage] = []
    print("gpt-oss chat: type a message, an empty line or Ctrl-D to quit.")
    while True:
        try:
            text = input("> ")
        except EOFError:
            return 0
        if not text.strip():
            return 0
        conversation.append(ChatMessage("user", text))
        reply = stream_reply(chat, conversation, args, options)
        conversation.append(ChatMessage("assistant", reply.final, channel="final"))


if __name__ == "__main__":
    sys.exit(main())
