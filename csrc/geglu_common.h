// Argument checks and shape helpers shared by the CPU and CUDA GEGLU launchers. The Python wrapper
// checks user input first; these guard direct calls to torch.ops.fastvision.*.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>

namespace fastvision {

inline bool geglu_is_tanh(const std::string& approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "geglu: approximate must be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "tanh";
}

// Views x as [rows, 2H] with unit stride along the last dim; copies only when that is impossible.
inline at::Tensor geglu_as_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "geglu: x must have at least one dimension");
  TORCH_CHECK(x.size(-1) % 2 == 0, "geglu: last dimension of x must be even, got ", x.size(-1));
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "geglu: x must be float32, float16 or bfloat16, got ", dtype);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);  // not view(-1, ...): last dim may be 0
  return x.contiguous().view({rows, x.size(-1)});
}

inline std::vector<int64_t> geglu_out_shape(const at::Tensor& x) {
  auto shape = x.sizes().vec();
  shape.back() /= 2;
  return shape;
}

}  // namespace fastvision
