// bind_int4.h -- argument checks and dispatch of int4_linear (cuda/int4_linear.cu): the tensor-core
// kernel for M <= 64, dequantize + dense matmul above. Included once, by cuda/bindings.cpp (the only
// translation unit with torch headers).
#pragma once

#include "int4.cuh"

namespace tinyinfer {
cudaError_t launch_int4_linear(const Int4LinearParams& p, cudaStream_t stream);
cudaError_t launch_int4_dequant(const Int4LinearParams& p, cudaStream_t stream);
}  // namespace tinyinfer

namespace {

// Checks the packed weight against x and returns the launcher parameters (y left unset). zeros selects
// the weight formula by dtype: uint8 -> w = (q - z) s; the scales' float dtype -> w = q s + z.
tinyinfer::Int4LinearParams int4_params(const Tensor& x, const Tensor& qweight, const Tensor& scales,
                                        const Tensor& zeros, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2, "int4_linear: x must be (M, K), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat16 || x.scalar_type() == torch::kBFloat16,
              "int4_linear: x must be float16 or bfloat16, got ", x.scalar_type(),
              "; run the INT4 model in fp16 or bf16");
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128,
              "int4_linear: group_size must be 32, 64 or 128, got ", group_size);
  const int64_t K = x.size(1);
  TORCH_CHECK(K > 0 && K % group_size == 0, "int4_linear: K=", K, " (x.size(1)) is not a multiple of the group "
              "size ", group_size, "; quantize this layer with a group size that divides K");
  const int64_t KB = (K + 63) / 64, NG = KB * 64 / group_size;
  TORCH_CHECK(qweight.dim() == 4 && qweight.scalar_type() == torch::kInt32 && qweight.size(1) == KB &&
              qweight.size(2) == 32 && qweight.size(3) == 4,
              "int4_linear: qweight must be int32 (N/16, ", KB, ", 32, 4) for K=", K, ", got ",
              qweight.scalar_type(), " ", qweight.sizes(),
              "; build it with tinyinfer.ops.int4_format.to_kernel_layout");
  const int64_t NT = qweight.size(0);
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == NT && scales.size(1) == NG && scales.size(2) == 16,
              "int4_linear: scales must be (", NT, ", ", NG, ", 16) for K=", K, " and group size ", group_size,
              ", got ", scales.sizes());
  TORCH_CHECK(scales.scalar_type() == torch::kFloat16 || scales.scalar_type() == torch::kBFloat16,
              "int4_linear: scales must be float16 or bfloat16, got ", scales.scalar_type());
  TORCH_CHECK(zeros.sizes() == scales.sizes() &&
              (zeros.scalar_type() == torch::kUInt8 || zeros.scalar_type() == scales.scalar_type()),
              "int4_linear: zeros must have the scales' shape ", scales.sizes(), " and be uint8 (zero points, "
              "w = (q - z) * s) or the scales' dtype ", scales.scalar_type(), " (offsets, w = q * s + z), got ",
              zeros.scalar_type(), " ", zeros.sizes());
  for (const Tensor* t : {&qweight, &scales, &zeros}) {
    TORCH_CHECK(t->is_contiguous() && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0,
                "int4_linear: qweight, scales and zeros must be contiguous and start 16-byte aligned (the kernel "
                "copies them in 16-byte pieces); repack once at load with "
                "tinyinfer.ops.int4_format.to_kernel_layout");
    TORCH_CHECK(t->device() == x.device(), "int4_linear: x is on ", x.device(), " but a weight tensor is on ",
                t->device(), "; move the layer to the activations' device");
  }
  TORCH_CHECK(x.size(0) * std::max<int64_t>(NT * 16, K) < (int64_t(1) << 31),
              "int4_linear: shape too large for 32-bit indexing: M=", x.size(0), " N=", NT * 16, " K=", K);
  tinyinfer::Int4LinearParams p{};
  p.qweight = qweight.data_ptr();
  p.scales = scales.data_ptr();
  p.zeros = zeros.data_ptr();
  p.M = static_cast<int>(x.size(0));
  p.N = static_cast<int>(NT * 16);
  p.K = static_cast<int>(K);
  p.group_size = static_cast<int>(group_size);
  p.x_bf16 = x.scalar_type() == torch::kBFloat16;
  p.scales_bf16 = scales.scalar_type() == torch::kBFloat16;
  p.zero_kind = zeros.scalar_type() == torch::kUInt8 ? tinyinfer::Int4Zeros::kUint8 : tinyinfer::Int4Zeros::kFloat;
  int major = 0;  // programmatic dependent launch needs sm_90+
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.device().index());
  p.pdl = major >= 9;
  return p;
}

// Largest M the tensor-core kernel takes; above it W is dequantized into a scratch buffer for cuBLAS.
constexpr int64_t kInt4KernelMaxM = 64;

// Writes y = x @ dequant(W).T into `out` (M, N): the tensor-core kernel for M <= 64 (GEMV-shaped up to
// 16, GEMM-shaped above), else dequantize W into a scratch buffer and call the dense matmul.
void int4_linear_out(const Tensor& x_in, const Tensor& qweight, const Tensor& scales, const Tensor& zeros,
                     int64_t group_size, Tensor& out) {
  TORCH_CHECK(x_in.is_cuda(), "int4_linear: x must be a CUDA tensor, got ", x_in.device());
  tinyinfer::Int4LinearParams p = int4_params(x_in, qweight, scales, zeros, group_size);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == p.M && out.size(1) == p.N && out.is_contiguous() &&
              out.scalar_type() == x_in.scalar_type() && out.device() == x_in.device(),
              "int4_linear: out must be a contiguous ", x_in.scalar_type(), " (", p.M, ", ", p.N, ") tensor on ",
              x_in.device(), ", got ", out.scalar_type(), " ", out.sizes());
  if (p.M == 0 || p.N == 0) return;
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (p.M > kInt4KernelMaxM) {
    Tensor w = torch::empty({p.N, p.K}, x_in.options());
    p.y = w.data_ptr();
    check_launch(tinyinfer::launch_int4_dequant(p, stream), "int4_dequant");
    torch::mm_out(out, x_in, w.t());
    return;
  }
  // The kernel copies rows of x in 16-byte pieces.
  Tensor x = x_in.is_contiguous() && reinterpret_cast<uintptr_t>(x_in.data_ptr()) % 16 == 0
                 ? x_in : x_in.clone(at::MemoryFormat::Contiguous);
  p.x = x.data_ptr();
  p.y = out.data_ptr();
  check_launch(tinyinfer::launch_int4_linear(p, stream), "int4_linear");
}

Tensor int4_linear(const Tensor& x, const Tensor& qweight, const Tensor& scales, const Tensor& zeros,
                   int64_t group_size) {
  TORCH_CHECK(x.dim() == 2, "int4_linear: x must be (M, K), got shape ", x.sizes());
  Tensor out = torch::empty({x.size(0), qweight.size(0) * 16}, x.options());
  int4_linear_out(x, qweight, scales, zeros, group_size, out);
  return out;
}

}  // namespace
