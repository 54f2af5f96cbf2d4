// Runs the shipped INT4 kernels of cuda/int4_linear.cu + cuda/int4_mm.cuh on a CPU (emulate_cuda.h,
// emulate_ptx.h) against a double-precision evaluation of y = x @ W.T, W = (q - z) s or q s + m.
// Built and run by tests/test_emulated_kernels.py: no argument = the quick subset, --full = every case
// with every tile configuration and both activation dtypes.
//
// Hostile inputs: N not a multiple of a CTA's rows (partial CTAs), K with an odd number of 64-column
// blocks (G = 32, K zero-padded), partial last stages, fewer stages than the pipeline depth, split-K
// clusters of 2/4/8, M not a multiple of 8, scales in the other 16-bit dtype, y poisoned with NaN, and
// every cp.async bounds-checked against the input buffers. Error bounds are derived, not tuned: the exact
// path (integer zeros, M <= 16) may differ from the double result only by fp32 accumulation and the output
// rounding; the "fold" path also by one rounding of each weight (two with a scale-dtype conversion).
#define TINYINFER_EMULATE 1
#include "emulate_cuda.h"
#include "../../cuda/int4_linear.cu"
#include "../../cuda/tuned.cuh"

#include <random>
#include <string>
#include <vector>

#include "check.h"

using namespace tinyinfer;

namespace {

uint16_t to16(double v, bool bf16) {
  return bf16 ? __float2bfloat16_rn(float(v)).bits : __float2half_rn(float(v)).bits;
}
double from16(uint16_t b, bool bf16) { return bf16 ? __bfloat162float({b}) : __half2float({b}); }

struct Case {
  int M, N, K, G;
  bool x_bf16, s_bf16;
  Int4Zeros zk;
  int split;  // 0: the launcher's choice from shapes; >0: forced
};

struct Problem {
  Case c;
  std::vector<uint32_t> qweight;  // (N/16, KB, 32, 4)
  std::vector<uint16_t> scales, fzeros;  // (N/16, NG, 16)
  std::vector<uint8_t> zeros;
  std::vector<uint16_t> x;  // (M, K)
  std::vector<double> want, absdot;  // (M, N): reference and sum |x w|
  int KB, NG;
};

Problem make_problem(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> level(0, 15);
  std::uniform_real_distribution<double> scale(0.002, 0.02), noise(-1.0, 1.0);
  std::normal_distribution<double> normal(0.0, 1.0);
  Problem p;
  p.c = c;
  p.KB = (c.K + 63) / 64;
  p.NG = p.KB * 64 / c.G;
  const int NT = c.N / 16, ng = c.K / c.G;
  std::vector<int> q(size_t(c.N) * c.K);
  std::vector<double> s(size_t(c.N) * ng), z(size_t(c.N) * ng);
  for (auto& v : q) v = level(rng);
  p.scales.assign(size_t(NT) * p.NG * 16, 0);
  p.zeros.assign(p.scales.size(), 0);
  p.fzeros.assign(p.scales.size(), 0);
  for (int n = 0; n < c.N; ++n)
    for (int gi = 0; gi < ng; ++gi) {
      const size_t e = (size_t(n / 16) * p.NG + gi) * 16 + int4::pair_index(n % 16);
      p.scales[e] = to16(scale(rng), c.s_bf16);
      s[size_t(n) * ng + gi] = from16(p.scales[e], c.s_bf16);
      if (c.zk == Int4Zeros::kUint8) {
        p.zeros[e] = uint8_t(level(rng));
        z[size_t(n) * ng + gi] = p.zeros[e];
      } else {  // Q4_1-like offset: about -8 s
        p.fzeros[e] = to16(-s[size_t(n) * ng + gi] * (8 + noise(rng)), c.s_bf16);
        z[size_t(n) * ng + gi] = from16(p.fzeros[e], c.s_bf16);
      }
    }
  p.qweight.assign(size_t(NT) * p.KB * 32 * 4, 0);
  for (int nt = 0; nt < NT; ++nt)
    for (int kb = 0; kb < p.KB; ++kb)
      for (int lane = 0; lane < 32; ++lane)
        for (int j = 0; j < 4; ++j) {
          uint32_t word = 0;
          for (int i = 0; i < 8; ++i) {
            const int row = nt * 16 + int4::nibble_row(lane, i), k = kb * 64 + int4::nibble_k(lane, j, i);
            if (k < c.K) word |= uint32_t(q[size_t(row) * c.K + k]) << (4 * i);
          }
          p.qweight[((size_t(nt) * p.KB + kb) * 32 + lane) * 4 + j] = word;
        }
  p.x.resize(size_t(c.M) * c.K);
  for (auto& v : p.x) v = to16(normal(rng), c.x_bf16);
  p.want.assign(size_t(c.M) * c.N, 0.0);
  p.absdot.assign(p.want.size(), 0.0);
  for (int m = 0; m < c.M; ++m)
    for (int n = 0; n < c.N; ++n)
      for (int k = 0; k < c.K; ++k) {
        const double sv = s[size_t(n) * ng + k / c.G], zv = z[size_t(n) * ng + k / c.G];
        const double w = c.zk == Int4Zeros::kUint8 ? (q[size_t(n) * c.K + k] - zv) * sv : q[size_t(n) * c.K + k] * sv + zv;
        const double xv = from16(p.x[size_t(m) * c.K + k], c.x_bf16);
        p.want[size_t(m) * c.N + n] += xv * w;
        p.absdot[size_t(m) * c.N + n] += std::fabs(xv * w);
      }
  return p;
}

Int4LinearParams params(Problem& p, void* y) {
  Int4LinearParams lp{};
  lp.x = p.x.data();
  lp.qweight = p.qweight.data();
  lp.scales = p.scales.data();
  lp.zeros = p.c.zk == Int4Zeros::kUint8 ? static_cast<void*>(p.zeros.data()) : static_cast<void*>(p.fzeros.data());
  lp.y = y;
  lp.M = p.c.M; lp.N = p.c.N; lp.K = p.c.K; lp.group_size = p.c.G;
  lp.x_bf16 = p.c.x_bf16; lp.scales_bf16 = p.c.s_bf16; lp.zero_kind = p.c.zk;
  emu::readable().clear();
  emu::register_readable(p.x.data(), p.x.size() * 2);
  emu::register_readable(p.qweight.data(), p.qweight.size() * 4);
  emu::register_readable(p.scales.data(), p.scales.size() * 2);
  emu::register_readable(p.zeros.data(), p.zeros.size());
  emu::register_readable(p.fzeros.data(), p.fzeros.size() * 2);
  return lp;
}

// One configuration on the emulator, as launch_int4_mm launches it (split: forced or 1).
template <typename T, Int4Zeros Z, int G, int MS, class C>
int run_config(Problem& p, const char* name) {
  std::vector<uint16_t> y(size_t(p.c.M) * p.c.N, 0x7FFF);  // NaN in both dtypes
  const Int4LinearParams lp = params(p, y.data());
  const int split = std::min(p.c.split > 0 ? p.c.split : 1, (p.KB + C::KS - 1) / C::KS);
  const Int4MmArgs a = int4_mm_args<C, G>(lp, split);
  constexpr Int4SmemPlan plan = int4_smem_plan<C, MS, G, Z == Int4Zeros::kUint8 ? 1 : 2>();
  emu::run_grid(dim3(int4_mm_ctas_n<C>(a), split), C::kThreads, plan.total_bytes,
                [&] { int4_mm_kernel<T, Z, G, MS, C>(a); }, split);
  const bool exact = Z == Int4Zeros::kUint8 && MS <= 2, bf16 = p.c.x_bf16;
  const double u = bf16 ? 1.0 / 256 : 1.0 / 2048, uw = (p.c.s_bf16 != bf16 ? 2 : 1) * u / 2;
  int fails = emu::violations();
  emu::violations() = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    const double got = from16(y[i], bf16), want = p.want[i];
    const double bound = u * std::fabs(want) + (exact ? 1e-5 : uw) * p.absdot[i] + 1e-6;
    if (!(std::fabs(got - want) <= bound) && ++fails <= 3)
      std::printf("  %s M=%d N=%d K=%d G=%d: y[%zu] = %.6g, want %.6g (bound %.3g)\n", name, p.c.M, p.c.N,
                  p.c.K, p.c.G, i, got, want, bound);
  }
  return fails;
}

