// The CPU kernels' arithmetic: MXFP4 decoding, register tiles and the loops over rows and experts, on
// plain pointers. cpu_kernels.cc binds these to XLA's FFI; tests/kernel_harness.cc checks them against
// float64 on every build (the x86-64 variants natively, aarch64 under qemu), with no jax in the way.
//
// MXFP4 layout (see gptoss_jax/mxfp4.py): per output row, K/32 blocks of 16 bytes; byte j holds element
// 2j in its low nibble and 2j+1 in its high nibble; one uint8 scale per block, value = fp4 * 2**(s-127).
// A block's 16 possible values are built with integer arithmetic on float32 bit patterns (exact for
// every scale, subnormals included) and looked up with one permute per 16 elements.
//
// Built by gptoss_jax/backends/cpu/build.py in named variants of one instruction-set level each (never
// -march=native): the intrinsics need AVX-512 F+BW (GPTOSS_AVX512, the avx512 variant) and, for bf16
// products, AVX512-BF16 (the avx512bf16 variant); AVX2 + FMA (GPTOSS_AVX2, the avx2 variant: most
// laptops) and ARM64's NEON (GPTOSS_NEON: Apple silicon, Graviton) have their own paths; other builds
// run the portable loops below (a compiler does not vectorize their float sums: it may not reorder them).

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define GPTOSS_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GPTOSS_AVX2 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define GPTOSS_NEON 1
#endif
// The int16 expert rows (ExpertRowInt16) need AVX2 + FMA: the avx2 build, and the AVX-512 builds too.
#if defined(GPTOSS_AVX2) || (defined(GPTOSS_AVX512) && defined(__AVX2__) && defined(__FMA__))
#define GPTOSS_INT16_ROWS 1
#endif

namespace gptoss_cpu {

// float32 bits of the 8 fp4 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
constexpr int32_t kMagnitudeBits[8] = {0x00000000, 0x3F000000, 0x3F800000, 0x3FC00000,
                                       0x40000000, 0x40400000, 0x40800000, 0x40C00000};

// float32 bits of magnitude * 2**(scale - 127), exact (the same rule as mxfp4._ldexp_bits).
inline int32_t ScaledMagnitude(int32_t bits, int32_t scale) {
  if (bits == 0) return 0;
  int32_t exponent = (bits >> 23) + scale - 127;
  int32_t mantissa = bits & 0x7FFFFF;
  if (exponent >= 255) return 0x7F800000;
  if (exponent >= 1) return (exponent << 23) | mantissa;
  int32_t shift = std::min(1 - exponent, 31);
  return (mantissa | 0x800000) >> shift;
}

// The 16 values of codes 0..15 at one scale, as float32 bits (codes 8..15 are the negatives).
inline void BlockTable(int32_t scale, int32_t table[16]) {
  for (int c = 0; c < 8; ++c) {
    table[c] = ScaledMagnitude(kMagnitudeBits[c], scale);
    table[c + 8] = table[c] | static_cast<int32_t>(0x80000000u);
  }
}

inline float BitsToFloat(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#ifdef GPTOSS_INT16_ROWS
inline float Sum8(__m256 v) {  // the sum of a vector's 8 lanes
  __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}

// 16 bf16 in one vector, as 32-bit lanes: shifting left by 16 gives the even elements as float32,
// masking the top halves the odd ones (half 1). No shuffles: widening instructions all need port 5.
inline __m256 Bf16Half(__m256i v, int half) {
  return _mm256_castsi256_ps(half ? _mm256_and_si256(v, _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u)))
                                  : _mm256_slli_epi32(v, 16));
}
#endif

// BlockTable of every scale, built once: a block's table is then one 64-byte load.
struct AllTables {
  alignas(64) int32_t bits[256][16];
  AllTables() {
    for (int s = 0; s < 256; ++s) BlockTable(s, bits[s]);
  }
};
inline const AllTables& Tables() {
  static const AllTables tables;
  return tables;
}

#ifdef GPTOSS_AVX512
inline __m512 BlockTableVector(const AllTables& tables, uint8_t scale) {
  return _mm512_castsi512_ps(_mm512_load_si512(tables.bits[scale]));
}

// One packed block (16 bytes, one scale) as its 32 values' float32 bits, in element order: lo, hi.
inline void DecodeBlockBits(const AllTables& tables, const uint8_t* bytes16, uint8_t scale, __m512i* lo, __m512i* hi) {
  const __m512i first_half = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second_half = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  __m512i table = _mm512_castps_si512(BlockTableVector(tables, scale));
  __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes16)));
  __m512i low = _mm512_permutexvar_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0x0F)), table);
  __m512i high = _mm512_permutexvar_epi32(_mm512_srli_epi32(bytes, 4), table);
  *lo = _mm512_permutex2var_epi32(low, first_half, high);
  *hi = _mm512_permutex2var_epi32(low, second_half, high);
}
#endif

// Twice each code's fp4 value, a small integer: for 16-entry byte lookups (NEON's tbl, x86's pshufb).
// A value is then this times half its block's scale, 2**(s-128): exact, subnormal scales included (at
// most 4 significant bits times a power of two; -0 becomes +0).
constexpr int8_t kDoubledFp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// Half a block's scale, 2**(s-128): where it sits in the tables (code 1 is 0.5), for a broadcast load.
inline const float* HalfScaleOf(const AllTables& tables, uint8_t scale) {
  return reinterpret_cast<const float*>(&tables.bits[scale][1]);
}
inline float HalfScale(const AllTables& tables, uint8_t scale) { return *HalfScaleOf(tables, scale); }

#ifdef GPTOSS_NEON
// NEON has a 16-entry byte lookup (tbl), not a 32-bit one: codes look up kDoubledFp4, widened to
// float32 and multiplied by HalfScale.

// A block's low nibbles (elements 0, 2, .., 30) and high nibbles (1, 3, .., 31) as doubled values.
inline void BlockNibbles(const uint8_t* bytes16, int8x16_t* low, int8x16_t* high) {
  const int8x16_t table = vld1q_s8(kDoubledFp4);
  const uint8x16_t bytes = vld1q_u8(bytes16);
  *low = vqtbl1q_s8(table, vandq_u8(bytes, vdupq_n_u8(0x0F)));
  *high = vqtbl1q_s8(table, vshrq_n_u8(bytes, 4));
}

// 16 doubled values times half_scale, as 4 vectors of 4 in the same order.
inline void Widen16(int8x16_t doubled, float32x4_t half_scale, float32x4_t v[4]) {
  const int16x8_t lo = vmovl_s8(vget_low_s8(doubled)), hi = vmovl_high_s8(doubled);
  v[0] = vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), half_scale);
  v[1] = vmulq_f32(vcvtq_f32_s32(vmovl_high_s16(lo)), half_scale);
  v[2] = vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), half_scale);
  v[3] = vmulq_f32(vcvtq_f32_s32(vmovl_high_s16(hi)), half_scale);
}
#endif

// Calls f(std::integral_constant<int, count>) for count in 1..8, so loops over rows unroll and the
// accumulators stay in registers.
template <typename F>
void WithCount(int count, F f) {
  switch (count) {
    case 1: return f(std::integral_constant<int, 1>());
    case 2: return f(std::integral_constant<int, 2>());
    case 3: return f(std::integral_constant<int, 3>());
    case 4: return f(std::integral_constant<int, 4>());
    case 5: return f(std::integral_constant<int, 5>());
    case 6: return f(std::integral_constant<int, 6>());
    case 7: return f(std::integral_constant<int, 7>());
    default: return f(std::integral_constant<int, 8>());
  }
}
constexpr int kMaxTokens = 8;

// One output row of an expert for kTokens token rows, each given as even and odd halves (the even
// elements x[2j] and the odd ones x[2j+1]), so low and high nibbles meet their inputs without
// interleaving. Low and high products go to separate accumulators: two independent FMA chains.
template <int kTokens>
void ExpertRow(const uint8_t* blocks, const uint8_t* scales, int64_t groups, const float* const* even,
               const float* const* odd, float* out) {
  const AllTables& tables = Tables();
#ifdef GPTOSS_AVX512
  // Four independent FMA chains a token (low and high nibbles of even and odd blocks): one chain would
  // wait on the FMA latency every block.
  __m512 acc[4][kTokens];
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c)
#pragma GCC unroll 8
    for (int t = 0; t < kTokens; ++t) acc[c][t] = _mm512_setzero_ps();
  const __m512i low_mask = _mm512_set1_epi32(0x0F);
  auto block = [&](int64_t g, int chain) __attribute__((always_inline)) {  // inlined: acc stays in registers
    __m512 table = BlockTableVector(tables, scales[g]);
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + 16 * g)));
    __m512 low = _mm512_permutexvar_ps(_mm512_and_si512(bytes, low_mask), table);
    __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
#pragma GCC unroll 8
    for (int t = 0; t < kTokens; ++t) {
      acc[chain][t] = _mm512_fmadd_ps(low, _mm512_loadu_ps(even[t] + 16 * g), acc[chain][t]);
      acc[chain + 1][t] = _mm512_fmadd_ps(high, _mm512_loadu_ps(odd[t] + 16 * g), acc[chain + 1][t]);
    }
  };
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    block(g, 0);
    block(g + 1, 2);
  }
  if (g < groups) block(g, 0);
  for (int t = 0; t < kTokens; ++t)
    out[t] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0][t], acc[1][t]), _mm512_add_ps(acc[2][t], acc[3][t])));
#elif defined(GPTOSS_AVX2)
  // Eight lanes: a block's 16 bytes are two vectors of 8, each giving 8 low and 8 high nibbles. The
  // table's first 8 entries are the magnitudes (one permute looks them up by a code's low 3 bits); bit 3
  // of a code is the sign. Four FMA chains a token: the two halves' low and high nibbles.
  __m256 acc[4][kTokens];
  for (int c = 0; c < 4; ++c)
    for (int t = 0; t < kTokens; ++t) acc[c][t] = _mm256_setzero_ps();
  const __m256i sign_bit = _mm256_set1_epi32(static_cast<int32_t>(0x80000000u));
  auto value = [&](__m256 magnitudes, __m256i codes, __m256i sign) {
    return _mm256_xor_ps(_mm256_permutevar8x32_ps(magnitudes, codes), _mm256_castsi256_ps(_mm256_and_si256(sign, sign_bit)));
  };
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 magnitudes = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(tables.bits[scales[g]])));
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + 16 * g));
    for (int half = 0; half < 2; ++half) {
      const __m256i b = _mm256_cvtepu8_epi32(half ? _mm_srli_si128(bytes, 8) : bytes);
      // low nibble: bits 0-2 index, bit 3 -> bit 31; high nibble: bits 4-6 index, bit 7 -> bit 31.
      const __m256 low = value(magnitudes, b, _mm256_slli_epi32(b, 28));
      const __m256 high = value(magnitudes, _mm256_srli_epi32(b, 4), _mm256_slli_epi32(b, 24));
      for (int t = 0; t < kTokens; ++t) {
        acc[2 * half][t] = _mm256_fmadd_ps(low, _mm256_loadu_ps(even[t] + 16 * g + 8 * half), acc[2 * half][t]);
        acc[2 * half + 1][t] = _mm256_fmadd_ps(high, _mm256_loadu_ps(odd[t] + 16 * g + 8 * half), acc[2 * half + 1][t]);
      }
    }
  }
  for (int t = 0; t < kTokens; ++t)
    out[t] = Sum8(_mm256_add_ps(_mm256_add_ps(acc[0][t], acc[1][t]), _mm256_add_ps(acc[2][t], acc[3][t])));
