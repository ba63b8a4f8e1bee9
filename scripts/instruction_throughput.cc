// How many of each vector instruction the CPU kernels lean on one core issues a second: 12 independent
// instructions a loop, in inline assembly (a compiler may not fold or reorder them), on the registers
// alone or with one operand from L1. The figures behind the README's floors for the CPU kernels (what
// bounds the unembedding's FMA tiles and the experts' int16 rows); instructions the CPU lacks are
// skipped. Build and run (x86-64, GCC or Clang):
//   g++ -O2 scripts/instruction_throughput.cc -o /tmp/instruction_throughput && /tmp/instruction_throughput
#include <chrono>
#include <cstdio>
#include <cstdlib>

#define X12(op, w) \
  op " %%" w "12, %%" w "13, %%" w "0\n" op " %%" w "12, %%" w "13, %%" w "1\n" op " %%" w "12, %%" w "13, %%" w "2\n" \
  op " %%" w "12, %%" w "13, %%" w "3\n" op " %%" w "12, %%" w "13, %%" w "4\n" op " %%" w "12, %%" w "13, %%" w "5\n" \
  op " %%" w "12, %%" w "13, %%" w "6\n" op " %%" w "12, %%" w "13, %%" w "7\n" op " %%" w "12, %%" w "13, %%" w "8\n" \
  op " %%" w "12, %%" w "13, %%" w "9\n" op " %%" w "12, %%" w "13, %%" w "10\n" op " %%" w "12, %%" w "13, %%" w "11\n"
// One token and pair of blocks of the experts' int16 rows (ExpertRowInt16): 4 vpmaddwd with x from L1,
// their sum, and (kFloat) its conversion, scale and FMA into the token's accumulator (ymm8 + t).
#define PAIR(t, off) \
  "vpmaddwd " #off "(%0), %%ymm12, %%ymm0\n vpmaddwd " #off "+32(%0), %%ymm13, %%ymm1\n" \
  "vpmaddwd " #off "+64(%0), %%ymm14, %%ymm2\n vpmaddwd " #off "+96(%0), %%ymm15, %%ymm3\n" \
  "vpaddd %%ymm1, %%ymm0, %%ymm0\n vpaddd %%ymm3, %%ymm2, %%ymm2\n vpaddd %%ymm2, %%ymm0, %%ymm0\n"
#define PAIR_INT(t, off) PAIR(t, off) "vpaddd %%ymm0, %%ymm" #t ", %%ymm" #t "\n"
#define PAIR_FLOAT(t, off) \
  PAIR(t, off) "vcvtdq2ps %%ymm0, %%ymm0\n vmulps " #off "+512(%0), %%ymm11, %%ymm1\n vfmadd231ps %%ymm1, %%ymm0, %%ymm" #t "\n"

static char* buffer = static_cast<char*>(aligned_alloc(64, 4096));

template <typename Body>
void Report(const char* name, int per_loop, const char* unit, Body body) {
  const long loops = 20000000;
  body(loops / 10);  // warm up: the clock reaches its working speed
  auto start = std::chrono::steady_clock::now();
  body(loops);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%-44s %6.2f G %s a second\n", name, loops * per_loop / seconds / 1e9, unit);
}

#define CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "memory"
#define INSTRUCTION(name, op, w) \
  Report(name, 12, "instructions", [](long n) { for (long i = 0; i < n; ++i) asm volatile(X12(op, w) :: "r"(buffer) : CLOBBERS); })

int main() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::printf("this CPU has no AVX2 + FMA\n");
    return 0;
  }
  INSTRUCTION("vfmadd231ps ymm (8 products)", "vfmadd231ps", "ymm");
  INSTRUCTION("vpmaddwd ymm (16 int16 products)", "vpmaddwd", "ymm");
  INSTRUCTION("vpmaddubsw ymm (32 int8 products)", "vpmaddubsw", "ymm");
  INSTRUCTION("vpaddd ymm", "vpaddd", "ymm");
  INSTRUCTION("vpshufb ymm", "vpshufb", "ymm");
  Report("int16 rows: token x pair, integer part", 4, "token-pairs", [](long n) {
    for (long i = 0; i < n; ++i)
      asm volatile(PAIR_INT(8, 0) PAIR_INT(9, 128) PAIR_INT(10, 256) PAIR_INT(4, 384) :: "r"(buffer) : CLOBBERS);
  });
  Report("int16 rows: token x pair, with the scaling", 4, "token-pairs", [](long n) {
    for (long i = 0; i < n; ++i)
      asm volatile(PAIR_FLOAT(8, 0) PAIR_FLOAT(9, 128) PAIR_FLOAT(10, 256) PAIR_FLOAT(4, 384) :: "r"(buffer) : CLOBBERS);
  });
  if (__builtin_cpu_supports("avx512f")) INSTRUCTION("vfmadd231ps zmm (16 products)", "vfmadd231ps", "zmm");
  if (__builtin_cpu_supports("avx512vnni")) {
    INSTRUCTION("vpdpwssd ymm (16 int16 products, summed)", "vpdpwssd", "ymm");
    INSTRUCTION("vpdpwssd zmm (32 int16 products, summed)", "vpdpwssd", "zmm");
  }
  if (__builtin_cpu_supports("avx512bf16")) INSTRUCTION("vdpbf16ps zmm (32 bf16 products)", "vdpbf16ps", "zmm");
  return 0;
}
