"""The CPU kernels (gptoss_jax/backends/cpu) against plain numpy / XLA formulations of the same math."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax
from gptoss_jax import mxfp4
from gptoss_jax.backends import cpu as kernels
from gptoss_jax.runtime import Runtime

from test_model_parity import relative_error


def test_kernels_build_on_this_machine():
    # CI machines have a C++ compiler: a kernel build that breaks must fail here, not fall back quietly.
    assert kernels.available()


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


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dequantize_is_bit_exact_for_every_scale_and_picks_the_layer_and_expert(dtype):
    rng = np.random.default_rng(0)
    blocks, scales = _packed(rng, (3, 4, 256, 2))  # 3 layers, 4 experts, every scale 0..255 appears
    scales = scales.at[1, 2].set(jnp.arange(512, dtype=jnp.int32).reshape(256, 2).astype(jnp.uint8))
    ours = jax.jit(kernels.mxfp4_dequantize, static_argnums=3)(blocks, scales, jnp.int32(2), dtype, jnp.int32(1))
    expected = mxfp4.dequantize(blocks[1, 2], scales[1, 2], dtype)
    bits = np.uint16 if dtype == jnp.bfloat16 else np.uint32
    np.testing.assert_array_equal(np.asarray(ours).view(bits), np.asarray(expected).view(bits))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_expert_matvec_matches_float64_products(dtype):
    # float32 rows: exact products; bf16 rows (the bf16 model's decoding): products of bf16 pairs.
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
    expected = np.einsum("tk,tknd,td->tkn", held, weights[np.clip(chosen, 0, experts - 1)], x.astype(np.float64))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert np.abs(expected).max() > 0 and not ours[0, 1].any() and not ours[1, 2].any()


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


@pytest.mark.parametrize("rows", [1, 2, 3, 9])
def test_bf16_matvec_matches_float64_products(rows):
    rng = np.random.default_rng(rows)
    width = 100  # not a multiple of the vector width: the tail loop runs too
    w = jnp.asarray(rng.standard_normal((3, 37, width)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((rows, width)), jnp.bfloat16)
    ours = np.asarray(jax.jit(kernels.bf16_matvec)(x, w, jnp.int32(2)))
    expected = np.asarray(x, np.float64) @ np.asarray(w[2], np.float64).T
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_portable_loops_without_avx512_compute_the_same(tmp_path):
    # The kernels' loops for CPUs without AVX-512, built for x86-64-v3 in a fresh cache and run in a child.
    if os.uname().machine != "x86_64":
        pytest.fail("this check builds for x86-64-v3; give it an -march for this machine")
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from gptoss_jax import mxfp4
        from gptoss_jax.backends import cpu as kernels
        from gptoss_jax.runtime import Runtime
        assert kernels.available()
        rng = np.random.default_rng(0)
        blocks = jnp.asarray(rng.integers(0, 256, (2, 3, 8, 4, 16), dtype=np.uint8))
        scales = jnp.asarray(rng.integers(0, 256, (2, 3, 8, 4), dtype=np.uint8))
        deq = kernels.mxfp4_dequantize(blocks, scales, jnp.int32(2), jnp.float32, jnp.int32(1))
        assert (np.asarray(deq).view(np.uint32) == np.asarray(mxfp4.dequantize(blocks[1, 2], scales[1, 2], jnp.float32)).view(np.uint32)).all()
        scales = jnp.full(scales.shape, 121, jnp.uint8)
        x = jnp.asarray(rng.standard_normal((5, 128)), jnp.float32)
        chosen = jnp.asarray(rng.integers(0, 3, (5, 2)), jnp.int32)
        ours = kernels.mxfp4_expert_matvec(x, chosen, blocks, scales, jnp.int32(1))
        weights = mxfp4.dequantize(blocks[1], scales[1], jnp.float32)
        expected = jnp.einsum("td,tknd->tkn", x, weights[chosen])
        assert float(jnp.abs(ours - expected).max()) < 1e-5 * float(jnp.abs(expected).max())
        ours = kernels.mxfp4_expert_matvec(x.astype(jnp.bfloat16), chosen, blocks, scales, jnp.int32(1))
        expected = jnp.einsum("td,tknd->tkn", x.astype(jnp.bfloat16).astype(jnp.float32), weights[chosen])
        assert float(jnp.abs(ours - expected).max()) < 1e-5 * float(jnp.abs(expected).max())
        w = jnp.asarray(rng.standard_normal((2, 7, 40)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((3, 40)), jnp.bfloat16)
        expected = v.astype(jnp.float32) @ w[1].astype(jnp.float32).T
        assert float(jnp.abs(kernels.bf16_matvec(v, w, jnp.int32(1)) - expected).max()) < 1e-5 * float(jnp.abs(expected).max())
        x = jnp.asarray(rng.standard_normal((7, 128)), jnp.bfloat16)
        sizes = jnp.asarray([2, 0, 4], jnp.int32)
        ours = kernels.mxfp4_grouped_matmul(x, sizes, blocks, scales, jnp.int32(1))
        expected = jnp.einsum("pk,pnk->pn", x[:6].astype(jnp.float32), weights[jnp.asarray([0, 0, 2, 2, 2, 2])])
        assert float(jnp.abs(ours[:6] - expected).max()) < 1e-5 * float(jnp.abs(expected).max()) and not ours[6].any()
        g = jnp.asarray(rng.standard_normal((7, 8)), jnp.bfloat16)
        grad = jax.vjp(lambda x: kernels.mxfp4_grouped_matmul(x, sizes, blocks, scales, jnp.int32(1)), x)[1](g.astype(jnp.float32))[0]
        expected = jnp.einsum("pn,pnk->pk", g[:6].astype(jnp.float32), weights[jnp.asarray([0, 0, 2, 2, 2, 2])])
        assert float(jnp.abs(grad[:6].astype(jnp.float32) - expected).max()) < 1e-2 * float(jnp.abs(expected).max())
        # Without hardware bf16 products the model keeps XLA's tiled path for prefill.
        assert not kernels.bf16_products()
        runtime = Runtime.default()
        assert runtime.cpu_kernels and not runtime.bf16_products
        paths = [runtime.expert_path_for(pairs, 32, packed=True, bf16=True, adapters=False) for pairs in (2048, 64)]
        assert paths == ["tiled", "fused"], paths
        print("portable kernels ok")
        """
    )
    env = {**os.environ, "GPTOSS_JAX_KERNEL_ARCH": "x86-64-v3", "GPTOSS_JAX_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "portable kernels ok" in result.stdout, result.stderr[-3000:]


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


def test_sorted_expert_path_gives_the_tiled_paths_values_and_gradients(hub_checkpoint, long_tokens):
    # bf16 prompts and training without expert adapters run the grouped kernel (its gradient is the same
    # kernel, transposed); the tiled path is the XLA formulation of the same products.
    from flax import nnx

    model = gptoss_jax.load(hub_checkpoint, dtype="bfloat16")
    pairs = long_tokens.size * model.config.experts_per_token
    default = model.runtime.expert_path_for(pairs, model.config.num_experts, packed=True, bf16=True, adapters=False)
    assert default == ("sorted" if kernels.bf16_products() else "tiled")  # float32 loops only without AVX512-BF16
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
