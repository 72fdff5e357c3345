// Window geometry and the coordinate view shared by the CPU and CUDA sparse max-pool kernels
// (host and device code alike, through C10_HOST_DEVICE).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

namespace fastvision {
namespace sparse_pool {

struct Geometry {
  int64_t kh, kw, sh, sw, limit_h, limit_w;
  // Most windows holding one input, along y and along x.
  C10_HOST_DEVICE int64_t py() const { return (kh + sh - 1) / sh; }
  C10_HOST_DEVICE int64_t px() const { return (kw + sw - 1) / sw; }
};

// window_limit < 0 along an axis means "no limit" (windows anywhere an input reaches).
inline Geometry make_geometry(at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef window_limit) {
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && window_limit.size() == 2,
              "sparse_max_pool2d: kernel_size, stride and window_limit must have two entries");
  TORCH_CHECK(kernel_size[0] > 0 && kernel_size[1] > 0 && stride[0] > 0 && stride[1] > 0,
              "sparse_max_pool2d: kernel_size and stride must be positive, got ", kernel_size, " and ", stride);
  const auto limit = [](int64_t l) { return l < 0 ? std::numeric_limits<int64_t>::max() : l; };
  return {kernel_size[0], kernel_size[1], stride[0], stride[1], limit(window_limit[0]), limit(window_limit[1])};
}

// First and last window along one axis whose span [o*s, o*s + k) holds the coordinate v. A negative
// v (invalid input, reported after the CUDA kernels run) reaches no window: last < first.
C10_HOST_DEVICE inline int64_t first_window(int64_t v, int64_t k, int64_t s) { return v < k ? 0 : (v - k) / s + 1; }
C10_HOST_DEVICE inline int64_t last_window(int64_t v, int64_t s, int64_t limit) {
  if (v < 0) return -1;
  return v / s < limit - 1 ? v / s : limit - 1;
}

// Rows of a [N, 3] (b, y, x) coordinate tensor in canonical (sorted, unique) order.
template <typename index_t>
struct CoordView {
  const index_t* data;
  C10_HOST_DEVICE int64_t b(int64_t i) const { return data[3 * i]; }
  C10_HOST_DEVICE int64_t y(int64_t i) const { return data[3 * i + 1]; }
  C10_HOST_DEVICE int64_t x(int64_t i) const { return data[3 * i + 2]; }
  // Number of inputs in [lo, hi) (one input row, sorted by x) with x < v, or x <= v if inclusive.
  C10_HOST_DEVICE int64_t count_before(int64_t lo, int64_t hi, int64_t v, bool inclusive) const {
    const int64_t begin = lo;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      const int64_t xm = x(mid);
      if (xm < v || (inclusive && xm == v)) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    return lo - begin;
  }
};

}  // namespace sparse_pool
}  // namespace fastvision
