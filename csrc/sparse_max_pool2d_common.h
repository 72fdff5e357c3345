// Window geometry and the coordinate view shared by the CPU and CUDA sparse max-pool kernels
// (host and device code alike, through C10_HOST_DEVICE).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <string>
#include <utility>

#include "raw_op_trust.h"

namespace fastvision {
namespace sparse_pool {

struct Geometry {
  int64_t kh, kw, sh, sw, limit_h, limit_w;
  // Most windows holding one input, along y and along x.
  C10_HOST_DEVICE int64_t py() const { return (kh + sh - 1) / sh; }
  C10_HOST_DEVICE int64_t px() const { return (kw + sw - 1) / sw; }
};

// coord_bound = (H, W): coords must have y < H and x < W (the public op's spatial_shape check, run by the
// kernels so that it costs no pass and no synchronization of its own); negative: unchecked.
inline std::pair<int64_t, int64_t> make_coord_bound(at::IntArrayRef coord_bound) {
  TORCH_CHECK_VALUE(coord_bound.size() == 2, "sparse_max_pool2d: coord_bound must have two entries, got ",
                    coord_bound);
  const auto bound = [](int64_t b) { return b < 0 ? std::numeric_limits<int64_t>::max() : b; };
  return {bound(coord_bound[0]), bound(coord_bound[1])};
}

// Coordinates must lie below this so that window arithmetic (oy * sy + ky, v - k) never overflows int64
// (COORD_LIMIT in fastvision/ops/sparse_max_pool2d.py).
constexpr int64_t kCoordLimit = int64_t(1) << 62;

// window_limit < 0 along an axis means "no limit" (windows anywhere an input reaches). The bounds are
// those of the Python op's checks, repeated for direct calls of the registered ops: kernel and stride
// at most 2^31 - 1 (no int64 overflow in window arithmetic), and N * windows per input within int32
// (the window map and argmax are int32; it also bounds the work per input, so no call runs for hours).
inline Geometry make_geometry(at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef window_limit,
                              int64_t n) {
  TORCH_CHECK_VALUE(kernel_size.size() == 2 && stride.size() == 2 && window_limit.size() == 2,
                    "sparse_max_pool2d: kernel_size, stride and window_limit must have two entries");
  TORCH_CHECK_VALUE(kernel_size[0] > 0 && kernel_size[1] > 0 && stride[0] > 0 && stride[1] > 0,
                    "sparse_max_pool2d: kernel_size and stride must be positive, got ", kernel_size, " and ",
                    stride);
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(kernel_size[0] <= kInt32Max && kernel_size[1] <= kInt32Max && stride[0] <= kInt32Max &&
                        stride[1] <= kInt32Max,
                    "sparse_max_pool2d: kernel_size and stride must be at most 2**31 - 1, got ", kernel_size,
                    " and ", stride);
  const auto limit = [](int64_t l) { return l < 0 ? std::numeric_limits<int64_t>::max() : l; };
  const Geometry g{kernel_size[0], kernel_size[1], stride[0], stride[1], limit(window_limit[0]),
                   limit(window_limit[1])};
  const int64_t py = g.py(), px = g.px();  // each below 2^31: no overflow in the products
  TORCH_CHECK_VALUE(py * px <= kInt32Max && (n == 0 || py * px <= kInt32Max / n),
                    "sparse_max_pool2d: N * ceil(ky/sy) * ceil(kx/sx) must fit int32 (the window map "
                    "is int32), got N = ", n, " and ", py * px, " windows per input");
  return g;
}

// First and last window along one axis whose span [o*s, o*s + k) holds the coordinate v. A negative
// v (invalid input, reported after the CUDA kernels run) reaches no window: last < first.
C10_HOST_DEVICE inline int64_t first_window(int64_t v, int64_t k, int64_t s) { return v < k ? 0 : (v - k) / s + 1; }
C10_HOST_DEVICE inline int64_t last_window(int64_t v, int64_t s, int64_t limit) {
  if (v < 0) return -1;
  return v / s < limit - 1 ? v / s : limit - 1;
}

// The argmax holds, per output row and channel, the offset of the max inside its window, row-major:
// (y - oy*sy) * kx + (x - ox*sx), in [0, ky * kx). Stored in the narrowest integer that holds the
// window's area: uint8 up to 256 (kernel_size <= 16), int16 up to 32768, else int32 / int64.
inline at::ScalarType offset_dtype(const Geometry& g) {
  const int64_t area = g.kh * g.kw;  // each at most 2^31 - 1: the product fits int64
  if (area <= 256) return at::kByte;
  if (area <= 32768) return at::kShort;
  if (area <= (int64_t(1) << 31)) return at::kInt;
  return at::kLong;
}

// The site offset of an input: its offset inside the first window that holds it (along y and x),
// (y - fy*sy) * kx + (x - fx*sx); 0 for an input in a gap between windows (kernel < stride), which no
// window holds. Its offset inside the window of each of its slots: slot_offset().
C10_HOST_DEVICE inline int64_t site_offset(int64_t y, int64_t x, const Geometry& g) {
  const int64_t ry = y - first_window(y, g.kh, g.sh) * g.sh, rx = x - first_window(x, g.kw, g.sw) * g.sw;
  return ry >= 0 && rx >= 0 ? ry * g.kw + rx : 0;
}

// The offset, in the window of slot s = dy * px + dx, of an input whose site offset is `site`; -1 when
// that window does not hold it (only a table that no forward made can point there).
C10_HOST_DEVICE inline int64_t slot_offset(int64_t site, int64_t s, const Geometry& g) {
  const int64_t px = g.px(), dy = s / px, dx = s - dy * px;
  const int64_t ry = site / g.kw - dy * g.sh, rx = site % g.kw - dx * g.sw;
  return ry >= 0 && rx >= 0 ? ry * g.kw + rx : -1;
}

// The backward's tables: argmax and site_offset in [0, ky * kx), window_map in [-1, M) (an output row,
// or -1 for no window). Always on the CPU (a loop), on direct calls only on CUDA (raw_op_trust.h).
inline void check_backward_tables(const at::Tensor& grad, const at::Tensor& argmax, const at::Tensor& window_map,
                                  const at::Tensor& site, const Geometry& g) {
  const at::ScalarType dtype = offset_dtype(g);
  TORCH_CHECK_VALUE(argmax.dim() == 2 && argmax.scalar_type() == dtype && grad.dim() == 2 &&
                        grad.sizes() == argmax.sizes(),
                    "sparse_max_pool2d_backward: argmax must be ", dtype, " of grad_out_feats' shape ", grad.sizes(),
                    " (the window offsets of a ", g.kh, " x ", g.kw, " kernel), got ", argmax.scalar_type(), " ",
                    argmax.sizes());
  TORCH_CHECK_VALUE(window_map.dim() == 2 && window_map.scalar_type() == at::kInt &&
                        window_map.size(1) == g.py() * g.px(),
                    "sparse_max_pool2d_backward: window_map must be int32 [N, ", g.py() * g.px(),
                    "] (ceil(ky/sy) * ceil(kx/sx) windows per input), got ", window_map.scalar_type(), " ",
                    window_map.sizes());
  TORCH_CHECK_VALUE(site.dim() == 1 && site.scalar_type() == dtype && site.size(0) == window_map.size(0),
                    "sparse_max_pool2d_backward: site_offset must be ", dtype, " [N] with N = ", window_map.size(0),
                    " (window_map's rows), got ", site.scalar_type(), " ", site.sizes());
  const int64_t area = g.kh * g.kw, m = argmax.size(0);
  const std::string offsets = "window offsets in [0, ky * kx) = [0, " + std::to_string(area) + ")";
  check_entries_in_range(argmax, 0, area, "sparse_max_pool2d_backward", "argmax", offsets.c_str());
  check_entries_in_range(site, 0, area, "sparse_max_pool2d_backward", "site_offset", offsets.c_str());
  const std::string outputs = "output rows in [0, M) = [0, " + std::to_string(m) + ") or -1 (no window)";
  check_entries_in_range(window_map, -1, m, "sparse_max_pool2d_backward", "window_map", outputs.c_str());
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
