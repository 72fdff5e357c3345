// Sparse max pooling on the CPU.
//
// No key sort: the inputs are in canonical order (sorted by (b, y, x), unique), so the inputs of one
// output row (b, oy) are a contiguous run of at most kh input rows, and merging those rows by x makes
// the inputs of each window a contiguous run of the merged order. Steps (csrc/cuda/sparse_max_pool2d.cu
// runs the same per-element bodies, one thread each, with device scans between them):
//   1. input rows: start of each run of equal (b, y), validating canonical order on the way;
//   2. output rows: each input row creates the window rows oy that it is the first to reach;
//   3. merge: the inputs of each output row ordered by (x, row), each placed by binary searches;
//   4. windows: each merged position creates the window columns ox it is the first to reach; a scan
//      numbers them, which is the canonical output order;
//   5. channel max over each window's run; argmax = the window offset of the lowest input index among
//      equal maxima (uint8 for kernels up to 16 x 16, sparse_max_pool2d_common.h).
// Backward gathers (no atomics, deterministic): each input sums, over the windows holding it
// (window_map), the gradients of the channels whose argmax is its offset in that window.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "sparse_max_pool2d_common.h"

namespace fastvision {
namespace {

using sparse_pool::CoordView;
using sparse_pool::first_window;
using sparse_pool::Geometry;
using sparse_pool::last_window;
using sparse_pool::make_coord_bound;
using sparse_pool::make_geometry;
using sparse_pool::offset_dtype;
using sparse_pool::site_offset;
using sparse_pool::slot_offset;

void check_inputs(const at::Tensor& coords, const at::Tensor& feats) {
  TORCH_CHECK(coords.dim() == 2 && coords.size(1) == 3, "sparse_max_pool2d: coords must be [N, 3], got ",
              coords.sizes());
  TORCH_CHECK(coords.scalar_type() == at::kInt || coords.scalar_type() == at::kLong,
              "sparse_max_pool2d: coords must be int32 or int64, got ", coords.scalar_type());
  TORCH_CHECK(feats.dim() == 2 && feats.size(0) == coords.size(0), "sparse_max_pool2d: feats must be [N, C] with N = ",
              coords.size(0), ", got ", feats.sizes());
  TORCH_CHECK(coords.size(0) < std::numeric_limits<int32_t>::max(),
              "sparse_max_pool2d: more than 2^31 - 1 inputs do not fit the int32 argmax");
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename index_t>
Outputs forward_impl(const at::Tensor& coords_in, const at::Tensor& feats_in, const Geometry& g,
                     std::pair<int64_t, int64_t> bound) {
  const at::Tensor coords = coords_in.contiguous();
  const at::Tensor feats = feats_in.contiguous();
  const int64_t n = coords.size(0), channels = feats.size(1);
  const int64_t px = g.px(), slots = g.py() * px;
  const CoordView<index_t> in{coords.data_ptr<index_t>()};

  // 1. Input rows. Validation costs one comparison per site, so the kernel always does it (ValueError).
  const at::ScalarType offsets = offset_dtype(g);
  at::Tensor site = at::empty({n}, feats.options().dtype(at::kLong));
  int64_t* site_data = site.data_ptr<int64_t>();
  std::vector<int64_t> row_start;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = in.b(i), y = in.y(i), x = in.x(i);
    TORCH_CHECK_VALUE(b >= 0 && y >= 0 && x >= 0, "coords must be non-negative, row ", i, " is [", b, ", ", y,
                      ", ", x, "]");
    TORCH_CHECK_VALUE(b < sparse_pool::kCoordLimit && y < sparse_pool::kCoordLimit && x < sparse_pool::kCoordLimit,
                      "coords must be below 2**62 (window arithmetic is int64), row ", i, " is [", b, ", ", y, ", ",
                      x, "]");
    TORCH_CHECK_VALUE(y < bound.first && x < bound.second, "coords must lie inside spatial_shape (", bound.first,
                      ", ", bound.second, "), row ", i, " is [", b, ", ", y, ", ", x, "]");
    site_data[i] = site_offset(y, x, g);
    if (i > 0) {
      const int64_t pb = in.b(i - 1), py = in.y(i - 1), pxv = in.x(i - 1);
      TORCH_CHECK_VALUE(pb < b || (pb == b && (py < y || (py == y && pxv < x))),
                        "coords must be sorted lexicographically by (batch, y, x) without duplicates; row ", i - 1,
                        " is [", pb, ", ", py, ", ", pxv, "] and row ", i, " is [", b, ", ", y, ", ", x, "]");
    }
    if (i == 0 || b != in.b(i - 1) || y != in.y(i - 1)) row_start.push_back(i);
  }
  const int64_t rows = static_cast<int64_t>(row_start.size());
  row_start.push_back(n);

  // 2. Output rows: row r creates the window rows oy that no earlier input row of its batch reaches.
  std::vector<int64_t> orow_b, orow_y, orow_r0, orow_r1, orow_off{0};
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = in.b(row_start[r]), y = in.y(row_start[r]);
    const int64_t first = first_window(y, g.kh, g.sh), last = last_window(y, g.sh, g.limit_h);
    const bool same_batch = r > 0 && in.b(row_start[r - 1]) == b;
    const int64_t prev_last = same_batch ? last_window(in.y(row_start[r - 1]), g.sh, g.limit_h) : -1;
    for (int64_t oy = std::max(first, prev_last + 1); oy <= last; ++oy) {
      int64_t r1 = r + 1;  // rows with y < oy*sh + kh: at most kh of them, all after r
      while (r1 < std::min(rows, r + g.kh) && in.b(row_start[r1]) == b && in.y(row_start[r1]) < oy * g.sh + g.kh) ++r1;
      orow_b.push_back(b);
      orow_y.push_back(oy);
      orow_r0.push_back(r);
      orow_r1.push_back(r1);
      orow_off.push_back(orow_off.back() + row_start[r1] - row_start[r]);
    }
  }
  const int64_t out_rows = static_cast<int64_t>(orow_b.size());
  const int64_t pairs = orow_off.back();

