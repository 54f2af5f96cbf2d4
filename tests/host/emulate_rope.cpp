// Runs the shipped RoPE + K/V-write kernel of cuda/rope_store_kv.cu on a CPU (emulate_cuda.h) and checks it
// bit for bit against the op written out element by element: with (c, s) the halves of the table row at
// the token's position, out[i] = R(R(x[i] c[i]) + R(-x[i + D/2] s[i])) and
// out[i + D/2] = R(R(x[i + D/2] c[i]) + R(x[i] s[i])) (R: rounding to the model dtype after every op, as
// separate tensor ops round) -- the same bits the former kernel produced from per-token cos/sin rows
// cat(c, c), cat(s, s). Built and run by tests/test_emulated_kernels.py; exit status 0 = pass.
//
// Hostile inputs: q, k, v as strided views into one fused QKV buffer (as the model passes them), shuffled
// positions, a position outside the table (its outputs and cache row must be NaN), padding slots (-1: not
// stored), caches poisoned with NaN everywhere (untouched entries must keep their bits), fp32 / fp16 /
// bf16, 16-byte vectors and the one-value fallback.
#define TINYINFER_EMULATE 1
#include "emulate_cuda.h"
#include "../../cuda/rope_store_kv.cu"

#include <cstring>
#include <random>
#include <string>
#include <vector>


using namespace tinyinfer;

