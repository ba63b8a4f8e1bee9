"""Convert a checkpoint to the orbax form that loads each array straight into its sharding.

    python -m gptoss_jax.convert openai/gpt-oss-20b gpt-oss-20b-orbax     # a hub id, or a local folder
    python -m gptoss_jax.convert path/to/gpt-oss-120b/original gpt-oss-120b-orbax

Then `gptoss_jax.load("gpt-oss-20b-orbax", mesh=...)`, `--checkpoint gpt-oss-20b-orbax` or
`checkpoint: gpt-oss-20b-orbax` in a training config. The experts stay packed MXFP4. Arrays are read and
written one at a time (a random 20b converted in 15.8 GB peak RSS here).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gptoss_jax.checkpoint.converted import convert
from gptoss_jax.cli import run_command


def run(args: argparse.Namespace, scratch: Path) -> int:
    started = time.perf_counter()
    destination = convert(args.source, args.destination)
    print(f"wrote {destination} in {time.perf_counter() - started:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptoss_jax.convert", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="a checkpoint folder (hub or original layout) or a hub repo id")
    parser.add_argument("destination", help="a new (or empty) folder for the orbax checkpoint")
    return run_command(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
