// The CPU kernels' arithmetic (gptoss_jax/backends/cpu/cpu_kernels.h) against float64, without jax: a
// standalone program, so that a build for another architecture (aarch64, run under qemu-user) is
// checked like the native ones. tests/test_kernel_harness.py compiles it once per build and runs it.
// The reference decodes MXFP4 on its own (e2m1 values times ldexp(1, scale - 127)), in double.
//
// Prints "paths: ..." (what the build compiled), one line a check, and "all ok"; exits 1 on a mismatch.

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cpu_kernels.h"

using namespace gptoss_cpu;

namespace {

struct Serial {  // the cores' `parallel`, run on this thread
  template <typename Body>
  void operator()(int64_t n, int64_t, const Body& body) const { body(0, n); }
};

std::mt19937 rng(7);
int failures = 0;

double Uniform(double low, double high) { return std::uniform_real_distribution<double>(low, high)(rng); }

// A packed stack [E, N, G, 16] with scales [E, N, G] in [low, high].
struct Packed {
  int64_t experts, n_out, groups;
  std::vector<uint8_t> blocks, scales;
  Packed(int64_t e, int64_t n, int64_t g, int low, int high) : experts(e), n_out(n), groups(g) {
    blocks.resize(e * n * g * 16);
    scales.resize(e * n * g);
    for (auto& b : blocks) b = static_cast<uint8_t>(rng() & 0xFF);
    for (auto& s : scales) s = static_cast<uint8_t>(low + rng() % (high - low + 1));
  }
  // w_e[n, k] in float64.
  double At(int64_t e, int64_t n, int64_t k) const {
    static const double kFp4[16] = {0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6};
    const int64_t block = (e * n_out + n) * groups + k / 32;
    const uint8_t byte = blocks[block * 16 + (k % 32) / 2];
    return kFp4[k % 2 ? byte >> 4 : byte & 0x0F] * std::ldexp(1.0, scales[block] - 127);
  }
};

// bf16 bits of a random value, and the value they hold.
uint16_t RandomBf16() {
  const float f = static_cast<float>(Uniform(-2.0, 2.0));
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<uint16_t>(bits >> 16);
}
double Bf16Value(uint16_t bits) { return BitsToFloat(static_cast<int32_t>(bits) << 16); }

// ours against the reference, each entry within 1e-5 * (the sum of its terms' magnitudes), plus what a
// build's quantization of its inputs may add to that entry (`allowed`, when given).
void Check(const char* name, const std::vector<float>& ours, const std::vector<double>& reference,
           const std::vector<double>& magnitude, const std::vector<double>& allowed = {}) {
  double worst = 0;
  for (size_t i = 0; i < ours.size(); ++i) {
    const double scale = magnitude[i] > 0 ? magnitude[i] : 1.0;
    const double error = std::fabs(ours[i] - reference[i]) / scale;
    if (!(error <= 1e-5 + (allowed.empty() ? 0.0 : allowed[i] / scale))) {
      std::printf("FAIL %s: entry %zu is %.9g, float64 gives %.9g\n", name, i, ours[i], reference[i]);
      ++failures;
      return;
    }
    worst = std::max(worst, error);
  }
  std::printf("ok %s (%zu values, largest error %.2g of the terms' magnitude)\n", name, ours.size(), worst);
}

// Every code at every scale, decoded exactly (float32 and bf16 bits).
void CheckDequantize() {
  Packed p(1, 256, 2, 0, 0);
  for (int64_t n = 0; n < 256; ++n)
    for (int64_t g = 0; g < 2; ++g) p.scales[n * 2 + g] = static_cast<uint8_t>(n);
  for (int64_t i = 0; i < 16; ++i) p.blocks[i] = static_cast<uint8_t>(i * 17);  // code i twice
  for (int64_t i = 16; i < 32; ++i) p.blocks[i] = static_cast<uint8_t>(((i - 16) << 4) | (15 - (i - 16)));
  for (int64_t b = 2; b < 512; ++b) std::memcpy(&p.blocks[16 * b], &p.blocks[16 * (b % 2)], 16);
  std::vector<float> f32(256 * 64);
  std::vector<uint16_t> b16(256 * 64);
  DecodeBlocks<false>(p.blocks.data(), p.scales.data(), 0, 512, f32.data());
  DecodeBlocks<true>(p.blocks.data(), p.scales.data(), 0, 512, b16.data());
  for (int64_t n = 0; n < 256; ++n)
    for (int64_t k = 0; k < 64; ++k) {
      const float expected = static_cast<float>(p.At(0, n, k));  // exact, or inf past float's range
      uint32_t bits;
      std::memcpy(&bits, &expected, 4);
      if (f32[n * 64 + k] != expected || b16[n * 64 + k] != (bits >> 16)) {
        std::printf("FAIL dequantize: scale %lld element %lld is %.9g (bf16 %04x), expected %.9g\n",
                    static_cast<long long>(n), static_cast<long long>(k), f32[n * 64 + k], b16[n * 64 + k], expected);
        ++failures;
        return;
      }
    }
  std::printf("ok dequantize (every code at every scale, float32 and bf16, exact)\n");
}

// The expert matvec: 11 tokens x 2 slots over 3 experts, 10 tokens on expert 2 (runs longer than
// kMaxTokens), slots naming no expert (-1, 3) left zero; float32 and bf16 rows.
void CheckExpertMatvec() {
  const int64_t rows = 11, k = 2, width = 96;
  Packed p(3, 7, width / 32, 119, 124);
  std::vector<int32_t> experts(rows * k);
  for (auto& e : experts) e = static_cast<int32_t>(rng() % 3);
  for (int64_t t = 0; t < 10; ++t) experts[t * k] = 2;
  experts[10 * k] = -1;
  experts[10 * k + 1] = 3;
  std::vector<uint16_t> x16(rows * width);
  std::vector<float> x32(rows * width);
  for (size_t i = 0; i < x16.size(); ++i) x32[i] = static_cast<float>(Bf16Value(x16[i] = RandomBf16()));
  for (int bf16 = 0; bf16 < 2; ++bf16) {
    std::vector<float> ours(rows * k * p.n_out, -1.0f);
    ExpertMatvec(bf16 ? static_cast<const void*>(x16.data()) : x32.data(), bf16, rows, width, experts.data(), k,
                 p.blocks.data(), p.scales.data(), p.experts, p.n_out, ours.data(), Serial{});
    // An int16 build may move each input by up to its block's largest |x| / 65534.
    const bool quantized = bf16 && kInt16Rows;
    std::vector<double> reference(ours.size()), magnitude(ours.size()), allowed(ours.size());
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t slot = 0; slot < k; ++slot) {
        const int32_t e = experts[t * k + slot];
        const int64_t i = (t * k + slot) * p.n_out;
        for (int64_t n = 0; n < p.n_out && e >= 0 && e < 3; ++n)
          for (int64_t j = 0; j < width; ++j) {
            const double term = x32[t * width + j] * p.At(e, n, j);
            reference[i + n] += term;
            magnitude[i + n] += std::fabs(term);
            double largest = 0;
            for (int64_t b = j / 32 * 32; b < j / 32 * 32 + 32; ++b) largest = std::max(largest, std::fabs(double(x32[t * width + b])));
            allowed[i + n] += quantized ? std::fabs(p.At(e, n, j)) * largest / 65534 : 0.0;
          }
      }
    Check(bf16 ? "expert matvec, bf16 rows" : "expert matvec, float32 rows", ours, reference, magnitude, allowed);
  }
}

