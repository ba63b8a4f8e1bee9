"""The CPU kernels' arithmetic against float64 in every build we ship: each x86-64 variant this CPU runs,
compiled natively, and the aarch64 (NEON) build, cross-compiled and run under qemu-user, since no ARM
machine is at hand. The program is tests/kernel_harness.cc: the kernels' header without jax or XLA."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from gptoss_jax.backends.cpu import build

HARNESS = Path(__file__).with_name("kernel_harness.cc")
FLAGS = ("-O3", "-std=c++17", "-mtune=generic", f"-I{build.HEADER.parent}")
# What each build must have compiled (the harness prints the header's kPaths): a variant that silently
# fell back to the portable loops fails here.
PATHS = {
    "baseline": "portable",
    "avx2": "avx2 int16-rows float-panels",
    "avx512": "avx512 int16-rows float-panels",
    "avx512bf16": "avx512 int16-rows bf16-products bf16-panels",
    "neon": "neon float-panels",
}
RUNNABLE = [variant for variant in build.variants() if build.runnable(variant)]
CHECKS = 34  # the "ok" lines of a run that checked everything
# Debian / Ubuntu packages; scripts/test.sh installs them where apt-get is at hand.
CROSS_TOOLS = {"aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu", "qemu-aarch64": "qemu-user"}


def run_harness(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.rstrip().endswith("all ok"), result.stdout + result.stderr[-2000:]
    return result.stdout


def compile_harness(compiler: str, flags: tuple[str, ...], out: Path) -> Path:
    result = subprocess.run([compiler, *FLAGS, *flags, str(HARNESS), "-o", str(out)], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("variant", RUNNABLE, ids=[variant.name for variant in RUNNABLE])
def test_each_native_build_matches_float64(variant, tmp_path):
    binary = compile_harness("c++", variant.arch_flags, tmp_path / "harness")
    out = run_harness([str(binary)])
    assert out.splitlines()[0] == f"paths: {PATHS[variant.name]}", out
    # Every check ran and passed: dequantize, two expert matvecs, five bf16 matvecs, two grouped matmuls,
    # decode attention at three group sizes with and without a window (its cache writes, its values).
    assert sum(line.startswith("ok ") for line in out.splitlines()) == CHECKS, out


@pytest.mark.cpu_kernels
def test_the_aarch64_build_runs_its_neon_paths_under_qemu_and_matches_float64(tmp_path):
    missing = [f"{tool} (Debian package {package})" for tool, package in CROSS_TOOLS.items() if not shutil.which(tool)]
    assert not missing, f"missing {', '.join(missing)}: scripts/test.sh installs them with apt-get"
    # Static, so qemu-aarch64 needs no aarch64 root for the C++ runtime.
    (variant,) = build.ARM64_VARIANTS  # the flags build.py compiles the library with on an ARM64 machine
    neon = compile_harness("aarch64-linux-gnu-g++", (*variant.arch_flags, "-static"), tmp_path / "harness-neon")
    out = run_harness(["qemu-aarch64", str(neon)])
    assert out.splitlines()[0] == f"paths: {PATHS['neon']}" and out.count("\nok ") == CHECKS, out
    # The same program without SIMD: the portable loops on a second architecture.
    portable = compile_harness("aarch64-linux-gnu-g++", ("-static", "-march=armv8-a+nosimd"), tmp_path / "harness-plain")
    out = run_harness(["qemu-aarch64", str(portable)])
    assert out.splitlines()[0] == "paths: portable" and out.count("\nok ") == CHECKS, out
