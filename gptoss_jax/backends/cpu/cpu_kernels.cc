// CPU kernels for MXFP4 experts and bf16 products, called from XLA through its FFI.
//
// XLA's CPU backend dequantizes MXFP4 element by element and runs one-row matrix products far below
// the memory bandwidth. These kernels read each weight byte once:
//   gptoss_mxfp4_expert_matvec(_bf16): x [T, K] against the chosen experts' packed weights -> [T, k, N]
//   gptoss_mxfp4_grouped_matmul:       rows sorted by expert against their experts (prefill, training),
//                                      each expert decoded once into cache-sized panels; and transposed
//   gptoss_mxfp4_dequantize:           one expert's packed weights -> dense [N, K] (bf16 or f32)
//   gptoss_bf16_matvec:                a few rows x [R, K] (bf16) against w [N, K] (bf16) -> f32 [R, N]
//   gptoss_bf16_matvec_blocks:         the same against w in blocks of 16 output rows [N/16, K, 16]
//   gptoss_decode_attention:           a decode step's token written into its layer's KV cache and attending
//                                      to it, in place in the stacked cache (bf16)
//
// The arithmetic lives in cpu_kernels.h; this file checks shapes, picks the layer and binds to the FFI.

#include "cpu_kernels.h"

#include <atomic>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace gptoss_cpu;