// The bf16 matvec at row counts across the tiles and a width that is no multiple of any vector width.
void CheckBf16Matvec() {
  const int64_t width = 100, n_out = 37;
  std::vector<uint16_t> w(n_out * width);
  for (auto& v : w) v = RandomBf16();
  for (int64_t rows : {1, 3, 5, 9, 16}) {
    std::vector<uint16_t> x(rows * width);
    for (auto& v : x) v = RandomBf16();
    std::vector<float> ours(rows * n_out);
    Bf16Matvec(x.data(), rows, width, w.data(), n_out, ours.data(), Serial{});
    std::vector<double> reference(ours.size()), magnitude(ours.size());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t n = 0; n < n_out; ++n)
        for (int64_t j = 0; j < width; ++j) {
          const double term = Bf16Value(x[r * width + j]) * Bf16Value(w[n * width + j]);
          reference[r * n_out + n] += term;
          magnitude[r * n_out + n] += std::fabs(term);
        }
    Check(("bf16 matvec, " + std::to_string(rows) + " rows").c_str(), ours, reference, magnitude);
  }
}

// The bf16 matvec with a weight in blocks of 16 rows ([N/16, K, 16]): row counts across its paths (one
// pass over up to 4 blocks at a time for up to 4 rows; chunks of k and tiles of rows past that), 7 blocks
// (a last partial group of blocks), a width past two of its chunks, odd (a lone last k) or even (AVX512-BF16
// takes pairs of k). And a row's results, bit for bit, the same alone as in a batch of 16.
void CheckBf16MatvecBlocks(int64_t width) {
  const int64_t blocks = 7, n_out = blocks * kBlockOut;
  std::vector<uint16_t> w(blocks * width * kBlockOut);  // w[b, k, j] = row 16b + j, column k
  for (auto& v : w) v = RandomBf16();
  std::vector<uint16_t> x(16 * width);
  for (auto& v : x) v = RandomBf16();
  for (int64_t rows : {1, 2, 3, 5, 16}) {
    std::vector<float> ours(rows * n_out);
    Bf16MatvecBlocks(x.data(), rows, width, w.data(), blocks, ours.data(), Serial{});
    std::vector<double> reference(ours.size()), magnitude(ours.size());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t n = 0; n < n_out; ++n)
        for (int64_t j = 0; j < width; ++j) {
          const double term = Bf16Value(x[r * width + j]) * Bf16Value(w[((n / kBlockOut) * width + j) * kBlockOut + n % kBlockOut]);
          reference[r * n_out + n] += term;
          magnitude[r * n_out + n] += std::fabs(term);
        }
    Check(("bf16 matvec in blocks of 16, width " + std::to_string(width) + ", " + std::to_string(rows) + " rows").c_str(), ours, reference, magnitude);
  }
  std::vector<float> batch(16 * n_out), alone(n_out);
  Bf16MatvecBlocks(x.data(), 16, width, w.data(), blocks, batch.data(), Serial{});
  for (int64_t r = 0; r < 16; ++r) {
    Bf16MatvecBlocks(x.data() + r * width, 1, width, w.data(), blocks, alone.data(), Serial{});
    if (std::memcmp(alone.data(), batch.data() + r * n_out, n_out * sizeof(float)) != 0) {
      std::printf("FAIL bf16 matvec in blocks of 16: row %ld alone differs from the same row in a batch of 16\n", static_cast<long>(r));
      ++failures;
      return;
    }
  }
  std::printf("ok bf16 matvec in blocks of 16, each of 16 rows the same alone\n");
}