// The dequantize kernel (M > 64 path): every element equals w computed in fp32, rounded once to T.
template <typename T, Int4Zeros Z, int G>
int run_dequant(Problem& p) {
  std::vector<uint16_t> w(size_t(p.c.N) * p.c.K, 0x7FFF);
  const Int4LinearParams lp = params(p, w.data());
  emu::run_grid(dim3(p.KB, (p.c.N / 16 + 3) / 4), 128, 0, [&] {
    int4_dequant_kernel<T, Z, G>(static_cast<const uint4*>(lp.qweight), static_cast<const uint16_t*>(lp.scales),
                                 lp.zeros, static_cast<T*>(lp.y), lp.N, lp.K, p.KB, p.NG, lp.scales_bf16);
  });
  int fails = 0;
  for (int n = 0; n < p.c.N; ++n)
    for (int k = 0; k < p.c.K; ++k) {
      const size_t e = (size_t(n / 16) * p.NG + k / G) * 16 + int4::pair_index(n % 16);
      const int kb = k / 64, kk = k % 64;
      uint32_t q = 0;
      for (int lane = 0; lane < 32; ++lane)
        for (int j = 0; j < 4; ++j)
          for (int i = 0; i < 8; ++i)
            if (int4::nibble_row(lane, i) == n % 16 && int4::nibble_k(lane, j, i) == kk)
              q = (p.qweight[((size_t(n / 16) * p.KB + kb) * 32 + lane) * 4 + j] >> (4 * i)) & 0xF;
      const float s = float(from16(p.scales[e], p.c.s_bf16));
      const float wf = Z == Int4Zeros::kUint8 ? (float(q) - float(p.zeros[e])) * s
                                              : std::fma(float(q), s, float(from16(p.fzeros[e], p.c.s_bf16)));
      const uint16_t want = to16(wf, p.c.x_bf16);
      if (w[size_t(n) * p.c.K + k] != want && ++fails <= 3)
        std::printf("  dequant W[%d][%d] = %04x, want %04x\n", n, k, w[size_t(n) * p.c.K + k], want);
    }
  return fails;
}