// Splits n items into parts run on XLA's own intra-op threads and the calling thread, calling
// body(begin, end) on each part. Every participant claims parts from a shared counter, so the caller
// finishes the work itself when the pool is busy (no waiting on queued tasks, no deadlock), and a
// task that starts late finds nothing left and touches nothing of the caller's.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t grain, const Body& body) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(n / std::max<int64_t>(grain, 1), 4 * threads));
  if (parts == 1 || threads == 1) {
    body(0, n);
    return;
  }
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();
  std::function<void(int64_t)> run_part = [&body, n, parts](int64_t p) { body(n * p / parts, n * (p + 1) / parts); };
  auto claim = [progress, parts](const std::function<void(int64_t)>* run) {
    for (int64_t p; (p = progress->next.fetch_add(1)) < parts;) {
      (*run)(p);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  // Helpers get a pointer to run_part only while parts remain; once every part is claimed they never call it.
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([claim, run = &run_part] { claim(run); });
  claim(&run_part);
  while (progress->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

// The trailing [E, N, G, 16] of packed blocks, and how many such stacks lead them ([L, E, N, G, 16]: the
// layers of a scanned model, passed whole with a layer index so that no layer's bytes are copied out).
struct PackedShape {
  int64_t stacks, num_experts, n_out, groups;
};

bool ReadPackedShape(ffi::Buffer<ffi::U8>& blocks, ffi::Buffer<ffi::U8>& scales, PackedShape* shape) {
  auto bd = blocks.dimensions();
  const size_t rank = bd.size();
  if (rank < 4 || bd[rank - 1] != 16) return false;
  shape->num_experts = bd[rank - 4];
  shape->n_out = bd[rank - 3];
  shape->groups = bd[rank - 2];
  shape->stacks = 1;
  for (size_t i = 0; i + 4 < rank; ++i) shape->stacks *= bd[i];
  return scales.element_count() * 16 == blocks.element_count();
}

// ParallelFor on XLA's intra-op threads, as the cores in cpu_kernels.h take it.
struct OnPool {
  ffi::ThreadPool& pool;
  template <typename Body>
  void operator()(int64_t n, int64_t grain, const Body& body) const { ParallelFor(pool, n, grain, body); }
};

// x [T, K] (float32, or bf16 bits when x_bf16) against the chosen experts -> out [T, k, N].
ffi::Error ExpertMatvecCall(const void* x_data, bool x_bf16, int64_t rows, int64_t width, ffi::Buffer<ffi::S32>& experts,
                            ffi::Buffer<ffi::U8>& all_blocks, ffi::Buffer<ffi::U8>& all_scales,
                            ffi::Buffer<ffi::S32>& layer, float* result, ffi::ThreadPool& pool) {
  auto ed = experts.dimensions();
  PackedShape shape;
  if (ed.size() != 2 || ed[0] != rows || !ReadPackedShape(all_blocks, all_scales, &shape) || shape.groups * 32 != width)
    return ffi::Error::InvalidArgument("gptoss_mxfp4_expert_matvec: x [T, K], experts [T, k], blocks [..., E, N, K/32, 16]");
  const int64_t num_experts = shape.num_experts, n_out = shape.n_out, groups = shape.groups;
  const int64_t stack = std::clamp<int64_t>(layer.typed_data()[0], 0, shape.stacks - 1);
  ExpertMatvec(x_data, x_bf16, rows, width, experts.typed_data(), ed[1],
               all_blocks.typed_data() + stack * num_experts * n_out * groups * 16,
               all_scales.typed_data() + stack * num_experts * n_out * groups, num_experts, n_out, result, OnPool{pool});
  return ffi::Error::Success();
}


ffi::Error Mxfp4ExpertMatvec(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> experts, ffi::Buffer<ffi::U8> all_blocks,
                             ffi::Buffer<ffi::U8> all_scales, ffi::Buffer<ffi::S32> layer,
                             ffi::ResultBuffer<ffi::F32> out, ffi::ThreadPool pool) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("gptoss_mxfp4_expert_matvec: x [T, K]");
  return ExpertMatvecCall(x.untyped_data(), false, xd[0], xd[1], experts, all_blocks, all_scales, layer, out->typed_data(), pool);
}

ffi::Error Mxfp4ExpertMatvecBf16(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::S32> experts, ffi::Buffer<ffi::U8> all_blocks,
                                 ffi::Buffer<ffi::U8> all_scales, ffi::Buffer<ffi::S32> layer,
                                 ffi::ResultBuffer<ffi::F32> out, ffi::ThreadPool pool) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("gptoss_mxfp4_expert_matvec: x [T, K]");
  return ExpertMatvecCall(x.untyped_data(), true, xd[0], xd[1], experts, all_blocks, all_scales, layer, out->typed_data(), pool);
}


// Dequantize expert `index` into out [N, K] (bf16 or float32, exactly).
template <bool kBf16>
ffi::Error Dequantize(ffi::Buffer<ffi::U8> blocks, ffi::Buffer<ffi::U8> scales, ffi::Buffer<ffi::S32> index,
                      int64_t out_elements, void* out, ffi::ThreadPool& pool) {
  PackedShape shape;
  if (!ReadPackedShape(blocks, scales, &shape) || index.element_count() != 2)
    return ffi::Error::InvalidArgument("gptoss_mxfp4_dequantize: blocks [..., E, N, G, 16], index (layer, expert)");
  const int64_t n_out = shape.n_out, groups = shape.groups;
  if (out_elements != n_out * groups * 32) return ffi::Error::InvalidArgument("gptoss_mxfp4_dequantize: output shape");
  const int64_t stack = std::clamp<int64_t>(index.typed_data()[0], 0, shape.stacks - 1);
  const int64_t expert = std::clamp<int64_t>(index.typed_data()[1], 0, shape.num_experts - 1);
  const int64_t offset = (stack * shape.num_experts + expert) * n_out * groups;
  const uint8_t* b = blocks.typed_data() + offset * 16;
  const uint8_t* s = scales.typed_data() + offset;
  ParallelFor(pool, n_out * groups, 1024, [&](int64_t begin, int64_t end) { DecodeBlocks<kBf16>(b, s, begin, end, out); });
  return ffi::Error::Success();
}

ffi::Error Mxfp4DequantizeBf16(ffi::Buffer<ffi::U8> blocks, ffi::Buffer<ffi::U8> scales, ffi::Buffer<ffi::S32> index,
                               ffi::ResultBuffer<ffi::BF16> out, ffi::ThreadPool pool) {
  return Dequantize<true>(blocks, scales, index, out->element_count(), out->untyped_data(), pool);
}

ffi::Error Mxfp4DequantizeF32(ffi::Buffer<ffi::U8> blocks, ffi::Buffer<ffi::U8> scales, ffi::Buffer<ffi::S32> index,
                              ffi::ResultBuffer<ffi::F32> out, ffi::ThreadPool pool) {
  return Dequantize<false>(blocks, scales, index, out->element_count(), out->untyped_data(), pool);
}

// out[r, n] = sum_k x[r, k] * w[n, k] with bf16 inputs and float32 accumulation.
// w may be a stack [..., N, K] (the layers of a scanned model), `layer` picking one.
ffi::Error Bf16MatvecCall(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w, ffi::Buffer<ffi::S32> layer,
                          ffi::ResultBuffer<ffi::F32> out, ffi::ThreadPool pool) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() < 2 || xd[1] != wd[wd.size() - 1])
    return ffi::Error::InvalidArgument("gptoss_bf16_matvec: x [R, K], w [..., N, K]");
  const int64_t rows = xd[0], width = xd[1], n_out = wd[wd.size() - 2];
  const int64_t stacks = static_cast<int64_t>(w.element_count()) / (n_out * width);
  const int64_t stack = std::clamp<int64_t>(layer.typed_data()[0], 0, stacks - 1);
  Bf16Matvec(reinterpret_cast<const uint16_t*>(x.untyped_data()), rows, width,
             reinterpret_cast<const uint16_t*>(w.untyped_data()) + stack * n_out * width, n_out, out->typed_data(),
             OnPool{pool});
  return ffi::Error::Success();
}