namespace {

template <typename T> T cast(float f) { return from_float<T>(f); }
template <typename T> uint32_t bits(T v) { uint32_t b = 0; std::memcpy(&b, &v, sizeof(T)); return b; }
template <typename T> float round_to(float f) { return to_float(from_float<T>(f)); }

template <typename T, int N>
int run(int T_, int Hq, int Hkv, int D, int P, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int width = (Hq + 2 * Hkv) * D, NB = 2 * T_ + 3, BS = 4;
  std::vector<T> qkv(size_t(T_) * width), table(size_t(P) * D);
  for (auto& x : qkv) x = cast<T>(normal(rng));
  for (int p = 0; p < P; ++p)
    for (int i = 0; i < D / 2; ++i) {
      const float angle = p * std::pow(10000.f, -2.f * i / D);
      table[size_t(p) * D + i] = cast<T>(std::cos(angle) * 1.1f);      // attention scaling 1.1
      table[size_t(p) * D + D / 2 + i] = cast<T>(std::sin(angle) * 1.1f);
    }
  std::vector<int64_t> positions(T_), slots(T_);
  std::vector<int64_t> free_slots(NB * BS);
  for (int i = 0; i < NB * BS; ++i) free_slots[i] = i;
  std::shuffle(free_slots.begin(), free_slots.end(), rng);
  for (int t = 0; t < T_; ++t) {
    positions[t] = std::uniform_int_distribution<int>(0, P - 1)(rng);
    slots[t] = t % 5 == 3 ? -1 : free_slots[t];
  }
  positions[T_ - 1] = P;  // outside the table: NaN rows, stored as NaN in its (valid) slot
  slots[T_ - 1] = free_slots[T_ - 1];
  const T nan_t = cast<T>(NAN);
  std::vector<T> k_cache(size_t(NB) * BS * Hkv * D, nan_t), v_cache(size_t(NB) * BS * Hkv * D, nan_t);
  std::vector<T> q_out(size_t(T_) * Hq * D, nan_t), k_out(size_t(T_) * Hkv * D, nan_t);

  RopeStoreKVParams p{};
  p.q = qkv.data(); p.k = qkv.data() + Hq * D; p.v = qkv.data() + (Hq + Hkv) * D;
  p.cos_sin = table.data(); p.positions = positions.data();
  p.q_out = q_out.data(); p.k_out = k_out.data(); p.k_cache = k_cache.data(); p.v_cache = v_cache.data();
  p.slot_mapping = slots.data();
  p.num_tokens = T_; p.num_q_heads = Hq; p.num_kv_heads = Hkv; p.head_dim = D; p.head_dim_v = D;
  p.num_blocks = NB; p.block_size = BS; p.num_positions = P;
  p.q_token_stride = p.k_token_stride = p.v_token_stride = width;
  p.q_head_stride = p.k_head_stride = p.v_head_stride = D;
  p.cos_sin_stride = D;
  p.k_cache_strides = p.v_cache_strides = CacheStrides{int64_t(BS) * Hkv * D, int64_t(Hkv) * D, D};
  const int64_t units = rope_store_units(Hq, Hkv, D, D, N);
  emu::run_grid(dim3(T_, unsigned(ceil_div(units, kRopeThreads))), kRopeThreads, 0,
                [&] { rope_store_kv_kernel<T, N>(p); });

  int fails = 0;
  std::vector<char> stored(k_cache.size(), 0);
  for (int t = 0; t < T_; ++t) {
    const bool bad = positions[t] >= P;
    const T* row = table.data() + size_t(bad ? 0 : positions[t]) * D;
    for (int h = 0; h < Hq + Hkv; ++h) {
      const bool is_q = h < Hq;
      const T* x = qkv.data() + size_t(t) * width + size_t(h) * D;
      const T* got = is_q ? q_out.data() + (size_t(t) * Hq + h) * D : k_out.data() + (size_t(t) * Hkv + h - Hq) * D;
      for (int i = 0; i < D; ++i) {
        const int j = i % (D / 2);
        const float c = to_float(row[j]), s = to_float(row[D / 2 + j]);
        const float x1 = to_float(x[j]), x2 = to_float(x[j + D / 2]);
        const float want = i < D / 2 ? round_to<T>(round_to<T>(x1 * c) + round_to<T>(-x2 * s))
                                     : round_to<T>(round_to<T>(x2 * c) + round_to<T>(x1 * s));
        const bool ok = bad ? std::isnan(to_float(got[i])) : bits(got[i]) == bits(cast<T>(want));
        if (!ok && ++fails <= 3) std::printf("  t=%d head %d dim %d: got %g want %g\n", t, h, i, to_float(got[i]), want);
        if (!is_q && slots[t] >= 0) {
          const size_t e = (size_t(slots[t]) * Hkv + (h - Hq)) * D + i;
          stored[e] = 1;
          if (bits(k_cache[e]) != bits(got[i]) && !(bad && std::isnan(to_float(k_cache[e]))) && ++fails <= 3)
            std::printf("  k_cache slot %lld differs from k_out\n", (long long)slots[t]);
          const T* v = qkv.data() + size_t(t) * width + size_t(Hq + Hkv + h - Hq) * D;
          if (bits(v_cache[e]) != bits(v[i]) && ++fails <= 3) std::printf("  v_cache slot %lld wrong\n", (long long)slots[t]);
        }
      }
    }
  }
  for (size_t e = 0; e < stored.size(); ++e)
    if (!stored[e] && (bits(k_cache[e]) != bits(nan_t) || bits(v_cache[e]) != bits(nan_t)) && ++fails <= 3)
      std::printf("  cache entry %zu written without a slot\n", e);
  return fails;
}

}  // namespace

int main(int argc, char** argv) {
  const bool full = argc > 1 && std::string(argv[1]) == "--full";
  int f = 0;
  for (int rep = 0; rep < (full ? 4 : 1); ++rep) {
    f += run<__nv_bfloat16, 8>(9, 4, 2, 64, 50, 1 + rep);
    f += run<__half, 8>(7, 8, 8, 128, 300, 2 + rep);
    f += run<float, 4>(6, 2, 1, 32, 17, 3 + rep);
    f += run<__nv_bfloat16, 1>(5, 3, 1, 10, 11, 4 + rep);  // D/2 = 5: no 16-byte vectors
    f += run<__half, 1>(4, 4, 2, 64, 40, 5 + rep);
  }
  std::printf(f ? "%d failure(s)\n" : "emulated rope_store_kv: bit for bit\n", f);
  return f ? 1 : 0;
}