#elif defined(GPTOSS_NEON)
  // Four lanes: a block's 16 low nibbles meet 16 even inputs, its 16 high nibbles 16 odd ones; two FMA
  // chains a token (even, odd), so 8 tokens keep 16 of the 32 vector registers.
  float32x4_t acc[2][kTokens];
  for (int c = 0; c < 2; ++c)
    for (int t = 0; t < kTokens; ++t) acc[c][t] = vdupq_n_f32(0.0f);
  for (int64_t g = 0; g < groups; ++g) {
    int8x16_t low, high;
    BlockNibbles(blocks + 16 * g, &low, &high);
    const float32x4_t half_scale = vdupq_n_f32(HalfScale(tables, scales[g]));
    float32x4_t lv[4], hv[4];
    Widen16(low, half_scale, lv);
    Widen16(high, half_scale, hv);
    for (int t = 0; t < kTokens; ++t)
      for (int q = 0; q < 4; ++q) {
        acc[0][t] = vfmaq_f32(acc[0][t], lv[q], vld1q_f32(even[t] + 16 * g + 4 * q));
        acc[1][t] = vfmaq_f32(acc[1][t], hv[q], vld1q_f32(odd[t] + 16 * g + 4 * q));
      }
  }
  for (int t = 0; t < kTokens; ++t) out[t] = vaddvq_f32(vaddq_f32(acc[0][t], acc[1][t]));
#else
  float acc[kTokens] = {0};
  for (int64_t g = 0; g < groups; ++g) {
    const int32_t* table = tables.bits[scales[g]];
    for (int j = 0; j < 16; ++j) {
      uint8_t byte = blocks[16 * g + j];
      float low = BitsToFloat(table[byte & 0x0F]), high = BitsToFloat(table[byte >> 4]);
      for (int t = 0; t < kTokens; ++t) acc[t] += low * even[t][16 * g + j] + high * odd[t][16 * g + j];
    }
  }
  for (int t = 0; t < kTokens; ++t) out[t] = acc[t];
#endif
}

#ifdef GPTOSS_INT16_ROWS
// ExpertRow for bf16 token rows on x86 with AVX2. Decoding blocks to float32 (or to bf16 pairs for
// AVX512-BF16's vdpbf16ps) is bound by permutes that all run on one port. Instead the rows are
// quantized once a call to int16 with a float32 scale per block of 32 (each input within its block's
// max|x| / 65534, far below bf16's own 2**-9) and the weights stay small integers: a pair of blocks is
// one 32-byte load (lane 0 block g, lane 1 block g+1, so nothing crosses lanes), pshufb looks each
// nibble up as twice its fp4 value in int8 (kDoubledFp4), and the low-nibble bytes read as int16 lanes
// hold two values each: shifting left by 8 keeps the even byte's, masking with 0xFF00 the odd byte's,
// both times 256, exact.
// vpmaddwd multiplies them by the rows laid out to match (QuantizeRowsInt16); one float FMA a pair
// applies both scales. ~7 uops a block shared by the tokens, ~6 a token: 3x fewer than decoding to
// float32 at one token, and fewer at eight too. AVX-512 builds run this 256-bit form as well (a 512-bit
// one, two pairs a load, is not written yet).
constexpr int kPairInt16 = 64;  // a token's int16 values per pair of blocks (a pair's scales: 8 floats)

inline int64_t Int16Pairs(int64_t groups) { return (groups + 1) / 2; }

// The int16 weight lanes of one pair of blocks (bytes: lane 0 block g, lane 1 block g+1), times 256: w[0]
// holds elements 4m of each block (m = 0..7), w[1] 4m + 2, w[2] 4m + 1, w[3] 4m + 3.
inline void PairInt16(__m256i bytes, __m256i w[4]) {
  const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kDoubledFp4)));
  const __m256i nibble = _mm256_set1_epi8(0x0F), odd_byte = _mm256_set1_epi16(static_cast<int16_t>(0xFF00));
  const __m256i low = _mm256_shuffle_epi8(table, _mm256_and_si256(bytes, nibble));                          // elements 2j
  const __m256i high = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble));  // 2j + 1
  w[0] = _mm256_slli_epi16(low, 8);
  w[1] = _mm256_and_si256(low, odd_byte);
  w[2] = _mm256_slli_epi16(high, 8);
  w[3] = _mm256_and_si256(high, odd_byte);
}

template <int kTokens>
void ExpertRowInt16(const uint8_t* blocks, const uint8_t* scales, int64_t groups, const int16_t* const* q,
                    const float* const* q_scale, float* out) {
  const AllTables& tables = Tables();
  // One accumulator a token, whatever the run's length: a token's sum is then the same alone or beside
  // others (batches decode as their rows would alone). Two chains for one token measured no faster.
  __m256 acc[kTokens];
  for (int t = 0; t < kTokens; ++t) acc[t] = _mm256_setzero_ps();
  auto pair = [&](int64_t p, __m256i bytes) {
    const int64_t g = 2 * p, second = std::min(g + 1, groups - 1);  // a lone last block: its lane 1 is zero
    __m256i w[4];
    PairInt16(bytes, w);
    const __m256 w_scale = _mm256_blend_ps(_mm256_broadcast_ss(HalfScaleOf(tables, scales[g])),
                                           _mm256_broadcast_ss(HalfScaleOf(tables, scales[second])),
                                           0xF0);  // each block's HalfScale: kDoubledFp4 doubles
#pragma GCC unroll 8
    for (int t = 0; t < kTokens; ++t) {
      const __m256i* x = reinterpret_cast<const __m256i*>(q[t] + kPairInt16 * p);
      const __m256i sums = _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(w[0], _mm256_loadu_si256(x)), _mm256_madd_epi16(w[1], _mm256_loadu_si256(x + 1))),
                                            _mm256_add_epi32(_mm256_madd_epi16(w[2], _mm256_loadu_si256(x + 2)), _mm256_madd_epi16(w[3], _mm256_loadu_si256(x + 3))));
      const __m256 scale = _mm256_mul_ps(w_scale, _mm256_loadu_ps(q_scale[t] + 8 * p));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[t]);
    }
  };
  auto load_pair = [&](int64_t p) {
    // Software prefetch ~1 KB ahead: measured 2x faster at one token than the hardware's alone here.
    _mm_prefetch(reinterpret_cast<const char*>(blocks + 32 * p + 1024), _MM_HINT_T0);
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blocks + 32 * p));
  };
  int64_t p = 0;
  for (; p < groups / 2; ++p) pair(p, load_pair(p));
  if (groups % 2) pair(p, _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + 32 * p))));
  for (int t = 0; t < kTokens; ++t) out[t] = Sum8(acc[t]) * (1.0f / 256);  // the weights' factor of 256
}

// bf16 rows [rows, width] -> int16 q, Int16Pairs(width / 32) * kPairInt16 values a row, and scales, 8
// floats a pair of blocks (each block's scale 4 times), x ~= q * scale. Within a pair, element j of block
// 2p + lane goes where PairInt16 puts its weight: vector (0, 2, 1, 3)[j % 4], lane, position j / 4. A
// missing second block of a pair is zeros.
inline void QuantizeRowsInt16(const uint16_t* x, int64_t rows, int64_t width, int16_t* q, float* q_scale) {
  static constexpr int kVector[4] = {0, 2, 1, 3};
  const int64_t groups = width / 32, pairs = Int16Pairs(groups);
  std::fill(q, q + rows * pairs * kPairInt16, 0);
  std::fill(q_scale, q_scale + rows * pairs * 8, 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const uint16_t* block = x + r * width + 32 * g;
      float values[32], largest = 0.0f;
      for (int j = 0; j < 32; ++j) {
        values[j] = BitsToFloat(static_cast<int32_t>(block[j]) << 16);
        largest = std::max(largest, std::fabs(values[j]));
      }
      const float inverse = largest > 0.0f ? 32767.0f / largest : 0.0f;
      const int64_t pair = r * pairs + g / 2, lane = g % 2;
      for (int j = 0; j < 32; ++j)
        q[pair * kPairInt16 + 16 * kVector[j % 4] + 8 * lane + j / 4] = static_cast<int16_t>(std::lrint(values[j] * inverse));
      for (int i = 0; i < 4; ++i) q_scale[pair * 8 + 4 * lane + i] = largest / 32767.0f;
    }
}
#endif

