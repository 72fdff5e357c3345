// Sparse max pooling on CUDA: the steps of csrc/cpu/sparse_max_pool2d.cpp (which see), one thread per
// element, with device scans (at::cumsum) between them. No key sort: canonical input order makes each
// output row's inputs a contiguous run of at most kh input rows, and a merge by x (each element placed
// by binary searches into the other rows) makes each window's inputs a contiguous run of the merged
// order. Buffers are sized by upper bounds (N * ceil(kh/sh)), the device-side counts end each kernel's
// range, so the only host synchronization is one read of (error flags, output count) that sizes the
// outputs. The pooling kernel gives each window a group of threads over 16-byte channel vectors and
// visits its inputs once (atomic-free); the backward gathers through the window map (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "cuda/cuda_helpers.cuh"
#include "sparse_max_pool2d_common.h"

namespace fastvision {
namespace {

constexpr int kThreads = 256;
constexpr unsigned long long kNegativeCoord = 1, kUnsortedCoords = 2;

using sparse_pool::CoordView;
using sparse_pool::first_window;
using sparse_pool::Geometry;
using sparse_pool::last_window;
using sparse_pool::make_geometry;

#define GRID_STRIDE(i, n)                                                       \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; \
       i < (n); i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// 1a. Row flags (start of each run of equal (b, y)) and validation flags.
template <typename index_t>
__global__ void row_flags_kernel(CoordView<index_t> in, int64_t n, int64_t* flag, unsigned long long* status) {
  GRID_STRIDE(i, n) {
    const int64_t b = in.b(i), y = in.y(i), x = in.x(i);
    unsigned long long error = (b < 0 || y < 0 || x < 0) ? kNegativeCoord : 0;
    bool starts_row = true;
    if (i > 0) {
      const int64_t pb = in.b(i - 1), py = in.y(i - 1), px = in.x(i - 1);
      if (!(pb < b || (pb == b && (py < y || (py == y && px < x))))) error |= kUnsortedCoords;
      starts_row = b != pb || y != py;
    }
    if (error) atomicOr(status, error);
    flag[i] = starts_row;
  }
}

// 1b. row_start[r] = first input of row r; row_start[R] = N.
__global__ void row_starts_kernel(const int64_t* flag, const int64_t* row_incl, int64_t n, int64_t* row_start) {
  GRID_STRIDE(i, n) {
    if (flag[i]) row_start[row_incl[i] - 1] = i;
    if (i == n - 1) row_start[row_incl[i]] = n;
  }
}

// 2a. Window rows each input row is the first to reach (0 past the last row, for the scan).
template <typename index_t>
__global__ void orow_count_kernel(CoordView<index_t> in, Geometry g, const int64_t* row_start, const int64_t* row_incl,
                                  int64_t n, int64_t* count) {
  const int64_t rows = row_incl[n - 1];
  GRID_STRIDE(r, n) {
    int64_t c = 0;
    if (r < rows) {
      const int64_t b = in.b(row_start[r]), y = in.y(row_start[r]);
      const int64_t first = first_window(y, g.kh, g.sh), last = last_window(y, g.sh, g.limit_h);
      const bool same_batch = r > 0 && in.b(row_start[r - 1]) == b;
      const int64_t prev_last = same_batch ? last_window(in.y(row_start[r - 1]), g.sh, g.limit_h) : -1;
      c = max(int64_t{0}, last - max(first, prev_last + 1) + 1);
    }
    count[r] = c;
  }
}

// 2b. Output row table: batch, oy, input rows [r0, r1), number of inputs.
template <typename index_t>
__global__ void orow_fill_kernel(CoordView<index_t> in, Geometry g, const int64_t* row_start, const int64_t* row_incl,
                                 const int64_t* count, const int64_t* count_incl, int64_t n, int64_t* orow_b,
                                 int64_t* orow_y, int64_t* orow_r0, int64_t* orow_r1, int64_t* orow_len) {
  const int64_t rows = row_incl[n - 1];
  GRID_STRIDE(r, rows) {
    const int64_t b = in.b(row_start[r]), y = in.y(row_start[r]);
    const int64_t last = last_window(y, g.sh, g.limit_h);
    for (int64_t t = 0; t < count[r]; ++t) {
      const int64_t o = count_incl[r] - count[r] + t, oy = last - count[r] + 1 + t;
      int64_t r1 = r + 1;
      while (r1 < min(rows, r + g.kh) && in.b(row_start[r1]) == b && in.y(row_start[r1]) < oy * g.sh + g.kh) ++r1;
      orow_b[o] = b;
      orow_y[o] = oy;
      orow_r0[o] = r;
      orow_r1[o] = r1;
      orow_len[o] = row_start[r1] - row_start[r];
    }
  }
}

// Number of (input, output row) pairs, read on the device (capped: invalid input is reported later).
__device__ __forceinline__ int64_t pair_count(const int64_t* count_incl, const int64_t* orow_end, int64_t n,
                                              int64_t capacity) {
  const int64_t out_rows = count_incl[n - 1];
  return out_rows > 0 ? min(orow_end[out_rows - 1], capacity) : 0;
}

// 3. Merge: each element of an output row goes to (rank in its row) + (ranks in the other rows).
template <typename index_t>
__global__ void merge_kernel(CoordView<index_t> in, const int64_t* row_start, const int64_t* count_incl,
                             const int64_t* orow_r0, const int64_t* orow_r1, const int64_t* orow_len,
                             const int64_t* orow_end, int64_t n, int64_t capacity, int64_t* merged,
                             int64_t* pair_orow) {
  const int64_t out_rows = count_incl[n - 1];
  const int64_t pairs = pair_count(count_incl, orow_end, n, capacity);
  GRID_STRIDE(q, pairs) {
    int64_t lo = 0, hi = out_rows - 1;  // the output row o with orow_end[o - 1] <= q < orow_end[o]
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (orow_end[mid] > q) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    const int64_t o = lo, offset = orow_end[o] - orow_len[o], r0 = orow_r0[o], r1 = orow_r1[o];
    const int64_t i = row_start[r0] + (q - offset);
    int64_t row = r0;
    while (row + 1 < r1 && row_start[row + 1] <= i) ++row;
    const int64_t x = in.x(i);
    int64_t pos = i - row_start[row];
    for (int64_t other = r0; other < r1; ++other) {
      if (other != row) pos += in.count_before(row_start[other], row_start[other + 1], x, other < row);
    }
    if (pos < orow_len[o] && offset + pos < capacity) merged[offset + pos] = i;
    pair_orow[q] = o;
  }
}

// 4. Window columns that merged position p is the first to reach.
template <typename index_t>
__device__ __forceinline__ void new_windows(CoordView<index_t> in, const Geometry& g, const int64_t* merged,
                                            int64_t segment_start, int64_t p, int64_t n, int64_t& first,
                                            int64_t& start, int64_t& last) {
  // merged holds a permutation of each segment for valid input; clamp so that invalid input (reported
  // after the count sync) cannot read out of bounds.
  const auto input = [&](int64_t q) { const int64_t i = merged[q]; return (i < 0 || i >= n) ? int64_t{0} : i; };
  const int64_t x = in.x(input(p));
  first = first_window(x, g.kw, g.sw);
  last = last_window(x, g.sw, g.limit_w);
  const int64_t prev_last = p > segment_start ? last_window(in.x(input(p - 1)), g.sw, g.limit_w) : -1;
  start = max(first, prev_last + 1);
}

template <typename index_t>
__global__ void window_count_kernel(CoordView<index_t> in, Geometry g, const int64_t* merged, const int64_t* pair_orow,
                                    const int64_t* orow_len, const int64_t* orow_end, const int64_t* count_incl,
                                    int64_t n, int64_t capacity, int64_t* win_count) {
  const int64_t pairs = pair_count(count_incl, orow_end, n, capacity);
  GRID_STRIDE(p, capacity) {
    int64_t c = 0;
    if (p < pairs) {
      const int64_t o = pair_orow[p];
      int64_t first, start, last;
      new_windows(in, g, merged, orow_end[o] - orow_len[o], p, n, first, start, last);
      c = max(int64_t{0}, last - start + 1);
    }
    win_count[p] = c;
  }
}

__global__ void output_count_kernel(const int64_t* win_end, int64_t capacity, unsigned long long* status) {
  status[1] = static_cast<unsigned long long>(win_end[capacity - 1]);
}

// 5a. Output coordinates, each window's first merged position, and the input -> window map.
template <typename index_t>
__global__ void window_fill_kernel(CoordView<index_t> in, Geometry g, const int64_t* merged, const int64_t* pair_orow,
                                   const int64_t* orow_b, const int64_t* orow_y, const int64_t* orow_len,
                                   const int64_t* orow_end, const int64_t* win_end, const int64_t* count_incl,
                                   int64_t capacity, int64_t n, index_t* out_coords, int64_t* win_first,
                                   int32_t* window_map) {
  const int64_t px = g.px(), slots = g.py() * px;
  const int64_t pairs = pair_count(count_incl, orow_end, n, capacity);
  GRID_STRIDE(p, pairs) {
    const int64_t o = pair_orow[p];
    int64_t first, start, last;
    new_windows(in, g, merged, orow_end[o] - orow_len[o], p, n, first, start, last);
    for (int64_t ox = start; ox <= last; ++ox) {
      const int64_t w = win_end[p] - 1 - (last - ox);
      out_coords[3 * w] = static_cast<index_t>(orow_b[o]);
      out_coords[3 * w + 1] = static_cast<index_t>(orow_y[o]);
      out_coords[3 * w + 2] = static_cast<index_t>(ox);
      win_first[w] = p;
    }
    const int64_t i = merged[p];
    const int64_t dy = orow_y[o] - first_window(in.y(i), g.kh, g.sh);
    for (int64_t ox = first; ox <= last; ++ox) {
      window_map[i * slots + dy * px + (ox - first)] = static_cast<int32_t>(win_end[p] - 1 - (last - ox));
    }
  }
}

using cuda::aligned16;
using cuda::Vec;

// NaN wins over numbers (like torch.max); among equal values (or NaNs) the lowest input index wins.
template <typename acc_t>
__device__ __forceinline__ bool better(acc_t v, int64_t i, acc_t best, int64_t best_i) {
  const bool v_nan = v != v, best_nan = best != best;
  if (best_nan) return v_nan && i < best_i;
  return v_nan || v > best || (v == best && i < best_i);
}

// 5b. Channel max: a group of `group` threads per window, each over kVec-channel vectors.
template <typename T, int kVec, typename index_t>
__global__ void __launch_bounds__(kThreads)
pool_kernel(CoordView<index_t> in, const T* __restrict__ feats, const int64_t* __restrict__ merged,
            const int64_t* __restrict__ pair_orow, const int64_t* __restrict__ orow_end,
            const int64_t* __restrict__ win_first, const index_t* __restrict__ out_coords, int64_t windows,
            int64_t vecs, int group, int64_t sw, int64_t kw, T* __restrict__ out, int32_t* __restrict__ argmax) {
  using V = Vec<T, kVec>;
  using I = Vec<int32_t, kVec>;
  using acc_t = at::opmath_type<T>;
  const int per_block = kThreads / group;
  const int lane = threadIdx.x % group;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * per_block + threadIdx.x / group; w < windows;
       w += static_cast<int64_t>(gridDim.x) * per_block) {
    const int64_t begin = win_first[w], end = orow_end[pair_orow[begin]];
    const int64_t x_end = static_cast<int64_t>(out_coords[3 * w + 2]) * sw + kw;
    for (int64_t c = lane; c < vecs; c += group) {
      V best;
      int32_t best_i[kVec];
      for (int64_t p = begin; p < end; ++p) {
        const int64_t i = merged[p];
        if (in.x(i) >= x_end) break;
        const V v = reinterpret_cast<const V*>(feats)[i * vecs + c];
        if (p == begin) {
          best = v;
#pragma unroll
          for (int k = 0; k < kVec; ++k) best_i[k] = static_cast<int32_t>(i);
          continue;
        }
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          if (better(static_cast<acc_t>(v.v[k]), i, static_cast<acc_t>(best.v[k]), best_i[k])) {
            best.v[k] = v.v[k];
            best_i[k] = static_cast<int32_t>(i);
          }
        }
      }
      I arg;
#pragma unroll
      for (int k = 0; k < kVec; ++k) arg.v[k] = best_i[k];
      reinterpret_cast<V*>(out)[w * vecs + c] = best;
      reinterpret_cast<I*>(argmax)[w * vecs + c] = arg;
    }
  }
}

