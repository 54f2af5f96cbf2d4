// Part 3 of emulate_kv_quant.cpp: the tensor-core paged-attention kernel (cuda/paged_attention.cuh) over
// int8 / fp8 caches, against float64 attention of the dequantized values. Included once, after part 2.
#pragma once

namespace {

struct QCase {
  std::vector<int> seq_lens, q_lens;
  int hq, hkv, d, dv, bs;
  bool mla;
};

double dequant(uint8_t c, double s, int kind) { return (kind == kKVInt8 ? double(int8_t(c)) : e4m3_value(c)) * s; }

template <typename T>
void run_qcase(const QCase& c, std::mt19937& rng, int kind, int splits) {
  std::normal_distribution<float> normal(0.f, 1.f);
  const int B = int(c.seq_lens.size()), vw = c.mla ? 0 : c.dv;
  int nb = 3, mb = 1;
  for (int n : c.seq_lens) { nb += 2 * ((n + c.bs - 1) / c.bs); mb = std::max(mb, (n + c.bs - 1) / c.bs + 1); }
  std::vector<int> perm(nb);
  for (int i = 0; i < nb; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<uint8_t> kc(size_t(nb) * c.bs * c.hkv * c.d, 0x7f), vc(size_t(nb) * c.bs * c.hkv * std::max(vw, 1), 0x7f);
  // Scales per slot and head (NaN where no sequence wrote).
  const size_t ns = size_t(nb) * c.bs * c.hkv;
  std::vector<__half> ksc(ns, __float2half_rn(NAN)), vsc(ns, __float2half_rn(NAN));
  std::vector<int32_t> table(size_t(B) * mb, -1);
  std::vector<std::vector<double>> dk(B), dv(B);
  const int64_t ss0 = int64_t(c.bs) * c.hkv, ss1 = c.hkv;
  int next = 0;
  std::vector<T> row(std::max(c.d, c.dv));
  for (int b = 0; b < B; ++b) {
    for (int i = 0; i < (c.seq_lens[b] + c.bs - 1) / c.bs; ++i) table[size_t(b) * mb + i] = perm[next++];
    dk[b].resize(size_t(c.seq_lens[b]) * c.hkv * c.d);
    dv[b].resize(size_t(c.seq_lens[b]) * c.hkv * c.dv);
    for (int p = 0; p < c.seq_lens[b]; ++p) {
      const int blk = table[size_t(b) * mb + p / c.bs], off = p % c.bs;
      for (int h = 0; h < c.hkv; ++h) {
        const size_t r = (size_t(blk) * c.bs + off) * c.hkv + h;
        __half* ks = &ksc[blk * ss0 + off * ss1 + h];
        __half* vs = &vsc[blk * ss0 + off * ss1 + h];
        for (int e = 0; e < c.d; ++e) row[e] = to_t<T>(normal(rng) * 2.f);
        quantize_kv_row<T>(row.data(), &kc[r * c.d], c.d, ks, kind);
        for (int e = 0; e < c.d; ++e) dk[b][(size_t(p) * c.hkv + h) * c.d + e] = dequant(kc[r * c.d + e], __half2float(*ks), kind);
        if (c.mla) {
          for (int e = 0; e < c.dv; ++e) dv[b][(size_t(p) * c.hkv + h) * c.dv + e] = dk[b][(size_t(p) * c.hkv + h) * c.d + e];
          continue;
        }
        for (int e = 0; e < c.dv; ++e) row[e] = to_t<T>(normal(rng));
        quantize_kv_row<T>(row.data(), &vc[r * vw], c.dv, vs, kind);
        for (int e = 0; e < c.dv; ++e) dv[b][(size_t(p) * c.hkv + h) * c.dv + e] = dequant(vc[r * vw + e], __half2float(*vs), kind);
      }
    }
  }
  std::vector<int32_t> qsl(B + 1, 0), lens(c.seq_lens.begin(), c.seq_lens.end());
  for (int b = 0; b < B; ++b) qsl[b + 1] = qsl[b] + c.q_lens[b];
  const int Tr = qsl[B] + 1;
  std::vector<T> q(size_t(Tr) * c.hq * c.d), out(size_t(Tr) * c.hq * c.dv, to_t<T>(NAN));
  for (auto& x : q) x = to_t<T>(normal(rng));
  PagedAttentionArgs a{};
  a.q = q.data(); a.q_s0 = int64_t(c.hq) * c.d; a.q_s1 = c.d;
  a.k = kc.data(); a.k_s0 = int64_t(c.bs) * c.hkv * c.d; a.k_s1 = int64_t(c.hkv) * c.d; a.k_s2 = c.d;
  if (c.mla) { a.v = kc.data(); a.v_s0 = a.k_s0; a.v_s1 = a.k_s1; a.v_s2 = a.k_s2; }
  else { a.v = vc.data(); a.v_s0 = int64_t(c.bs) * c.hkv * vw; a.v_s1 = int64_t(c.hkv) * vw; a.v_s2 = vw; }
  a.kv_quant = kind;
  a.k_scale = ksc.data(); a.ks0 = ss0; a.ks1 = ss1; a.ks2 = 1;
  a.v_scale = c.mla ? ksc.data() : vsc.data(); a.vs0 = ss0; a.vs1 = ss1; a.vs2 = 1;
  a.block_tables = table.data(); a.bt_stride = mb; a.seq_lens = lens.data(); a.query_start_loc = qsl.data();
  a.out = out.data();
  a.num_tokens = Tr; a.num_seqs = B; a.max_blocks = mb; a.num_q_heads = c.hq; a.num_kv_heads = c.hkv;
  a.head_dim = c.d; a.head_dim_v = c.dv; a.block_size = c.bs; a.block_shift = log2_if_power_of_two(c.bs);
  a.scale = 0.7f / std::sqrt(float(c.d)); a.v_aliases_k = c.mla;
  a.dtype = std::is_same<T, __half>::value ? PagedAttentionDtype::kHalf : PagedAttentionDtype::kBFloat16;
  PagedAttentionPlan plan = attn_plan_shapes(a, tuned::kAttnMinChunk);
  plan.min_chunk = 16;
  plan.num_splits = splits;
  plan.workspace_floats = splits == 1 ? 0 : int64_t(Tr) * c.hq * splits * (c.dv + 2);
  std::vector<float> ws(size_t(std::max<int64_t>(plan.workspace_floats, 1)), NAN);
  const int64_t partials = int64_t(Tr) * c.hq * splits;
  a.ws_out = ws.data(); a.ws_max = ws.data() + partials * c.dv; a.ws_sum = a.ws_max + partials;
  emulate_dispatch<T>(a, plan);
  const double tol = std::is_same<T, __half>::value ? 2e-3 : 2e-2;
  for (int b = 0; b < B; ++b)
    for (int t = qsl[b]; t < qsl[b + 1]; ++t)
      for (int h = 0; h < c.hq; ++h) {
        const int kv = h / (c.hq / c.hkv), visible = c.seq_lens[b] - c.q_lens[b] + (t - qsl[b]) + 1;
        std::vector<double> w(visible);
        double mx = -INFINITY, sum = 0;
        for (int p = 0; p < visible; ++p) {
          double sc = 0;
          for (int e = 0; e < c.d; ++e) sc += double(to_float(q[(size_t(t) * c.hq + h) * c.d + e])) * dk[b][(size_t(p) * c.hkv + kv) * c.d + e];
          w[p] = sc * a.scale;
          mx = std::max(mx, w[p]);
        }
        for (int p = 0; p < visible; ++p) { w[p] = std::exp(w[p] - mx); sum += w[p]; }
        for (int e = 0; e < c.dv; ++e) {
          double want = 0;
          for (int p = 0; p < visible; ++p) want += w[p] / sum * dv[b][(size_t(p) * c.hkv + kv) * c.dv + e];
          const double got = to_float(out[(size_t(t) * c.hq + h) * c.dv + e]);
          check(std::fabs(got - want) <= tol + 2e-2 * std::fabs(want), "attention", got, want);
        }
      }
  for (int e = 0; e < c.hq * c.dv; ++e) check(to_float(out[size_t(qsl[B]) * c.hq * c.dv + e]) == 0.f || splits > 1, "padding row", 1, 0);
}

template <typename T>
void test_attention(std::mt19937& rng, int kind) {
  const std::vector<QCase> cases = {
      {{70, 37, 1}, {1, 1, 1}, 8, 2, 64, 64, 16, false},        // decode, GQA 4
      {{53, 20}, {5, 16}, 4, 2, 128, 128, 8, false},            // verify
      {{40, 9}, {1, 3}, 16, 1, 576, 512, 16, true},             // MLA latent rows, V = K[..., :512]
  };
  for (const QCase& c : cases)
    for (int splits : {1, 3}) run_qcase<T>(c, rng, kind, splits);
}

}  // namespace
