"""The CPU kernels (gptoss_jax/backends/cpu) against plain numpy / XLA formulations of the same math,
and how they are built: the variants this machine can run, a missing compiler, a hanging one."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax
from gptoss_jax import mxfp4
from gptoss_jax.backends import cpu as kernels
from gptoss_jax.backends.cpu import build
from gptoss_jax.runtime import Runtime

from cli_errors import command_lines
from conftest import decode_case
from test_model_parity import relative_error

# The variants this CPU can run, by build.py's own reading of /proc/cpuinfo (checked below).
RUNNABLE = [variant.name for variant in build.variants() if build.runnable(variant)]
# The builds whose expert matvec takes bf16 rows quantized to int16 (x86 with AVX2).
INT16_ROWS = ("avx2", "avx512", "avx512bf16")


def _cpuinfo_flags() -> set[str]:
    with open("/proc/cpuinfo") as info:
        return set(next(line for line in info if line.startswith(("flags", "Features"))).split(":", 1)[1].split())


def _expected_variant() -> str:
    """This CPU's best variant, from its flags, written out apart from build.py's tables."""
    if platform.machine() in ("aarch64", "arm64"):
        return "neon"
    if platform.machine() != "x86_64":
        return "baseline"
    flags = _cpuinfo_flags()
    v3 = {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm", "sse4_2", "popcnt", "ssse3"}
    v4 = v3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    if v4 | {"avx512_bf16"} <= flags:
        return "avx512bf16"
    return "avx512" if v4 <= flags else "avx2" if v3 <= flags else "baseline"


def _own_tiles(variant: str) -> bool:
    """Whether the variant's bf16 matvec takes the unembedding to 16 rows, held in blocks: AVX2's tiles,
    and AVX512-BF16's where the CPU has no AMX for XLA's dot."""
    return variant == "avx2" or (variant == "avx512bf16" and "amx_bf16" not in _cpuinfo_flags())


def _matvec_rows(variant: str) -> int:
    return 16 if _own_tiles(variant) else 4


@pytest.mark.quick
@pytest.mark.cpu_kernels
def test_kernels_build_on_this_machine_for_the_variant_its_cpu_flags_allow():
    # CI machines have a C++ compiler: a kernel build that breaks must fail here, not fall back quietly.
    status = kernels.load_kernels()
    expected = os.environ.get("GPTOSS_JAX_KERNEL_VARIANT") or _expected_variant()
    assert status == kernels.KernelStatus(expected, bf16_products=expected == "avx512bf16",
                                          grouped_tiles=expected != "baseline", int16_rows=expected in INT16_ROWS,
                                          matvec_rows=_matvec_rows(expected),
                                          unembedding_blocks=_own_tiles(expected), reason=None)
    assert RUNNABLE[-1] == _expected_variant() and Runtime.default().cpu_kernels == expected


def _isa_macros(*flags: str) -> set[str]:
    out = subprocess.run(["c++", *flags, "-dM", "-E", "-x", "c++", "/dev/null"], capture_output=True, text=True, check=True)
    return {line.split()[1] for line in out.stdout.splitlines() if line.split()[1].startswith(("__AVX", "__FMA", "__BMI", "__F16C"))}


@pytest.mark.cpu_kernels
def test_every_runnable_variant_asks_for_no_instruction_this_cpu_lacks():
    # The compiler's own view of this CPU (-march=native) must cover each variant's instruction sets.
    native = _isa_macros("-march=native")
    for variant in build.variants():
        extra = _isa_macros(*variant.arch_flags) - native
        assert (variant.name in RUNNABLE) == (not extra), (variant.name, sorted(extra))
    if platform.machine() == "x86_64":  # the last variant has the source's AVX-512 and bf16 paths
        assert {"__AVX512F__", "__AVX512BW__", "__AVX512BF16__"} <= _isa_macros(*build.variants()[-1].arch_flags)


def _packed(rng, shape, scale_range=(0, 256)):
    blocks = rng.integers(0, 256, (*shape, 16), dtype=np.uint8)
    scales = rng.integers(*scale_range, shape, dtype=np.uint8)
    return jnp.asarray(blocks), jnp.asarray(scales)


def _dense(blocks, scales) -> np.ndarray:
    """float64 weights [..., N, K] by table lookup, independent of mxfp4.dequantize."""
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    codes = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    values = mxfp4.FP4_VALUES.astype(np.float64)[codes] * np.exp2(scales.astype(np.float64) - 127)[..., None]
    return values.reshape(*values.shape[:-2], -1)


@pytest.mark.quick
@pytest.mark.cpu_kernels
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dequantize_is_bit_exact_for_every_scale_and_picks_the_layer_and_expert(dtype):
    rng = np.random.default_rng(0)
    blocks, scales = _packed(rng, (3, 4, 256, 2))  # 3 layers, 4 experts, every scale 0..255 appears
    scales = scales.at[1, 2].set(jnp.arange(512, dtype=jnp.int32).reshape(256, 2).astype(jnp.uint8))
    ours = jax.jit(kernels.mxfp4_dequantize, static_argnums=3)(blocks, scales, jnp.int32(2), dtype, jnp.int32(1))
    expected = mxfp4.dequantize(blocks[1, 2], scales[1, 2], dtype)
    bits = np.uint16 if dtype == jnp.bfloat16 else np.uint32
    np.testing.assert_array_equal(np.asarray(ours).view(bits), np.asarray(expected).view(bits))


@pytest.mark.quick
@pytest.mark.cpu_kernels
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_expert_matvec_matches_float64_products(dtype):
    # float32 rows: exact products; bf16 rows (the bf16 model's decoding): exact, or on x86 builds with
    # AVX2 quantized to int16 per block of 32 (each input within its block's largest |x| / 65534).
    rng = np.random.default_rng(1)
    layers, experts, n_out, width, tokens, k = 2, 5, 24, 96, 11, 3
    blocks, scales = _packed(rng, (layers, experts, n_out, width // 32), (118, 124))
    x = np.asarray(jnp.asarray(rng.standard_normal((tokens, width)), dtype), np.float32)
    # Expert 4 is chosen by 10 tokens (more than one run of 8), -1 and 5 name experts held elsewhere.
    chosen = rng.integers(0, experts, (tokens, k)).astype(np.int32)
    chosen[:10, 0] = 4
    chosen[0, 1], chosen[1, 2] = -1, experts
    ours = np.asarray(jax.jit(kernels.mxfp4_expert_matvec)(jnp.asarray(x, dtype), jnp.asarray(chosen), blocks, scales, jnp.int32(1)))
    weights = _dense(blocks[1], scales[1])  # [E, N, K]
    held = (chosen >= 0) & (chosen < experts)
    chosen_weights = weights[np.clip(chosen, 0, experts - 1)]
    expected = np.einsum("tk,tknd,td->tkn", held, chosen_weights, x.astype(np.float64))
    allowed = 1e-5 * np.abs(expected).max()
    if dtype == jnp.bfloat16 and kernels.load_kernels().int16_rows:  # each input within its block's max / 65534
        largest = np.repeat(np.abs(x).reshape(tokens, -1, 32).max(-1), 32, axis=-1)
        allowed = allowed + np.einsum("tk,tknd,td->tkn", held, np.abs(chosen_weights), largest / 65534)
    assert (np.abs(ours - expected) <= allowed).all(), np.abs(ours - expected).max()
    assert np.abs(expected).max() > 0 and not ours[0, 1].any() and not ours[1, 2].any()


@pytest.mark.quick
@pytest.mark.cpu_kernels
def test_expert_matvec_gradient_is_the_transposed_product():
    rng = np.random.default_rng(2)
    blocks, scales = _packed(rng, (4, 16, 2), (120, 124))
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    chosen = jnp.asarray([[0, 3], [1, 1], [2, -1]], jnp.int32)
    weights = jnp.asarray(_dense(blocks, scales), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((3, 2, 16)), jnp.float32)
    grad = jax.grad(lambda x: (kernels.mxfp4_expert_matvec(x, chosen, blocks, scales) * cotangent).sum())(x)
    held = (chosen >= 0)[..., None, None]
    expected = jnp.einsum("tkn,tknd->td", cotangent, jnp.where(held, weights[jnp.clip(chosen, 0)], 0.0))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.quick
@pytest.mark.cpu_kernels
@pytest.mark.parametrize("n_out, width", [(130, 96), (64, 2880 // 10)])
def test_grouped_matmul_and_its_gradient_match_float64_products(n_out, width):
    # Rows sorted by expert; expert 1 owns no rows, 13 rows (more than two tiles of 6) go to expert 3, and
    # the last 2 rows belong to no expert (held elsewhere): zeros. 130 outputs: a panel of 64 is partial.
    rng = np.random.default_rng(n_out)
    sizes = np.array([4, 0, 5, 13, 1], np.int32)
    rows = int(sizes.sum()) + 2
    blocks, scales = _packed(rng, (2, len(sizes), n_out, width // 32), (118, 126))
    x = jnp.asarray(rng.standard_normal((rows, width)), jnp.bfloat16)
    cotangent = jnp.asarray(rng.standard_normal((rows, n_out)), jnp.float32)
    run = jax.jit(lambda x: jax.vjp(lambda x: kernels.mxfp4_grouped_matmul(x, jnp.asarray(sizes), blocks, scales, jnp.int32(1)), x))
    ours, pullback = run(x)
    (grad,) = pullback(cotangent)
    weights = _dense(blocks[1], scales[1])  # [E, N, K]
    expert_of_row = np.repeat(np.arange(len(sizes)), sizes)
    x64 = np.asarray(x, np.float64)
    expected = np.zeros((rows, n_out))
    expected[: len(expert_of_row)] = np.einsum("pk,pnk->pn", x64[: len(expert_of_row)], weights[expert_of_row])
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    # The gradient multiplies the bf16-rounded cotangent by the transposed weights, rounded to x's bf16.
    g64 = np.asarray(cotangent.astype(jnp.bfloat16), np.float64)
    expected_grad = np.zeros((rows, width))
    expected_grad[: len(expert_of_row)] = np.einsum("pn,pnk->pk", g64[: len(expert_of_row)], weights[expert_of_row])
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(grad, np.float64), expected_grad, rtol=1 / 128, atol=1e-5 * np.abs(expected_grad).max())
    assert not np.asarray(ours)[-2:].any() and not np.asarray(grad, np.float64)[-2:].any()


@pytest.mark.quick
@pytest.mark.cpu_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 9, 16])
def test_bf16_matvec_matches_float64_products(rows):
    rng = np.random.default_rng(rows)
    width = 100  # not a multiple of the vector width: the tail loop runs too
    w = jnp.asarray(rng.standard_normal((3, 37, width)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((rows, width)), jnp.bfloat16)
    ours = np.asarray(jax.jit(kernels.bf16_matvec)(x, w, jnp.int32(2)))
    expected = np.asarray(x, np.float64) @ np.asarray(w[2], np.float64).T
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.fixture(scope="module")
def variant_cache(tmp_path_factory):
    """A fresh cache holding a build of every variant this CPU can run (built once for the module)."""
    folder = tmp_path_factory.mktemp("kernel_variants")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GPTOSS_JAX_CACHE", str(folder))
        for name in RUNNABLE:
            build.build(build.variant_named(name))
    return folder


# Run in a child per variant: one process registers one library under the kernels' FFI names.
VARIANT_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from gptoss_jax import mxfp4
from gptoss_jax.backends import cpu as kernels
from gptoss_jax.backends.cpu import build
from gptoss_jax.runtime import Runtime
name = sys.argv[1]
assert build.library_path(build.variant_named(name)).exists()  # the fixture's build, not a new one
status = kernels.load_kernels()
assert status == kernels.KernelStatus(name, bf16_products=name == "avx512bf16", grouped_tiles=name != "baseline",
                                     int16_rows=sys.argv[2] == "int16",
                                     matvec_rows=int(sys.argv[3]),
                                     unembedding_blocks=int(sys.argv[3]) == 16), status
def close(ours, expected, tolerance=1e-5):  # expected: a float64 reference
    ours, expected = np.asarray(ours, np.float64), np.asarray(expected)
    assert expected.dtype == np.float64
    error = np.abs(ours - expected).max() / np.abs(expected).max()
    assert np.abs(expected).max() > 0 and error <= tolerance, error
rng = np.random.default_rng(0)
blocks = jnp.asarray(rng.integers(0, 256, (2, 3, 40, 4, 16), dtype=np.uint8))
scales = jnp.asarray(rng.integers(0, 256, (2, 3, 40, 4), dtype=np.uint8))
deq = kernels.mxfp4_dequantize(blocks, scales, jnp.int32(2), jnp.float32, jnp.int32(1))
assert (np.asarray(deq).view(np.uint32) == np.asarray(mxfp4.dequantize(blocks[1, 2], scales[1, 2], jnp.float32)).view(np.uint32)).all()
scales = jnp.asarray(rng.integers(119, 124, scales.shape, dtype=np.uint8))
weights = np.asarray(mxfp4.dequantize(blocks[1], scales[1], jnp.float32), np.float64)  # exact
f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
# The MXFP4 expert matvec (float32 and bf16 rows; 10 tokens pick expert 2) against XLA's einsum.
x = jnp.asarray(rng.standard_normal((11, 128)), jnp.float32)
chosen = jnp.asarray(rng.integers(0, 3, (11, 2)), jnp.int32).at[:10, 0].set(2)
for rows in (x, x.astype(jnp.bfloat16)):
    ours = jax.jit(kernels.mxfp4_expert_matvec)(rows, chosen, blocks, scales, jnp.int32(1))
    expected = np.einsum("td,tknd->tkn", f64(rows), weights[np.asarray(chosen)])
    if status.int16_rows and rows.dtype == jnp.bfloat16:  # taken as int16 per block of 32
        largest = np.repeat(np.abs(f64(rows)).reshape(11, -1, 32).max(-1), 32, axis=-1)  # [T, K]: each block's max
        allowed = np.einsum("td,tknd->tkn", largest / 65534, np.abs(weights[np.asarray(chosen)]))
        assert (np.abs(np.asarray(ours, np.float64) - expected) <= allowed + 1e-5 * np.abs(expected).max()).all()
    else:
        close(ours, expected)
# The bf16 matvec, a width that is no multiple of the vector width, against XLA's dot.
w = jnp.asarray(rng.standard_normal((2, 37, 100)), jnp.bfloat16)
for count in (1, 3, 9, 16):
    v = jnp.asarray(rng.standard_normal((count, 100)), jnp.bfloat16)
    close(jax.jit(kernels.bf16_matvec)(v, w, jnp.int32(1)), f64(v) @ f64(w[1]).T)
# A row's products do not depend on the rows beside it: a batch decodes as each of its rows would alone
# (16 rows: tiles of 3 and of 2 on AVX2).
v = jnp.asarray(rng.standard_normal((16, 100)), jnp.bfloat16)
alone = [np.asarray(jax.jit(kernels.bf16_matvec)(v[i : i + 1], w, jnp.int32(1))) for i in range(16)]
assert (np.asarray(jax.jit(kernels.bf16_matvec)(v, w, jnp.int32(1))) == np.concatenate(alone)).all()
rows = x.astype(jnp.bfloat16)
matvec = jax.jit(kernels.mxfp4_expert_matvec)
alone = [np.asarray(matvec(rows[i : i + 1], chosen[i : i + 1], blocks, scales, jnp.int32(1))) for i in range(11)]
assert (np.asarray(matvec(rows, chosen, blocks, scales, jnp.int32(1))) == np.concatenate(alone)).all()
# A product of 16 rows with a whole weight (the unembedding at batch 16) runs in the kernel where the build
# says it beats XLA's dot there (the avx2 build's register tiles), else in XLA's dot: the same values.
from gptoss_jax.backends.cpu import products
v = jnp.asarray(rng.standard_normal((16, 100)), jnp.bfloat16)
unembed = jax.jit(lambda v: products.matmul("td,vd->tv", v, w[1], jnp.bfloat16, kernels=True))
assert ("gptoss_bf16_matvec" in unembed.lower(v).as_text()) == (status.matvec_rows >= 16), status
close(unembed(v), f64(v) @ f64(w[1]).T)
# The same weight in blocks of 16 rows (48 rows: 3 blocks), every build: against float64, a row the same
# alone as in a batch, in the kernel for any number of rows (XLA's dot on this layout is slow), its gradient.
from gptoss_jax.backends.cpu.blocks import from_blocks, to_blocks
wide = jnp.asarray(rng.standard_normal((48, 100)), jnp.bfloat16)
in_blocks = to_blocks(wide)
assert in_blocks.shape == (3, 100, 16) and (from_blocks(in_blocks) == wide).all()
for count in (1, 3, 9, 40, 16):  # v ends as 16 rows
    v = jnp.asarray(rng.standard_normal((count, 100)), jnp.bfloat16)
    close(jax.jit(kernels.bf16_matvec_blocks)(v, in_blocks), f64(v) @ f64(wide).T)
    product = jax.jit(lambda v: products.blocks_matmul(v, in_blocks, jnp.bfloat16, kernels=True))
    assert "gptoss_bf16_matvec_blocks" in product.lower(v).as_text(), count
    close(product(v), f64(v) @ f64(wide).T)
alone = [np.asarray(jax.jit(kernels.bf16_matvec_blocks)(v[i : i + 1], in_blocks)) for i in range(16)]
assert (np.asarray(jax.jit(kernels.bf16_matvec_blocks)(v, in_blocks)) == np.concatenate(alone)).all()
g = jnp.asarray(rng.standard_normal((16, 48)), jnp.float32)
grads = jax.grad(lambda v, w: (kernels.bf16_matvec_blocks(v, w) * g).sum(), argnums=(0, 1))(v, in_blocks)
close(grads[0], f64(g) @ f64(wide), 1e-2)
close(from_blocks(grads[1]), f64(g).T @ f64(v), 1e-2)
assert Runtime.default().unembedding_blocks == status.unembedding_blocks
# The grouped matmul and its gradient (the transposed kernel).
x = jnp.asarray(rng.standard_normal((15, 128)), jnp.bfloat16)
sizes = jnp.asarray([2, 0, 11], jnp.int32)
owner = np.asarray([0, 0] + [2] * 11)
ours, pullback = jax.vjp(lambda x: kernels.mxfp4_grouped_matmul(x, sizes, blocks, scales, jnp.int32(1)), x)
close(ours[:13], np.einsum("pk,pnk->pn", f64(x[:13]), weights[owner]))
assert not np.asarray(ours[13:]).any()
g = jnp.asarray(rng.standard_normal((15, 40)), jnp.bfloat16)
close(pullback(g.astype(jnp.float32))[0][:13], np.einsum("pn,pnk->pk", f64(g[:13]), weights[owner]), 1e-2)
# The runtime uses this build, and the grouped kernel for prefill where it runs register tiles.
runtime = Runtime.default()
assert (runtime.cpu_kernels, runtime.bf16_products) == (name, status.bf16_products), runtime
paths = [runtime.expert_path_for(pairs, 32, packed=True, bf16=True, adapters=False) for pairs in (2048, 64)]
assert paths == ["sorted" if status.grouped_tiles else "tiled", "fused"], paths
print("variant ok", name)
"""


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("name", RUNNABLE)
def test_each_variant_this_cpu_runs_gives_xla_values(variant_cache, name):
    env = {**os.environ, "GPTOSS_JAX_CACHE": str(variant_cache), "GPTOSS_JAX_KERNEL_VARIANT": name}
    rows = "int16" if name in INT16_ROWS else "exact"  # how the build must take bf16 rows
    command = [sys.executable, "-c", VARIANT_SCRIPT, name, rows, str(_matvec_rows(name))]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and f"variant ok {name}" in result.stdout, result.stderr[-3000:]


