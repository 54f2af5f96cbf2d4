// Host-side checks of cuda/int4.cuh, the INT4 kernels' index math and dequantization bit tricks:
// every nibble value at every position of a packed word, every lane and word of a tile, every zero
// point, fp16 and bf16. Built with g++ and run by the host-test runner; exit status 0 = pass.
//
// The references are independent of the helpers: IEEE half / bfloat16 bit patterns decoded by hand,
// and the mma.m16n8k16 fragment layouts as the PTX ISA documents them.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <set>
#include <utility>

#include "int4.cuh"

using namespace tinyinfer::int4;

static int failures = 0;

#define CHECK(cond, ...)                          \
  do {                                            \
    if (!(cond)) {                                \
      if (++failures <= 20) {                     \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);                 \
        std::printf("\n");                        \
      }                                           \
    }                                             \
  } while (0)

// IEEE binary16 bits -> value (normal and subnormal; no inf/nan needed here).
static double half_value(uint32_t bits) {
  const int sign = (bits >> 15) & 1, exp = (bits >> 10) & 0x1F, man = bits & 0x3FF;
  const double mag = exp == 0 ? std::ldexp(man, -24) : std::ldexp(1024 + man, exp - 25);
  return sign ? -mag : mag;
}

// bfloat16 bits -> value (the top half of a float32).
static double bf16_value(uint32_t bits) {
  const int sign = (bits >> 15) & 1, exp = (bits >> 7) & 0xFF, man = bits & 0x7F;
  const double mag = exp == 0 ? std::ldexp(man, -133) : std::ldexp(128 + man, exp - 134);
  return sign ? -mag : mag;
}

// PTX ISA, mma.m16n8k16 with .f16/.bf16 inputs: A register r of lane (g, t) holds rows g + 8 * (r & 1),
// k slots 2t + h + 8 * (r >> 1) for its halves h; B register b holds k slots 2t + h + 8b, column g.
static int a_row(int lane, int r) { return (lane >> 2) + 8 * (r & 1); }
static int a_slot(int lane, int r, int h) { return 2 * (lane & 3) + h + 8 * (r >> 1); }
static int b_slot(int lane, int b, int h) { return 2 * (lane & 3) + h + 8 * b; }

static void test_tile_is_a_bijection() {
  std::set<std::pair<int, int>> seen;
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < kWordsPerLane; ++j)
      for (int i = 0; i < 8; ++i) {
        const int row = nibble_row(lane, i), k = nibble_k(lane, j, i);
        CHECK(row >= 0 && row < kTileN && k >= 0 && k < kTileK, "lane %d word %d nibble %d -> (%d, %d)", lane, j, i,
              row, k);
        CHECK(seen.insert({row, k}).second, "(%d, %d) held twice", row, k);
      }
  CHECK(seen.size() == kTileN * kTileK, "tile covers %zu of %d weights", seen.size(), kTileN * kTileK);
}

// The A operand (weights) and B operand (x) must agree, slot by slot, on which column k they carry;
// a slot's B value comes from the lane of the same t in any row group g.
static void test_fragments_agree_with_x_loads() {
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < kWordsPerLane; ++j)
      for (int r = 0; r < 4; ++r)
        for (int h = 0; h < 2; ++h) {
          const int i = r + 4 * h;  // register r holds nibbles r (low half) and r + 4 (high half)
          CHECK(nibble_row(lane, i) == a_row(lane, r), "lane %d reg %d: row %d, mma expects %d", lane, r,
                nibble_row(lane, i), a_row(lane, r));
          const int slot = a_slot(lane, r, h);
          for (int blane = lane & 3; blane < 32; blane += 4) {
            // x load `half` = j / 2, element e = 4 (j % 2) + 2b + h feeds B register b of word j.
            const int b = r >> 1, e = 4 * (j & 1) + 2 * b + h;
            CHECK(b_slot(blane, b, h) == slot, "slot mismatch lane %d reg %d half %d", lane, r, h);
            CHECK(x_k(blane, j >> 1, e) == nibble_k(lane, j, i), "lane %d word %d reg %d half %d: weight k %d, x k %d",
                  lane, j, r, h, nibble_k(lane, j, i), x_k(blane, j >> 1, e));
          }
        }
  // Words 0-1 stay below column 32 and words 2-3 at or above it: no mma straddles a group of 32.
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < 8; ++i) CHECK((nibble_k(lane, j, i) >= 32) == (j >= 2), "word %d crosses k=32", j);
}

