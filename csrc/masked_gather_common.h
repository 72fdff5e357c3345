// Argument checks and output allocation shared by the CPU and CUDA masked_gather kernels. The Python
// op checks user input first; these guard direct calls to torch.ops.fastvision.masked_gather_*.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include "raw_op_trust.h"

#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace fastvision {

struct MaskedGatherOutputs {
  at::Tensor values, sites, valid, counts;
};

inline MaskedGatherOutputs masked_gather_check_and_allocate(const at::Tensor& x, const at::Tensor& mask,
                                                            int64_t max_count) {
  TORCH_CHECK(x.dim() == 4, "masked_gather: x must be [B, C, H, W], got ", x.dim(), " dims");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "masked_gather: x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(mask.scalar_type() == at::kBool, "masked_gather: mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 3 && mask.size(0) == x.size(0) && mask.size(1) == x.size(2) &&
                  mask.size(2) == x.size(3),
              "masked_gather: mask must be [B, H, W] with x's batch and spatial sizes");
  TORCH_CHECK(mask.device() == x.device(), "masked_gather: x and mask must be on one device");
  TORCH_CHECK(max_count >= 0 && max_count <= std::numeric_limits<int32_t>::max(),
              "masked_gather: max_count must be in [0, 2**31 - 1], got ", max_count);
  TORCH_CHECK(x.size(2) * x.size(3) <= std::numeric_limits<int32_t>::max(),
              "masked_gather: H * W must fit int32");
  const int64_t batch = x.size(0), channels = x.size(1);
  const auto index_options = x.options().dtype(at::kLong);
  return {at::empty({batch, max_count, channels}, x.options()), at::empty({batch, max_count}, index_options),
          at::empty({batch, max_count}, x.options().dtype(at::kBool)), at::empty({batch}, index_options)};
}

// The gradient of x, [B, C, H, W]: zero-filled, or uninitialized with zeroed = false (a kernel that
// writes every element).
inline at::Tensor masked_gather_backward_check_and_allocate(const at::Tensor& grad_values, const at::Tensor& sites,
                                                            int64_t height, int64_t width, bool zeroed = true) {
  TORCH_CHECK(grad_values.dim() == 3, "masked_gather_backward: grad_values must be [B, M, C]");
  TORCH_CHECK(sites.scalar_type() == at::kLong && sites.dim() == 2 && sites.size(0) == grad_values.size(0) &&
                  sites.size(1) == grad_values.size(1),
              "masked_gather_backward: sites must be int64 [B, M] matching grad_values");
  TORCH_CHECK(height >= 0 && width >= 0, "masked_gather_backward: height and width must be non-negative");
  TORCH_CHECK(sites.device() == grad_values.device(), "masked_gather_backward: tensors must be on one device");
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(height <= kInt32Max && width <= kInt32Max && (width == 0 || height <= kInt32Max / width),
                    "masked_gather_backward: height * width must fit int32, got ", height, " x ", width);
  const std::vector<int64_t> shape = {grad_values.size(0), grad_values.size(2), height, width};
  return zeroed ? at::zeros(shape, grad_values.options()) : at::empty(shape, grad_values.options());
}

// Sites in [0, H * W), or -1 (an empty slot): always on the CPU, on direct calls only on CUDA.
inline void masked_gather_check_sites(const at::Tensor& sites, int64_t num_sites) {
  const std::string what = "indices in [0, H * W) = [0, " + std::to_string(num_sites) + ") or -1 (an empty slot)";
  check_entries_in_range(sites, -1, num_sites, "masked_gather_backward", "sites", what.c_str());
}

}  // namespace fastvision
