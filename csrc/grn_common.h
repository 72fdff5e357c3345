// Argument checks of the grn kernel ops, for direct calls to torch.ops.fastvision.grn_*: the Python op
// checks user input first and passes gamma and beta as [C] and an empty mask for none.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace fastvision {

inline void grn_check_forward(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                              const at::Tensor& mask, double eps) {
  TORCH_CHECK_VALUE(x.dim() == 4, "grn: x must be channels-last [B, H, W, C], got ", x.dim(), " dims");
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "grn: x must be float32, float16 or bfloat16, got ", dtype);
  const int64_t channels = x.size(3);
  const auto check_param = [&](const char* name, const at::Tensor& param) {
    TORCH_CHECK_VALUE(param.dim() == 1 && param.size(0) == channels, "grn: ", name, " must have shape [",
                      channels, "] (x's channels), got ", param.sizes());
    TORCH_CHECK_TYPE(param.scalar_type() == dtype || param.scalar_type() == at::kFloat, "grn: ", name,
                     " must have x's dtype or float32, got ", param.scalar_type());
    TORCH_CHECK_VALUE(param.device() == x.device(), "grn: ", name, " must be on x's device");
  };
  check_param("gamma", gamma);
  check_param("beta", beta);
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "grn: mask must be bool (True = masked), got ",
                   mask.scalar_type());
  const bool no_mask = mask.dim() == 1 && mask.numel() == 0;
  TORCH_CHECK_VALUE(no_mask || (mask.dim() == 3 && mask.size(0) == x.size(0) && mask.size(1) == x.size(1) &&
                                mask.size(2) == x.size(2)),
                    "grn: mask must have shape [B, H, W] = [", x.size(0), ", ", x.size(1), ", ", x.size(2),
                    "] or be an empty [0] tensor (no mask), got ", mask.sizes());
  TORCH_CHECK_VALUE(mask.device() == x.device(), "grn: mask must be on x's device");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "grn: eps must be a positive finite number, got ", eps);
}

inline void grn_check_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gamma,
                               const at::Tensor& beta, const at::Tensor& mask, double eps) {
  grn_check_forward(x, gamma, beta, mask, eps);
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type() &&
                        grad_out.device() == x.device(),
                    "grn_backward: grad_out must be ", x.scalar_type(), " of x's shape ", x.sizes(),
                    " on x's device, got ", grad_out.scalar_type(), " ", grad_out.sizes());
}

}  // namespace fastvision
