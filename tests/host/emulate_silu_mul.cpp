// Runs the shipped SwiGLU activation kernel of cuda/silu_mul.cu on a CPU (emulate_cuda.h) and checks it
// bit for bit against the op written out element by element: y[t, i] = R(R(g / (1 + exp(-g))) * u) with
// g = x[t, i], u = x[t, F + i] and R the rounding to the model dtype. Built and run by
// tests/test_emulated_kernels.py; exit status 0 = pass.
//
// Hostile inputs: x rows with padding between them (a row stride > 2F, as a view into a wider buffer
// would have), large |g| (exp overflow / underflow), fp32 / fp16 / bf16, the 16-byte vector path and the
// one-value fallback (F not a multiple of the vector), an output poisoned with NaN before the launch.
#define TINYINFER_EMULATE 1
#include "emulate_cuda.h"
#include "../../cuda/silu_mul.cu"

#include <cstring>
#include <random>
#include <vector>

using namespace tinyinfer;

namespace {

template <typename T> uint32_t bits(T v) { uint32_t b = 0; std::memcpy(&b, &v, sizeof(T)); return b; }

template <typename T, int N>
int run(int tokens, int F, int row_pad, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 3.f);
  const int64_t stride = 2 * F + row_pad;
  std::vector<T> x(size_t(tokens) * stride), y(size_t(tokens) * F, from_float<T>(NAN));
  for (auto& v : x) v = from_float<T>(normal(rng));
  x[0] = from_float<T>(90.f);                       // exp(-g) underflows: silu(g) = g
  if (F > 1) x[1] = from_float<T>(-90.f);           // exp(-g) overflows: silu(g) = -0
  SiluMulParams p{};
  p.x = x.data(); p.y = y.data(); p.num_tokens = tokens; p.width = F; p.x_row_stride = stride;
  emu::run_grid(dim3(tokens, unsigned((F / N + kSiluMulThreads - 1) / kSiluMulThreads)), kSiluMulThreads, 0,
                [&] { silu_mul_kernel<T, N>(p); });
  int fails = 0;
  for (int t = 0; t < tokens; ++t)
    for (int i = 0; i < F; ++i) {
      const float g = to_float(x[size_t(t) * stride + i]), u = to_float(x[size_t(t) * stride + F + i]);
      const T want = from_float<T>(to_float(from_float<T>(g / (1.0f + std::exp(-g)))) * u);
      const T got = y[size_t(t) * F + i];
      if (bits(got) != bits(want) && fails++ < 5)
        std::printf("FAIL %zu-byte dtype, N=%d, F=%d: y[%d, %d] = %g, want %g\n", sizeof(T), N, F, t, i,
                    to_float(got), to_float(want));
    }
  return fails;
}

}  // namespace

int main() {
  int fails = 0;
  fails += run<float, 4>(5, 768, 8, 1);
  fails += run<float, 1>(3, 37, 0, 2);              // F not a multiple of 4: the scalar path
  fails += run<__half, 8>(4, 256, 16, 3);
  fails += run<__half, 1>(2, 9, 3, 4);
  fails += run<__nv_bfloat16, 8>(6, 1408, 0, 5);
  fails += run<__nv_bfloat16, 1>(3, 20, 1, 6);
  std::printf(fails ? "silu_mul: %d mismatches\n" : "silu_mul: all bit-identical\n", fails);
  return fails != 0;
}
