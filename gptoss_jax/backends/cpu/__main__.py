"""python -m gptoss_jax.backends.cpu: build the CPU kernels ahead of time (at install time, or before a
first run that should not wait for the compiler), for this CPU's variant, one named variant, or all."""

from __future__ import annotations

import argparse
import sys
import time

from gptoss_jax.backends.cpu import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptoss_jax.backends.cpu", description=__doc__)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every variant of this architecture, runnable here or not")
    which.add_argument("--variant", help=f"one variant, e.g. {build.variants()[-1].name}")
    args = parser.parse_args(argv)
    try:
        if args.all:
            chosen = build.variants()
        elif args.variant:
            chosen = (build.variant_named(args.variant, must_run=False),)
        else:
            chosen = (build.chosen_variant(),)
        for variant in chosen:
            cached = build.library_path(variant).exists()
            start = time.perf_counter()
            library = build.build(variant)
            took = "already built" if cached else f"built in {time.perf_counter() - start:.1f} s"
            runs_here = "" if build.runnable(variant) else " (this CPU cannot run it)"
            print(f"{variant.name}: {took}: {library}{runs_here}")
    except (build.BuildError, build.VariantError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