template <typename T, Int4Zeros Z, int G>
int run_all_configs(Problem& p, bool full) {
  const int M = p.c.M;
  int f = 0;
  // The shipped configuration for M's range, then (--full) other shapes of the tuning space.
  if (M <= 8) f += run_config<T, Z, G, 1, tuned::Int4M8>(p, "Int4M8");
  else if (M <= 16) f += run_config<T, Z, G, 2, tuned::Int4M16>(p, "Int4M16");
  else if (M <= 32) f += run_config<T, Z, G, 4, tuned::Int4M32>(p, "Int4M32");
  else f += run_config<T, Z, G, 8, tuned::Int4M64>(p, "Int4M64");
  if (full && M <= 8) {
    f += run_config<T, Z, G, 1, Int4Tile<1, 8, 1, 2, 2>>(p, "<1,8,1,2,2>");
    f += run_config<T, Z, G, 1, Int4Tile<2, 2, 1, 4, 3>>(p, "<2,2,1,4,3>");
  }
  if (full && M <= 16) f += run_config<T, Z, G, 2, Int4Tile<2, 1, 4, 2, 5>>(p, "<2,1,4,2,5>");
  if (full) f += run_config<T, Z, G, 8, Int4Tile<2, 2, 2, 2, 3>>(p, "<2,2,2,2,3>");
  return f;
}

template <typename T>
int run_case(const Case& c, uint32_t seed, bool full) {
  Problem p = make_problem(c, seed);
  const bool u8 = c.zk == Int4Zeros::kUint8;
  switch (c.G) {
    case 32: return u8 ? run_all_configs<T, Int4Zeros::kUint8, 32>(p, full) : run_all_configs<T, Int4Zeros::kFloat, 32>(p, full);
    case 64: return u8 ? run_all_configs<T, Int4Zeros::kUint8, 64>(p, full) : run_all_configs<T, Int4Zeros::kFloat, 64>(p, full);
    default: return u8 ? run_all_configs<T, Int4Zeros::kUint8, 128>(p, full) : run_all_configs<T, Int4Zeros::kFloat, 128>(p, full);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool full = argc > 1 && std::string(argv[1]) == "--full";
  const auto U8 = Int4Zeros::kUint8, FL = Int4Zeros::kFloat;
  // (M, N, K, G, x bf16, scales bf16, zeros, split)
  const std::vector<Case> cases = {
      {1, 48, 160, 32, true, true, U8, 0},      // odd KB (K padded to 192), partial CTA over N
      {3, 32, 4096, 128, true, false, U8, 1},   // 8 stages: the steady state of the pipeline
      {5, 64, 512, 128, false, false, U8, 2},   // split-K cluster of 2
      {16, 80, 384, 64, true, false, U8, 2},    // M = 16, exact path, fp16 scales under bf16 x
      {13, 32, 1024, 128, false, false, FL, 4}, // float offsets (fold) at M <= 16, cluster of 4
      {20, 144, 512, 32, false, true, FL, 2},   // GEMM M 17-32, bf16 offsets under fp16 x
      {33, 96, 256, 128, true, true, U8, 1},    // GEMM M 33-64, integer zeros folded
      {64, 64, 1088, 64, true, true, FL, 8},    // M = 64, cluster of 8, K = 17 blocks
  };
  int failures_total = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    for (int dt = 0; dt < 2; ++dt) {
      Case c = cases[i];
      if (dt == 1) {
        if (!full) continue;
        c.x_bf16 = !c.x_bf16;
      }
      const int f = c.x_bf16 ? run_case<__nv_bfloat16>(c, 11 + i, full) : run_case<__half>(c, 11 + i, full);
      std::printf("case %zu M=%d N=%d K=%d G=%d %s %s zeros split=%d: %s\n", i, c.M, c.N, c.K, c.G,
                  c.x_bf16 ? "bf16" : "fp16", c.zk == U8 ? "uint8" : "float", c.split, f ? "FAIL" : "ok");
      failures_total += f;
    }
  }
  for (int zk = 0; zk < 2; ++zk) {  // the M > 64 path's dequantize kernel, bit for bit
    Problem p = make_problem({1, 48, 160, 32, zk == 0, zk != 0, zk == 0 ? U8 : FL, 0}, 99 + zk);
    const int f = zk == 0 ? run_dequant<__nv_bfloat16, Int4Zeros::kUint8, 32>(p) : run_dequant<__half, Int4Zeros::kFloat, 32>(p);
    std::printf("dequant %s zeros: %s\n", zk == 0 ? "uint8" : "float", f ? "FAIL" : "ok");
    failures_total += f;
  }
  failures += failures_total;
  std::printf(failures ? "%d failure(s)\n" : "emulated int4: all cases match\n", failures);
  return failures ? 1 : 0;
}