// Backward: each input sums, over the windows holding it, the gradients of the channels it is the max of.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const T* __restrict__ grad, const int32_t* __restrict__ argmax, const int32_t* __restrict__ window_map,
                int64_t n, int64_t slots, int64_t m, int64_t vecs, int group, T* __restrict__ grad_feats) {
  using V = Vec<T, kVec>;
  using I = Vec<int32_t, kVec>;
  using acc_t = at::opmath_type<T>;
  const int per_block = kThreads / group;
  const int lane = threadIdx.x % group;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * per_block + threadIdx.x / group; i < n;
       i += static_cast<int64_t>(gridDim.x) * per_block) {
    for (int64_t c = lane; c < vecs; c += group) {
      acc_t acc[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc[k] = acc_t(0);
      for (int64_t s = 0; s < slots; ++s) {
        const int64_t w = window_map[i * slots + s];
        if (w < 0 || w >= m) continue;
        const I arg = reinterpret_cast<const I*>(argmax)[w * vecs + c];
        const V g = reinterpret_cast<const V*>(grad)[w * vecs + c];
#pragma unroll
        for (int k = 0; k < kVec; ++k) acc[k] += arg.v[k] == i ? static_cast<acc_t>(g.v[k]) : acc_t(0);
      }
      V out;
#pragma unroll
      for (int k = 0; k < kVec; ++k) out.v[k] = static_cast<T>(acc[k]);
      reinterpret_cast<V*>(grad_feats)[i * vecs + c] = out;
    }
  }
}

