// Host-side run of the store_kv kernel body (cuda/store_kv.cuh) -- the exact per-token code the GPU
// executes, driven over an emulated grid (every token x every lane) -- against an element-by-element
// reference written from the op's contract. Covers every copy width (16/8/4/2/1-byte words), padding
// and out-of-range slots, strided sources and caches, MLA (no V), and several lane counts. The cache is
// poisoned first, so rows the kernel must not touch are checked too. Exit status 0 = pass.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "store_kv.cuh"

#include "check.h"

using namespace tinyinfer;


struct alignas(16) Word16 { uint32_t x, y, z, w; };  // stands in for CUDA's uint4
struct alignas(8) Word8 { uint32_t x, y; };          // uint2

// One tensor described in ELEMENTS: base offset into its buffer and strides of dims 0..2 (last = 1).
struct Layout {
  int64_t base;
  int64_t s0, s1, s2;  // token/head strides for sources; block/offset/head for caches
};

struct Case {
  const char* name;
  int64_t elem;            // element size in bytes (2: fp16/bf16, 4: fp32)
  int64_t T, H, D, Dv;     // Dv = 0: MLA, no V
  int64_t NB, BS;
  Layout k, v, kc, vc;     // in elements
  int64_t expect_word;     // the copy width the launcher must pick
};

template <typename Word>
static void run_grid(const StoreKVParams& bytes, int64_t lanes) {
  const StoreKVParams p = store_kv_in_words(bytes, sizeof(Word));
  for (int64_t t = 0; t < p.num_tokens; ++t)
    for (int64_t lane = 0; lane < lanes; ++lane) store_kv_token<Word>(p, t, lane, lanes);
}

static void run_case(const Case& c, int64_t lanes, std::mt19937& rng) {
  const bool has_v = c.Dv > 0;
  const size_t buffer = 1 << 16;  // elements per buffer, enough for every layout below
  // Byte buffers over-aligned to 16 so each layout's `base` alone decides the alignment.
  std::vector<Word16> kbuf(buffer * c.elem / 16 + 1), vbuf(kbuf.size()), kcbuf(kbuf.size()), vcbuf(kbuf.size());
  auto bytes_of = [](std::vector<Word16>& b) { return reinterpret_cast<uint8_t*>(b.data()); };
  for (auto* b : {&kbuf, &vbuf})
    for (auto& w : *b) w = Word16{uint32_t(rng()), uint32_t(rng()), uint32_t(rng()), uint32_t(rng())};
  std::memset(kcbuf.data(), 0xFF, kcbuf.size() * 16);  // poison: all-ones is a NaN in every float type
  std::memset(vcbuf.data(), 0xFF, vcbuf.size() * 16);
  std::vector<uint8_t> kc_want(bytes_of(kcbuf), bytes_of(kcbuf) + kcbuf.size() * 16);
  std::vector<uint8_t> vc_want(bytes_of(vcbuf), bytes_of(vcbuf) + vcbuf.size() * 16);

  // Slots: a few distinct valid ones, padding (-1) and one past the end (skipped, never written).
  std::vector<int64_t> slots(c.T);
  std::vector<int64_t> pool(c.NB * c.BS);
  for (size_t i = 0; i < pool.size(); ++i) pool[i] = int64_t(i);
  std::shuffle(pool.begin(), pool.end(), rng);
  for (int64_t t = 0; t < c.T; ++t) slots[t] = t % 4 == 1 ? -1 : (t == c.T - 1 ? c.NB * c.BS : pool[t]);

  // Reference: element by element, straight from the contract.
  auto ref_copy = [&](uint8_t* src, const Layout& s, std::vector<uint8_t>& dst, const Layout& d, int64_t dim) {
    for (int64_t t = 0; t < c.T; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0 || slot >= c.NB * c.BS) continue;
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t i = 0; i < dim; ++i) {
          const int64_t from = s.base + t * s.s0 + h * s.s1 + i;
          const int64_t to = d.base + (slot / c.BS) * d.s0 + (slot % c.BS) * d.s1 + h * d.s2 + i;
          std::memcpy(&dst[to * c.elem], src + from * c.elem, c.elem);
        }
    }
  };
  ref_copy(bytes_of(kbuf), c.k, kc_want, c.kc, c.D);
  if (has_v) ref_copy(bytes_of(vbuf), c.v, vc_want, c.vc, c.Dv);

  // The params bindings.cpp builds: pointers, and every length and stride in bytes.
  const int64_t e = c.elem;
  StoreKVParams p{};
  p.k = bytes_of(kbuf) + c.k.base * e;
  p.k_cache = bytes_of(kcbuf) + c.kc.base * e;
  p.slot_mapping = slots.data();
  p.num_tokens = c.T;
  p.num_heads = c.H;
  p.num_blocks = c.NB;
  p.block_size = c.BS;
  p.k_row_words = c.D * e;
  p.k_token_stride = c.k.s0 * e;
  p.k_head_stride = c.k.s1 * e;
  p.k_cache_strides = {c.kc.s0 * e, c.kc.s1 * e, c.kc.s2 * e};
  if (has_v) {
    p.v = bytes_of(vbuf) + c.v.base * e;
    p.v_cache = bytes_of(vcbuf) + c.vc.base * e;
    p.v_row_words = c.Dv * e;
    p.v_token_stride = c.v.s0 * e;
    p.v_head_stride = c.v.s1 * e;
    p.v_cache_strides = {c.vc.s0 * e, c.vc.s1 * e, c.vc.s2 * e};
  }
  const int64_t word = store_kv_word_bytes(p);
  CHECK(word == c.expect_word, "%s: copy width %lld bytes, expected %lld", c.name, (long long)word,
        (long long)c.expect_word);
  const StoreKVParams words = store_kv_in_words(p, word);
  const int64_t threads = store_kv_threads(words), chunks = store_kv_chunks(words, threads);
  CHECK(threads % 32 == 0 && threads >= 32 && threads <= 256, "%s: %lld threads", c.name, (long long)threads);
  CHECK(chunks >= 1 && chunks <= 64, "%s: %lld chunks", c.name, (long long)chunks);
  if (lanes == 0) lanes = threads * chunks;  // the launch shape the GPU uses
  switch (word) {
    case 16: run_grid<Word16>(p, lanes); break;
    case 8: run_grid<Word8>(p, lanes); break;
    case 4: run_grid<uint32_t>(p, lanes); break;
    case 2: run_grid<uint16_t>(p, lanes); break;
    default: run_grid<uint8_t>(p, lanes); break;
  }
  CHECK(std::memcmp(kc_want.data(), bytes_of(kcbuf), kc_want.size()) == 0, "%s (lanes %lld): k_cache differs",
        c.name, (long long)lanes);
  CHECK(std::memcmp(vc_want.data(), bytes_of(vcbuf), vc_want.size()) == 0, "%s (lanes %lld): v_cache differs",
        c.name, (long long)lanes);
}

