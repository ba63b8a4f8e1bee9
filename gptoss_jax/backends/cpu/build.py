"""Building the CPU kernels: one source (cpu_kernels.cc, with cpu_kernels.h) compiled into a few named variants.

Each variant is built with portable flags (an instruction-set level, `-mtune=generic`, never
`-march=native`), so a build runs on any CPU that has its instructions, not only the one it was built
on. On x86-64:

  baseline     -march=x86-64                    any x86-64 CPU: the source's portable loops
  avx2         -march=x86-64-v3                 AVX2 + FMA: the same loops, vectorized by the compiler
  avx512       -march=x86-64-v4                 AVX-512 F/BW/CD/DQ/VL: the source's GPTOSS_AVX512 paths
  avx512bf16   -march=x86-64-v4 -mavx512bf16    ... and bf16 products in hardware (vdpbf16ps)

On ARM64 (Apple silicon, Graviton, Ampere) there is one, `neon`: the compiler's default target, since
every ARMv8-A CPU has NEON. Other machines build `baseline` only. The variant for this machine is
the last of these its CPU can run (read from /proc/cpuinfo's flags), unless GPTOSS_JAX_KERNEL_VARIANT
names one. Builds land in a cache folder ($GPTOSS_JAX_CACHE, default ~/.cache/gptoss_jax) under a name
keyed by the source, the flags and jax's version (whose FFI headers they include). The compiler is
$CXX (default c++), stopped after $GPTOSS_JAX_KERNEL_BUILD_TIMEOUT seconds (default 300).
`python -m gptoss_jax.backends.cpu` builds ahead of time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import jax

from gptoss_jax.errors import GptOssError

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
HEADER = Path(__file__).with_name("cpu_kernels.h")
DEFAULT_TIMEOUT_S = 300.0
COMMON_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mtune=generic")


class BuildError(GptOssError):
    """The kernels could not be built: no compiler, a failed compile, or a compile past the timeout."""


class VariantError(GptOssError):
    """GPTOSS_JAX_KERNEL_VARIANT names a variant unknown here or one this CPU cannot run."""


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    # The compiler flags that pick its instructions.
    arch_flags: tuple[str, ...]
    # The /proc/cpuinfo flags a CPU needs to run it.
    cpu_flags: frozenset[str]

    @property
    def flags(self) -> tuple[str, ...]:
        return (*COMMON_FLAGS, *self.arch_flags)


# The x86-64 micro-architecture levels as /proc/cpuinfo spells them (pni is SSE3, abm includes LZCNT).
_X86_64_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})
_X86_64_V3 = _X86_64_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_X86_64_V4 = _X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}

X86_64_VARIANTS = (
    Variant("baseline", ("-march=x86-64",), frozenset()),
    Variant("avx2", ("-march=x86-64-v3",), _X86_64_V3),
    Variant("avx512", ("-march=x86-64-v4",), _X86_64_V4),
    Variant("avx512bf16", ("-march=x86-64-v4", "-mavx512bf16"), _X86_64_V4 | {"avx512_bf16"}),
)
ARM64_VARIANTS = (Variant("neon", (), frozenset()),)
OTHER_VARIANTS = (Variant("baseline", (), frozenset()),)


def variants() -> tuple[Variant, ...]:
    """The variants this machine's architecture builds, slowest first."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return X86_64_VARIANTS
    return ARM64_VARIANTS if machine in ("aarch64", "arm64") else OTHER_VARIANTS


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where it cannot be read: baseline only)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def runnable(variant: Variant, flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU (or one with `flags`) has every instruction the variant may use."""
    return variant.cpu_flags <= (cpu_flags() if flags is None else flags)


def best_variant() -> Variant:
    """The fastest variant this CPU can run."""
    return [variant for variant in variants() if runnable(variant)][-1]


def variant_named(name: str, *, must_run: bool = True) -> Variant:
    """The variant called `name`, which this CPU must be able to run (unless only building it)."""
    known = {variant.name: variant for variant in variants()}
    if name not in known:
        raise VariantError(f"unknown CPU kernel variant {name!r} on {platform.machine()}; expected one of {list(known)}")
    if must_run and not runnable(known[name]):
        missing = " ".join(sorted(known[name].cpu_flags - cpu_flags()))
        raise VariantError(f"CPU kernel variant {name!r} cannot run on this CPU (it lacks: {missing})")
    return known[name]


def chosen_variant() -> Variant:
    """GPTOSS_JAX_KERNEL_VARIANT's variant if set, else this CPU's best."""
    name = os.environ.get("GPTOSS_JAX_KERNEL_VARIANT")
    return variant_named(name) if name else best_variant()


def cache_dir() -> Path:
    return Path(os.environ.get("GPTOSS_JAX_CACHE", Path.home() / ".cache" / "gptoss_jax"))


def library_path(variant: Variant) -> Path:
    """Where the variant's build of this source, for this jax, lives (built or not)."""
    parts = [SOURCE.read_bytes(), HEADER.read_bytes(), " ".join(variant.flags).encode(), jax.__version__.encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return cache_dir() / f"cpu_kernels-{variant.name}-{key}.so"


def build_timeout() -> float:
    value = os.environ.get("GPTOSS_JAX_KERNEL_BUILD_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise BuildError(f"GPTOSS_JAX_KERNEL_BUILD_TIMEOUT must be a positive number of seconds, got {value!r}")
    return seconds


def build(variant: Variant) -> Path:
    """The variant's shared library, compiled now if the cache does not hold it yet."""
    library = library_path(variant)
    if library.exists():
        return library
    compiler = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]
    if shutil.which(compiler[0]) is None:
        raise BuildError(f"no C++ compiler {compiler[0]!r} found; install one or set CXX")
    timeout = build_timeout()
    library.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed: concurrent first uses never load a half-written file.
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        command = [*compiler, *variant.flags, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)]
        _run(command, timeout, f"building CPU kernel variant {variant.name!r}")
        os.replace(built, library)
    return library


def _run(command: list[str], timeout: float, what: str) -> None:
    # In a session of its own, so a timeout stops the compiler's children too (cc1plus, as): they hold
    # its output pipes, and waiting for those would outlast the timeout.
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    except OSError as error:
        raise BuildError(f"{what}: cannot run {command[0]}: {error.strerror or error}") from None
    with process:
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise BuildError(f"{what}: {command[0]} did not finish within {timeout:g} s (GPTOSS_JAX_KERNEL_BUILD_TIMEOUT)") from None
    if process.returncode != 0:
        last = " | ".join(line.strip() for line in stderr.splitlines() if line.strip())[-400:]
        raise BuildError(f"{what}: {command[0]} failed (exit {process.returncode}): {last}")
