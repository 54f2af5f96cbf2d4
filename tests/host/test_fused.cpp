// Host-side checks of cuda/fused.cuh, the element math and work split of the fused kernels:
//   - rope_unit: over a token's units, every (q/k head, pair vector) is rotated exactly once and
//     every (V head, column vector) copied exactly once, for vector widths 1, 4 and 8;
//   - rope_pair: equals the rotate_half formula out = x * cos + rotate_half(x) * sin, written out
//     element by element from the op's definition, with fp32 rounding and with a bf16-like rounding
//     applied after every product and sum (as the reference's separate tensor ops round).
// Exit status 0 = pass.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "fused.cuh"

#include "check.h"

using namespace tinyinfer;


// Round to bfloat16 (nearest, ties to even) and back: what a bf16 tensor op does to its fp32 result.
static float round_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  bits &= 0xffff0000u;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

struct Fp32 {
  float operator()(float x) const { return x; }
};
struct Bf16 {
  float operator()(float x) const { return round_bf16(x); }
};

static void check_unit_cover(int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv, int64_t vec) {
  std::vector<int> rotated((Hq + Hkv) * D / 2, 0), copied(Hkv * Dv, 0);
  const int64_t total = rope_store_units(Hq, Hkv, D, Dv, vec);
  CHECK(total == (Hq + Hkv) * D / 2 / vec + Hkv * Dv / vec, "unit count %lld", (long long)total);
  for (int64_t u = 0; u < total; ++u) {
    const RopeUnit unit = rope_unit(u, Hq, Hkv, D, Dv, vec);
    for (int64_t i = 0; i < vec; ++i) {
      if (unit.is_rope) {
        CHECK(unit.head < Hq + Hkv && unit.column + i < D / 2, "rope unit %lld out of range", (long long)u);
        ++rotated[unit.head * (D / 2) + unit.column + i];
      } else {
        CHECK(unit.head < Hkv && unit.column + i < Dv, "copy unit %lld out of range", (long long)u);
        ++copied[unit.head * Dv + unit.column + i];
      }
    }
  }
  for (size_t i = 0; i < rotated.size(); ++i) CHECK(rotated[i] == 1, "pair %zu rotated %d times", i, rotated[i]);
  for (size_t i = 0; i < copied.size(); ++i) CHECK(copied[i] == 1, "V value %zu copied %d times", i, copied[i]);
}

template <typename Round>
static void check_rope_pair(Round round, const char* name) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  const int D = 16;
  for (int trial = 0; trial < 200; ++trial) {
    float x[D], c[D], s[D], want[D], got[D];
    for (int i = 0; i < D; ++i) {
      x[i] = round(normal(rng));
      c[i] = round(std::cos(normal(rng)));
      s[i] = round(std::sin(normal(rng)));
    }
    // The definition: rotate_half(x) = cat(-x[D/2:], x[:D/2]); each op rounded on its own.
    for (int i = 0; i < D; ++i) {
      const float rotated = i < D / 2 ? -x[i + D / 2] : x[i - D / 2];
      const float a = round(x[i] * c[i]);
      const float b = round(rotated * s[i]);
      want[i] = round(a + b);
    }
    for (int j = 0; j < D / 2; ++j) {
      rope_pair(x[j], x[j + D / 2], c[j], s[j], c[j + D / 2], s[j + D / 2], round, &got[j], &got[j + D / 2]);
    }
    for (int i = 0; i < D; ++i) {
      CHECK(std::memcmp(&got[i], &want[i], 4) == 0, "%s rope dim %d: got %.9g want %.9g", name, i, got[i], want[i]);
    }
  }
}

int main() {
  for (int64_t vec : {1, 4, 8}) {
    check_unit_cover(4, 2, 64, 64, vec);
    check_unit_cover(32, 8, 128, 128, vec);
    check_unit_cover(16, 1, 128, 128, vec);
    check_unit_cover(3, 3, 16, 8, vec);
  }
  check_unit_cover(3, 1, 10, 10, 1);  // D/2 = 5: only the one-value path
  check_rope_pair(Fp32(), "fp32");
  check_rope_pair(Bf16(), "bf16");
  CHECK(mul_rn(3.f, 0.5f) == 1.5f && add_rn(1.f, 2.f) == 3.f, "mul_rn/add_rn arithmetic");
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_fused: all checks passed\n");
  return 0;
}
