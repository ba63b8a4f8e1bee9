"""An OpenAI-compatible server: chat completions, the Responses API and raw completions over continuous
batching (gptoss_jax/serving).

    python -m eval.serve --checkpoint openai/gpt-oss-20b                 # http://127.0.0.1:8000/v1
    python -m eval.serve --checkpoint random --port 8001                  # a tiny random model, real vocabulary

Any OpenAI client then talks to it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="gpt-oss-20b", messages=[{"role": "user", "content": "hi"}])

It binds to 127.0.0.1 unless --host says otherwise; give --api-key before exposing it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gptoss_jax
from gptoss_jax import sharding
from gptoss_jax.chat import harmony
from gptoss_jax.cli import UsageError, add_checkpoint_args, check_checkpoint_args, checkpoint_directory, run_command
from gptoss_jax.inference.batching import Batcher


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    add_checkpoint_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", help="the model id clients send (default: the checkpoint folder's name)")
    parser.add_argument("--slots", type=int, default=8, help="requests decoded at once (rows of the KV cache)")
    parser.add_argument("--context", type=int, default=8192, help="tokens a request may hold, prompt and reply")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per engine step")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ routes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv))


def run(args: argparse.Namespace, scratch: Path) -> int:
    check_checkpoint_args(args)
    for name in ("slots", "context", "prefill_chunk", "port"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_queue < 0:
        raise UsageError(f"--max-queue must be at least 0, got {args.max_queue}")
    import uvicorn  # the serve extra: pip install "gptoss_jax[serve]"

    from gptoss_jax.serving.app import create_app

    directory = checkpoint_directory(args.checkpoint, scratch)
    encoding = harmony.load_encoding(directory)
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None
    model = gptoss_jax.load(directory, dtype=args.dtype, mesh=mesh)
    batcher = Batcher(model, slots=args.slots, context=args.context, prefill_chunk=args.prefill_chunk)
    name = args.model_name or ("gpt-oss-random" if args.checkpoint == "random" else Path(args.checkpoint).name)
    app = create_app(batcher, encoding, name, max_queue=args.max_queue, api_key=args.api_key)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 ({args.slots} slots of {batcher.context} tokens)",
          file=sys.stderr)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
