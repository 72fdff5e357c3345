// sparse_conv2d: submanifold sparse convolution over a neighbour table.
// feats [N, Cin]; neighbors [N, K*K] int32, neighbors[o, k] the input row at kernel offset k of output
// site o, or -1 (absent); weight [K*K, Cin, Cout] of feats' dtype. The forward returns
// out[o] = sum_k feats[neighbors[o, k]] @ weight[k] ([N, Cout]). The backward returns
// (grad_feats [N, Cin], or [0] unless need_feats_grad; grad_weight [K*K, Cin, Cout], or [0] unless
// need_weight_grad). The input gradient relies on the map being symmetric, as every submanifold map
// is (i is o's neighbour at offset k exactly when o is i's at K*K - 1 - k); the kernels check it.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastvision, m) {
  m.def("sparse_conv2d_forward(Tensor feats, Tensor neighbors, Tensor weight) -> Tensor");
  m.def(
      "sparse_conv2d_backward(Tensor grad_out, Tensor feats, Tensor neighbors, Tensor weight, "
      "bool need_feats_grad, bool need_weight_grad) -> (Tensor, Tensor)");
}