// x [T, K] (float32, or bf16 bits when x_bf16) against each row's k chosen experts of one layer's packed
// weights [E, N, K/32, 16] -> out [T, k, N]; experts [T, k], entries outside [0, E) give zeros.
// parallel(n, grain, body) runs body(begin, end) over parts of [0, n) (a thread pool, or a plain call).
template <typename Parallel>
void ExpertMatvec(const void* x_data, bool x_bf16, int64_t rows, int64_t width, const int32_t* experts, int64_t k,
                  const uint8_t* blocks_data, const uint8_t* scales_data, int64_t num_experts, int64_t n_out,
                  float* result, const Parallel& parallel) {
  const int64_t groups = width / 32, half = width / 2;
#ifdef GPTOSS_INT16_ROWS
  // bf16 rows go to ExpertRowInt16, quantized once here. Measured in a C++ loop over 4 of 20b's mlp1
  // experts chosen from 32, 2 threads: against decoding to float32 on AVX2, 1.15x faster at one token and
  // 1.5x at 16; against vdpbf16ps on bf16 pairs (AVX512-BF16, which decoding bounds too), 1.6x at one
  // token, 1.9x at 16, 1.1x at 64.
  const bool bf16_rows = x_bf16;
  const int64_t pairs = Int16Pairs(groups);
  std::vector<int16_t> q(x_bf16 ? rows * pairs * kPairInt16 : 0);
  std::vector<float> q_scale(x_bf16 ? rows * pairs * 8 : 0);
  if (x_bf16) QuantizeRowsInt16(static_cast<const uint16_t*>(x_data), rows, width, q.data(), q_scale.data());
#else
  const bool bf16_rows = false;  // ExpertRow takes them widened to float32
#endif

  // Float32 rows as even and odd halves (see ExpertRow).
  std::vector<float> split(bf16_rows ? 0 : rows * width);
  for (int64_t t = 0; !bf16_rows && t < rows; ++t) {
    for (int64_t j = 0; j < half; ++j)
      for (int64_t odd = 0; odd < 2; ++odd) {
        const int64_t i = t * width + 2 * j + odd;
        split[t * width + odd * half + j] =
            x_bf16 ? BitsToFloat(static_cast<int32_t>(static_cast<const uint16_t*>(x_data)[i]) << 16)
                   : static_cast<const float*>(x_data)[i];
      }
  }
  // The (token, slot) pairs of each expert, in runs of at most kMaxTokens.
  std::vector<std::vector<int64_t>> pairs_of(num_experts);
  for (int64_t p = 0; p < rows * k; ++p) {
    int32_t e = experts[p];
    if (e >= 0 && e < num_experts) pairs_of[e].push_back(p);
  }
  struct Run { int64_t expert; int64_t first; int count; };
  std::vector<Run> runs;
  for (int64_t e = 0; e < num_experts; ++e)
    for (size_t i = 0; i < pairs_of[e].size(); i += kMaxTokens)
      runs.push_back({e, static_cast<int64_t>(i), static_cast<int>(std::min<size_t>(kMaxTokens, pairs_of[e].size() - i))});
  std::fill(result, result + rows * k * n_out, 0.0f);  // pairs naming no expert here stay zero

  // Work item = (run, output row); split across threads in contiguous ranges.
  const int64_t items = static_cast<int64_t>(runs.size()) * n_out;
  parallel(items, 256, [&](int64_t begin, int64_t end) {
    const float* even[kMaxTokens];
    const float* odd[kMaxTokens];
    [[maybe_unused]] const int16_t* q_rows[kMaxTokens];
    [[maybe_unused]] const float* q_scales[kMaxTokens];
    float values[kMaxTokens];
    for (int64_t item = begin; item < end; ++item) {
      const Run& run = runs[item / n_out];
      const int64_t n = item % n_out;
      for (int i = 0; i < run.count; ++i) {
        int64_t token = pairs_of[run.expert][run.first + i] / k;
        even[i] = split.data() + token * width;
        odd[i] = even[i] + half;
#ifdef GPTOSS_INT16_ROWS
        q_rows[i] = q.data() + token * pairs * kPairInt16;
        q_scales[i] = q_scale.data() + token * pairs * 8;
#endif
      }
      const int64_t row = run.expert * n_out + n;
      const uint8_t* row_blocks = blocks_data + row * groups * 16;
      const uint8_t* row_scales = scales_data + row * groups;
      WithCount(run.count, [&](auto tokens) {
#ifdef GPTOSS_INT16_ROWS
        if (bf16_rows) return ExpertRowInt16<tokens()>(row_blocks, row_scales, groups, q_rows, q_scales, values);
#endif
        ExpertRow<tokens()>(row_blocks, row_scales, groups, even, odd, values);
      });
      for (int i = 0; i < run.count; ++i) result[pairs_of[run.expert][run.first + i] * n_out + n] = values[i];
    }
  });
}

// Decodes blocks [begin, end) of packed rows (16 bytes and one scale each) into out, 32 values a
// block, as float32 bits (kBf16: their top halves, which is exact: fp4 values times a power of two have
// at most 2 significant bits, and even the smallest, 2**-128, sits in the top half).
template <bool kBf16>
void DecodeBlocks(const uint8_t* b, const uint8_t* s, int64_t begin, int64_t end, void* out) {
  uint16_t* out16 = static_cast<uint16_t*>(out);
  int32_t* out32 = static_cast<int32_t*>(out);
  const AllTables& tables = Tables();
#ifdef GPTOSS_AVX512
  for (int64_t g = begin; g < end; ++g) {
    __m512i v0, v1;
    DecodeBlockBits(tables, b + 16 * g, s[g], &v0, &v1);
    if constexpr (kBf16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out16 + 32 * g), _mm512_cvtepi32_epi16(_mm512_srli_epi32(v0, 16)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out16 + 32 * g + 16), _mm512_cvtepi32_epi16(_mm512_srli_epi32(v1, 16)));
    } else {
      _mm512_storeu_si512(out32 + 32 * g, v0);
      _mm512_storeu_si512(out32 + 32 * g + 16, v1);
    }
  }
#else
  for (int64_t g = begin; g < end; ++g) {
    const int32_t* table = tables.bits[s[g]];
    for (int j = 0; j < 32; ++j) {
      uint8_t byte = b[16 * g + j / 2];
      int32_t bits = table[j % 2 ? byte >> 4 : byte & 0x0F];
      if constexpr (kBf16) out16[32 * g + j] = static_cast<uint16_t>(static_cast<uint32_t>(bits) >> 16);
      else out32[32 * g + j] = bits;
    }
  }
#endif
}

// sums[i][r] = sum_j x[r, j] * w[i, j] for kRows bf16 rows x (row stride `width`) and kW bf16 rows w
// (row stride `w_stride`), float32 accumulation. Several weight rows at a time share the loads of x.
template <int kRows, int kW>
void Bf16Rows(const uint16_t* x, const uint16_t* w, int64_t width, int64_t w_stride, float (*sums)[8]) {
  int64_t j = 0;
  for (int i = 0; i < kW; ++i)
    for (int r = 0; r < kRows; ++r) sums[i][r] = 0.0f;
#if defined(GPTOSS_AVX512) && defined(__AVX512BF16__)
  __m512 acc[kW][kRows];
  for (int i = 0; i < kW; ++i)
    for (int r = 0; r < kRows; ++r) acc[i][r] = _mm512_setzero_ps();
  for (; j + 32 <= width; j += 32) {
    __m512bh wv[kW];
    for (int i = 0; i < kW; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(w + i * w_stride + j + 1024), _MM_HINT_T0);  // as the AVX2 path
      wv[i] = (__m512bh)_mm512_loadu_si512(w + i * w_stride + j);
    }
    for (int r = 0; r < kRows; ++r) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * width + j);
      for (int i = 0; i < kW; ++i) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, wv[i]);
    }
  }
  for (int i = 0; i < kW; ++i)
    for (int r = 0; r < kRows; ++r) sums[i][r] = _mm512_reduce_add_ps(acc[i][r]);
#elif defined(GPTOSS_AVX512)
  auto widen = [](const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  };
  __m512 acc[kW][kRows];
  for (int i = 0; i < kW; ++i)
    for (int r = 0; r < kRows; ++r) acc[i][r] = _mm512_setzero_ps();
  for (; j + 16 <= width; j += 16) {
    __m512 wv[kW];
    for (int i = 0; i < kW; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(w + i * w_stride + j + 1024), _MM_HINT_T0);
      wv[i] = widen(w + i * w_stride + j);
    }
    for (int r = 0; r < kRows; ++r) {
      __m512 xv = widen(x + r * width + j);
      for (int i = 0; i < kW; ++i) acc[i][r] = _mm512_fmadd_ps(xv, wv[i], acc[i][r]);
    }
  }
  for (int i = 0; i < kW; ++i)
    for (int r = 0; r < kRows; ++r) sums[i][r] = _mm512_reduce_add_ps(acc[i][r]);
#elif defined(GPTOSS_AVX2)
  // 16 bf16 a load, widened by Bf16Half. One accumulator a (weight, row), even products then odd ones:
  // the order Bf16Tile sums in, so a row's products are the same alone or in a batch.
  __m256 acc[kW][kRows];
  for (int i = 0; i < kW; ++i)
    for (int r = 0; r < kRows; ++r) acc[i][r] = _mm256_setzero_ps();
  for (; j + 16 <= width; j += 16) {
    __m256i wv[kW];
    for (int i = 0; i < kW; ++i) {
      // Software prefetch 2 KB ahead in each weight row: the hardware's alone left ~15% of the
      // bandwidth unused here (one row: 53 -> 46 ms for 20b's unembedding on 2 cores, a stream 45 ms).
      _mm_prefetch(reinterpret_cast<const char*>(w + i * w_stride + j + 1024), _MM_HINT_T0);
      wv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * w_stride + j));
    }
    for (int r = 0; r < kRows; ++r) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * width + j));
      const __m256 xe = Bf16Half(xv, 0), xo = Bf16Half(xv, 1);
      for (int i = 0; i < kW; ++i) {
        acc[i][r] = _mm256_fmadd_ps(xe, Bf16Half(wv[i], 0), acc[i][r]);
        acc[i][r] = _mm256_fmadd_ps(xo, Bf16Half(wv[i], 1), acc[i][r]);
      }
    }
  }
  for (int i = 0; i < kW; ++i)
    for (int r = 0; r < kRows; ++r) sums[i][r] = Sum8(acc[i][r]);
#elif defined(GPTOSS_NEON)
  auto widen = [](const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); };  // 4 bf16
  float32x4_t acc[kW][kRows];
  for (int i = 0; i < kW; ++i)
    for (int r = 0; r < kRows; ++r) acc[i][r] = vdupq_n_f32(0.0f);
  for (; j + 4 <= width; j += 4) {
    float32x4_t wv[kW];
    for (int i = 0; i < kW; ++i) wv[i] = widen(w + i * w_stride + j);
    for (int r = 0; r < kRows; ++r) {
      const float32x4_t xv = widen(x + r * width + j);
      for (int i = 0; i < kW; ++i) acc[i][r] = vfmaq_f32(acc[i][r], xv, wv[i]);
    }
  }
  for (int i = 0; i < kW; ++i)
    for (int r = 0; r < kRows; ++r) sums[i][r] = vaddvq_f32(acc[i][r]);
#endif
  for (; j < width; ++j)
    for (int i = 0; i < kW; ++i) {
      float wv = BitsToFloat(static_cast<int32_t>(w[i * w_stride + j]) << 16);
      for (int r = 0; r < kRows; ++r) sums[i][r] += BitsToFloat(static_cast<int32_t>(x[r * width + j]) << 16) * wv;
    }
}