// out[r, 16b + j] = sum_k x[r, k] * w[b, k, j]: w in blocks of 16 output rows (the AVX2 build's unembedding).
ffi::Error Bf16MatvecBlocksCall(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> out,
                                ffi::ThreadPool pool) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kBlockOut || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("gptoss_bf16_matvec_blocks: x [R, K], w [N/16, K, 16]");
  Bf16MatvecBlocks(reinterpret_cast<const uint16_t*>(x.untyped_data()), xd[0], xd[1],
                   reinterpret_cast<const uint16_t*>(w.untyped_data()), wd[0], out->typed_data(), OnPool{pool});
  return ffi::Error::Success();
}

ffi::Error Mxfp4GroupedMatmul(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::S32> sizes, ffi::Buffer<ffi::U8> all_blocks,
                              ffi::Buffer<ffi::U8> all_scales, ffi::Buffer<ffi::S32> layer,
                              ffi::ResultBuffer<ffi::F32> out, ffi::ThreadPool pool, bool transpose) {
  auto xd = x.dimensions();
  PackedShape shape;
  const char* usage = "gptoss_mxfp4_grouped_matmul: x [P, K] (transposed: [P, N], N even), sizes [E], blocks [..., E, N, K/32, 16]";
  if (xd.size() != 2 || !ReadPackedShape(all_blocks, all_scales, &shape) ||
      static_cast<int64_t>(sizes.element_count()) != shape.num_experts)
    return ffi::Error::InvalidArgument(usage);
  const int64_t n_out = shape.n_out, groups = shape.groups;
  if (xd[1] != (transpose ? n_out : groups * 32) || (transpose && n_out % 2)) return ffi::Error::InvalidArgument(usage);
  const int64_t stack = std::clamp<int64_t>(layer.typed_data()[0], 0, shape.stacks - 1);
  GroupedMatmul(reinterpret_cast<const uint16_t*>(x.untyped_data()), xd[0], sizes.typed_data(),
                all_blocks.typed_data() + stack * shape.num_experts * n_out * groups * 16,
                all_scales.typed_data() + stack * shape.num_experts * n_out * groups, shape.num_experts, n_out, groups,
                transpose, out->typed_data(), OnPool{pool});
  return ffi::Error::Success();
}