// The grouped matmul, forward and transposed: 4 experts owning 3, 0, 8 and 1 rows of 14 (the last two
// rows belong to none and come back zero), widths that cross the panels' slices, output columns that do
// not fill the last panel.
void CheckGroupedMatmul() {
  const int64_t rows = 14, groups = 10, n_out = 270, k_in = groups * 32;
  const std::vector<int32_t> sizes = {3, 0, 8, 1};
  Packed p(4, n_out, groups, 120, 124);
  std::vector<int64_t> owner;
  for (int64_t e = 0; e < 4; ++e) owner.insert(owner.end(), sizes[e], e);
  for (int transpose = 0; transpose < 2; ++transpose) {
    const int64_t width = transpose ? n_out : k_in, columns = transpose ? k_in : n_out;
    std::vector<uint16_t> x(rows * width);
    for (auto& v : x) v = RandomBf16();
    std::vector<float> ours(rows * columns, -1.0f);
    GroupedMatmul(x.data(), rows, sizes.data(), p.blocks.data(), p.scales.data(), p.experts, n_out, groups, transpose,
                  ours.data(), Serial{});
    std::vector<double> reference(ours.size()), magnitude(ours.size());
    for (int64_t r = 0; r < static_cast<int64_t>(owner.size()); ++r)
      for (int64_t c = 0; c < columns; ++c)
        for (int64_t j = 0; j < width; ++j) {
          const double term = Bf16Value(x[r * width + j]) * (transpose ? p.At(owner[r], j, c) : p.At(owner[r], c, j));
          reference[r * columns + c] += term;
          magnitude[r * columns + c] += std::fabs(term);
        }
    Check(transpose ? "grouped matmul, transposed" : "grouped matmul", ours, reference, magnitude);
  }
}

