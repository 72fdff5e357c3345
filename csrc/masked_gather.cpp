// masked_gather: x [B, C, H, W] (float32/float16/bfloat16, any strides), mask [B, H, W] bool, max_count
// M >= 0. The forward returns values [B, M, C] (x's dtype), sites [B, M] int64 (h * W + w of each slot
// in row-major order, -1 past the sample's count), valid [B, M] bool and counts [B] int64 (the true
// number of True sites). The backward writes each valid slot's gradient at its site of a zero
// [B, C, H, W] (contiguous): one slot per site, so no atomics.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastvision, m) {
  m.def("masked_gather_forward(Tensor x, Tensor mask, int max_count) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("masked_gather_backward(Tensor grad_values, Tensor sites, int height, int width) -> Tensor");
}