// Contiguous layouts in elements: source (T, H, D) and cache (NB, BS, H, D).
static Layout src(int64_t H, int64_t D, int64_t base = 0) { return {base, H * D, D, 1}; }
static Layout cache(int64_t BS, int64_t H, int64_t D, int64_t base = 0) { return {base, BS * H * D, H * D, D}; }

int main() {
  std::mt19937 rng(1234);
  const Case cases[] = {
      // fp16/bf16 head_dim 64, GQA 2 kv heads: everything 16-byte aligned.
      {"bf16 contiguous", 2, 9, 2, 64, 64, 5, 4, src(2, 64), src(2, 64), cache(4, 2, 64), cache(4, 2, 64), 16},
      // fp32, head_dim 128, MHA-like 4 heads, block size 16.
      {"fp32 contiguous", 4, 17, 4, 128, 128, 3, 16, src(4, 128), src(4, 128), cache(16, 4, 128), cache(16, 4, 128), 16},
      // K a slice of a fused qkv buffer (token stride 3*H*D), V at an offset of that buffer.
      {"fp16 strided source", 2, 6, 2, 64, 64, 4, 4, {0, 3 * 128, 64, 1}, {256, 3 * 128, 64, 1},
       cache(4, 2, 64), cache(4, 2, 64), 16},
      // head-major storage inside each block, viewed as (NB, BS, H, D).
      {"fp16 permuted cache", 2, 8, 2, 64, 64, 4, 4, src(2, 64), src(2, 64), {0, 4 * 2 * 64, 64, 4 * 64},
       {0, 4 * 2 * 64, 64, 4 * 64}, 16},
      // MLA: one latent head of 512 + 64, no V.
      {"bf16 MLA latent", 2, 7, 1, 576, 0, 3, 16, src(1, 576), {}, cache(16, 1, 576), {}, 16},
      // Dv != D and a cache at an 8-byte (not 16) offset.
      {"fp16 8-byte aligned", 2, 5, 2, 16, 8, 3, 4, src(2, 16), src(2, 8), cache(4, 2, 16, 4), cache(4, 2, 8), 8},
      {"fp32 head_dim 3", 4, 6, 2, 3, 3, 4, 2, src(2, 3), src(2, 3), cache(2, 2, 3), cache(2, 2, 3), 4},
      {"fp16 head_dim 5", 2, 6, 3, 5, 5, 4, 2, src(3, 5), src(3, 5), cache(2, 3, 5), cache(2, 3, 5), 2},
      {"fp16 odd base", 2, 4, 1, 8, 8, 2, 4, src(1, 8, 1), src(1, 8), cache(4, 1, 8), cache(4, 1, 8), 2},
  };
  for (const Case& c : cases)
    for (int64_t lanes : {0, 1, 32, 128, 256}) run_case(c, lanes, rng);  // 0: the launcher's own
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("store_kv.cuh: all checks passed\n");
  return 0;
}
