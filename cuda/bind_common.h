// bind_common.h -- helpers every op binding shares: launch errors as exceptions. Part of the single
// torch translation unit cuda/bindings.cpp (included once there, after the torch headers).
#pragma once

namespace {

using torch::Tensor;


// Kernel launches report configuration errors through cudaGetLastError; turn them into exceptions.
void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "tinyinfer: launching the ", kernel,
              " kernel failed: ", cudaGetErrorString(err));
}

}  // namespace