#ifdef GPTOSS_AVX2
// Two or more bf16 rows on AVX2 are compute-bound. A tile of kW weight rows x kRows rows widens each
// weight vector once (Bf16Half) and keeps it in a register for all the rows, and each row's vector once
// for all the weights; the sums run in Bf16Rows's order, so a row's products are the same alone or in
// a batch. 3 x 3 tiles: 3 x 4 spills with GCC, and 4 x 4 (Bf16Rows's) widens each weight vector once a
// row (20b's unembedding at 16 rows on 2 cores: 165-172 ms against 190).
template <int kRows, int kW>
void Bf16Tile(const uint16_t* x, const uint16_t* w, int64_t width, float (*sums)[8]) {
  __m256 acc[kW][kRows];
  for (int i = 0; i < kW; ++i)
    for (int r = 0; r < kRows; ++r) acc[i][r] = _mm256_setzero_ps();
  auto widen = [](const uint16_t* p, int half) {  // half 0: the even elements of 16, 1: the odd ones
    return Bf16Half(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), half);
  };
  int64_t j = 0;
  for (; j + 16 <= width; j += 16) {
    // The next tile's weight rows (Bf16Matvec's next n), fetched while this one computes from cache:
    // 188 -> 165 ms for 20b's unembedding at 16 rows on 2 cores here.
    for (int i = 0; i < kW; ++i) _mm_prefetch(reinterpret_cast<const char*>(w + (kW + i) * width + j), _MM_HINT_T0);
    for (int half = 0; half < 2; ++half) {
      __m256 wv[kW];
      for (int i = 0; i < kW; ++i) wv[i] = widen(w + i * width + j, half);
      for (int r = 0; r < kRows; ++r) {
        __m256 xv = widen(x + r * width + j, half);
        asm("" : "+x"(xv));  // widened once for kW products (GCC would otherwise redo it for each)
        for (int i = 0; i < kW; ++i) acc[i][r] = _mm256_fmadd_ps(xv, wv[i], acc[i][r]);
      }
    }
  }
  for (int i = 0; i < kW; ++i)
    for (int r = 0; r < kRows; ++r) {
      sums[i][r] = Sum8(acc[i][r]);
      for (int64_t t = j; t < width; ++t)
        sums[i][r] += BitsToFloat(static_cast<int32_t>(x[r * width + t]) << 16) * BitsToFloat(static_cast<int32_t>(w[i * width + t]) << 16);
    }
}
#endif

// out[r, n] = sum_k x[r, k] * w[n, k] for x [R, K] and w [N, K], bf16 inputs, float32 accumulation.
template <typename Parallel>
void Bf16Matvec(const uint16_t* xs, int64_t rows, int64_t width, const uint16_t* ws, int64_t n_out, float* result,
                const Parallel& parallel) {
#ifdef GPTOSS_AVX2
  const bool tiles = rows > 1;  // Bf16Tile for several rows, Bf16Rows (4 weight rows) for one
#else
  const bool tiles = false;
#endif
  const int tile = tiles ? 3 : 4;
  parallel(n_out, 64, [&](int64_t begin, int64_t end) {
    float sums[4][8];
    // The tile of weight rows first + i * spacing, i < weights, against every row.
    auto weight_tile = [&](int64_t first, int weights, int64_t spacing) {
      for (int64_t r0 = 0; r0 < rows; r0 += tile) {
        const int count = static_cast<int>(std::min<int64_t>(tile, rows - r0));
        WithCount(count, [&](auto kRows) {
          WithCount(weights, [&](auto kW) {
            if constexpr (kRows() <= 4 && kW() <= 4) {
#ifdef GPTOSS_AVX2
              if constexpr (kRows() <= 3 && kW() <= 3)
                if (tiles) return Bf16Tile<kRows(), kW()>(xs + r0 * width, ws + first * width, width, sums);
#endif
              Bf16Rows<kRows(), kW()>(xs + r0 * width, ws + first * width, width, spacing * width, sums);
            }
          });
        });
        for (int i = 0; i < weights; ++i)
          for (int r = 0; r < count; ++r) result[(r0 + r) * n_out + first + i * spacing] = sums[i][r];
      }
    };
    // Bf16Rows is bound by reading the weights, so its tile takes one row from each of `tile` far-apart
    // stretches of [begin, end), each read in order: several hardware prefetch streams a thread instead
    // of one (20b's unembedding at one row, 2 threads: 47 -> 38 ms; a streaming read there 24.6 GB/s with
    // one stream a thread, 29.7 with four). Bf16Tile is bound by its FMAs and prefetches the next adjacent
    // rows itself. A row's sums do not depend on which rows share its tile.
    const int64_t stretch = tiles ? 0 : (end - begin) / tile;
    for (int64_t i = 0; i < stretch; ++i) weight_tile(begin + i, tile, stretch);
    for (int64_t n = begin + tile * stretch; n < end; n += tile)
      weight_tile(n, static_cast<int>(std::min<int64_t>(tile, end - n)), 1);
  });
}

// Grouped matmul of rows sorted by expert against their experts' MXFP4 weights w_e [N, K]:
//   forward:    out[p, n] = sum_k x[p, k] * w_e[n, k]   (x [P, K], out [P, N])
//   transposed: out[p, k] = sum_n x[p, n] * w_e[n, k]   (x [P, N], out [P, K]; the input gradient)
// Expert e owns the next sizes[e] rows; rows past them get zeros. A work item decodes a panel of one
// expert's weights for kPanel output columns into a bf16 buffer that stays in cache, and applies it to
// every row of that expert: no padding, and each weight is decoded once a call.
constexpr int kPanel = 64;

#if defined(GPTOSS_AVX512) && defined(__AVX512BF16__)
// Panels are stored pair-major: panel[j][c] is the 32-bit pair (w[c, 2j], w[c, 2j+1]) of output column
// c as two bf16 (for the transposed product, (w[2j, c], w[2j+1, c])), so one 64-byte load holds one pair
// of 16 columns, and vdpbf16ps multiplies it by a broadcast pair of x: the usual GEMM register tile, no
// horizontal sums.

// Two float32-bit vectors as bf16 pairs: lane i = (bf16 of first[i]) | (bf16 of second[i]) << 16.
inline __m512i PairBf16(__m512i first, __m512i second) {
  return _mm512_ternarylogic_epi32(_mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u)), second,
                                   _mm512_srli_epi32(first, 16), 0xEA);  // (a & b) | c
}

// rows[r] holds 16 pairs (lane j: pair j) of column r; stores pair j of the 16 columns at to + j * kPanel
// (a 16 x 16 transpose of 32-bit lanes in three rounds of shuffles).
inline void StorePairsOf16Rows(__m512i rows[16], uint32_t* to) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)
    for (int j = 0; j < 2; ++j) {
      rows[i + j] = _mm512_unpacklo_epi64(t[i + j], t[i + 2 + j]);
      rows[i + 2 + j] = _mm512_unpackhi_epi64(t[i + j], t[i + 2 + j]);
    }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(rows[i + j], rows[i + 4 + j], 0x88);
      t[i + 4 + j] = _mm512_shuffle_i32x4(rows[i + j], rows[i + 4 + j], 0xDD);
    }
  // After the three rounds vector q holds pair kPairOf[q].
  static const int kPairOf[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
  for (int j = 0; j < 8; ++j) {
    _mm512_store_si512(to + kPairOf[j] * kPanel, _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88));
    _mm512_store_si512(to + kPairOf[j + 8] * kPanel, _mm512_shuffle_i32x4(t[j], t[j + 8], 0xDD));
  }
}

// Forward panel: output columns are weight rows n0.. (columns of them real, the rest zero); pairs run
// along k. Each weight row's block holds 16 pairs of one column: 16 rows are transposed 16 x 16.
inline void DecodeRowsPanel(const uint8_t* b, const uint8_t* s, int64_t groups, int64_t columns, uint32_t* panel) {
  const AllTables& tables = Tables();
  const __m512i low_mask = _mm512_set1_epi32(0x0F);
  for (int64_t c0 = 0; c0 < kPanel; c0 += 16) {
    for (int64_t g = 0; g < groups; ++g) {
      __m512i rows[16];
      for (int r = 0; r < 16; ++r) {
        const int64_t block = (c0 + r) * groups + g;
        if (c0 + r >= columns) {
          rows[r] = _mm512_setzero_si512();
          continue;
        }
        __m512i table = _mm512_castps_si512(BlockTableVector(tables, s[block]));
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 * block)));
        __m512i low = _mm512_permutexvar_epi32(_mm512_and_si512(bytes, low_mask), table);  // elements 2j
        __m512i high = _mm512_permutexvar_epi32(_mm512_srli_epi32(bytes, 4), table);      // elements 2j+1
        rows[r] = PairBf16(low, high);  // lane j: the pair (2j, 2j+1) of this row's block
      }
      StorePairsOf16Rows(rows, panel + 16 * g * kPanel + c0);
    }
  }
}

// Transposed panel: output columns are k = 32 * g0 ... (two blocks of every weight row); pairs run
// along n, so two weight rows' decoded blocks interleave lane by lane (no transpose).
inline void DecodeColumnsPanel(const uint8_t* b, const uint8_t* s, int64_t groups, int64_t g0, int64_t n_out, uint32_t* panel) {
  const AllTables& tables = Tables();
  const int64_t blocks_here = std::min<int64_t>(2, groups - g0);
  for (int64_t j = 0; j < n_out / 2; ++j) {
    uint32_t* to = panel + j * kPanel;
    for (int64_t q = 0; q < 2; ++q) {
      if (q >= blocks_here) {
        _mm512_store_si512(to + 32 * q, _mm512_setzero_si512());
        _mm512_store_si512(to + 32 * q + 16, _mm512_setzero_si512());
        continue;
      }
      __m512i lo0, hi0, lo1, hi1;
      const int64_t first = 2 * j * groups + g0 + q, second = first + groups;
      DecodeBlockBits(tables, b + 16 * first, s[first], &lo0, &hi0);
      DecodeBlockBits(tables, b + 16 * second, s[second], &lo1, &hi1);
      _mm512_store_si512(to + 32 * q, PairBf16(lo0, lo1));
      _mm512_store_si512(to + 32 * q + 16, PairBf16(hi0, hi1));
    }
  }
}

// kRows rows of x (row stride x_stride bf16) against pairs [first_pair, end_pair) of the panel, added to
// out (or written, for the first slice); columns past `columns` are not stored.
template <int kRows>
void PanelTile(const uint16_t* x, int64_t x_stride, const uint32_t* panel, int64_t first_pair, int64_t end_pair,
               float* out, int64_t out_stride, int64_t columns) {
  __mmask16 masks[4];  // masked, not branched: the accumulators stay in registers
  for (int c = 0; c < 4; ++c) masks[c] = static_cast<__mmask16>((1u << std::clamp<int64_t>(columns - 16 * c, 0, 16)) - 1);
  __m512 acc[kRows][4];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c)
      acc[r][c] = first_pair == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(masks[c], out + r * out_stride + 16 * c);
  for (int64_t j = first_pair; j < end_pair; ++j) {
    const uint32_t* p = panel + j * kPanel;
    __m512bh w0 = (__m512bh)_mm512_load_si512(p), w1 = (__m512bh)_mm512_load_si512(p + 16);
    __m512bh w2 = (__m512bh)_mm512_load_si512(p + 32), w3 = (__m512bh)_mm512_load_si512(p + 48);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * x_stride + 2 * j, 4);
      __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, w3);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) _mm512_mask_storeu_ps(out + r * out_stride + 16 * c, masks[c], acc[r][c]);
}
constexpr int kTileRows = 6;     // 6 rows x 64 columns: 24 accumulators
constexpr int kSlicePairs = 128;  // 32 KiB of panel: stays in L1 while every row passes it