int64_t blocks_for(int64_t items, int64_t per_block = kThreads) {
  return cuda::blocks_for(items, per_block, 65535LL * 8);
}

// Threads per row: enough for one pass over the channel vectors, at most a warp.
int group_for(int64_t vecs) {
  int group = 1;
  while (group < 32 && group < vecs) group *= 2;
  return group;
}

// Calls launch(std::integral_constant<int, kVec>) with 16-byte vectors when C and the pointers allow.
template <typename T, typename Launch>
void dispatch_vector_width(int64_t channels, bool pointers_aligned, Launch&& launch) {
  constexpr int kWide = cuda::kWideVec<T>;
  if (pointers_aligned && channels % kWide == 0) {
    launch(std::integral_constant<int, kWide>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

template <typename index_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& coords,
                                                                         const at::Tensor& feats, const Geometry& g) {
  const int64_t n = coords.size(0), channels = feats.size(1);
  const int64_t py = g.py(), slots = py * g.px();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto longs = coords.options().dtype(at::kLong);
  if (n == 0) {
    const auto ints = feats.options().dtype(at::kInt);
    return {at::empty({0, 3}, coords.options()), at::empty({0, channels}, feats.options()),
            at::empty({0, channels}, ints), at::empty({0, slots}, ints)};
  }
  const CoordView<index_t> in{coords.data_ptr<index_t>()};
  const int64_t capacity = n * py;  // bound on output rows and on (input, output row) pairs

  at::Tensor status = at::zeros({2}, longs);  // [error flags, output count]
  auto* status_ptr = reinterpret_cast<unsigned long long*>(status.data_ptr<int64_t>());
  at::Tensor flag = at::empty({n}, longs);
  row_flags_kernel<<<blocks_for(n), kThreads, 0, stream>>>(in, n, flag.data_ptr<int64_t>(), status_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor row_incl = at::cumsum(flag, 0);
  at::Tensor row_start = at::empty({n + 1}, longs);
  row_starts_kernel<<<blocks_for(n), kThreads, 0, stream>>>(flag.data_ptr<int64_t>(), row_incl.data_ptr<int64_t>(), n,
                                                            row_start.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor count = at::empty({n}, longs);
  orow_count_kernel<<<blocks_for(n), kThreads, 0, stream>>>(in, g, row_start.data_ptr<int64_t>(),
                                                            row_incl.data_ptr<int64_t>(), n, count.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor count_incl = at::cumsum(count, 0);
  at::Tensor orow = at::empty({4, capacity}, longs);
  at::Tensor orow_len = at::zeros({capacity}, longs);  // zeros past the last output row, for the scan
  int64_t* orow_b = orow[0].data_ptr<int64_t>();
  int64_t* orow_y = orow[1].data_ptr<int64_t>();
  int64_t* orow_r0 = orow[2].data_ptr<int64_t>();
  int64_t* orow_r1 = orow[3].data_ptr<int64_t>();
  orow_fill_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      in, g, row_start.data_ptr<int64_t>(), row_incl.data_ptr<int64_t>(), count.data_ptr<int64_t>(),
      count_incl.data_ptr<int64_t>(), n, orow_b, orow_y, orow_r0, orow_r1, orow_len.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor orow_end = at::cumsum(orow_len, 0);

  at::Tensor merged = at::empty({capacity}, longs);
  at::Tensor pair_orow = at::empty({capacity}, longs);
  merge_kernel<<<blocks_for(capacity), kThreads, 0, stream>>>(
      in, row_start.data_ptr<int64_t>(), count_incl.data_ptr<int64_t>(), orow_r0, orow_r1,
      orow_len.data_ptr<int64_t>(), orow_end.data_ptr<int64_t>(), n, capacity, merged.data_ptr<int64_t>(),
      pair_orow.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor win_count = at::empty({capacity}, longs);
  window_count_kernel<<<blocks_for(capacity), kThreads, 0, stream>>>(
      in, g, merged.data_ptr<int64_t>(), pair_orow.data_ptr<int64_t>(), orow_len.data_ptr<int64_t>(),
      orow_end.data_ptr<int64_t>(), count_incl.data_ptr<int64_t>(), n, capacity, win_count.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor win_end = at::cumsum(win_count, 0);
  output_count_kernel<<<1, 1, 0, stream>>>(win_end.data_ptr<int64_t>(), capacity, status_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // The one host synchronization: error flags and the output count.
  const at::Tensor host_status = status.cpu();
  const int64_t errors = host_status[0].item<int64_t>(), m = host_status[1].item<int64_t>();
  TORCH_CHECK_VALUE(!(errors & kNegativeCoord), "coords must be non-negative");
  TORCH_CHECK_VALUE(!(errors & kUnsortedCoords),
                    "coords must be sorted lexicographically by (batch, y, x) without duplicates");
  // Window-map entries and argmax are int32 (the Python wrapper checks N * slots; direct calls land here).
  TORCH_CHECK(m <= std::numeric_limits<int32_t>::max(), "sparse_max_pool2d: ", m,
              " output windows do not fit the int32 window map");
  // From here the input is valid: the pairs fit the capacity and merged is a permutation of each segment.

  at::Tensor out_coords = at::empty({m, 3}, coords.options());
  at::Tensor out_feats = at::empty({m, channels}, feats.options());
  at::Tensor argmax = at::empty({m, channels}, feats.options().dtype(at::kInt));
  at::Tensor window_map = at::full({n, slots}, -1, feats.options().dtype(at::kInt));
  if (m == 0) return {out_coords, out_feats, argmax, window_map};
  at::Tensor win_first = at::empty({m}, longs);
  window_fill_kernel<<<blocks_for(capacity), kThreads, 0, stream>>>(
      in, g, merged.data_ptr<int64_t>(), pair_orow.data_ptr<int64_t>(), orow_b, orow_y, orow_len.data_ptr<int64_t>(),
      orow_end.data_ptr<int64_t>(), win_end.data_ptr<int64_t>(), count_incl.data_ptr<int64_t>(), capacity, n,
      out_coords.data_ptr<index_t>(),
      win_first.data_ptr<int64_t>(), window_map.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (channels == 0) return {out_coords, out_feats, argmax, window_map};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "sparse_max_pool2d_cuda", [&] {
    using T = scalar_t;
    const bool pointers_aligned = aligned16(feats.data_ptr()) && aligned16(out_feats.data_ptr()) &&
                                  aligned16(argmax.data_ptr());
    dispatch_vector_width<T>(channels, pointers_aligned, [&](auto vec_tag) {
      constexpr int kVec = decltype(vec_tag)::value;
      const int64_t vecs = channels / kVec;
      const int group = group_for(vecs);
      pool_kernel<T, kVec, index_t><<<blocks_for(m, kThreads / group), kThreads, 0, stream>>>(
          in, feats.data_ptr<T>(), merged.data_ptr<int64_t>(), pair_orow.data_ptr<int64_t>(),
          orow_end.data_ptr<int64_t>(), win_first.data_ptr<int64_t>(), out_coords.data_ptr<index_t>(), m, vecs,
          group, g.sw, g.kw, out_feats.data_ptr<T>(), argmax.data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out_coords, out_feats, argmax, window_map};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_max_pool2d_forward_cuda(
    const at::Tensor& coords_in, const at::Tensor& feats_in, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef window_limit) {
  TORCH_CHECK(coords_in.is_cuda() && feats_in.is_cuda(), "sparse_max_pool2d_forward_cuda: tensors must be on CUDA");
  TORCH_CHECK(coords_in.dim() == 2 && coords_in.size(1) == 3, "sparse_max_pool2d: coords must be [N, 3], got ",
              coords_in.sizes());
  TORCH_CHECK(coords_in.scalar_type() == at::kInt || coords_in.scalar_type() == at::kLong,
              "sparse_max_pool2d: coords must be int32 or int64, got ", coords_in.scalar_type());
  TORCH_CHECK(feats_in.dim() == 2 && feats_in.size(0) == coords_in.size(0),
              "sparse_max_pool2d: feats must be [N, C] with N = ", coords_in.size(0), ", got ", feats_in.sizes());
  TORCH_CHECK(coords_in.size(0) < std::numeric_limits<int32_t>::max(),
              "sparse_max_pool2d: more than 2^31 - 1 inputs do not fit the int32 argmax");
  TORCH_CHECK(coords_in.device() == feats_in.device(), "sparse_max_pool2d: coords on ", coords_in.device(),
              " and feats on ", feats_in.device(), " must be on one device");
  const c10::cuda::CUDAGuard guard(feats_in.device());
  const Geometry g = make_geometry(kernel_size, stride, window_limit);
  const at::Tensor coords = coords_in.contiguous();
  const at::Tensor feats = feats_in.contiguous();
  if (coords.scalar_type() == at::kInt) return forward_impl<int32_t>(coords, feats, g);
  return forward_impl<int64_t>(coords, feats, g);
}

at::Tensor sparse_max_pool2d_backward_cuda(const at::Tensor& grad_out_feats, const at::Tensor& argmax_in,
                                           const at::Tensor& window_map_in) {
  TORCH_CHECK(grad_out_feats.is_cuda() && argmax_in.is_cuda() && window_map_in.is_cuda(),
              "sparse_max_pool2d_backward_cuda: tensors must be on CUDA");
  TORCH_CHECK(argmax_in.dim() == 2 && argmax_in.scalar_type() == at::kInt,
              "sparse_max_pool2d_backward: argmax must be a 2-D int32 tensor");
  TORCH_CHECK(window_map_in.dim() == 2 && window_map_in.scalar_type() == at::kInt,
              "sparse_max_pool2d_backward: window_map must be a 2-D int32 tensor");
  TORCH_CHECK(grad_out_feats.sizes() == argmax_in.sizes(), "sparse_max_pool2d_backward: grad_out_feats has shape ",
              grad_out_feats.sizes(), ", expected argmax's shape ", argmax_in.sizes());
  TORCH_CHECK(argmax_in.device() == grad_out_feats.device() && window_map_in.device() == grad_out_feats.device(),
              "sparse_max_pool2d_backward: grad_out_feats, argmax and window_map must be on one device");
  const c10::cuda::CUDAGuard guard(grad_out_feats.device());
  const at::Tensor grad = grad_out_feats.contiguous();
  const at::Tensor argmax = argmax_in.contiguous();
  const at::Tensor window_map = window_map_in.contiguous();
  const int64_t n = window_map.size(0), slots = window_map.size(1);
  const int64_t m = grad.size(0), channels = grad.size(1);
  at::Tensor grad_feats = at::empty({n, channels}, grad.options());
  if (grad_feats.numel() == 0) return grad_feats;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "sparse_max_pool2d_backward_cuda", [&] {
    using T = scalar_t;
    const bool pointers_aligned =
        aligned16(grad.data_ptr()) && aligned16(argmax.data_ptr()) && aligned16(grad_feats.data_ptr());
    dispatch_vector_width<T>(channels, pointers_aligned, [&](auto vec_tag) {
      constexpr int kVec = decltype(vec_tag)::value;
      const int64_t vecs = channels / kVec;
      const int group = group_for(vecs);
      backward_kernel<T, kVec><<<blocks_for(n, kThreads / group), kThreads, 0, stream>>>(
          grad.data_ptr<T>(), argmax.data_ptr<int32_t>(), window_map.data_ptr<int32_t>(), n, slots, m, vecs, group,
          grad_feats.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_feats;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvision, CUDA, m) {
  m.impl("sparse_max_pool2d_forward", &sparse_max_pool2d_forward_cuda);
  m.impl("sparse_max_pool2d_backward", &sparse_max_pool2d_backward_cuda);
}

}  // namespace fastvision
