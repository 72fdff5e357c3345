// add_layer_norm: LayerNorm(x + residual) over the last dimension, with optional [D] weight and bias.
// The forward returns (out, mean, rstd, summed): the statistics float32 with x's leading shape, and
// summed = x + residual in x's dtype when return_residual is set (an empty [0] tensor otherwise). The
// backward recomputes x + residual, adds grad_summed (the gradient of the returned sum, if any) into
// d/dx, and returns (d/dx == d/dresidual, d/dweight, d/dbias), an absent parameter getting an empty
// [0] gradient.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastvision, m) {
  m.def(
      "add_layer_norm_forward(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps, "
      "bool return_residual=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "add_layer_norm_backward(Tensor grad_out, Tensor x, Tensor residual, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor rstd, Tensor? grad_summed) -> (Tensor, Tensor, Tensor)");
}