static void test_pair_index() {
  std::set<int> seen;
  for (int row = 0; row < 16; ++row) {
    const int p = pair_index(row);
    CHECK(p / 2 == (row & 7) && p % 2 == row / 8, "row %d -> pair entry %d", row, p);
    seen.insert(p);
  }
  CHECK(seen.size() == 16, "pair_index is not a permutation of 0..15");
}

// Every nibble value v at every position i of a word, under several backgrounds, through the fp16 and
// bf16 tricks, for every zero point: the register's halves become exactly v - z and the neighbour.
static void test_dequant_every_nibble() {
  const uint32_t backgrounds[] = {0x00000000u, 0xFFFFFFFFu, 0x5A3C96E1u, 0x12345678u, 0x87654321u};
  for (uint32_t bg : backgrounds)
    for (int i = 0; i < 8; ++i)
      for (uint32_t v = 0; v < 16; ++v) {
        const uint32_t word = (bg & ~(0xFu << (4 * i))) | (v << (4 * i));
        const int r = i & 3, h = i >> 2;
        const uint32_t other = (word >> (4 * (r + 4 * (1 - h)))) & 0xF;  // the register's other nibble
        // fp16: 1024 + q (even r) or 1024 + 16 q (odd r), then + -(1024 + z) or * 1/16 + -(64 + z).
        const uint32_t p16 = fp16_pair_bits(word, r);
        const double mine = half_value(h ? p16 >> 16 : p16 & 0xFFFF);
        const double theirs = half_value(h ? p16 & 0xFFFF : p16 >> 16);
        const double mult = (r & 1) ? 16.0 : 1.0;
        CHECK(mine == 1024 + mult * v, "fp16 word %08x nibble %d: %g, want %g", word, i, mine, 1024 + mult * v);
        CHECK(theirs == 1024 + mult * other, "fp16 word %08x nibble %d: neighbour %g", word, i, theirs);
        CHECK(half_value(kFp16Sixteenth & 0xFFFF) == 1.0 / 16 && half_value(kFp16Sixteenth >> 16) == 1.0 / 16,
              "1/16 constant");
        // bf16: 128 + q for every register.
        const uint32_t pb = bf16_pair_bits(word, r);
        CHECK(bf16_value(h ? pb >> 16 : pb & 0xFFFF) == 128.0 + v, "bf16 word %08x nibble %d", word, i);
        CHECK(bf16_value(h ? pb & 0xFFFF : pb >> 16) == 128.0 + other, "bf16 word %08x nibble %d: neighbour",
              word, i);
        for (uint32_t z = 0; z <= 16; ++z) {  // GPTQ v1 checkpoints can carry z = 16
          const uint32_t zb = fp16_zero_bits(z, r);
          CHECK((zb & 0xFFFF) == (zb >> 16), "fp16 zero bits differ between halves");
          // The device op (add.f16x2 / fma.rn.f16x2) rounds once; the exact result is a small integer,
          // which fp16 represents, so exactness here means the device gets it bit for bit.
          const double got = (r & 1) ? mine / 16 + half_value(zb & 0xFFFF) : mine + half_value(zb & 0xFFFF);
          CHECK(got == double(v) - double(z), "fp16 nibble %d v %u z %u -> %g", i, v, z, got);
          const uint32_t bz = bf16_zero_bits(z);
          CHECK((bz & 0xFFFF) == (bz >> 16), "bf16 zero bits differ between halves");
          CHECK(bf16_value(h ? pb >> 16 : pb & 0xFFFF) + bf16_value(bz & 0xFFFF) == double(v) - double(z),
                "bf16 nibble %d v %u z %u", i, v, z);
        }
      }
  // The magic constants are what the comments say.
  CHECK(half_value(kFp16Magic & 0xFFFF) == 1024.0 && bf16_value(kBf16Magic & 0xFFFF) == 128.0, "magic constants");
  CHECK(bf16_value(kBf16One & 0xFFFF) == 1.0 && bf16_value(kBf16One >> 16) == 1.0, "bf16 one");
}

int main() {
  test_tile_is_a_bijection();
  test_fragments_agree_with_x_loads();
  test_pair_index();
  test_dequant_every_nibble();
  if (failures) {
    std::printf("test_int4: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_int4: all checks passed\n");
  return 0;
}