// out[r, c] = sum_k x[r, k] * w[c, k] for `rows` rows of x (row stride width, even) and a packed panel.
inline void ApplyPanel(const uint16_t* x, int64_t rows, int64_t width, const uint32_t* panel, float* out, int64_t out_stride,
                int64_t columns) {
  for (int64_t first_pair = 0; first_pair < width / 2; first_pair += kSlicePairs) {
    const int64_t end_pair = std::min<int64_t>(width / 2, first_pair + kSlicePairs);
    for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
      const int count = static_cast<int>(std::min<int64_t>(kTileRows, rows - r0));
      WithCount(count, [&](auto kRows) {
        if constexpr (kRows() <= kTileRows)
          PanelTile<kRows()>(x + r0 * width, width, panel, first_pair, end_pair, out + r0 * out_stride, out_stride, columns);
      });
    }
  }
}

#endif

// Without bf16 products (AVX2 + FMA, AVX-512 without BF16, NEON): float32 panels and FMA register tiles.
// x is widened to float32 once a call; a panel holds decoded weights in natural order, panel[j][c] for
// the j-th summed index and output column c (16 columns forward, 32 transposed: one block's width), so
// a tile broadcasts one x value and multiplies whole panel rows (no horizontal sums).
constexpr int kForwardColumns = 16, kTransposedColumns = 32;

#if !(defined(GPTOSS_AVX512) && defined(__AVX512BF16__)) && defined(__AVX2__) && defined(__FMA__)
#define GPTOSS_FLOAT_PANELS 1

// One block's 32 values in element order, as 4 vectors of 8 (the hub packs codes 2j, 2j+1 in byte j).
inline void DecodeBlock32(const AllTables& tables, const uint8_t* bytes16, uint8_t scale, __m256 v[4]) {
  const __m256 magnitudes = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(tables.bits[scale])));
  const __m256i sign_bit = _mm256_set1_epi32(static_cast<int32_t>(0x80000000u));
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes16));
  for (int half = 0; half < 2; ++half) {  // bytes 0-7 hold elements 0-15, bytes 8-15 elements 16-31
    const __m256i b = _mm256_cvtepu8_epi32(half ? _mm_srli_si128(bytes, 8) : bytes);
    const __m256 low = _mm256_xor_ps(_mm256_permutevar8x32_ps(magnitudes, b),
                                     _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(b, 28), sign_bit)));
    const __m256 high = _mm256_xor_ps(_mm256_permutevar8x32_ps(magnitudes, _mm256_srli_epi32(b, 4)),
                                      _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(b, 24), sign_bit)));
    // low = elements 0,2,..,14 of the half, high = 1,3,..,15: interleave, then put the 128-bit lanes in order.
    const __m256 a = _mm256_unpacklo_ps(low, high), c = _mm256_unpackhi_ps(low, high);
    v[2 * half] = _mm256_permute2f128_ps(a, c, 0x20);
    v[2 * half + 1] = _mm256_permute2f128_ps(a, c, 0x31);
  }
}

// The 8 x 8 transpose of rows r[0..7].
inline void Transpose8x8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Forward panel: columns are weight rows (columns of them real, the rest zero), rows of the panel run
// along k. Blocks of 8 weight rows are decoded and transposed 8 x 8.
inline void DecodeRowsPanelF32(const uint8_t* b, const uint8_t* s, int64_t groups, int64_t columns, float* panel) {
  const AllTables& tables = Tables();
  for (int64_t c0 = 0; c0 < kForwardColumns; c0 += 8) {
    for (int64_t g = 0; g < groups; ++g) {
      __m256 decoded[8][4];
      for (int r = 0; r < 8; ++r) {
        const int64_t block = (c0 + r) * groups + g;
        if (c0 + r < columns) DecodeBlock32(tables, b + 16 * block, s[block], decoded[r]);
        else for (int q = 0; q < 4; ++q) decoded[r][q] = _mm256_setzero_ps();
      }
      for (int q = 0; q < 4; ++q) {
        __m256 rows[8];
        for (int r = 0; r < 8; ++r) rows[r] = decoded[r][q];
        Transpose8x8(rows);
        for (int i = 0; i < 8; ++i) _mm256_store_ps(panel + (32 * g + 8 * q + i) * kForwardColumns + c0, rows[i]);
      }
    }
  }
}

// Transposed panel: columns are k = 32 * g0 .. + 32 (one block of every weight row), rows run along n.
inline void DecodeColumnsPanelF32(const uint8_t* b, const uint8_t* s, int64_t groups, int64_t g0, int64_t n_out, float* panel) {
  const AllTables& tables = Tables();
  for (int64_t n = 0; n < n_out; ++n) {
    __m256 v[4];
    DecodeBlock32(tables, b + 16 * (n * groups + g0), s[n * groups + g0], v);
    for (int q = 0; q < 4; ++q) _mm256_store_ps(panel + n * kTransposedColumns + 8 * q, v[q]);
  }
}

// kRows rows of x (float32, row stride x_stride) against panel rows [first, end), kVecs vectors of 8
// columns wide; added to out (or written, for the first slice); columns past `columns` are not stored.
template <int kRows, int kVecs>
void PanelTileF32(const float* x, int64_t x_stride, const float* panel, int64_t first, int64_t end, float* out,
                  int64_t out_stride, int64_t columns) {
  __m256i masks[kVecs];  // masked, not branched: the accumulators stay in registers
  for (int v = 0; v < kVecs; ++v)
    masks[v] = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(columns - 8 * v)),
                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  // Unrolled by pragma: GCC otherwise keeps the accumulators on the stack, stored and reloaded every j
  // (a 6 x 16 tile: 43 -> 104 GFLOP/s on one Zen 4 core, whose 8-wide FMA peak is 116).
  __m256 acc[kRows][kVecs];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v)
      acc[r][v] = first == 0 ? _mm256_setzero_ps() : _mm256_maskload_ps(out + r * out_stride + 8 * v, masks[v]);
  for (int64_t j = first; j < end; ++j) {
    const float* p = panel + j * 8 * kVecs;
    __m256 w[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) w[v] = _mm256_load_ps(p + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * x_stride + j);
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm256_fmadd_ps(a, w[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) _mm256_maskstore_ps(out + r * out_stride + 8 * v, masks[v], acc[r][v]);
}

#elif defined(GPTOSS_NEON)
#define GPTOSS_FLOAT_PANELS 1

// One block's 32 values in element order, as 8 vectors of 4.
inline void DecodeBlock32(const AllTables& tables, const uint8_t* bytes16, uint8_t scale, float32x4_t v[8]) {
  int8x16_t low, high;
  BlockNibbles(bytes16, &low, &high);
  const float32x4_t half_scale = vdupq_n_f32(HalfScale(tables, scale));
  Widen16(vzip1q_s8(low, high), half_scale, v);      // elements 0-15
  Widen16(vzip2q_s8(low, high), half_scale, v + 4);  // elements 16-31
}

// Forward panel: column c is weight row c (columns of them real, the rest zero), written down the
// column a block at a time (the panel is reused by every row of the expert, so the scattered stores
// cost little).
inline void DecodeRowsPanelF32(const uint8_t* b, const uint8_t* s, int64_t groups, int64_t columns, float* panel) {
  const AllTables& tables = Tables();
  alignas(16) float values[32];
  for (int64_t c = 0; c < kForwardColumns; ++c)
    for (int64_t g = 0; g < groups; ++g) {
      if (c < columns) {
        float32x4_t v[8];
        DecodeBlock32(tables, b + 16 * (c * groups + g), s[c * groups + g], v);
        for (int q = 0; q < 8; ++q) vst1q_f32(values + 4 * q, v[q]);
      } else {
        std::fill(values, values + 32, 0.0f);
      }
      for (int i = 0; i < 32; ++i) panel[(32 * g + i) * kForwardColumns + c] = values[i];
    }
}

// Transposed panel: columns are k = 32 * g0 .. + 32 (one block of every weight row), rows run along n.
inline void DecodeColumnsPanelF32(const uint8_t* b, const uint8_t* s, int64_t groups, int64_t g0, int64_t n_out,
                                  float* panel) {
  const AllTables& tables = Tables();
  for (int64_t n = 0; n < n_out; ++n) {
    float32x4_t v[8];
    DecodeBlock32(tables, b + 16 * (n * groups + g0), s[n * groups + g0], v);
    for (int q = 0; q < 8; ++q) vst1q_f32(panel + n * kTransposedColumns + 4 * q, v[q]);
  }
}

// As the AVX2 tile: kRows rows of x against panel rows [first, end), 8 * kVecs columns (2 * kVecs vectors
// of 4); a tile with fewer than all its columns real goes through a full-width copy of its outputs.
template <int kRows, int kVecs>
void PanelTileF32(const float* x, int64_t x_stride, const float* panel, int64_t first, int64_t end, float* out,
                  int64_t out_stride, int64_t columns) {
  constexpr int kQuads = 2 * kVecs, kWidth = 8 * kVecs;
  const bool whole = columns >= kWidth;
  alignas(16) float edge[kRows][kWidth];
  float32x4_t acc[kRows][kQuads];
  for (int r = 0; r < kRows; ++r) {
    const float* from = out + r * out_stride;
    if (!whole) {
      std::fill(edge[r], edge[r] + kWidth, 0.0f);
      if (first != 0) std::copy(from, from + columns, edge[r]);
      from = edge[r];
    }
    for (int q = 0; q < kQuads; ++q) acc[r][q] = first == 0 ? vdupq_n_f32(0.0f) : vld1q_f32(from + 4 * q);
  }
  for (int64_t j = first; j < end; ++j) {
    const float* p = panel + j * kWidth;
    float32x4_t w[kQuads];
    for (int q = 0; q < kQuads; ++q) w[q] = vld1q_f32(p + 4 * q);
    for (int r = 0; r < kRows; ++r) {
      const float32x4_t a = vdupq_n_f32(x[r * x_stride + j]);
      for (int q = 0; q < kQuads; ++q) acc[r][q] = vfmaq_f32(acc[r][q], a, w[q]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    float* to = whole ? out + r * out_stride : edge[r];
    for (int q = 0; q < kQuads; ++q) vst1q_f32(to + 4 * q, acc[r][q]);
    if (!whole) std::copy(edge[r], edge[r] + columns, out + r * out_stride);
  }
}
#endif

#ifdef GPTOSS_FLOAT_PANELS
// out[r, c] = sum_j x[r, j] * panel[j, c] for `rows` rows of x (row stride width), in slices of panel
// rows that stay in L1 while every row passes them. Tiles: 6 rows x 16 columns or 2 rows x 32 (AVX2:
// 12 and 8 accumulators of its 16 vector registers; NEON: 24 and 16 of its 32).
template <int kVecs>
void ApplyPanelF32(const float* x, int64_t rows, int64_t width, const float* panel, float* out, int64_t out_stride,
                   int64_t columns) {
  constexpr int kTile = kVecs == 2 ? 6 : 2;
  constexpr int64_t kSlice = 512 / kVecs;  // 16 KiB of panel
  for (int64_t first = 0; first < width; first += kSlice) {
    const int64_t end = std::min<int64_t>(width, first + kSlice);
    for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
      const int count = static_cast<int>(std::min<int64_t>(kTile, rows - r0));
      WithCount(count, [&](auto kRows) {
        if constexpr (kRows() <= kTile)
          PanelTileF32<kRows(), kVecs>(x + r0 * width, width, panel, first, end, out + r0 * out_stride, out_stride, columns);
      });
    }
  }
}
#endif

// Grouped matmul over rows sorted by expert (see above) against one layer's packed weights [E, N, G, 16]:
// x [P, width] bf16 (width = K forward, N transposed), sizes [E] rows per expert in order -> out [P, columns].
template <typename Parallel>
void GroupedMatmul(const uint16_t* xs, int64_t rows, const int32_t* sizes, const uint8_t* blocks_data,
                   const uint8_t* scales_data, int64_t num_experts, int64_t n_out, int64_t groups, bool transpose,
                   float* result, const Parallel& parallel) {
  const int64_t k_in = groups * 32, width = transpose ? n_out : k_in, columns_total = transpose ? k_in : n_out;
#ifdef GPTOSS_FLOAT_PANELS
  const int64_t panel_columns = transpose ? kTransposedColumns : kForwardColumns;
#else
  const int64_t panel_columns = kPanel;
#endif
  struct Item { int64_t expert, first_row, row_count, first_column; };
  std::vector<Item> items;
  int64_t start = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t count = std::clamp<int64_t>(sizes[e], 0, rows - start);
    for (int64_t c = 0; count > 0 && c < columns_total; c += panel_columns) items.push_back({e, start, count, c});
    start += count;
  }
  std::fill(result + start * columns_total, result + rows * columns_total, 0.0f);
#ifdef GPTOSS_FLOAT_PANELS
  // x widened to float32 once (bf16 is float32's top half), not once for every panel that reads it.
  std::vector<float> x32(start * width);
  parallel(start, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * width; i < end * width; ++i) x32[i] = BitsToFloat(static_cast<int32_t>(xs[i]) << 16);
  });
