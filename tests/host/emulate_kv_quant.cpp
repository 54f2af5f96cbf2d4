// The quantized KV cache's CUDA code (cuda/kv_quant.cuh, and the quantized tile load of
// cuda/paged_attention.cuh) on a CPU through emulate_cuda.h, against independent float64 formulas. Built and
// run by tests/test_emulated_kernels.py:  g++ -std=c++17 -I cuda -I tests/host emulate_kv_quant.cpp
//   1. e4m3: every byte decodes to (-1)^s 2^(e-7) (1 + m/8) (e > 0) or m 2^-9 (e = 0), 0x7F / 0xFF NaN;
//      encode(x) is the nearest finite e4m3 value (ties to an even mantissa) for 100k values in +-448.
//   2. the K/V write (store_kv_quant_row, every dtype): s = fp16(max(amax / 127 (int8) or 448 (fp8),
//      2^-14)); int8 q = round_half_even(x / s) in float64, fp8 = the nearest e4m3 of x / s; -1 slots
//      untouched.
//   3. paged attention over int8 / fp8 caches (GQA decode, verify, MLA's aliased latent rows): float64
//      attention of the dequantized values (byte x scale); NaN in every unowned slot of the caches' scales.
#define TINYINFER_EMULATE 1
#include "emulate_cuda.h"
#include "../../cuda/kv_quant.cuh"
#include "../../cuda/paged_attention.cuh"
#include "../../cuda/tuned.cuh"
#include "emulate_attention_launch.h"

#include <random>

using namespace tinyinfer;

namespace {

int fails = 0;
void check(bool ok, const char* what, double got, double want) {
  if (!ok && ++fails <= 8) std::printf("  %s: got %.9g want %.9g\n", what, got, want);
}

double e4m3_value(int c) {  // the format's definition, in float64
  const int s = c >> 7, e = (c >> 3) & 15, m = c & 7;
  const double v = e == 0 ? std::ldexp(m, -9) : std::ldexp(1.0 + m / 8.0, e - 7);
  return s ? -v : v;
}

void test_fp8_codes(std::mt19937& rng) {
  for (int c = 0; c < 256; ++c) {
    const float got = fp8_e4m3_decode(static_cast<uint8_t>(c));
    if ((c & 0x7f) == 0x7f) check(std::isnan(got), "decode NaN", got, NAN);
    else check(got == e4m3_value(c), "decode", got, e4m3_value(c));
  }
  std::uniform_real_distribution<float> u(-448.f, 448.f);
  std::uniform_real_distribution<float> small(-0.02f, 0.02f);
  for (int i = 0; i < 100000; ++i) {
    const float x = i % 4 == 0 ? small(rng) : i % 4 == 1 ? std::ldexp(u(rng), -(i % 12)) : u(rng);
    int best = -1;
    double err = INFINITY;
    for (int c = 0; c < 256; ++c) {
      if ((c & 0x7f) == 0x7f || (c == 0x80)) continue;  // NaN, and -0 (ties with +0 resolved by sign below)
      const double d = std::fabs(e4m3_value(c) - double(x));
      if (d < err || (d == err && (c & 1) == 0)) { err = d; best = c; }
    }
    const uint8_t got = fp8_e4m3_encode(x);
    check(e4m3_value(got) == e4m3_value(best), "encode", e4m3_value(got), e4m3_value(best));
  }
}

template <typename T> T to_t(float f);
template <> float to_t<float>(float f) { return f; }
template <> __nv_bfloat16 to_t<__nv_bfloat16>(float f) { return __float2bfloat16_rn(f); }
template <> __half to_t<__half>(float f) { return __float2half_rn(f); }

template <typename T>
void test_store(std::mt19937& rng, int kind) {
  const int Tn = 9, H = 3, D = 64, NB = 4, BS = 8;
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<T> k(Tn * H * D);
  for (size_t i = 0; i < k.size(); ++i) k[i] = to_t<T>(normal(rng) * std::ldexp(1.f, int(i / (H * D)) - 4));
  std::vector<uint8_t> cache(NB * BS * H * D, 0xAB);
  std::vector<__half> scales(NB * BS * H);
  std::vector<int64_t> slots = {5, 0, -1, 31, 12, 7, 20, 1, 30};
  StoreKVQuantParams p{};
  p.src[0] = k.data();
  p.src_token_stride[0] = H * D;
  p.src_head_stride[0] = D;
  p.cache[0] = cache.data();
  p.cache_strides[0] = {BS * H * D, H * D, D};
  p.scale[0] = scales.data();
  p.scale_strides[0][0] = BS * H;
  p.scale_strides[0][1] = H;
  p.scale_strides[0][2] = 1;
  p.width[0] = D;
  p.slot_mapping = slots.data();
  p.num_tokens = Tn; p.num_heads = H; p.num_blocks = NB; p.block_size = BS; p.kind = kind;
  for (int row = 0; row < 2 * Tn * H + 5; ++row) store_kv_quant_row<T>(p, row);
  std::vector<bool> written(NB * BS, false);
  for (int t = 0; t < Tn; ++t) {
    if (slots[t] < 0) continue;
    written[slots[t]] = true;
    for (int h = 0; h < H; ++h) {
      const uint8_t* q = &cache[(slots[t] * H + h) * D];
      double amax = 0;
      for (int d = 0; d < D; ++d) amax = std::max(amax, std::fabs(double(to_float(k[(t * H + h) * D + d]))));
      const double qmax = kind == kKVInt8 ? 127 : 448;
      const double s = double(__half2float(__float2half_rn(float(std::max(amax / qmax, std::ldexp(1.0, -14))))));
      check(__half2float(scales[slots[t] * H + h]) == s, "scale", __half2float(scales[slots[t] * H + h]), s);
      for (int d = 0; d < D; ++d) {
        const double r = double(to_float(k[(t * H + h) * D + d])) / s;
        if (kind == kKVInt8) {
          const double want = std::max(-127.0, std::min(127.0, std::nearbyint(r)));
          check(double(int8_t(q[d])) == want, "int8 value", int8_t(q[d]), want);
        } else {
          const double c = std::max(-448.0, std::min(448.0, r));
          double best = INFINITY;
          for (int b = 0; b < 256; ++b)
            if ((b & 0x7f) != 0x7f) best = std::min(best, std::fabs(e4m3_value(b) - c));
          check(std::fabs(e4m3_value(q[d]) - c) == best, "fp8 nearest", e4m3_value(q[d]), c);
        }
      }
    }
  }
  for (int s = 0; s < NB * BS; ++s)
    if (!written[s]) for (int e = 0; e < H * D; ++e) check(cache[s * H * D + e] == 0xAB, "unwritten slot", cache[s * H * D + e], 0xAB);
}

}  // namespace

#include "emulate_kv_quant_attention.h"

int main() {
  std::mt19937 rng(7);
  test_fp8_codes(rng);
  for (int kind : {kKVInt8, kKVFp8}) {
    test_store<float>(rng, kind);
    test_store<__half>(rng, kind);
    test_store<__nv_bfloat16>(rng, kind);
    test_attention<__half>(rng, kind);
    test_attention<__nv_bfloat16>(rng, kind);
  }
  std::printf("%s (%d failures)\n", fails ? "FAILED" : "ok", fails);
  return fails ? 1 : 0;
}
