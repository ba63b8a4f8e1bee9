"""MXFP4 codec: table, scale bias, nibble order, agreement with transformers, exact round trips."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from gptoss_jax import mxfp4

pytestmark = [pytest.mark.peer, pytest.mark.quick]  # compares with transformers / OpenAI's reference (torch on the CPU)


def _bits(x):
    """Bit patterns of a float array (so -0 != +0 and comparisons are exact)."""
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _random_blocks(rng, shape, scale_low=0, scale_high=252):
    """Random packed blocks [*shape, 16] and scales [*shape] with every value finite."""
    blocks = rng.integers(0, 256, (*shape, 16), dtype=np.uint8)
    scales = rng.integers(scale_low, scale_high + 1, shape, dtype=np.uint8)
    return blocks, scales


def _block_of(codes, scale):
    codes = np.asarray(codes, np.uint8).reshape(1, 32)
    return np.asarray(mxfp4.pack_codes(codes)), np.array([scale], np.uint8)


# --- the format ----------------------------------------------------------------------------


def test_fp4_table_is_the_e2m1_format():
    reference = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert mxfp4.FP4_VALUES.dtype == np.float32
    np.testing.assert_array_equal(_bits(mxfp4.FP4_VALUES), _bits(reference))
    assert (mxfp4.BLOCK_SIZE, mxfp4.BYTES_PER_BLOCK, mxfp4.SCALE_BIAS) == (32, 16, 127)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_all_16_codes_decode_to_the_table_values_including_negative_zero(dtype):
    blocks, scales = _block_of(np.tile(np.arange(16), 2), scale=127)
    out = np.asarray(mxfp4.dequantize(blocks, scales, dtype))
    assert out.dtype == np.dtype(dtype) and out.shape == (32,)
    expected = np.tile(mxfp4.FP4_VALUES, 2).astype(dtype)
    np.testing.assert_array_equal(_bits(out), _bits(expected))
    assert np.signbit(out[8]) and not np.signbit(out[0])


@pytest.mark.parametrize("scale, factor", [(127, 1.0), (128, 2.0), (126, 0.5), (0, 2.0**-127), (254, 2.0**127)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_scale_is_a_power_of_two_with_bias_127(scale, factor, dtype):
    # codes 2 (1.0), 1 (0.5) and 10 (-1.0) times 2**(scale - 127); at scale 0, 0.5 * 2**-127
    # is subnormal in both bf16 and fp32 and must not be flushed to zero.
    blocks, scales = _block_of([2, 1, 10] + [0] * 29, scale)
    out = np.asarray(mxfp4.dequantize(blocks, scales, dtype)).astype(np.float64)
    assert out[:3].tolist() == [factor, 0.5 * factor, -factor]


def test_values_beyond_the_float_range_become_infinite():
    blocks, scales = _block_of([7, 12, 2] + [0] * 29, 254)  # +-6, -2 times 2**127 > max float; 2**127 fits
    out = np.asarray(mxfp4.dequantize(blocks, scales, jnp.float32)).astype(np.float64)
    assert out[:3].tolist() == [np.inf, -np.inf, 2.0**127]


def test_low_nibble_holds_the_even_element():
    blocks = np.zeros((1, 16), np.uint8)
    blocks[0, 0] = 0x21  # low nibble 1 (0.5) -> element 0, high nibble 2 (1.0) -> element 1
    blocks[0, 15] = 0xF3  # low nibble 3 (1.5) -> element 30, high nibble 15 (-6.0) -> element 31
    codes = np.asarray(mxfp4.unpack_codes(blocks))
    assert codes.dtype == np.uint8 and codes.shape == (1, 32)
    assert codes[0, [0, 1, 30, 31]].tolist() == [1, 2, 3, 15]
    out = np.asarray(mxfp4.dequantize(blocks, np.array([127], np.uint8), jnp.float32))
    assert out[[0, 1, 30, 31]].tolist() == [0.5, 1.0, 1.5, -6.0]
    assert np.asarray(mxfp4.pack_codes(codes)).tolist() == blocks.tolist()


def test_pack_and_unpack_are_inverse_over_random_bytes():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 5, 7, 16), dtype=np.uint8)
    codes = np.asarray(mxfp4.unpack_codes(blocks))
    assert codes.shape == (3, 5, 7, 32) and codes.max() <= 15
    np.testing.assert_array_equal(np.asarray(mxfp4.pack_codes(codes)), blocks)
    codes = rng.integers(0, 16, (4, 9, 32), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(mxfp4.unpack_codes(mxfp4.pack_codes(codes))), codes)


# --- dequantize ----------------------------------------------------------------------------


@pytest.mark.parametrize("scale_range", [(0, 254), (110, 135)])
def test_dequantize_matches_transformers_convert_moe_packed_tensors_in_bf16(scale_range):
    rng = np.random.default_rng(1)
    blocks, scales = _random_blocks(rng, (4, 24, 3), *scale_range)  # [E, out, G, 16]
    scales[0, 0] = [0, 1, 254]
    theirs = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.bfloat16)
    assert tuple(theirs.shape) == (4, 96, 24)  # transformers returns [E, in, out]
    theirs = theirs.transpose(1, 2).contiguous().view(torch.int16).numpy().view(np.uint16)
    ours = np.asarray(mxfp4.dequantize(blocks, scales, jnp.bfloat16))
    assert ours.shape == (4, 24, 96)
    np.testing.assert_array_equal(_bits(ours), theirs)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dequantize_is_exact_against_a_float64_reference(dtype):
    rng = np.random.default_rng(2)
    blocks, scales = _random_blocks(rng, (5, 40))
    scales[0, :3] = [0, 1, 252]
    codes = np.asarray(mxfp4.unpack_codes(blocks))
    reference = mxfp4.FP4_VALUES[codes].astype(np.float64) * 2.0 ** (scales[..., None].astype(np.float64) - 127)
    ours = np.asarray(mxfp4.dequantize(blocks, scales, dtype))
    np.testing.assert_array_equal(ours.astype(np.float64), reference.reshape(5, -1 ))
    np.testing.assert_array_equal(np.signbit(ours), np.signbit(reference.reshape(5, -1)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dequantize_gives_identical_values_under_jit_and_eagerly(dtype):
    rng = np.random.default_rng(3)
    blocks, scales = _random_blocks(rng, (2, 16, 6), 0, 254)
    scales[0, 0] = [0, 1, 2, 3, 253, 254]
    with jax.disable_jit():  # op by op, as without the module's own jit
        eager = np.asarray(mxfp4.dequantize(blocks, scales, dtype))
    jitted = np.asarray(jax.jit(lambda b, s: mxfp4.dequantize(b, s, dtype))(blocks, scales))
    assert eager.dtype == jitted.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(_bits(jitted), _bits(eager))
    np.testing.assert_array_equal(_bits(np.asarray(mxfp4.dequantize(blocks, scales, dtype))), _bits(eager))


# --- quantize ------------------------------------------------------------------------------


def _round_trip_cases(rng):
    blocks, scales = _random_blocks(rng, (3, 8, 10))
    blocks[0, 0, :3] = 0  # all-zero blocks (at a low, middle and the largest scale)
    blocks[0, 1, :3] = 0x88  # all negative zero
    scales[0, :2, :3] = [0, 127, 252]
    scales[1, 0, :4] = [0, 1, 2, 3]  # subnormal and near-subnormal results
    # The largest scales only with codes that stay finite: |value| <= 3 at 253, <= 0.5 at 254.
    scales[2, 0, :2] = [253, 254]
    blocks[2, 0, 0] &= 0xDD  # magnitude codes <= 5 (3.0)
    blocks[2, 0, 1] &= 0x99  # magnitude codes <= 1 (0.5)
    return blocks, scales


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_requantizing_dequantized_values_is_lossless(dtype):
    blocks, scales = _round_trip_cases(np.random.default_rng(4))
    values = mxfp4.dequantize(blocks, scales, dtype)
    for eagerly in (True, False):
        with jax.disable_jit(eagerly):
            new_blocks, new_scales = mxfp4.quantize(values)
        assert new_blocks.shape == blocks.shape and new_blocks.dtype == jnp.uint8
        assert new_scales.shape == scales.shape and new_scales.dtype == jnp.uint8
        again = np.asarray(mxfp4.dequantize(new_blocks, new_scales, dtype))
        np.testing.assert_array_equal(_bits(again), _bits(np.asarray(values)))


def _brute_force_quantize(x):
    """Reference in float64: OCP scale, then the nearest of the 16 scaled values (ties to even code)."""
    x = np.asarray(x, np.float64).reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(x).max(-1)
    _, e = np.frexp(amax)  # amax = m * 2**e with m in [0.5, 1): floor(log2(amax)) = e - 1
    scales = np.where(amax > 0, np.clip(e - 1 - 2 + 127, 0, 254), 0)
    grid = mxfp4.FP4_VALUES[:8].astype(np.float64) * 2.0 ** (scales[..., None, None] - 127.0)
    dist = np.abs(np.abs(x)[..., None] - grid)
    not_nearest = dist > dist.min(-1, keepdims=True)
    mag = np.argmin(2 * not_nearest + (np.arange(8) % 2), axis=-1)  # nearest, then even code
    values = np.where(np.signbit(x), -1.0, 1.0) * np.take_along_axis(grid, mag[..., None], -1)[..., 0]
    return values.reshape(*values.shape[:-2], -1), scales


def test_quantize_rounds_random_floats_to_the_nearest_fp4_value_with_the_ocp_scale():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 50, 32)) * 2.0 ** rng.integers(-140, 120, (6, 50, 1))  # incl. subnormals
    x[0, 0] = 0.0
    x = x.astype(np.float32).reshape(6, -1)
    expected_values, expected_scales = _brute_force_quantize(x)
    blocks, scales = mxfp4.quantize(x)
    np.testing.assert_array_equal(np.asarray(scales), expected_scales)
    assert np.asarray(scales)[0, 0] == 0  # an all-zero block gets scale 0
    ours = np.asarray(mxfp4.dequantize(blocks, scales, jnp.float32)).astype(np.float64)
    np.testing.assert_array_equal(ours, expected_values)
    np.testing.assert_array_equal(np.signbit(ours), np.signbit(x))
    with jax.disable_jit():  # op by op gives the same bytes
        eager_blocks, eager_scales = mxfp4.quantize(x)
    np.testing.assert_array_equal(np.asarray(eager_blocks), np.asarray(blocks))
    np.testing.assert_array_equal(np.asarray(eager_scales), np.asarray(scales))


def test_quantize_error_is_at_most_half_the_gap_between_neighbouring_fp4_values():
    x = np.random.default_rng(6).standard_normal((64, 32 * 8)).astype(np.float32)
    blocks, scales = mxfp4.quantize(x)
    q = np.asarray(mxfp4.dequantize(blocks, scales, jnp.float32)).reshape(64, 8, 32)
    step = 2.0 ** (np.asarray(scales, np.float64) - 127)[..., None]  # 2**exp of each block
    y = np.abs(x.astype(np.float64)).reshape(64, 8, 32) / step
    assert y.max() < 8 and y.max(-1).min() >= 4  # the OCP exponent puts each block's amax in [4, 8)
    gap = np.select([y <= 2, y <= 4], [0.5, 1.0], 2.0)  # fp4 spacing: 0.5 up to 2, 1 up to 4, then 2
    saturated = y > 6
    assert np.all(np.abs(np.abs(q) / step - y)[~saturated] <= gap[~saturated] / 2)
    assert np.all(np.abs(q)[saturated] / step[..., 0].repeat(32, -1).reshape(q.shape)[saturated] == 6.0)


def test_ties_round_to_the_even_code_and_magnitudes_above_6_saturate():
    midpoints = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    x = np.array(midpoints + [-m for m in midpoints] + [7.5, -7.9, 6.0, -0.0] + [0.0] * 14, np.float32)
    blocks, scales = mxfp4.quantize(x)
    assert np.asarray(scales).tolist() == [127]  # amax 7.9: floor(log2) = 2, exponent 0
    out = np.asarray(mxfp4.dequantize(blocks, scales, jnp.float32))
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert out[:7].tolist() == expected and out[7:14].tolist() == [-e for e in expected]
    assert out[14:18].tolist() == [6.0, -6.0, 6.0, 0.0] and np.signbit(out[17])
    # The same block scaled by 2**100 or 2**-60 rounds the same way, only its scale moves.
    for k, scale in [(100, 227), (-60, 67)]:
        blocks, scales = mxfp4.quantize(x * np.float32(2.0**k))
        assert np.asarray(scales).tolist() == [scale]
        out_k = np.asarray(mxfp4.dequantize(blocks, scales, jnp.float32)).astype(np.float64)
        np.testing.assert_array_equal(out_k, out.astype(np.float64) * 2.0**k)


def test_quantize_rejects_a_last_dimension_that_is_not_a_multiple_of_32():
    with pytest.raises(AssertionError):
        mxfp4.quantize(np.zeros((2, 48), np.float32))
