// Argument checks shared by the sparse_conv2d kernels. The Python op checks user input first; these
// guard direct calls to torch.ops.fastvision.sparse_conv2d_* (shapes, dtypes, devices; the kernels
// check every neighbour index they read).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace fastvision {
namespace sparse_conv {

inline void check_inputs(const at::Tensor& feats, const at::Tensor& neighbors, const at::Tensor& weight) {
  const auto dtype = feats.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "sparse_conv2d: feats must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_TYPE(weight.scalar_type() == dtype, "sparse_conv2d: weight must have feats' dtype ", dtype,
                   ", got ", weight.scalar_type());
  TORCH_CHECK_TYPE(neighbors.scalar_type() == at::kInt, "sparse_conv2d: neighbors must be int32, got ",
                   neighbors.scalar_type());
  TORCH_CHECK_VALUE(feats.dim() == 2, "sparse_conv2d: feats must have shape [N, Cin], got ", feats.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 3 && weight.size(1) == feats.size(1),
                    "sparse_conv2d: weight must have shape [K*K, Cin, Cout] with Cin = ", feats.size(1), ", got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(neighbors.dim() == 2 && neighbors.size(0) == feats.size(0) &&
                        neighbors.size(1) == weight.size(0),
                    "sparse_conv2d: neighbors must have shape [N, K*K] = [", feats.size(0), ", ", weight.size(0),
                    "] (the rows of feats, the offsets of weight), got ", neighbors.sizes());
  TORCH_CHECK_VALUE(feats.size(0) < (int64_t{1} << 31), "sparse_conv2d: at most 2**31 - 1 sites, got ",
                    feats.size(0));
  TORCH_CHECK_VALUE(feats.device() == weight.device() && feats.device() == neighbors.device(),
                    "sparse_conv2d: feats, neighbors and weight must be on one device");
}

inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& feats, const at::Tensor& weight) {
  TORCH_CHECK_TYPE(grad_out.scalar_type() == feats.scalar_type(), "sparse_conv2d: grad_out must have feats' dtype ",
                   feats.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == feats.size(0) && grad_out.size(1) == weight.size(2),
                    "sparse_conv2d: grad_out must have shape [N, Cout] = [", feats.size(0), ", ", weight.size(2),
                    "], got ", grad_out.sizes());
  TORCH_CHECK_VALUE(grad_out.device() == feats.device(), "sparse_conv2d: grad_out must be on feats' device");
}

// The messages of the index checks (the Python checks say the same).
constexpr const char* kRangeMessage = "neighbors entries must be -1 (absent) or a site index in [0, N)";
constexpr const char* kSymmetryMessage =
    "neighbors must be symmetric: i is o's neighbour at offset k exactly when o is i's at the mirrored "
    "offset K*K - 1 - k (as in every submanifold map)";

}  // namespace sparse_conv
}  // namespace fastvision
