// Runs the shipped tensor-core paged-attention kernels (cuda/paged_attention.cuh, configurations of
// cuda/tuned.cuh) on a CPU through emulate_cuda.h / emulate_ptx.h, against a float64 evaluation of the op
// contract. Built and run by tests/test_paged_attention.py (quick subset) and tests/test_emulated_kernels.py:
//   g++ -std=c++17 -I cuda -I tests/host emulate_paged_attention.cpp; ./a.out [--all | --full]
// Each case: shuffled block tables, NaN in every unowned cache slot, -1 past each table's last block,
// varlen queries (q_len 0 included), padding rows, output poisoned with NaN before the launch; each runs
// with the plan a 132-SM GPU would get and with forced partition counts (one partition: the kernel
// normalises and zeroes padding rows itself; several: partial results + the merge kernel).
#define TINYINFER_EMULATE 1
#include "emulate_cuda.h"
#include "../../cuda/paged_attention.cuh"
#include "../../cuda/tuned.cuh"
#include "emulate_attention_launch.h"

#include <cstring>
#include <random>
#include <string>

using namespace tinyinfer;

namespace {

template <typename T> T to_t(float f);
template <> __nv_bfloat16 to_t<__nv_bfloat16>(float f) { return __float2bfloat16_rn(f); }
template <> __half to_t<__half>(float f) { return __float2half_rn(f); }
inline float from_t(__nv_bfloat16 x) { return __bfloat162float(x); }
inline float from_t(__half x) { return __half2float(x); }

struct Case {
  std::vector<int> seq_lens, q_lens;
  int hq, hkv, d, dv, bs, pad_rows;
  bool mla_alias;  // v_cache = k_cache[..., :dv]
};

// Returns the number of failures of this case. splits: 0 = the plan for 132 SMs x 2 CTAs, else forced.
template <typename T>
int run_case(const Case& c, uint32_t seed, int splits) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  const int B = static_cast<int>(c.seq_lens.size());
  std::vector<int> blocks(B);
  int total_blocks = 0, mb = 1;
  for (int b = 0; b < B; ++b) {
    blocks[b] = (c.seq_lens[b] + c.bs - 1) / c.bs;
    total_blocks += blocks[b];
    mb = std::max(mb, blocks[b] + 2);
  }
  const int nb = 2 * total_blocks + 3;
  std::vector<int> perm(nb);
  for (int i = 0; i < nb; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  const T nan_t = to_t<T>(NAN);
  const int kw = c.d, vw = c.mla_alias ? 0 : c.dv;
  std::vector<T> kc(size_t(nb) * c.bs * c.hkv * kw, nan_t), vc(size_t(nb) * c.bs * c.hkv * std::max(vw, 1), nan_t);
  std::vector<int32_t> table(size_t(B) * mb, -1);
  // dense[b][pos][h][dim] as float (already rounded to T)
  std::vector<std::vector<float>> dk(B), dv(B);
  int next = 0;
  for (int b = 0; b < B; ++b) {
    for (int i = 0; i < blocks[b]; ++i) table[size_t(b) * mb + i] = perm[next++];
    dk[b].resize(size_t(c.seq_lens[b]) * c.hkv * c.d);
    dv[b].resize(size_t(c.seq_lens[b]) * c.hkv * c.dv);
    for (int p = 0; p < c.seq_lens[b]; ++p) {
      const size_t row = (size_t(table[size_t(b) * mb + p / c.bs]) * c.bs + p % c.bs) * c.hkv;
      for (int h = 0; h < c.hkv; ++h) {
        for (int e = 0; e < c.d; ++e) {
          T x = to_t<T>(normal(rng));
          kc[(row + h) * kw + e] = x;
          dk[b][(size_t(p) * c.hkv + h) * c.d + e] = from_t(x);
          if (c.mla_alias && e < c.dv) dv[b][(size_t(p) * c.hkv + h) * c.dv + e] = from_t(x);
        }
        if (!c.mla_alias)
          for (int e = 0; e < c.dv; ++e) {
            T x = to_t<T>(normal(rng));
            vc[(row + h) * vw + e] = x;
            dv[b][(size_t(p) * c.hkv + h) * c.dv + e] = from_t(x);
          }
      }
    }
  }
  std::vector<int32_t> qsl(B + 1, 0);
  for (int b = 0; b < B; ++b) qsl[b + 1] = qsl[b] + c.q_lens[b];
  const int T_rows = qsl[B] + c.pad_rows;
  std::vector<T> q(size_t(T_rows) * c.hq * c.d);
  for (auto& x : q) x = to_t<T>(normal(rng));
  const float scale = 0.7f / std::sqrt(float(c.d));
  std::vector<T> out(size_t(T_rows) * c.hq * c.dv, nan_t);  // poisoned

  std::vector<int32_t> lens(c.seq_lens.begin(), c.seq_lens.end());
  PagedAttentionArgs a{};
  a.q = q.data(); a.q_s0 = int64_t(c.hq) * c.d; a.q_s1 = c.d;
  a.k = kc.data(); a.k_s0 = int64_t(c.bs) * c.hkv * kw; a.k_s1 = int64_t(c.hkv) * kw; a.k_s2 = kw;
  if (c.mla_alias) { a.v = kc.data(); a.v_s0 = a.k_s0; a.v_s1 = a.k_s1; a.v_s2 = a.k_s2; }
  else { a.v = vc.data(); a.v_s0 = int64_t(c.bs) * c.hkv * vw; a.v_s1 = int64_t(c.hkv) * vw; a.v_s2 = vw; }
  a.block_tables = table.data(); a.bt_stride = mb;
  a.seq_lens = lens.data(); a.query_start_loc = qsl.data();
  a.out = out.data();
  a.num_tokens = T_rows; a.num_seqs = B; a.max_blocks = mb; a.num_q_heads = c.hq; a.num_kv_heads = c.hkv;
  a.head_dim = c.d; a.head_dim_v = c.dv; a.block_size = c.bs; a.block_shift = log2_if_power_of_two(c.bs);
  a.scale = scale; a.v_aliases_k = c.mla_alias;
  a.dtype = std::is_same<T, __half>::value ? PagedAttentionDtype::kHalf : PagedAttentionDtype::kBFloat16;
  PagedAttentionPlan plan = attn_plan_shapes(a, tuned::kAttnMinChunk);
  if (splits > 0) {  // forced: a small minimum partition so that short test sequences really split
    plan.min_chunk = 16;
    plan.num_splits = splits;
    plan.workspace_floats = splits == 1 ? 0 : int64_t(T_rows) * c.hq * splits * (c.dv + 2);
  } else {
    attn_plan_splits(a, 132 * 2, tuned::kAttnSplitFill, &plan);
  }
  std::vector<float> ws(size_t(std::max<int64_t>(plan.workspace_floats, 1)), NAN);
  const int64_t partials = int64_t(T_rows) * c.hq * plan.num_splits;
  a.ws_out = ws.data(); a.ws_max = ws.data() + partials * c.dv; a.ws_sum = a.ws_max + partials;
  emu::readable().clear();
  emu::register_readable(kc.data(), kc.size() * sizeof(T));
  if (!c.mla_alias) emu::register_readable(vc.data(), vc.size() * sizeof(T));
  emu::register_readable(q.data(), q.size() * sizeof(T));
  emulate_dispatch<T>(a, plan);

  // float64 reference of the contract
  const double tol = sizeof(T) == 2 && std::is_same<T, __half>::value ? 1e-3 : 1e-2;
  int fails = emu::violations();
  emu::violations() = 0;
  const int group = c.hq / c.hkv;
  for (int t = 0; t < T_rows; ++t) {
    int b = -1;
    for (int i = 0; i < B; ++i) if (qsl[i] <= t && t < qsl[i + 1]) b = i;
    for (int h = 0; h < c.hq; ++h) {
      std::vector<double> want(c.dv, 0.0);
      if (b >= 0) {
        const int i = t - qsl[b], visible = c.seq_lens[b] - c.q_lens[b] + i + 1, kv = h / group;
        std::vector<double> w(visible);
        double mx = -INFINITY, sum = 0;
        for (int p = 0; p < visible; ++p) {
          double sc = 0;
          for (int e = 0; e < c.d; ++e)
            sc += double(from_t(q[(size_t(t) * c.hq + h) * c.d + e])) * dk[b][(size_t(p) * c.hkv + kv) * c.d + e];
          w[p] = sc * scale;
          mx = std::max(mx, w[p]);
        }
        for (int p = 0; p < visible; ++p) { w[p] = std::exp(w[p] - mx); sum += w[p]; }
        for (int p = 0; p < visible; ++p)
          for (int e = 0; e < c.dv; ++e) want[e] += w[p] / sum * dv[b][(size_t(p) * c.hkv + kv) * c.dv + e];
      }
      for (int e = 0; e < c.dv; ++e) {
        const float got = from_t(out[(size_t(t) * c.hq + h) * c.dv + e]);
        const bool ok = b >= 0 ? std::fabs(got - want[e]) <= tol + 1e-2 * std::fabs(want[e]) : got == 0.0f;
        if (!ok && ++fails <= 3)
          std::printf("  mismatch t=%d h=%d e=%d (seq %d): got %g want %g\n", t, h, e, b, got, want[e]);
      }
    }
  }
  return fails;
}

}  // namespace