// out = stack[layer] for a stack [L, ...] of any element type: one layer's weights for XLA's own matmuls.
// (Sliced by XLA inside the layer scan, a bf16 stack is first converted to float32 whole, every call.)
ffi::Error CopyLayer(ffi::AnyBuffer stack, ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::AnyBuffer> out,
                     ffi::ThreadPool pool) {
  const int64_t bytes = static_cast<int64_t>(out->size_bytes());
  const int64_t layers = bytes ? static_cast<int64_t>(stack.size_bytes()) / bytes : 1;
  if (stack.element_type() != out->element_type() || bytes * layers != static_cast<int64_t>(stack.size_bytes()))
    return ffi::Error::InvalidArgument("gptoss_copy_layer: out must be one [...] of stack [L, ...]");
  const int64_t index = std::clamp<int64_t>(layer.typed_data()[0], 0, layers - 1);
  const char* from = static_cast<const char*>(stack.untyped_data()) + index * bytes;
  char* to = static_cast<char*>(out->untyped_data());
  ParallelFor(pool, bytes, 1 << 20, [&](int64_t begin, int64_t end) { std::memcpy(to + begin, from + begin, end - begin); });
  return ffi::Error::Success();
}

// One decode step's attention for one layer of the stacked KV cache: each row's new token is written
// into its slot in place (the stacks are aliased to the results), then its query attends to the layer.
// q [B, kv_heads, group, head_dim] bf16; keys, values [L, B, slots, kv_heads * head_dim] bf16; positions
// [L, B, slots] s32; layer [1]; new keys, values [B, kv_heads * head_dim]; new positions [B] (the query's
// own position, -1 for padding rows); sinks [kv_heads, group] f32.
ffi::Error DecodeAttentionCall(ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> keys, ffi::Buffer<ffi::BF16> values,
                               ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> layer,
                               ffi::Buffer<ffi::BF16> new_keys, ffi::Buffer<ffi::BF16> new_values,
                               ffi::Buffer<ffi::S32> new_positions, ffi::Buffer<ffi::F32> sinks,
                               ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::BF16> keys_out,
                               ffi::ResultBuffer<ffi::BF16> values_out, ffi::ResultBuffer<ffi::S32> positions_out,
                               ffi::ThreadPool pool, int64_t window, float scale) {
  auto qd = q.dimensions(), kd = keys.dimensions(), pd = positions.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || pd.size() != 3 || kd[1] != qd[0] || kd[3] != qd[1] * qd[3] ||
      pd[0] != kd[0] || pd[1] != kd[1] || pd[2] != kd[2] || values.element_count() != keys.element_count() ||
      static_cast<int64_t>(new_keys.element_count()) != qd[0] * kd[3] ||
      static_cast<int64_t>(new_values.element_count()) != qd[0] * kd[3] ||
      static_cast<int64_t>(new_positions.element_count()) != qd[0] ||
      static_cast<int64_t>(sinks.element_count()) != qd[1] * qd[2])
    return ffi::Error::InvalidArgument("gptoss_decode_attention: q [B, N, G, D], keys and values [L, B, S, N * D], "
                                       "positions [L, B, S], new keys and values [B, N * D], new positions [B], sinks [N, G]");
  const DecodeShape shape{qd[0], kd[2], qd[1], qd[2], qd[3]};
  const int64_t layer_elements = shape.batch * shape.slots * kd[3];
  const int64_t stack = std::clamp<int64_t>(layer.typed_data()[0], 0, kd[0] - 1);
  // The results are the operands' buffers (aliased); were they not, they start as copies.
  auto same = [](const void* from, void* to, size_t bytes) { if (from != to) std::memcpy(to, from, bytes); };
  same(keys.untyped_data(), keys_out->untyped_data(), keys.size_bytes());
  same(values.untyped_data(), values_out->untyped_data(), values.size_bytes());
  same(positions.untyped_data(), positions_out->untyped_data(), positions.size_bytes());
  uint16_t* k = reinterpret_cast<uint16_t*>(keys_out->untyped_data()) + stack * layer_elements;
  uint16_t* v = reinterpret_cast<uint16_t*>(values_out->untyped_data()) + stack * layer_elements;
  int32_t* p = positions_out->typed_data() + stack * shape.batch * shape.slots;
  WriteCacheSlots(shape, reinterpret_cast<const uint16_t*>(new_keys.untyped_data()),
                  reinterpret_cast<const uint16_t*>(new_values.untyped_data()), new_positions.typed_data(), k, v, p);
  DecodeAttention(shape, reinterpret_cast<const uint16_t*>(q.untyped_data()), k, v, p, new_positions.typed_data(),
                  sinks.typed_data(), window, scale, out->typed_data(), OnPool{pool});
  return ffi::Error::Success();
}

}  // namespace