  // 3. Merge the input rows of each output row by (x, row): position = rank in own row + ranks in the others.
  std::vector<int64_t> merged(pairs);
  const int64_t row_grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, pairs / std::max<int64_t>(1, out_rows)));
  at::parallel_for(0, out_rows, row_grain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t r = orow_r0[o]; r < orow_r1[o]; ++r) {
        for (int64_t i = row_start[r]; i < row_start[r + 1]; ++i) {
          const int64_t x = in.x(i);
          int64_t pos = i - row_start[r];
          for (int64_t other = orow_r0[o]; other < orow_r1[o]; ++other) {
            if (other != r) pos += in.count_before(row_start[other], row_start[other + 1], x, other < r);
          }
          merged[orow_off[o] + pos] = i;
        }
      }
    }
  });

  // 4. Windows: merged position p creates the columns ox in [first, last] beyond its predecessor's last.
  const auto new_windows = [&](int64_t o, int64_t p, int64_t& first, int64_t& start, int64_t& last) {
    const int64_t x = in.x(merged[p]);
    first = first_window(x, g.kw, g.sw);
    last = last_window(x, g.sw, g.limit_w);
    const int64_t prev_last = p > orow_off[o] ? last_window(in.x(merged[p - 1]), g.sw, g.limit_w) : -1;
    start = std::max(first, prev_last + 1);
  };
  std::vector<int64_t> win_end(pairs);  // inclusive scan of the windows created per merged position
  at::parallel_for(0, out_rows, row_grain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t p = orow_off[o]; p < orow_off[o + 1]; ++p) {
        int64_t first, start, last;
        new_windows(o, p, first, start, last);
        win_end[p] = std::max<int64_t>(0, last - start + 1);
      }
    }
  });
  for (int64_t p = 1; p < pairs; ++p) win_end[p] += win_end[p - 1];
  const int64_t m = pairs > 0 ? win_end[pairs - 1] : 0;

  at::Tensor out_coords = at::empty({m, 3}, coords.options());
  at::Tensor out_feats = at::empty({m, channels}, feats.options());
  at::Tensor argmax = at::empty({m, channels}, feats.options().dtype(offsets));
  at::Tensor window_map = at::full({n, slots}, -1, feats.options().dtype(at::kInt));
  std::vector<int64_t> win_first(m), win_seg_end(m);
  index_t* oc = out_coords.data_ptr<index_t>();
  int32_t* map = window_map.data_ptr<int32_t>();
  at::parallel_for(0, out_rows, row_grain, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t p = orow_off[o]; p < orow_off[o + 1]; ++p) {
        int64_t first, start, last;
        new_windows(o, p, first, start, last);
        for (int64_t ox = start; ox <= last; ++ox) {
          const int64_t w = win_end[p] - 1 - (last - ox);
          oc[3 * w] = static_cast<index_t>(orow_b[o]);
          oc[3 * w + 1] = static_cast<index_t>(orow_y[o]);
          oc[3 * w + 2] = static_cast<index_t>(ox);
          win_first[w] = p;
          win_seg_end[w] = orow_off[o + 1];
        }
        // The windows [first, last] of this input all exist and are numbered consecutively.
        const int64_t i = merged[p];
        const int64_t dy = orow_y[o] - first_window(in.y(i), g.kh, g.sh);
        for (int64_t ox = first; ox <= last; ++ox) {
          map[i * slots + dy * px + (ox - first)] = static_cast<int32_t>(win_end[p] - 1 - (last - ox));
        }
      }
    }
  });

  // 5. Channel max per window, visiting its inputs in index order so that strict '>' keeps the lowest;
  // the argmax is the window offset of the input that holds the max.
  if (m > 0 && channels > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "sparse_max_pool2d_cpu", [&] {
      using feat_t = scalar_t;  // the offset dispatch below names its own scalar_t
      using acc_t = at::opmath_type<feat_t>;
      const feat_t* f = feats.data_ptr<feat_t>();
      feat_t* out = out_feats.data_ptr<feat_t>();
      AT_DISPATCH_INTEGRAL_TYPES(offsets, "sparse_max_pool2d_cpu_offsets", [&] {
        using offset_t = scalar_t;
        offset_t* arg = argmax.data_ptr<offset_t>();
        const int64_t grain = std::max<int64_t>(1, 16384 / channels);
        at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
          std::vector<int64_t> inputs;
          std::vector<offset_t> input_offset;
          std::vector<acc_t> best(channels);
          std::vector<int32_t> best_k(channels);  // position in `inputs`, which are in index order
          for (int64_t w = begin; w < end; ++w) {
            const int64_t oy = static_cast<int64_t>(oc[3 * w + 1]), ox = static_cast<int64_t>(oc[3 * w + 2]);
            const int64_t x_end = ox * g.sw + g.kw;
            inputs.clear();
            for (int64_t p = win_first[w]; p < win_seg_end[w] && in.x(merged[p]) < x_end; ++p) {
              inputs.push_back(merged[p]);
            }
            for (size_t k = 1; k < inputs.size(); ++k) {  // insertion sort: a window holds a few inputs
              for (size_t j = k; j > 0 && inputs[j] < inputs[j - 1]; --j) std::swap(inputs[j], inputs[j - 1]);
            }
            input_offset.resize(inputs.size());
            for (size_t k = 0; k < inputs.size(); ++k) {
              input_offset[k] = static_cast<offset_t>((in.y(inputs[k]) - oy * g.sh) * g.kw + (in.x(inputs[k]) - ox * g.sw));
            }
            const feat_t* row = f + inputs[0] * channels;
            for (int64_t c = 0; c < channels; ++c) {
              best[c] = static_cast<acc_t>(row[c]);
              best_k[c] = 0;
            }
            for (size_t k = 1; k < inputs.size(); ++k) {
              row = f + inputs[k] * channels;
              const int32_t position = static_cast<int32_t>(k);
              for (int64_t c = 0; c < channels; ++c) {
                const acc_t v = static_cast<acc_t>(row[c]);
                // NaN wins over numbers (like torch.max); the first NaN stays.
                const bool take = v > best[c] || (v != v && best[c] == best[c]);
                best[c] = take ? v : best[c];
                best_k[c] = take ? position : best_k[c];
              }
            }
            for (int64_t c = 0; c < channels; ++c) {
              out[w * channels + c] = static_cast<feat_t>(best[c]);
              arg[w * channels + c] = input_offset[best_k[c]];
            }
          }
        });
      });
    });
  }
  return {out_coords, out_feats, argmax, window_map, site.to(offsets)};
}

