// grn: Global Response Normalization of channels-last x [B, H, W, C] (float32/float16/bfloat16, any
// strides) with gamma and beta [C] (x's dtype or float32) and mask [B, H, W] bool (True = left out of
// the statistics) or an empty [0] tensor for no mask. The forward returns a new contiguous tensor of x's
// shape and dtype; the backward returns (dx in x's dtype, dgamma float32 [C], dbeta float32 [C]).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastvision, m) {
  m.def("grn_forward(Tensor x, Tensor gamma, Tensor beta, Tensor mask, float eps) -> Tensor");
  m.def(
      "grn_backward(Tensor grad_out, Tensor x, Tensor gamma, Tensor beta, Tensor mask, float eps) "
      "-> (Tensor, Tensor, Tensor)");
}