int main(int argc, char** argv) {
  // No argument: the quick subset CI runs. --all: every case, both dtypes, the planned and forced
  // partition counts. --full: --all plus long sequences.
  const std::string mode = argc > 1 ? argv[1] : "";
  const bool all = mode == "--all" || mode == "--full";
  // (seq_lens, q_lens, hq, hkv, d, dv, bs, pad_rows, mla_alias)
  std::vector<Case> cases = {
      {{600, 37, 1, 300}, {1, 1, 1, 1}, 8, 2, 128, 128, 16, 3, false},        // decode GQA 4, MT 1
      {{530, 16, 90}, {16, 16, 4}, 8, 2, 128, 128, 8, 2, false},             // verify: 64 rows, MT 4
      {{300, 9, 2, 64}, {1, 1, 3, 1}, 4, 2, 64, 64, 16, 2, false},           // demo-llama GQA 4/2, D 64
      {{290, 33}, {2, 1}, 64, 1, 576, 512, 16, 2, true},                     // MLA alias, 2 head chunks
      {{280, 0, 45, 7}, {3, 0, 5, 7}, 4, 4, 64, 64, 32, 4, false},           // MHA, empty seq, q = len
      {{300, 70}, {1, 2}, 16, 1, 64, 64, 16, 1, false},                      // MQA group 16
      {{40, 17}, {1, 3}, 16, 1, 576, 512, 16, 1, false},                     // MLA, V separate
      {{10, 5}, {0, 0}, 4, 2, 64, 64, 16, 3, false},                         // every row padding
      {{200, 77}, {5, 5}, 8, 2, 128, 128, 64, 0, false},                     // verify k = 4: 20 rows, MT 2
  };
  if (mode == "--full") {
    cases.push_back({{2048, 700, 1500}, {1, 1, 1}, 32, 8, 128, 128, 16, 2, false});
    cases.push_back({{1100, 257, 256, 255}, {4, 4, 4, 4}, 8, 8, 128, 128, 32, 1, false});
    cases.push_back({{900, 20}, {16, 20}, 4, 1, 64, 64, 8, 2, false});   // q_len 20: two passes of 64 rows
  }
  int failures = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const bool quick = i < 4 || i == 8;
    for (int dtype = 0; dtype < 2; ++dtype) {
      for (int splits : {0, 1, 3}) {
        if (!all && (!quick || dtype != int(i % 2) || (splits != 0 && splits != (i % 2 ? 3 : 1)))) continue;
        int f = dtype == 0 ? run_case<__nv_bfloat16>(cases[i], 100 + i, splits)
                           : run_case<__half>(cases[i], 200 + i, splits);
        std::printf("case %zu %s splits=%s: %s\n", i, dtype == 0 ? "bf16" : "fp16",
                    splits ? std::to_string(splits).c_str() : "plan", f ? "FAIL" : "ok");
        failures += f;
      }
    }
  }
  std::printf(failures ? "%d failure(s)\n" : "emulated paged attention: all cases match\n", failures);
  return failures ? 1 : 0;
}
