"""MXFP4: OCP microscaling FP4 (e2m1) values with one E8M0 scale per block of 32.

A block of 32 values along the last (input) dimension is stored as 16 bytes of 4-bit codes plus
one uint8 scale: value = FP4_VALUES[code] * 2**(scale - SCALE_BIAS). Byte j of a block holds
element 2j in its low nibble and element 2j+1 in its high nibble.

Everything here is integer bit arithmetic on float32 bit patterns, not float multiplies: XLA on
CPU flushes subnormal floats to zero inside compiled kernels, and scales near 0 produce values
down to 2**-128 (subnormal in fp32 and bf16). Working on bits keeps dequantize and quantize exact
for every scale, eagerly, under jax.jit and under jax.disable_jit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_SIZE = 32
BYTES_PER_BLOCK = 16
SCALE_BIAS = 127
FP4_VALUES = np.array(
    [+0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32
)

# float32 bit patterns of the 8 fp4 magnitudes (index = code & 7).
_MAG_BITS = FP4_VALUES[:8].view(np.int32)
# Rounding thresholds between neighbouring magnitudes (midpoints). A value exactly on a midpoint
# goes to the neighbour with an even magnitude code (= even mantissa, round-half-to-even as in
# OCP/IEEE conversion): down at 0.25, 1.25, 2.5, 5 and up at 0.75, 1.75, 3.5.
_THRESHOLD_BITS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32).view(np.int32)
_TIE_GOES_UP = np.array([False, True, False, True, False, True, False])


def unpack_codes(blocks):
    """uint8 [..., G, 16] packed bytes -> uint8 [..., G, 32] fp4 codes (low nibble first)."""
    blocks = jnp.asarray(blocks, jnp.uint8)
    pairs = jnp.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # [..., G, 16, 2]: element 2j, 2j+1
    return pairs.reshape(*blocks.shape[:-1], 2 * blocks.shape[-1])


def pack_codes(codes):
    """uint8 [..., G, 32] fp4 codes -> uint8 [..., G, 16] packed bytes (inverse of unpack_codes)."""
    codes = jnp.asarray(codes, jnp.uint8)
    return (codes[..., 0::2] & 0x0F) | (codes[..., 1::2] << 4)


def _ldexp_bits(bits, scale):
    """float32 bits of float(bits) * 2**(scale - 127), exact, computed on integers.

    `bits` are int32 patterns of non-negative values whose mantissa uses at most its top 3 bits
    (fp4 magnitudes and the rounding thresholds), so shifting into the subnormal range (at most
    3 places: 0.25 at scale 0 is 2**-129) loses nothing. Results past fp32's range become +inf.
    """
    exp = (bits >> 23) + scale - SCALE_BIAS  # biased float32 exponent of the result
    mant = bits & 0x7FFFFF
    normal = (exp << 23) | mant
    subnormal = (mant | 0x800000) >> jnp.clip(1 - exp, 0, 31)  # make the implicit 1 explicit
    out = jnp.where(exp >= 1, normal, subnormal)
    out = jnp.where(exp >= 255, 0x7F800000, out)
    return jnp.where(bits == 0, 0, out)  # zero stays zero whatever the scale


def _magnitude_bits(code):
    """float32 bits of the fp4 magnitude of codes 0..7 (= _MAG_BITS[code]), computed rather than looked up
    so that XLA fuses the whole decode into one loop instead of materialising a gather."""
    exponent, mantissa = code >> 1, code & 1  # e2m1: 2**(e-1) * (1 + m/2), subnormal 0.5 * m at e = 0
    normal = ((exponent + 126) << 23) | (mantissa << 22)
    return jnp.where(exponent > 0, normal, mantissa * (126 << 23))


# jit so that eager calls on whole checkpoint tensors run as one fused kernel instead of
# materialising int32 intermediates several times the size of the packed weights.
@functools.partial(jax.jit, static_argnames="dtype")
def dequantize(blocks, scales, dtype=jnp.bfloat16):
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> `dtype` [..., G*32].

    Exact in bf16 and fp32 (every product has at most 2 significant bits, so the final cast from
    fp32 does not round). Only scales >= 253 with large codes exceed the float range (-> +-inf).
    """
    blocks = jnp.asarray(blocks, jnp.uint8).astype(jnp.int32)
    scales = jnp.asarray(scales, jnp.uint8).astype(jnp.int32)[..., None]

    def decode(codes):
        bits = _ldexp_bits(_magnitude_bits(codes & 7), scales).astype(jnp.uint32)
        bits = bits | ((codes >> 3).astype(jnp.uint32) << 31)  # code bit 3 = sign
        return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)

    # Low nibbles are the even elements, high nibbles the odd ones: decode both, then interleave.
    values = jnp.stack([decode(blocks & 0x0F), decode(blocks >> 4)], axis=-1)  # [..., G, 16, 2]
    return values.reshape(*values.shape[:-3], -1)


@jax.jit
def quantize(x):
    """float [..., N] (N % 32 == 0) -> (blocks uint8 [..., N/32, 16], scales uint8 [..., N/32]).

    OCP rule: shared exponent = floor(log2(amax)) - 2, stored with bias 127 and clamped to 0..254
    (all-zero blocks get scale 0); each element is rounded to the nearest fp4 value, ties to the
    even code, magnitudes above 6 * 2**exp saturate to 6. Signs, including of zero, are kept.
    Non-finite inputs are not supported. Re-quantizing dequantized values is lossless.
    """
    x = jnp.asarray(x).astype(jnp.float32)  # exact for bf16 / fp16 inputs
    assert x.shape[-1] % BLOCK_SIZE == 0, f"last dimension {x.shape[-1]} is not a multiple of 32"
    bits = jax.lax.bitcast_convert_type(x.reshape(*x.shape[:-1], -1, BLOCK_SIZE), jnp.uint32)
    sign = (bits >> 31).astype(jnp.int32)
    # Non-negative floats order like their bit patterns, so integer max/compare are float
    # max/compare without any flushing of subnormals.
    abs_bits = (bits & 0x7FFFFFFF).astype(jnp.int32)
    amax_exp = abs_bits.max(axis=-1) >> 23  # = floor(log2(amax)) + 127; 0 for zero/subnormal amax
    scales = jnp.clip(amax_exp - 2, 0, 254)
    thresholds = _ldexp_bits(jnp.asarray(_THRESHOLD_BITS), scales[..., None])[..., None, :]
    a = abs_bits[..., None]  # [..., G, 32, 1] against thresholds [..., G, 1, 7]
    crossed = (a > thresholds) | ((a == thresholds) & jnp.asarray(_TIE_GOES_UP))
    codes = crossed.sum(axis=-1) | (sign << 3)  # magnitude code 0..7 (saturates at 7 = 6.0)
    return pack_codes(codes.astype(jnp.uint8)), scales.astype(jnp.uint8)


def quantize_experts(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`quantize` of host weights [E, out, in], one expert at a time (bounded temporaries at 120b sizes)."""
    pairs = [jax.device_get(quantize(expert)) for expert in weights]
    return np.stack([blocks for blocks, _ in pairs]), np.stack([scales for _, scales in pairs])


def dequantize_experts(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 host weights [E, out, in] from packed [E, out, G, 16] blocks and [E, out, G] scales."""
    return np.stack([np.asarray(dequantize(b, s, jnp.float32)) for b, s in zip(blocks, scales)])