#endif

  parallel(static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
#if defined(GPTOSS_AVX512) && defined(__AVX512BF16__)
    struct alignas(64) Line { uint32_t v[16]; };
    std::vector<Line> storage(width / 2 * kPanel / 16);
    uint32_t* panel = storage.front().v;
    for (int64_t i = begin; i < end; ++i) {
      const Item& item = items[i];
      const int64_t columns = std::min<int64_t>(kPanel, columns_total - item.first_column);
      const int64_t expert_block = item.expert * n_out * groups;
      if (transpose)
        DecodeColumnsPanel(blocks_data + 16 * expert_block, scales_data + expert_block, groups, item.first_column / 32,
                           n_out, panel);
      else
        DecodeRowsPanel(blocks_data + 16 * (expert_block + item.first_column * groups),
                        scales_data + expert_block + item.first_column * groups, groups, columns, panel);
      ApplyPanel(xs + item.first_row * width, item.row_count, width, panel,
                 result + item.first_row * columns_total + item.first_column, columns_total, columns);
    }
#elif defined(GPTOSS_FLOAT_PANELS)
    struct alignas(32) Line { float v[8]; };
    std::vector<Line> storage(width * panel_columns / 8);
    float* panel = storage.front().v;
    for (int64_t i = begin; i < end; ++i) {
      const Item& item = items[i];
      const int64_t columns = std::min<int64_t>(panel_columns, columns_total - item.first_column);
      const int64_t expert_block = item.expert * n_out * groups;
      const float* x_rows = x32.data() + item.first_row * width;
      float* to = result + item.first_row * columns_total + item.first_column;
      if (transpose) {
        DecodeColumnsPanelF32(blocks_data + 16 * expert_block, scales_data + expert_block, groups, item.first_column / 32,
                              n_out, panel);
        ApplyPanelF32<4>(x_rows, item.row_count, width, panel, to, columns_total, columns);
      } else {
        DecodeRowsPanelF32(blocks_data + 16 * (expert_block + item.first_column * groups),
                           scales_data + expert_block + item.first_column * groups, groups, columns, panel);
        ApplyPanelF32<2>(x_rows, item.row_count, width, panel, to, columns_total, columns);
      }
    }
#else
    // Portable: decode the expert's whole weight matrix as float32 and multiply row by row.
    std::vector<float> w;
    int64_t decoded = -1;
    for (int64_t i = begin; i < end; ++i) {
      const Item& item = items[i];
      if (item.expert != decoded) {
        w.resize(n_out * k_in);
        const int64_t expert_block = item.expert * n_out * groups;
        DecodeBlocks<false>(blocks_data + 16 * expert_block, scales_data + expert_block, 0, n_out * groups, w.data());
        decoded = item.expert;
      }
      const int64_t columns = std::min<int64_t>(kPanel, columns_total - item.first_column);
      for (int64_t r = 0; r < item.row_count; ++r) {
        const uint16_t* xr = xs + (item.first_row + r) * width;
        float* to = result + (item.first_row + r) * columns_total + item.first_column;
        for (int64_t c = 0; c < columns; ++c) {
          const int64_t column = item.first_column + c;
          float sum = 0.0f;
          for (int64_t j = 0; j < width; ++j) {
            const float weight = transpose ? w[j * k_in + column] : w[column * k_in + j];
            sum += BitsToFloat(static_cast<int32_t>(xr[j]) << 16) * weight;
          }
          to[c] = sum;
        }
      }
    }
#endif
  });
}

// Whether bf16 rows reach the expert matvec quantized to int16 (ExpertRowInt16): within max|x| / 65534 of
// each block's largest input, not exact.
#ifdef GPTOSS_INT16_ROWS
constexpr bool kInt16Rows = true;
#else
constexpr bool kInt16Rows = false;
#endif

// The paths this build compiled (the kernel harness and `python -m gptoss_jax.backends.cpu` print it).
#if defined(GPTOSS_AVX512) && defined(__AVX512BF16__)
constexpr char kPaths[] = "avx512 int16-rows bf16-products bf16-panels";
#elif defined(GPTOSS_AVX512)
constexpr char kPaths[] = "avx512 int16-rows float-panels";
#elif defined(GPTOSS_AVX2)
constexpr char kPaths[] = "avx2 int16-rows float-panels";
#elif defined(GPTOSS_NEON)
constexpr char kPaths[] = "neon float-panels";
#else
constexpr char kPaths[] = "portable";
#endif

// ---- Decode attention over the KV cache, read and written in place in its stack ----------------------
//
// XLA's CPU backend slices a layer's bf16 cache out of the stack, converts it, transposes it for its
// dots and writes it back, every layer and step: at 4096 cached tokens that was 40 of a 67 ms step of
// a 4-layer model, growing with the context. These loops touch one slot a row to write and read the
// layer's keys and values once.

inline float Bf16ToFloat(uint16_t bits) { return BitsToFloat(static_cast<int32_t>(bits) << 16); }

// float32 -> bf16 bits, rounding to nearest even (as XLA's convert).
inline uint16_t FloatToBf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

struct DecodeShape {
  int64_t batch, slots, kv_heads, group, head_dim;
};

// Row b's new token (keys, values [B, kv_heads * head_dim] bf16, position [B]) into slot position % slots
// of one layer's cache (keys, values [B, slots, kv_heads * head_dim], positions [B, slots]); a position
// of -1 (a padding row) writes nothing.
inline void WriteCacheSlots(const DecodeShape& shape, const uint16_t* new_keys, const uint16_t* new_values,
                            const int32_t* new_positions, uint16_t* keys, uint16_t* values, int32_t* positions) {
  const int64_t features = shape.kv_heads * shape.head_dim;
  for (int64_t b = 0; b < shape.batch; ++b) {
    const int32_t position = new_positions[b];
    if (position < 0) continue;
    const int64_t slot = b * shape.slots + position % shape.slots;
    std::memcpy(keys + slot * features, new_keys + b * features, features * 2);
    std::memcpy(values + slot * features, new_values + b * features, features * 2);
    positions[slot] = position;
  }
}

// Fetches [from, from + bytes) towards the cache ahead of its use (a no-op where the compiler has no hint).
inline void Prefetch(const void* from, int64_t bytes) {
  for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(static_cast<const char*>(from) + at);
}

// Softmax attention with sinks of one query per row (q [B, kv_heads, group, head_dim], bf16 bits) to one
// layer's cache -> out float32 [B, kv_heads, group, head_dim]. A slot is seen when its position is >= 0,
// <= the row's query position and, with window > 0, less than `window` before it. As the model's XLA
// path: scores in float32 times `scale`; the sink joins the max and the normaliser; weights are rounded
// to bf16 for the product with the values, the normaliser sums them unrounded.
//
// A work item is one row's kv head and up to 8 of its query heads (all of gpt-oss's), in three passes
// over the seen slots: scores, weights, values. Eight lanes run across the heads (scores, weights) or 8 of
// a head's dimensions (values), in GCC's portable vectors (AVX2 registers, two NEON ones), so a slot's key
// and value are widened once for all the heads and every sum stays in a register. Fewer heads leave lanes
// at zero. 20b's shapes at 4096 slots, one row, in a C++ loop here: one thread, warm cache, 5.0 -> 3.9 ms a
// layer against a dot product a head and slot with the values' sums in memory; 2 threads, cold cache,
// 5.3-8.3 -> 3.1-3.6 ms with the prefetches below alone, 2.4-3.3 with these loops too.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors passed without AVX (baseline): all inlined here
#endif
typedef float Lanes8 __attribute__((vector_size(32)));
typedef uint16_t Bf16x8 __attribute__((vector_size(16)));
typedef uint32_t Bits8 __attribute__((vector_size(32)));

inline Lanes8 WidenBf16x8(const uint16_t* from) {
  Bf16x8 bf16;
  std::memcpy(&bf16, from, sizeof bf16);
  const Bits8 bits = __builtin_convertvector(bf16, Bits8) << 16;
  Lanes8 lanes;
  std::memcpy(&lanes, &bits, sizeof lanes);
  return lanes;
}

// n bf16 -> float32, 8 at a time where they go.
inline void WidenBf16(const uint16_t* from, int64_t n, float* to) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const Lanes8 lanes = WidenBf16x8(from + i);
    std::memcpy(to + i, &lanes, sizeof lanes);
  }
  for (; i < n; ++i) to[i] = Bf16ToFloat(from[i]);
}

