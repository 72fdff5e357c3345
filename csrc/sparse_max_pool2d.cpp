// sparse_max_pool2d: max pooling over the active sites of a sparse 2-D map.
// coords [N, 3] (batch, y, x) int32/int64 in canonical order (lexicographically sorted, unique);
// feats [N, C]. A window (b, oy, ox) covers y in [oy*sh, oy*sh + kh) and x in [ox*sw, ox*sw + kw);
// window_limit = (windows along y, windows along x), -1 for unbounded; coord_bound = (H, W) that coords
// must lie below (checked by the kernels), -1 for unchecked. The forward returns out_coords [M, 3]
// (coords' dtype), out_feats [M, C], argmax [M, C] (the window offset (y - oy*sh) * kw + (x - ox*sw)
// of each max, lowest input index on ties; uint8 when kh * kw <= 256, int16 up to 32768, else int32 /
// int64), window_map [N, P] int32 (for each input and each of the P = ceil(kh/sh) * ceil(kw/sw)
// windows that can hold it, the output row, or -1) and site_offset [N] (argmax's dtype: each input's
// offset in the first window that holds it). The backward gathers: each input sums the gradients of
// the outputs whose argmax is its offset in that window.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastvision, m) {
  m.def(
      "sparse_max_pool2d_forward(Tensor coords, Tensor feats, int[2] kernel_size, int[2] stride, "
      "int[2] window_limit, int[2] coord_bound=-1) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sparse_max_pool2d_backward(Tensor grad_out_feats, Tensor argmax, Tensor window_map, Tensor site_offset, "
      "int[2] kernel_size, int[2] stride) -> Tensor");
}