@pytest.mark.cpu_kernels
def test_the_command_builds_ahead_of_time_and_fails_in_one_line(variant_cache, tmp_path):
    command = [sys.executable, "-m", "gptoss_jax.backends.cpu"]
    env = {**os.environ, "GPTOSS_JAX_CACHE": str(variant_cache)}
    env.pop("GPTOSS_JAX_KERNEL_VARIANT", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    best = build.variant_named(RUNNABLE[-1])
    assert done.returncode == 0 and done.stdout.startswith(f"{best.name}: already built: {variant_cache}"), done
    env.update(GPTOSS_JAX_CACHE=str(tmp_path), CXX="/nonexistent/c++")
    failed = subprocess.run([*command, "--variant", "baseline"], env=env, capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stdout == "", failed
    assert command_lines(failed.stderr) == ["error: no C++ compiler '/nonexistent/c++' found; install one or set CXX"]
    unknown = subprocess.run([*command, "--variant", "avx9000"], env=env, capture_output=True, text=True)
    assert unknown.returncode == 1 and command_lines(unknown.stderr)[0].startswith("error: unknown CPU kernel variant 'avx9000'")


@pytest.mark.quick
def test_a_variant_this_cpu_cannot_run_or_does_not_know_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("GPTOSS_JAX_KERNEL_VARIANT", "avx9000")
    with pytest.raises(build.VariantError, match=r"^unknown CPU kernel variant 'avx9000' on .*; expected one of \['baseline'"):
        build.chosen_variant()
    beyond = [variant.name for variant in build.variants() if variant.name not in RUNNABLE]
    for name in beyond:  # none on a CPU with AVX512-BF16
        monkeypatch.setenv("GPTOSS_JAX_KERNEL_VARIANT", name)
        with pytest.raises(build.VariantError, match=f"^CPU kernel variant '{name}' cannot run on this CPU \\(it lacks: "):
            build.chosen_variant()


MISSING_COMPILER_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
import gptoss_jax
model = gptoss_jax.load(sys.argv[1], dtype="bfloat16")
assert model.runtime.cpu_kernels is None and not model.runtime.bf16_products, model.runtime
logits = np.asarray(jax.jit(lambda t: model(t, jnp.arange(4)[None], None))(jnp.asarray([[5, 300, 17, 9]])))
assert logits.shape[-1] == model.config.vocab_size and np.isfinite(logits).all()
from gptoss_jax.backends import cpu
print("runs without kernels:", cpu.load_kernels().reason)
"""


def test_a_missing_compiler_gives_one_notice_and_a_model_on_xla_paths(hub_checkpoint, tmp_path):
    env = {**os.environ, "GPTOSS_JAX_CACHE": str(tmp_path / "cache"), "CXX": "/nonexistent"}
    env.pop("GPTOSS_JAX_KERNEL_VARIANT", None)
    env.pop("GPTOSS_JAX_KERNELS", None)  # on, even in the suite's run without kernels: the compiler is missing
    result = subprocess.run([sys.executable, "-c", MISSING_COMPILER_SCRIPT, str(hub_checkpoint)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    reason = "no C++ compiler '/nonexistent' found; install one or set CXX"
    assert result.stdout.strip().endswith(f"runs without kernels: {reason}")
    notices = [line for line in result.stderr.splitlines() if "CPU kernels" in line]
    assert len(notices) == 1 and "load_kernels" not in result.stderr, result.stderr[-3000:]
    assert notices[0] == (
        f"gptoss_jax:0: KernelsUnavailableWarning: CPU kernels unavailable ({reason}); using XLA's paths, decoding is slower"
    )
    # Turned off on purpose: no notice at all (an error if one were raised).
    env["GPTOSS_JAX_KERNELS"] = "0"
    script = "from gptoss_jax.backends import cpu; print(cpu.load_kernels().reason)"
    quiet = subprocess.run([sys.executable, "-W", "error", "-c", script], env=env, capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stdout == "turned off by GPTOSS_JAX_KERNELS=0\n", quiet.stderr[-3000:]


def _compiler_script(folder, body: str):
    script = folder / "fake-c++"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.quick
def test_a_hanging_compiler_is_stopped_at_the_timeout(tmp_path, monkeypatch):
    # The sleep is a child of the compiler, as cc1plus is of c++: it is stopped too, not waited for.
    monkeypatch.setenv("CXX", _compiler_script(tmp_path, "sleep 60\necho done"))
    monkeypatch.setenv("GPTOSS_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPTOSS_JAX_KERNEL_BUILD_TIMEOUT", "1.5")
    start = time.monotonic()
    with pytest.raises(build.BuildError, match=r"^building CPU kernel variant 'baseline': .*fake-c\+\+ did not finish within 1.5 s \(GPTOSS_JAX_KERNEL_BUILD_TIMEOUT\)$"):
        build.build(build.variant_named("baseline"))
    assert time.monotonic() - start < 15
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-built left behind


@pytest.mark.quick
def test_a_failing_compiler_error_ends_with_its_last_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", _compiler_script(tmp_path, "echo 'cpu_kernels.cc:1: error: broken' >&2\necho 'compilation terminated.' >&2\nexit 1"))
    monkeypatch.setenv("GPTOSS_JAX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(build.BuildError) as failure:
        build.build(build.variant_named("baseline"))
    assert str(failure.value).endswith("failed (exit 1): cpu_kernels.cc:1: error: broken | compilation terminated.")
    assert "\n" not in str(failure.value) and list((tmp_path / "cache").iterdir()) == []


@pytest.mark.quick
@pytest.mark.cpu_kernels
@pytest.mark.parametrize("sliding", [False, True])
def test_decode_attention_writes_its_slot_in_place_and_matches_xla(sliding):
    from gptoss_jax.nn.attention import _attend
    from gptoss_jax.nn.cache import LayerCache

    kernels.load_kernels()
    rng = np.random.default_rng(5)
    config, q, keys, values, positions, at, sinks = decode_case(rng, sliding)  # the rows' slots hold older tokens
    keys, values = jnp.asarray(keys, jnp.bfloat16), jnp.asarray(values, jnp.bfloat16)
    new_shape = (q.shape[0], config.num_kv_heads, config.head_dim)  # each row's token to write
    k_new, v_new = (jnp.asarray(rng.standard_normal(new_shape), jnp.float32) for _ in range(2))
    window = config.sliding_window if sliding else None

    def step(q, k_new, v_new, keys, values, positions):
        cache = LayerCache(keys, values, positions).group(jnp.int32(1), False, in_place=True)
        out, cache = kernels.decode_attention(q, k_new, v_new, cache, jnp.asarray(at), sinks, window)
        return out, cache.keys.stack, cache.values.stack, cache.positions.stack

    lowered = jax.jit(step, donate_argnums=(3, 4, 5)).lower(q, k_new, v_new, keys, values, jnp.asarray(positions))
    assert "gptoss_decode_attention" in lowered.as_text()
    # The new token sits in slot position % slots of group 1 (padding rows write nothing); all else is kept.
    expected_stacks = [np.array(keys), np.array(values), positions.copy()]
    out, *stacks = lowered.compile()(q, k_new, v_new, keys, values, jnp.asarray(positions))  # donated: in place
    slots = positions.shape[-1]
    for row in np.flatnonzero(at >= 0):
        slot = at[row] % slots
        expected_stacks[0][1, row, slot] = np.asarray(k_new[row].astype(jnp.bfloat16)).reshape(-1)
        expected_stacks[1][1, row, slot] = np.asarray(v_new[row].astype(jnp.bfloat16)).reshape(-1)
        expected_stacks[2][1, row, slot] = at[row]
    for ours, expected in zip(stacks, expected_stacks):
        np.testing.assert_array_equal(np.asarray(ours), expected)
    # XLA's attention over that cache (bf16 products, float32 sums), the model's path without kernels.
    heads = lambda x: jnp.asarray(x[1]).reshape(*x.shape[1:3], config.num_kv_heads, config.head_dim)
    reference = _attend(q[:, None], heads(expected_stacks[0]), heads(expected_stacks[1]), jnp.asarray(at)[:, None],
                        jnp.asarray(expected_stacks[2][1]), sinks, sliding, config, "bfloat16",
                        Runtime("cpu").without_kernels())[:, 0]  # fmt: skip
    assert relative_error(np.asarray(out), np.asarray(reference)) <= 1e-5
    np.testing.assert_array_equal(np.asarray(out)[1], 0.0)  # the padding row sees nothing but the sink


@pytest.mark.quick
@pytest.mark.cpu_kernels
def test_bf16_decoding_attends_in_place_in_the_cache_as_xla_does(hub_checkpoint, long_tokens, tiny_config):
    # A prefill then decode steps with a cache of 40 slots: the sliding ring wraps, full layers fill part
    # of theirs. With the kernels each step's attention is the in-place kernel; without, XLA's path.
    from gptoss_jax.nn import KVCache

    model = gptoss_jax.load(hub_checkpoint, dtype="bfloat16")
    tokens = long_tokens[:, :38]
    batch = tokens.shape[0]
    at = lambda start, stop: np.broadcast_to(np.arange(start, stop, dtype=np.int32), (batch, stop - start))

    def run(model):
        forward = jax.jit(lambda tokens, positions, cache: model(tokens, positions, cache))
        logits, cache = forward(tokens[:, :30], at(0, 30), KVCache.create(tiny_config, batch, 40, "bfloat16"))
        step_text = forward.lower(tokens[:, 30:31], at(30, 31), cache).as_text()
        outputs = [np.asarray(logits[:, -1:])]
        for step in range(30, 38):
            logits, cache = forward(tokens[:, step : step + 1], at(step, step + 1), cache)
            outputs.append(np.asarray(logits))
        return np.concatenate(outputs, axis=1), "gptoss_decode_attention" in step_text

    with_kernels, in_place = run(model)
    model.runtime = model.runtime.without_kernels()
    without, xla_in_place = run(model)
    assert in_place and not xla_in_place
    assert relative_error(with_kernels, without) <= 1e-2

@pytest.mark.quick
@pytest.mark.cpu_kernels
def test_decoding_with_and_without_kernels_gives_the_same_logits(hub_checkpoint):
    # bf16 decoding runs the matvec and expert kernels; with them off, the plain XLA paths.
    tokens = np.array([[5, 300, 17, 9]], np.int32)
    model = gptoss_jax.load(hub_checkpoint, dtype="bfloat16")
    assert model.runtime.cpu_kernels and model.runtime.whole_stacks
    with_kernels = np.asarray(jax.jit(lambda t: model(t[:, -1:], jnp.array([[3]]), None))(tokens))
    model.runtime = model.runtime.without_kernels()
    without = np.asarray(jax.jit(lambda t: model(t[:, -1:], jnp.array([[3]]), None))(tokens))
    assert relative_error(with_kernels, without) <= 1e-2
    # The switch really turned them off.
    assert model.runtime.expert_path_for(4, 32, packed=True, bf16=True, adapters=False) == "gathered"


@pytest.mark.cpu_kernels
def test_sorted_expert_path_gives_the_tiled_paths_values_and_gradients(hub_checkpoint, long_tokens):
    # bf16 prompts and training without expert adapters run the grouped kernel (its gradient is the same
    # kernel, transposed); the tiled path is the XLA formulation of the same products.
    from flax import nnx

    model = gptoss_jax.load(hub_checkpoint, dtype="bfloat16")
    pairs = long_tokens.size * model.config.experts_per_token
    default = model.runtime.expert_path_for(pairs, model.config.num_experts, packed=True, bf16=True, adapters=False)
    assert default == ("sorted" if kernels.grouped_tiles() else "tiled")  # the portable build's loops are slower
    model.runtime = model.runtime.replace(expert_path="sorted")
    cotangent = jnp.asarray(np.random.default_rng(0).standard_normal((*long_tokens.shape, model.config.hidden_size)), jnp.float32)

    def values_and_gradients():
        def loss(model):
            hidden, _ = model.hidden(long_tokens)
            return (hidden * cotangent).sum(), hidden

        (_, hidden), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        return np.asarray(hidden), {path: np.asarray(leaf.get_value(), np.float32) for path, leaf in nnx.to_flat_state(grads)}

    sorted_hidden, sorted_grads = values_and_gradients()
    model.runtime = model.runtime.replace(expert_path="tiled")
    tiled_hidden, tiled_grads = values_and_gradients()
    assert relative_error(sorted_hidden, tiled_hidden) <= 1e-2
    names = [path for path in tiled_grads if any(part in ("mlp1_bias", "router", "embed", "q_proj") for part in path)]
    assert len(names) >= 4
    for path in names:
        assert np.abs(tiled_grads[path]).max() > 0, path
        assert relative_error(sorted_grads[path], tiled_grads[path]) <= 3e-2, path