// Each lane rounded to bf16 (to nearest, ties to even) and back, as FloatToBf16; NaN stays NaN.
inline Lanes8 RoundToBf16(Lanes8 x) {
  Bits8 bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  Lanes8 rounded;
  std::memcpy(&rounded, &bits, sizeof rounded);
  return x == x ? rounded : x;
}

constexpr int kAttendSlots = 8;  // slots a step of the scores' loop: independent sums in flight

struct AttendScratch {
  std::vector<int64_t> seen;
  std::vector<Lanes8> query, scores, weights, values;
  std::vector<float> keys;
};

// Attention of `heads` (<= 8) query heads q [heads, dim] sharing one kv head: keys and values point at
// that head in slot 0 of the row, positions at the row's; sinks [heads]; out [heads, dim].
inline void AttendHeads(const DecodeShape& shape, int64_t heads, const uint16_t* q, const uint16_t* keys,
                        const uint16_t* values, const int32_t* positions, int64_t at, const float* sinks,
                        int64_t window, float scale, float* out, AttendScratch& scratch) {
  const int64_t slots = shape.slots, dim = shape.head_dim, features = shape.kv_heads * dim;
  // A head's key is head_dim values of each slot's kv_heads * head_dim: a stride the hardware does not
  // prefetch across pages, and the cache is cold after a step's weights streamed through it: prefetched
  // 32 slots ahead (16 and 64 measured no better).
  constexpr int64_t kAhead = 32;
  std::vector<int64_t>& seen = scratch.seen;
  seen.clear();
  for (int64_t s = 0; s < slots; ++s) {
    if (s + kAhead < slots) Prefetch(keys + (s + kAhead) * features, dim * 2);
    const int64_t p = positions[s];
    if (p < 0 || p > at || (window > 0 && at - p >= window)) continue;
    seen.push_back(s);
  }
  const int64_t count = static_cast<int64_t>(seen.size());
  // The query transposed: lane h of query[d] is head h's dimension d.
  scratch.query.assign(dim, Lanes8{});
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t d = 0; d < dim; ++d) scratch.query[d][h] = Bf16ToFloat(q[h * dim + d]);
  const Lanes8* query = scratch.query.data();

  // Scores, kAttendSlots slots at a time (their keys widened first), each a sum over the dimensions in order.
  scratch.keys.resize(kAttendSlots * dim + 8);
  scratch.scores.resize(count);
  float* key = scratch.keys.data();
  Lanes8* scores = scratch.scores.data();
  Lanes8 top{}, sink{};
  for (int64_t h = 0; h < heads; ++h) top[h] = sink[h] = sinks[h];
  for (int64_t i0 = 0; i0 < count; i0 += kAttendSlots) {
    const int64_t block = std::min<int64_t>(kAttendSlots, count - i0);
    for (int64_t j = 0; j < kAttendSlots; ++j) {
      if (j < block) WidenBf16(keys + seen[i0 + j] * features, dim, key + j * dim);
      else std::fill(key + j * dim, key + (j + 1) * dim, 0.0f);
    }
    Lanes8 sums[kAttendSlots] = {};
    for (int64_t d = 0; d < dim; ++d)
      for (int j = 0; j < kAttendSlots; ++j) sums[j] += query[d] * key[j * dim + d];
    for (int64_t j = 0; j < block; ++j) {
      scores[i0 + j] = sums[j] * scale;
      for (int h = 0; h < 8; ++h) top[h] = std::max(top[h], scores[i0 + j][h]);
    }
  }

  // Weights: exp(score - top), rounded to bf16 for the values' product; the normaliser sums them unrounded.
  scratch.weights.resize(count);
  Lanes8* weights = scratch.weights.data();
  Lanes8 total;
  for (int h = 0; h < 8; ++h) total[h] = std::exp(sink[h] - top[h]);
  for (int64_t i = 0; i < count; ++i) {
    Lanes8 weight;
    for (int h = 0; h < 8; ++h) weight[h] = std::exp(scores[i][h] - top[h]);
    total += weight;
    weights[i] = RoundToBf16(weight);
  }

  // Values, widened once into 8-dimension columns (value[c][i]: dimensions 8c..8c+7 of seen slot i), then
  // a column at a time for all the heads, each a sum over the seen slots in order.
  const int64_t columns = (dim + 7) / 8;
  scratch.values.resize(columns * count);
  Lanes8* value = scratch.values.data();
  float* row = key;  // the keys' scratch, done with: kAttendSlots * dim + 8 >= 8 * columns floats
  std::fill(row + dim, row + 8 * columns, 0.0f);  // a last partial column's padding (WidenBf16 stops at dim)
  for (int64_t i = 0; i < count; ++i) {
    if (i + kAhead < count) Prefetch(values + seen[i + kAhead] * features, dim * 2);
    WidenBf16(values + seen[i] * features, dim, row);
    for (int64_t c = 0; c < columns; ++c) std::memcpy(&value[c * count + i], row + 8 * c, sizeof(Lanes8));
  }
  for (int64_t c = 0; c < columns; ++c) {
    Lanes8 sums[8] = {};
    for (int64_t i = 0; i < count; ++i)
      for (int h = 0; h < 8; ++h) sums[h] += value[c * count + i] * weights[i][h];
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t l = 0; l < std::min<int64_t>(8, dim - 8 * c); ++l) out[h * dim + 8 * c + l] = sums[h][l] / total[h];
  }
}

template <typename Parallel>
void DecodeAttention(const DecodeShape& shape, const uint16_t* q, const uint16_t* keys, const uint16_t* values,
                     const int32_t* positions, const int32_t* query_positions, const float* sinks, int64_t window,
                     float scale, float* out, const Parallel& parallel) {
  const int64_t slots = shape.slots, group = shape.group, dim = shape.head_dim;
  const int64_t features = shape.kv_heads * dim;
  parallel(shape.batch * shape.kv_heads, 1, [&](int64_t begin, int64_t end) {
    AttendScratch scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / shape.kv_heads, n = item % shape.kv_heads;
      for (int64_t h0 = 0; h0 < group; h0 += 8)  // more than 8 heads a kv head: rescans the slots for each 8
        AttendHeads(shape, std::min<int64_t>(8, group - h0), q + (item * group + h0) * dim,
                    keys + b * slots * features + n * dim, values + b * slots * features + n * dim,
                    positions + b * slots, query_positions[b], sinks + n * group + h0, window, scale,
                    out + (item * group + h0) * dim, scratch);
    }
  });
}


// ---- Products with a weight in blocks of 16 output rows (the unembedding on AVX2 and AVX512-BF16) -----
//
// w [N/16, K, 16]: each block of 16 output rows holds its K columns one after another, 16 values each
// (gptoss_jax.backends.cpu.blocks.to_blocks). out[r, 16b + j] = sum_k x[r, k] * w[b, k, j]: one load
// brings a k's 16 weights, widened once for every row, which are broadcast a value at a time (an outer
// product in registers). No sums across lanes, and each (row, output)'s sum runs over k in order on its
// own, so a row's result is the same alone or in a batch. Against the dot-product tiles of Bf16Matvec on
// [N, K] (the widening shift there shares the FMA ports; here the unpacks do not), 20b's unembedding at
// 16 rows on the Xeon's 2 cores forced to AVX2: 164 -> 145 ms in jax (a C++ loop: 186-214 -> 139-143).
constexpr int kBlockOut = 16;
typedef uint16_t Bf16x16 __attribute__((vector_size(32)));

// One k's 16 bf16 weights -> float32: `low` holds outputs 0-3 and 8-11, `high` 4-7 and 12-15, the order
// AVX2's in-lane unpacks give (StoreBlockSums puts them back).
inline void WidenBlockColumn(const uint16_t* from, Lanes8* low, Lanes8* high) {
  Bf16x16 v;
  std::memcpy(&v, from, sizeof v);
  const Bf16x16 zero = {};
  const Bf16x16 l = __builtin_shufflevector(zero, v, 0, 16, 1, 17, 2, 18, 3, 19, 8, 24, 9, 25, 10, 26, 11, 27);
  const Bf16x16 h = __builtin_shufflevector(zero, v, 4, 20, 5, 21, 6, 22, 7, 23, 12, 28, 13, 29, 14, 30, 15, 31);
  std::memcpy(low, &l, sizeof l);
  std::memcpy(high, &h, sizeof h);
}

// a * b + c, fused where the CPU has the instruction (the build is ISO C++: no contraction by itself).
inline Lanes8 MulAdd(Lanes8 a, Lanes8 b, Lanes8 c) {
#if defined(__FMA__) && (defined(GPTOSS_AVX2) || defined(GPTOSS_AVX512))
  return _mm256_fmadd_ps(a, b, c);
#elif defined(GPTOSS_NEON)
  float32x4_t lanes[3][2];
  std::memcpy(lanes[0], &a, 32);
  std::memcpy(lanes[1], &b, 32);
  std::memcpy(lanes[2], &c, 32);
  const float32x4_t sums[2] = {vfmaq_f32(lanes[2][0], lanes[0][0], lanes[1][0]),
                               vfmaq_f32(lanes[2][1], lanes[0][1], lanes[1][1])};
  Lanes8 out;
  std::memcpy(&out, sums, 32);
  return out;
#else
  return a * b + c;
#endif
}

inline void StoreBlockSums(Lanes8 low, Lanes8 high, float* out) {
  std::memcpy(out, &low[0], 16);
  std::memcpy(out + 4, &high[0], 16);
  std::memcpy(out + 8, &low[4], 16);
  std::memcpy(out + 12, &high[4], 16);
}

// One k of BlockTile: the k's weights of kBlocks blocks widened, times each row's x[r, k]. Always inlined:
// GCC otherwise keeps the sums in memory, stored back every k (16 rows, C++ loop: 166 -> 143 ms).
template <int kRows, int kBlocks>
__attribute__((always_inline)) inline void BlockStep(const float* xk, const uint16_t* w, int64_t block_elements,
                                                     Lanes8 (&acc)[kRows][2 * kBlocks]) {
  Lanes8 low[kBlocks], high[kBlocks];
#pragma GCC unroll 4
  for (int i = 0; i < kBlocks; ++i) WidenBlockColumn(w + i * block_elements, &low[i], &high[i]);
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    const Lanes8 xv = {xk[r], xk[r], xk[r], xk[r], xk[r], xk[r], xk[r], xk[r]};
#pragma GCC unroll 4
    for (int i = 0; i < kBlocks; ++i) {
      acc[r][2 * i] = MulAdd(xv, low[i], acc[r][2 * i]);
      acc[r][2 * i + 1] = MulAdd(xv, high[i], acc[r][2 * i + 1]);
    }
  }
}

