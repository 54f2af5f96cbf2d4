// norm.h -- RMSNorm (Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019) and the residual
// add fused before it, as one loop over each row: the reference's arithmetic (ops/reference.py: rms_norm,
// fused_add_rmsnorm -- the stream x + residual rounded to the dtype, normalised in float32, rounded to
// the dtype, times the weight, rounded) with its mean of squares summed in another order, so within
// float32 rounding of it, not its bits (tests/test_cpu_kernels.py: against float64). The per-op CPU
// kernels and the fused decode step (cpu/decode_step.h) both call these, so the two stay equal bit for
// bit. Seven ATen calls a norm cost ~18 us on SmolLM2's 576-wide rows; one loop costs ~1 us.
#pragma once

#include <ATen/ops/add.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/rsqrt.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"

namespace tinyinfer_cpu {

// One row of d: stream = round(x + res) (res may be null: stream = x, not written), then
// y = round(w * round(stream / rms(stream))). T the activations' dtype, W the weight's, O the output's.
template <typename T, typename W, typename O>
inline void rms_norm_row(const T* x, const T* res, T* stream, const W* w, O* y, int64_t d, float eps,
                         float* tmp) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) {
    const float s = res ? round_to<T>(load(x + i) + load(res + i)) : load(x + i);
    tmp[i] = s;
    sum += s * s;
  }
  if (res) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) store(stream + i, tmp[i]);
  }
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(d) + eps);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) store(y + i, load(w + i) * round_to<T>(tmp[i] * inv));
}

// One row with a float32 stream (the CPU's residual stream, layers/norm.py): stream = x + res in float32,
// y = round(w * stream / rms(stream)) -- one rounding to T, the activations' dtype.
template <typename T, typename W>
inline void rms_norm_row_f32(const T* x, const float* res, float* stream, const W* w, T* y, int64_t d,
                             float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) {
    const float s = load(x + i) + res[i];
    stream[i] = s;
    sum += s * s;
  }
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(d) + eps);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) store(y + i, load(w + i) * (stream[i] * inv));
}

// Rows of x (T, d) (and residual (T, d)) against weight (d,): the loop above for the dtypes the engine
// runs (x and weight of one dtype, or a float32 weight: float32 out); other pairs keep ATen's ops.
inline bool norm_loop_takes(const at::Tensor& x, const at::Tensor& weight) {
  const auto t = x.scalar_type();
  return (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf) && x.dim() >= 1 && weight.dim() == 1 &&
         weight.size(0) == x.size(-1) && (weight.scalar_type() == t || weight.scalar_type() == at::kFloat);
}

inline void norm_rows(const at::Tensor& x, const at::Tensor* residual, at::Tensor* stream,
                      const at::Tensor& weight, at::Tensor& y, double eps) {
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  std::vector<float> tmp(d);
  TINYINFER_CPU_DISPATCH(x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = stream ? stream->mutable_data_ptr<scalar_t>() : nullptr;
    auto run = [&](const auto* wp, auto* yp) {
      for (int64_t r = 0; r < rows; ++r)
        rms_norm_row(xp + r * d, rp ? rp + r * d : nullptr, sp ? sp + r * d : nullptr, wp, yp + r * d, d,
                     static_cast<float>(eps), tmp.data());
    };
    if (weight.scalar_type() == at::kFloat)
      run(weight.const_data_ptr<float>(), y.mutable_data_ptr<float>());
    else
      run(weight.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>());
  });
}

// x (..., d), weight (d,): weight * dtype(x / rms(x)), normalised in float32.
inline at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (!norm_loop_takes(x, weight)) {
    const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
    at::Tensor y = at::mul(xf, at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true).add_(eps)));
    if (x.scalar_type() != at::kFloat) y = y.to(x.scalar_type());
    return weight.scalar_type() == y.scalar_type() ? y.mul_(weight) : at::mul(weight, y);
  }
  const at::Tensor xc = x.contiguous(), w = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(weight.scalar_type()));
  norm_rows(xc, nullptr, nullptr, w, y, eps);
  return y;
}

// (rms_norm(x + residual), x + residual); with a float32 residual and x in half precision, the stream
// stays float32 and the norm is rounded once, to x's dtype (ops/reference.py: fused_add_rmsnorm).
inline std::tuple<at::Tensor, at::Tensor> fused_add_rmsnorm(const at::Tensor& x, const at::Tensor& residual,
                                                            const at::Tensor& weight, double eps) {
  if (residual.scalar_type() == at::kFloat && x.scalar_type() != at::kFloat && norm_loop_takes(x, weight) &&
      residual.sizes() == x.sizes()) {
    const at::Tensor xc = x.contiguous(), rc = residual.contiguous(), w = weight.contiguous();
    at::Tensor stream = at::empty(x.sizes(), residual.options());
    at::Tensor y = at::empty(x.sizes(), x.options());
    const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
    TINYINFER_CPU_DISPATCH(x.scalar_type(), "fused_add_rmsnorm", [&] {
      auto run = [&](const auto* wp) {
        for (int64_t r = 0; r < rows; ++r)
          rms_norm_row_f32(xc.const_data_ptr<scalar_t>() + r * d, rc.const_data_ptr<float>() + r * d,
                           stream.mutable_data_ptr<float>() + r * d, wp, y.mutable_data_ptr<scalar_t>() + r * d,
                           d, static_cast<float>(eps));
      };
      if (w.scalar_type() == at::kFloat) run(w.const_data_ptr<float>()); else run(w.const_data_ptr<scalar_t>());
    });
    return {y, stream};
  }
  if (residual.scalar_type() == at::kFloat && x.scalar_type() != at::kFloat) {
    // Another shape or dtype pair: the reference's float32-stream arithmetic in ATen calls.
    at::Tensor stream = at::add(x.to(at::kFloat), residual);
    at::Tensor y = at::mul(stream, at::rsqrt(stream.pow(2).mean(-1, /*keepdim=*/true).add_(eps)));
    return {at::mul(weight.to(at::kFloat), y).to(x.scalar_type()), stream};
  }
  if (!norm_loop_takes(x, weight) || residual.scalar_type() != x.scalar_type() ||
      residual.sizes() != x.sizes()) {
    at::Tensor stream = at::add(x, residual);
    return {rms_norm(stream, weight, eps), stream};
  }
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous(), w = weight.contiguous();
  at::Tensor stream = at::empty(x.sizes(), x.options());
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(weight.scalar_type()));
  norm_rows(xc, &rc, &stream, w, y, eps);
  return {y, stream};
}

}  // namespace tinyinfer_cpu