Outputs sparse_max_pool2d_forward_cpu(const at::Tensor& coords, const at::Tensor& feats, at::IntArrayRef kernel_size,
                                      at::IntArrayRef stride, at::IntArrayRef window_limit,
                                      at::IntArrayRef coord_bound) {
  check_inputs(coords, feats);
  const Geometry g = make_geometry(kernel_size, stride, window_limit, coords.size(0));
  const auto bound = make_coord_bound(coord_bound);
  if (coords.scalar_type() == at::kInt) return forward_impl<int32_t>(coords, feats, g, bound);
  return forward_impl<int64_t>(coords, feats, g, bound);
}

at::Tensor sparse_max_pool2d_backward_cpu(const at::Tensor& grad_out_feats, const at::Tensor& argmax_in,
                                          const at::Tensor& window_map_in, const at::Tensor& site_in,
                                          at::IntArrayRef kernel_size, at::IntArrayRef stride) {
  const Geometry g = make_geometry(kernel_size, stride, {-1, -1}, window_map_in.dim() == 2 ? window_map_in.size(0) : 0);
  sparse_pool::check_backward_tables(grad_out_feats, argmax_in, window_map_in, site_in, g);
  const at::Tensor grad = grad_out_feats.contiguous();
  const at::Tensor argmax = argmax_in.contiguous();
  const at::Tensor window_map = window_map_in.contiguous();
  const at::Tensor site_t = site_in.to(at::kLong).contiguous();
  const int64_t n = window_map.size(0), slots = window_map.size(1), channels = grad.size(1);
  at::Tensor grad_feats = at::empty({n, channels}, grad.options());
  if (grad_feats.numel() == 0) return grad_feats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "sparse_max_pool2d_backward_cpu", [&] {
    using feat_t = scalar_t;  // the offset dispatch below names its own scalar_t
    using acc_t = at::opmath_type<feat_t>;
    const feat_t* dy = grad.data_ptr<feat_t>();
    feat_t* dx = grad_feats.data_ptr<feat_t>();
    const int32_t* map = window_map.data_ptr<int32_t>();
    const int64_t* site = site_t.data_ptr<int64_t>();
    AT_DISPATCH_INTEGRAL_TYPES(argmax.scalar_type(), "sparse_max_pool2d_backward_cpu_offsets", [&] {
      using offset_t = scalar_t;
      const offset_t* arg = argmax.data_ptr<offset_t>();
      at::parallel_for(0, n, std::max<int64_t>(1, 16384 / channels), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(channels);
        for (int64_t i = begin; i < end; ++i) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t s = 0; s < slots; ++s) {
            const int64_t w = map[i * slots + s];
            const int64_t offset = w < 0 ? -1 : slot_offset(site[i], s, g);
            if (offset < 0) continue;
            const offset_t mine = static_cast<offset_t>(offset);  // the argmax's width: the loop vectorizes
            const offset_t* arg_row = arg + w * channels;
            const feat_t* dy_row = dy + w * channels;
            for (int64_t c = 0; c < channels; ++c) {
              acc[c] += arg_row[c] == mine ? static_cast<acc_t>(dy_row[c]) : acc_t(0);
            }
          }
          for (int64_t c = 0; c < channels; ++c) dx[i * channels + c] = static_cast<feat_t>(acc[c]);
        }
      });
    });
  });
  return grad_feats;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvision, CPU, m) {
  m.impl("sparse_max_pool2d_forward", &sparse_max_pool2d_forward_cpu);
  m.impl("sparse_max_pool2d_backward", &sparse_max_pool2d_backward_cpu);
}

}  // namespace fastvision