// kRows rows (xt: x transposed, [K][x_stride] float32) against kBlocks adjacent blocks for k in [k0, k1),
// adding to sums[r][2 * i] (low) and [2 * i + 1] (high) of block i. The weights at `prefetch` (and the
// same offset in the next blocks) are fetched towards the cache as the loop goes, a line per two k's
// (locality 3: the next k's of these blocks; 2: the next chunk, into L2).
template <int kRows, int kBlocks, int kLocality>
void BlockTile(const float* xt, int64_t x_stride, const uint16_t* w, int64_t width, int64_t k0, int64_t k1,
               Lanes8 (*sums)[2 * kBlocks], const char* prefetch) {
  const int64_t block_elements = width * kBlockOut;
  Lanes8 acc[kRows][2 * kBlocks];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < 2 * kBlocks; ++i) acc[r][i] = sums[r][i];
  int64_t k = k0;
  for (; k + 2 <= k1; k += 2) {
    if (prefetch != nullptr)
      for (int i = 0; i < kBlocks; ++i) __builtin_prefetch(prefetch + i * block_elements * 2 + (k - k0) * 32, 0, kLocality);
    BlockStep<kRows, kBlocks>(xt + k * x_stride, w + k * kBlockOut, block_elements, acc);
    BlockStep<kRows, kBlocks>(xt + (k + 1) * x_stride, w + (k + 1) * kBlockOut, block_elements, acc);
  }
  if (k < k1) BlockStep<kRows, kBlocks>(xt + k * x_stride, w + k * kBlockOut, block_elements, acc);
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
    for (int i = 0; i < 2 * kBlocks; ++i) sums[r][i] = acc[r][i];
}

// The few-row pass of the block kernels: f(b, kRows, kCount) for blocks [begin, end) in groups of 4 / rows
// side by side (rows <= 4; the last group may be shorter), kRows and kCount as integral constants.
template <typename F>
void ForBlockGroups(int64_t rows, int64_t begin, int64_t end, F f) {
  WithCount(static_cast<int>(rows), [&](auto kRows) {
    if constexpr (kRows() <= 4) {
      constexpr int kBlocks = 4 / kRows();
      for (int64_t b = begin; b < end; b += kBlocks) {
        if (b + kBlocks <= end) f(b, kRows, std::integral_constant<int, kBlocks>());
        else WithCount(static_cast<int>(end - b), [&](auto kCount) {
          if constexpr (kCount() < kBlocks) f(b, kRows, kCount);
        });
      }
    }
  });
}

#if defined(GPTOSS_AVX512) && defined(__AVX512BF16__)
// AVX512-BF16: vdpbf16ps takes (k, k+1) pairs, so two k's 16 weights are interleaved in a register
// (one vpermw) into one vector of 16 outputs' pairs, multiplied by each row's broadcast pair of x. kRows
// rows (xp: x's pairs transposed, [K/2][x_stride] bf16 pairs) against kBlocks adjacent blocks for pairs
// [p0, p1), added to sums[r][i]; `prefetch` as BlockTile's. A row's sums run over k in order whatever the
// tile, so a row gives the same alone or in a batch.
template <int kRows, int kBlocks, int kLocality>
void BlockTileBf16(const uint32_t* xp, int64_t x_stride, const uint16_t* w, int64_t width, int64_t p0, int64_t p1,
                   __m512 (*sums)[kBlocks], const char* prefetch) {
  const int64_t block_elements = width * kBlockOut;
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  __m512 acc[kRows][kBlocks];
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int i = 0; i < kBlocks; ++i) acc[r][i] = sums[r][i];
  for (int64_t p = p0; p < p1; ++p) {
    __m512bh pairs[kBlocks];
#pragma GCC unroll 4
    for (int i = 0; i < kBlocks; ++i) {
      if (prefetch != nullptr) __builtin_prefetch(prefetch + i * block_elements * 2 + (p - p0) * 64, 0, kLocality);
      const __m512i both = _mm512_loadu_si512(w + i * block_elements + 2 * p * kBlockOut);  // k = 2p, then 2p + 1
      pairs[i] = (__m512bh)_mm512_permutexvar_epi16(interleave, both);
    }
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(xp[p * x_stride + r]));
#pragma GCC unroll 4
      for (int i = 0; i < kBlocks; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], xv, pairs[i]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int i = 0; i < kBlocks; ++i) sums[r][i] = acc[r][i];
}

// Bf16MatvecBlocks with vdpbf16ps (even K: gpt-oss's widths): up to 4 rows, 4 / rows blocks side by side
// in one pass (the read's memory streams); more, a block in chunks of k that stay in L1 and tiles of up
// to 8 rows, their sums parked between chunks. 20b's unembedding in jax on a 2-core Zen 4 (medians of 7):
// one row 42 ms where the row-major matvec (Bf16Rows' vdpbf16ps) took 51, 16 rows 50 ms against 76 (XLA's
// dot: 105).
template <typename Parallel>
void Bf16MatvecBlocksBf16(const uint16_t* xs, int64_t rows, int64_t width, const uint16_t* ws, int64_t blocks,
                          float* out, const Parallel& parallel) {
  const int64_t n_out = blocks * kBlockOut, pairs = width / 2, block_elements = width * kBlockOut;
  std::vector<uint32_t> xp(pairs * rows);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t p = 0; p < pairs; ++p) xp[p * rows + r] = xs[r * width + 2 * p] | static_cast<uint32_t>(xs[r * width + 2 * p + 1]) << 16;
  constexpr int64_t kChunk = 256;  // pairs: 16 KB of a block
  parallel(blocks, 16, [&](int64_t begin, int64_t end) {
    if (rows <= 4) {
      ForBlockGroups(rows, begin, end, [&](int64_t b, auto kRows, auto kCount) {
        const uint16_t* w = ws + b * block_elements;
        __m512 sums[kRows()][kCount()];
        for (int r = 0; r < kRows(); ++r)
          for (int i = 0; i < kCount(); ++i) sums[r][i] = _mm512_setzero_ps();
        BlockTileBf16<kRows(), kCount(), 3>(xp.data(), rows, w, width, 0, pairs, sums, reinterpret_cast<const char*>(w) + 1024);
        for (int r = 0; r < kRows(); ++r)
          for (int i = 0; i < kCount(); ++i) _mm512_storeu_ps(out + r * n_out + (b + i) * kBlockOut, sums[r][i]);
      });
      return;
    }
    struct alignas(64) Parked { __m512 v; };  // a vector of __m512 itself drops its alignment attribute
    std::vector<Parked> parked(rows);
    for (int64_t b = begin; b < end; ++b) {
      const uint16_t* w = ws + b * block_elements;
      std::fill(parked.begin(), parked.end(), Parked{_mm512_setzero_ps()});
      for (int64_t p0 = 0; p0 < pairs; p0 += kChunk) {
        const int64_t p1 = std::min(pairs, p0 + kChunk);
        const uint16_t* next = p1 < pairs ? w + 2 * p1 * kBlockOut : (b + 1 < end ? w + block_elements : nullptr);
        for (int64_t r0 = 0; r0 < rows; r0 += 8) {
          WithCount(static_cast<int>(std::min<int64_t>(8, rows - r0)), [&](auto kRows) {
            if constexpr (kRows() <= 8)
              BlockTileBf16<kRows(), 1, 2>(xp.data() + r0, rows, w, width, p0, p1,
                                           reinterpret_cast<__m512(*)[1]>(parked.data() + r0),
                                           r0 == 0 ? reinterpret_cast<const char*>(next) : nullptr);
          });
        }
      }
      for (int64_t r = 0; r < rows; ++r) _mm512_storeu_ps(out + r * n_out + b * kBlockOut, parked[r].v);
    }
  });
}
#endif

// out [R, N] float32 = x [R, K] (bf16) against w in blocks [N/16, K, 16] (bf16).
template <typename Parallel>
void Bf16MatvecBlocks(const uint16_t* xs, int64_t rows, int64_t width, const uint16_t* ws, int64_t blocks, float* out,
                      const Parallel& parallel) {
#if defined(GPTOSS_AVX512) && defined(__AVX512BF16__)
  if (width % 2 == 0) return Bf16MatvecBlocksBf16(xs, rows, width, ws, blocks, out, parallel);
#endif
  const int64_t n_out = blocks * kBlockOut;
  std::vector<float> xt(width * rows);  // x transposed: a k's values for every row side by side
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < width; ++k) xt[k * rows + r] = Bf16ToFloat(xs[r * width + k]);
  const int64_t block_elements = width * kBlockOut;
  // Up to 4 rows: one pass over a block's weights, 4 / rows blocks side by side so that 8 sums are in flight
  // (an FMA's latency). More rows: a block is taken in chunks of k that stay in L1 (16 KB), tiles of 4 rows
  // each reading the chunk, their sums parked between chunks; the next chunk is fetched into L2 meanwhile.
  constexpr int64_t kChunk = 512;
  parallel(blocks, 16, [&](int64_t begin, int64_t end) {
    if (rows <= 4) {
      ForBlockGroups(rows, begin, end, [&](int64_t b, auto kRows, auto kCount) {
        const uint16_t* w = ws + b * block_elements;
        Lanes8 sums[kRows()][2 * kCount()] = {};
        BlockTile<kRows(), kCount(), 3>(xt.data(), rows, w, width, 0, width, sums, reinterpret_cast<const char*>(w) + 1024);
        for (int r = 0; r < kRows(); ++r)
          for (int i = 0; i < kCount(); ++i)
            StoreBlockSums(sums[r][2 * i], sums[r][2 * i + 1], out + r * n_out + (b + i) * kBlockOut);
      });
      return;
    }
    std::vector<Lanes8> parked(rows * 2);
    for (int64_t b = begin; b < end; ++b) {
      const uint16_t* w = ws + b * block_elements;
      std::fill(parked.begin(), parked.end(), Lanes8{});
      for (int64_t k0 = 0; k0 < width; k0 += kChunk) {
        const int64_t k1 = std::min(width, k0 + kChunk);
        const uint16_t* next = k1 < width ? w + k1 * kBlockOut : (b + 1 < end ? w + block_elements : nullptr);
        for (int64_t r0 = 0; r0 < rows; r0 += 4) {
          WithCount(static_cast<int>(std::min<int64_t>(4, rows - r0)), [&](auto kRows) {
            if constexpr (kRows() <= 4)
              BlockTile<kRows(), 1, 2>(xt.data() + r0, rows, w, width, k0, k1,
                                       reinterpret_cast<Lanes8(*)[2]>(parked.data() + 2 * r0),
                                       r0 == 0 ? reinterpret_cast<const char*>(next) : nullptr);
          });
        }
      }
      for (int64_t r = 0; r < rows; ++r) StoreBlockSums(parked[2 * r], parked[2 * r + 1], out + r * n_out + b * kBlockOut);
    }
  });
}

}  // namespace gptoss_cpu
