// Checks the host implementations of cuda/ptx.cuh (tests/host/emulate_ptx.h) against plain matrix
// products, so the emulated kernels' tensor-core paths rest on a tested base:
//   - ldmatrix.x4 of a row-major 16x16 A tile + ldmatrix.x2.trans of a row-major 16x8 B (k x n), then
//     mma.m16n8k16, equals A @ B + C in double (fp16 and bf16, random values);
//   - the attention kernel's operand forms: B from a [n][k] tile (K rows, ldmatrix.x4, two n-tiles)
//     and from a [k][n] tile (V rows, ldmatrix.x4.trans, two n-tiles);
//   - the 16-bit roundings behind the packed f16x2/bf16x2 math against the compiler's own conversions.
// Built and run by tests/test_emulated_kernels.py; exit status 0 = pass.
#define TINYINFER_EMULATE 1
#include "emulate_cuda.h"
#include "../../cuda/ptx.cuh"

#include <random>

#include "check.h"

using namespace tinyinfer;

namespace {

template <typename T> uint16_t bits_of(double x);
template <> uint16_t bits_of<__half>(double x) { return __float2half_rn(float(x)).bits; }
template <> uint16_t bits_of<__nv_bfloat16>(double x) { return __float2bfloat16_rn(float(x)).bits; }
template <typename T> double value_of(uint16_t b);
template <> double value_of<__half>(uint16_t b) { return __half2float(__half{b}); }
template <> double value_of<__nv_bfloat16>(uint16_t b) { return __bfloat162float(__nv_bfloat16{b}); }

// One warp: A (16x16) and Bt (8 rows n x 16 k, i.e. K-like) and Bkn (16 k x 8 n, V-like) in "shared
// memory" with padded rows; D1 = A @ B through ldmatrix.x4 + ldmatrix.x2 (Bt), D2 through ldmatrix.x2.trans
// (Bkn); E = A @ [Bkn | Bkn2] (16 x 16) through one ldmatrix.x4.trans for both n-tiles.
template <typename T>
void check_mma(uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  constexpr int P = 24;  // row pitch in elements (16 + 8 padding)
  uint16_t A[16][P], Bt[16][P], Bkn[16][P];
  double a[16][16], b[16][16];  // b[k][n] for n in 0..15
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      A[i][j] = bits_of<T>(normal(rng));
      a[i][j] = value_of<T>(A[i][j]);
      Bkn[i][j] = bits_of<T>(normal(rng));   // row k = i, column n = j
      b[i][j] = value_of<T>(Bkn[i][j]);
    }
  for (int n = 0; n < 16; ++n)
    for (int k = 0; k < 16; ++k) Bt[n][k] = Bkn[k][n];
  float d1[32][4], d2[32][4], e[32][2][4];
  const float c0 = 0.25f;
  emu::run_grid(dim3(1), 32, 3 * 16 * P * 2, [&] {
    char* smem = emu::current->cta->smem;
    auto* sA = reinterpret_cast<uint16_t(*)[P]>(smem);
    auto* sBt = reinterpret_cast<uint16_t(*)[P]>(smem + 16 * P * 2);
    auto* sB = reinterpret_cast<uint16_t(*)[P]>(smem + 2 * 16 * P * 2);
    const int lane = threadIdx.x;
    for (int j = 0; j < 16; ++j) { sA[lane % 16][j] = A[lane % 16][j]; sBt[lane % 16][j] = Bt[lane % 16][j];
                                   sB[lane % 16][j] = Bkn[lane % 16][j]; }
    __syncwarp();
    uint32_t fa[4], fb[2], fv[2], fv4[4];
    ptx::ldmatrix_x4(fa, &sA[lane % 16][8 * (lane / 16)]);
    ptx::ldmatrix_x2(fb, &sBt[lane % 8][8 * ((lane / 8) % 2)]);          // n rows 0-7, k halves
    ptx::ldmatrix_x2_trans(fv, &sB[lane % 16][0]);                       // k rows 0-15, n 0-7
    ptx::ldmatrix_x4_trans(fv4, &sB[(lane % 8) + 8 * ((lane / 8) % 2)][8 * (lane / 16)]);
    float acc1[4] = {c0, c0, c0, c0}, acc2[4] = {0, 0, 0, 0}, acc3[2][4] = {};
    ptx::mma_16816<T>(acc1, fa, fb[0], fb[1]);
    ptx::mma_16816<T>(acc2, fa, fv[0], fv[1]);
    ptx::mma_16816<T>(acc3[0], fa, fv4[0], fv4[1]);
    ptx::mma_16816<T>(acc3[1], fa, fv4[2], fv4[3]);
    for (int i = 0; i < 4; ++i) { d1[lane][i] = acc1[i]; d2[lane][i] = acc2[i]; e[lane][0][i] = acc3[0][i];
                                  e[lane][1][i] = acc3[1][i]; }
  });
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
      for (int nt = 0; nt < 2; ++nt) {
        double want = 0;
        for (int k = 0; k < 16; ++k) want += a[row][k] * b[k][col + 8 * nt];
        const double tol = 1e-5 * (1 + std::fabs(want));
        if (nt == 0) {
          CHECK(std::fabs(d1[lane][i] - (want + c0)) <= tol, "ldmatrix.x2 B: lane %d elem %d got %g want %g",
                lane, i, d1[lane][i], want + c0);
          CHECK(std::fabs(d2[lane][i] - want) <= tol, "ldmatrix.x2.trans B: lane %d elem %d got %g want %g",
                lane, i, d2[lane][i], want);
        }
        CHECK(std::fabs(e[lane][nt][i] - want) <= tol, "ldmatrix.x4.trans n-tile %d: lane %d got %g want %g",
              nt, lane, e[lane][nt][i], want);
      }
    }
  }
}

void check_roundings(uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> mant(-1.0, 1.0);
  std::uniform_int_distribution<int> exps(-30, 20);
  for (int i = 0; i < 200000; ++i) {
    const double x = std::ldexp(mant(rng), exps(rng));
    const _Float16 h = static_cast<_Float16>(x);  // the compiler's correctly rounded conversion
    uint16_t hb;
    std::memcpy(&hb, &h, 2);
    CHECK(ptx::detail::double_to_half(x) == hb, "fp16 rounding of %.17g: got %04x want %04x", x,
          ptx::detail::double_to_half(x), hb);
    const float f = static_cast<float>(x);          // exact float inputs: float -> bf16 is the reference
    CHECK(ptx::detail::double_to_bf16(f) == __float2bfloat16_rn(f).bits, "bf16 rounding of %.9g", f);
  }
  // fma with one rounding: (1 + 2^-10) * (1 + 2^-10) + 0 = 1 + 2^-9 + 2^-20 -> 1 + 2^-9 in fp16
  const uint32_t one_ulp = 0x3C013C01u;
  CHECK(ptx::hfma2(one_ulp, one_ulp, 0) == 0x3C023C02u, "hfma2 rounding");
  CHECK(ptx::hadd2(0x3C003C00u, 0x3C003C00u) == 0x40004000u, "hadd2 1 + 1");
  CHECK(ptx::bfma2(0x3F803F80u, 0x40004000u, 0x3F803F80u) == 0x40404040u, "bfma2 1 * 2 + 1");
}

}  // namespace

int main() {
  for (uint32_t seed = 0; seed < 4; ++seed) {
    check_mma<__half>(seed);
    check_mma<__nv_bfloat16>(100 + seed);
  }
  check_roundings(7);
  std::printf(failures ? "%d failure(s)\n" : "emulated ptx: mma, ldmatrix and packed math match\n", failures);
  return failures ? 1 : 0;
}