// Decode attention: 3 rows over a cache of 13 slots, with and without a window of 5, for kv heads of 3 query
// heads (head_dim 20, no multiple of the vector width), of 8 (gpt-oss's 8 x 64) and of 10 (two passes of at
// most 8): a row whose cache holds stale positions past its query, a padding row
// (query at -1: writes nothing, sees only the sink) and a row whose ring has wrapped. Each row's new
// token is written first, into slot position % slots, and nothing else changes. The reference in
// float64 keeps the weights unrounded; the kernel rounds each to bf16 for the product with the values,
// as the model's XLA path does, so each output may move by half a bf16 step of each weight's share.
void CheckDecodeAttention(const DecodeShape& shape) {
  const int64_t slots = shape.slots, dim = shape.head_dim, features = shape.kv_heads * dim;
  const int64_t heads = shape.kv_heads * shape.group;
  const std::vector<int32_t> at = {6, -1, 30};
  for (int64_t window : {0, 5}) {
    std::vector<uint16_t> keys(shape.batch * slots * features), values(keys.size());
    std::vector<uint16_t> q(shape.batch * heads * dim), new_keys(shape.batch * features), new_values(new_keys.size());
    for (auto* v : {&keys, &values, &q, &new_keys, &new_values})
      for (auto& x : *v) x = RandomBf16();
    std::vector<int32_t> positions(shape.batch * slots, -1);
    for (int64_t s = 0; s < slots; ++s) {
      positions[s] = s == 6 ? -1 : static_cast<int32_t>(s);  // row 0: stale 7..12 past its query at 6
      positions[slots + s] = s < 4 ? static_cast<int32_t>(s) : -1;  // row 1 (padding): someone else's
      positions[2 * slots + s] = static_cast<int32_t>(26 - (26 - s) % slots);  // row 2: positions 17..29
    }
    std::vector<float> sinks(heads), ours(shape.batch * heads * dim);
    for (auto& v : sinks) v = static_cast<float>(Uniform(-1.0, 1.0));
    const std::vector<uint16_t> keys_before = keys;
    const std::vector<int32_t> positions_before = positions;
    WriteCacheSlots(shape, new_keys.data(), new_values.data(), at.data(), keys.data(), values.data(), positions.data());
    const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
    DecodeAttention(shape, q.data(), keys.data(), values.data(), positions.data(), at.data(), sinks.data(), window,
                    scale, ours.data(), Serial{});
    int written = 0, changed = 0;
    for (int64_t b = 0; b < shape.batch; ++b)
      for (int64_t s = 0; s < slots; ++s) {
        const bool mine = at[b] >= 0 && s == at[b] % slots;
        const int64_t row = b * slots + s;
        for (int64_t f = 0; f < features; ++f)
          if (mine ? keys[row * features + f] == new_keys[b * features + f] : keys[row * features + f] == keys_before[row * features + f])
            ++(mine ? written : changed);
        if (mine ? positions[row] != at[b] : positions[row] != positions_before[row]) ++failures;
      }
    const bool slots_ok = written == 2 * features && changed == (shape.batch * slots - 2) * features;
    const std::string name = "decode attention, group " + std::to_string(shape.group) + (window ? ", window 5" : "");
    std::printf("%s %s writes only its slot\n", slots_ok ? "ok" : "FAIL", name.c_str());
    failures += !slots_ok;
    std::vector<double> reference(ours.size()), magnitude(ours.size()), allowed(ours.size());
    for (int64_t b = 0; b < shape.batch; ++b)
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t n = h / shape.group, item = b * heads + h;
        std::vector<double> scores(slots, -INFINITY);
        double top = sinks[h];
        for (int64_t s = 0; s < slots; ++s) {
          const int32_t p = positions[b * slots + s];
          if (p < 0 || p > at[b] || (window > 0 && at[b] - p >= window)) continue;
          scores[s] = 0;
          for (int64_t d = 0; d < dim; ++d)
            scores[s] += Bf16Value(q[item * dim + d]) * Bf16Value(keys[(b * slots + s) * features + n * dim + d]);
          scores[s] *= scale;
          top = std::max(top, scores[s]);
        }
        double total = std::exp(sinks[h] - top);
        for (int64_t s = 0; s < slots; ++s) total += std::exp(scores[s] - top);
        for (int64_t d = 0; d < dim; ++d) {
          const int64_t i = item * dim + d;
          for (int64_t s = 0; s < slots; ++s) {
            const double share = std::exp(scores[s] - top) / total;
            const double value = Bf16Value(values[(b * slots + s) * features + n * dim + d]);
            reference[i] += share * value;
            magnitude[i] += share * std::fabs(value);
            allowed[i] += share * std::fabs(value) / 256;  // half a bf16 step of the weight (2**-8 of it)
          }
          if (at[b] < 0 && ours[i] != 0.0f) ++failures;  // a padding row sees nothing but the sink
        }
      }
    Check(name.c_str(), ours, reference, magnitude, allowed);
  }
}

}  // namespace

int main() {
  std::printf("paths: %s\n", kPaths);
  CheckDequantize();
  CheckExpertMatvec();
  CheckBf16Matvec();
  CheckBf16MatvecBlocks(1101);
  CheckBf16MatvecBlocks(1102);  // even: AVX512-BF16's pairs of k (vdpbf16ps)
  CheckGroupedMatmul();
  for (const DecodeShape& shape : {DecodeShape{3, 13, 2, 3, 20}, DecodeShape{3, 13, 2, 8, 64}, DecodeShape{3, 13, 1, 10, 24}})
    CheckDecodeAttention(shape);
  if (failures) return 1;
  std::printf("all ok\n");
  return 0;
}