// Whether this build multiplies bf16 pairs in hardware (AVX512-BF16): the bf16 expert matvec.
extern "C" int GptossHasBf16Products() {
#if defined(GPTOSS_AVX512) && defined(__AVX512BF16__)
  return 1;
#else
  return 0;
#endif
}

// Whether bf16 rows reach the expert matvec quantized to int16 per block of 32 (x86 builds with AVX2):
// each within its block's largest |x| / 65534, so not exact.
extern "C" int GptossHasInt16Rows() { return kInt16Rows ? 1 : 0; }

// Rows up to which the bf16 matvec beats XLA's dot on a whole weight (the unembedding): 16 for the AVX2
// build's register tiles (Bf16Tile) and for AVX512-BF16's vdpbf16ps tiles (20b's unembedding at 16 rows
// on a 2-core Zen 4: 78 ms against XLA's 106; at 8, 54 against 84), where the CPU has no AMX (load_kernels
// says: XLA's dot takes AMX's tiles there, ~52 ms); elsewhere 4, past which XLA's AVX-512 dot is as fast.
extern "C" int GptossMatvecRows() {
#if defined(GPTOSS_AVX2) || (defined(GPTOSS_AVX512) && defined(__AVX512BF16__))
  return 16;
#else
  return 4;
#endif
}

// Whether the unembedding is best held in blocks of 16 rows for Bf16MatvecBlocks: the AVX2 build, where
// the dot-product tiles on [N, K] share the FMA ports with widening, and the AVX512-BF16 build (load_kernels
// keeps [N, K] where the CPU has AMX), whose vdpbf16ps block tiles on a 2-core Zen 4 take 20b's unembedding
// in 42 ms at one row (row-major matvec 51) and 50 at 16 rows (matvec 76, XLA's dot 105). Every build has
// the kernel.
extern "C" int GptossUnembeddingBlocks() {
#if defined(GPTOSS_AVX2) || (defined(GPTOSS_AVX512) && defined(__AVX512BF16__))
  return 1;
#else
  return 0;
#endif
}

// Whether the grouped matmul runs register tiles (bf16 products, or float32 FMA panels); the portable
// build's scalar loops are slower than XLA's tiled path.
extern "C" int GptossHasTiledGroupedMatmul() {
#if (defined(GPTOSS_AVX512) && defined(__AVX512BF16__)) || defined(GPTOSS_FLOAT_PANELS)
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossMxfp4ExpertMatvec, Mxfp4ExpertMatvec,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossMxfp4ExpertMatvecBf16, Mxfp4ExpertMatvecBf16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossMxfp4DequantizeBf16, Mxfp4DequantizeBf16,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossMxfp4DequantizeF32, Mxfp4DequantizeF32,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossBf16Matvec, Bf16MatvecCall,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossBf16MatvecBlocks, Bf16MatvecBlocksCall,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossMxfp4GroupedMatmul, Mxfp4GroupedMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<bool>("transpose"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossCopyLayer, CopyLayer,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ctx<ffi::ThreadPool>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(GptossDecodeAttention, DecodeAttentionCall,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale"));
