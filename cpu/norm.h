// norm.h -- RMSNorm (Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019) and the residual
// add fused before it, as the reference computes them (ops/reference.py: rms_norm, fused_add_rmsnorm):
// the same ATen operations in the same order, so the same bits -- called from C++, which saves the
// Python cost of each call (a decode step of a small model makes two of these per layer).
#pragma once

#include <ATen/ops/add.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/rsqrt.h>

#include <tuple>

#include "common.h"

namespace tinyinfer_cpu {

// x (..., d), weight (d,): weight * dtype(x / rms(x)), normalised in float32.
inline at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  at::Tensor y = at::mul(xf, at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true).add_(eps)));
  if (x.scalar_type() != at::kFloat) y = y.to(x.scalar_type());
  return weight.scalar_type() == y.scalar_type() ? y.mul_(weight) : at::mul(weight, y);
}

// (rms_norm(x + residual), x + residual).
inline std::tuple<at::Tensor, at::Tensor> fused_add_rmsnorm(const at::Tensor& x, const at::Tensor& residual,
                                                            const at::Tensor& weight, double eps) {
  at::Tensor stream = at::add(x, residual);
  return {rms_norm(stream, weight, eps), stream};
}

}  // namespace tinyinfer_cpu
