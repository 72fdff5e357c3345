// Sparse max pooling on CUDA: the steps of csrc/cpu/sparse_max_pool2d.cpp (which see), one thread per
// element. No key sort: canonical input order makes each output row's inputs a contiguous run of at
// most kh input rows, and a merge by x (each element placed by binary searches into the other rows)
// makes each window's inputs a contiguous run of the merged order.
//
// The forward is two launches and one host synchronization:
//   1. plan_kernel, a cooperative launch (one resident grid, grid-wide barriers between the steps):
//      validation flags, row starts, the output-row table, the merge, the window numbering (four
//      device-wide scans, each a block-local pass, a barrier, and an offset pass that also runs the
//      step that consumes it) and the input -> window map. It leaves (error flags, first bad row,
//      output count, pair count) in four words;
//   2. the host reads those four words (the one synchronization: the output count sizes the outputs);
//   3. pool_kernel: each window's coordinates (found from its creating merged position by a binary
//      search over the window scan) and its channel max, a group of threads over 16-byte channel
//      vectors, atomic-free; the argmax is the window offset of the max (uint8 for kernels up to
//      16 x 16, sparse_max_pool2d_common.h).
// Buffers are sized by upper bounds (N * ceil(kh/sh)) and carved out of one allocation. The backward is
// one kernel that gathers through the window map (deterministic) and never synchronizes.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "cuda/cuda_helpers.cuh"
#include "sparse_max_pool2d_common.h"

namespace fastvision {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned long long kBadInput = 1;  // any of: negative, >= 2**62, outside coord_bound, unsorted
constexpr unsigned long long kNoRow = ~0ull;
// The four words plan_kernel leaves for the host.
enum StatusWord { kErrors = 0, kBadRow = 1, kOutputs = 2, kPairs = 3, kStatusWords = 4 };

using cuda::aligned16;
using cuda::Vec;
using sparse_pool::CoordView;
using sparse_pool::first_window;
using sparse_pool::Geometry;
using sparse_pool::last_window;
using sparse_pool::make_coord_bound;
using sparse_pool::make_geometry;
using sparse_pool::offset_dtype;

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// plan_kernel's buffers (device pointers into one allocation).
struct Plan {
  int64_t* flag;        // [n] 1 where an input starts a row of equal (b, y)
  int64_t* row_incl;    // [n] inclusive scan of flag
  int64_t* row_start;   // [n + 1] first input of each row; row_start[rows] = n
  int64_t* count;       // [n] output rows each input row is the first to reach
  int64_t* count_incl;  // [n] inclusive scan of count
  int64_t *orow_b, *orow_y, *orow_r0, *orow_r1, *orow_len;  // [capacity] the output-row table
  int64_t* orow_end;    // [capacity] inclusive scan of orow_len
  int64_t* merged;      // [capacity] the inputs of each output row ordered by (x, row)
  int64_t* pair_orow;   // [capacity] the output row of each merged position
  int64_t* win_end;     // [capacity] inclusive scan of the windows each merged position creates
  int64_t* block_sums;  // [4 * grid] one row per scan
  unsigned long long* block_errors;  // [2 * grid] error bits and first bad row of each block
  int64_t* status;                   // [kStatusWords]
};

// Offsets in the argmax's dtype (1, 2, 4 or 8 bytes): a warp-uniform switch, no template per dtype.
template <typename O, int kVec>
__device__ __forceinline__ void store_as(void* base, int64_t index, const int64_t* v) {
  if constexpr (sizeof(O) * kVec <= 16) {  // one aligned vector (index is a multiple of kVec)
    Vec<O, kVec> out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) out.v[k] = static_cast<O>(v[k]);
    *reinterpret_cast<Vec<O, kVec>*>(static_cast<O*>(base) + index) = out;
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) static_cast<O*>(base)[index + k] = static_cast<O>(v[k]);
  }
}

template <int kVec>
__device__ __forceinline__ void store_offsets(void* base, int bytes, int64_t index, const int64_t* v) {
  switch (bytes) {
    case 1: store_as<uint8_t, kVec>(base, index, v); break;
    case 2: store_as<int16_t, kVec>(base, index, v); break;
    case 4: store_as<int32_t, kVec>(base, index, v); break;
    default: store_as<int64_t, kVec>(base, index, v); break;
  }
}

template <typename O, int kVec>
__device__ __forceinline__ void load_as(const void* base, int64_t index, int64_t* v) {
  if constexpr (sizeof(O) * kVec <= 16) {
    const Vec<O, kVec> in = *reinterpret_cast<const Vec<O, kVec>*>(static_cast<const O*>(base) + index);
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = static_cast<int64_t>(in.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = static_cast<int64_t>(static_cast<const O*>(base)[index + k]);
  }
}

template <int kVec>
__device__ __forceinline__ void load_offsets(const void* base, int bytes, int64_t index, int64_t* v) {
  switch (bytes) {
    case 1: load_as<uint8_t, kVec>(base, index, v); break;
    case 2: load_as<int16_t, kVec>(base, index, v); break;
    case 4: load_as<int32_t, kVec>(base, index, v); break;
    default: load_as<int64_t, kVec>(base, index, v); break;
  }
}

// Inclusive scan of v over the block's threads; *total gets the block's sum. Every thread calls it.
__device__ int64_t block_inclusive_scan(int64_t v, int64_t* total) {
  __shared__ int64_t warp_sums[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t t = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += t;
  }
  if (lane == 31) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int64_t s = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < kWarps; o <<= 1) {
      const int64_t t = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += t;
    }
    if (lane < kWarps) warp_sums[lane] = s;
  }
  __syncthreads();
  if (warp > 0) v += warp_sums[warp - 1];
  *total = warp_sums[kWarps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return v;
}

// Device-wide inclusive scan over [0, n) (n the same in every block) of value(i), called once per
// element, into out; then epilogue(i, out[i]) once per element. Each block scans one contiguous chunk
// (pass 1), one grid barrier, then adds the earlier blocks' sums (pass 2, with the epilogue). Returns
// the total to every thread. The caller adds a barrier before reading other elements' results.
template <typename Value, typename Epilogue>
__device__ int64_t grid_scan(cg::grid_group& grid, int64_t n, int64_t* out, int64_t* block_sums, Value&& value,
                             Epilogue&& epilogue) {
  const int64_t blocks = gridDim.x;
  const int64_t chunk = (n + blocks - 1) / blocks;
  const int64_t begin = min(n, static_cast<int64_t>(blockIdx.x) * chunk), end = min(n, begin + chunk);
  int64_t carry = 0;
  for (int64_t base = begin; base < end; base += kThreads) {  // block-uniform trip count
    const int64_t i = base + threadIdx.x;
    int64_t total;
    const int64_t inclusive = block_inclusive_scan(i < end ? value(i) : 0, &total);
    if (i < end) out[i] = carry + inclusive;
    carry += total;
  }
  if (threadIdx.x == 0) block_sums[blockIdx.x] = carry;
  grid.sync();
  int64_t before = 0, all = 0;
  for (int64_t j = threadIdx.x; j < blocks; j += kThreads) {
    const int64_t s = block_sums[j];
    all += s;
    if (j < blockIdx.x) before += s;
  }
  int64_t offset, total;
  block_inclusive_scan(before, &offset);
  block_inclusive_scan(all, &total);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const int64_t inclusive = out[i] + offset;
    out[i] = inclusive;
    epilogue(i, inclusive);
  }
  return total;
}

// Window columns that merged position p is the first to reach: [start, last] of [first, last].
template <typename index_t>
__device__ __forceinline__ void new_windows(CoordView<index_t> in, const Geometry& g, const int64_t* merged,
                                            int64_t segment_start, int64_t p, int64_t& first, int64_t& start,
                                            int64_t& last) {
  const int64_t x = in.x(merged[p]);
  first = first_window(x, g.kw, g.sw);
  last = last_window(x, g.sw, g.limit_w);
  const int64_t prev_last = p > segment_start ? last_window(in.x(merged[p - 1]), g.sw, g.limit_w) : -1;
  start = max(first, prev_last + 1);
}

// NaN wins over numbers (like torch.max); among equal values (or NaNs) the lowest window offset wins,
// which is the lowest input index (row-major inside the window, canonical order outside).
template <typename acc_t>
__device__ __forceinline__ bool better(acc_t v, int64_t off, acc_t best, int64_t best_off) {
  const bool v_nan = v != v, best_nan = best != best;
  if (best_nan) return v_nan && off < best_off;
  return v_nan || v > best || (v == best && off < best_off);
}

// Step 1 to 4 of the forward in one cooperative launch (see the file comment).
template <typename index_t>
__global__ void __launch_bounds__(kThreads)
plan_kernel(CoordView<index_t> in, Geometry g, int64_t bound_h, int64_t bound_w, int64_t n, int64_t capacity,
            Plan plan, int32_t* window_map, void* site, int offset_bytes) {
  cg::grid_group grid = cg::this_grid();
  __shared__ unsigned long long block_bad_row, all_errors, all_bad_row;
  if (threadIdx.x == 0) {
    block_bad_row = kNoRow;
    all_errors = 0;
    all_bad_row = kNoRow;
  }
  __syncthreads();
  const int64_t slots = g.py() * g.px(), px = g.px();
  const int64_t blocks = gridDim.x;

  // 1. Validation (the first bad row), row starts (scan 1), the window map's -1 and the site offsets.
  const int64_t rows = grid_scan(
      grid, n, plan.row_incl, plan.block_sums,
      [&](int64_t i) -> int64_t {
        const int64_t b = in.b(i), y = in.y(i), x = in.x(i);
        constexpr int64_t limit = sparse_pool::kCoordLimit;
        bool bad = b < 0 || y < 0 || x < 0 || b >= limit || y >= limit || x >= limit || y >= bound_h ||
                   x >= bound_w;
        bool starts_row = true;
        if (i > 0) {
          const int64_t pb = in.b(i - 1), pyv = in.y(i - 1), pxv = in.x(i - 1);
          bad = bad || !(pb < b || (pb == b && (pyv < y || (pyv == y && pxv < x))));
          starts_row = b != pb || y != pyv;
        }
        if (bad) atomicMin(&block_bad_row, static_cast<unsigned long long>(i));
        for (int64_t s = 0; s < slots; ++s) window_map[i * slots + s] = -1;
        const int64_t offset = sparse_pool::site_offset(y, x, g);
        store_offsets<1>(site, offset_bytes, i, &offset);
        plan.flag[i] = starts_row;
        return starts_row ? 1 : 0;
      },
      [&](int64_t i, int64_t inclusive) {
        if (plan.flag[i]) plan.row_start[inclusive - 1] = i;
        if (i == n - 1) plan.row_start[inclusive] = n;
      });
  if (threadIdx.x == 0) {
    plan.block_errors[2 * blockIdx.x] = block_bad_row != kNoRow ? kBadInput : 0;
    plan.block_errors[2 * blockIdx.x + 1] = block_bad_row;
  }
  grid.sync();
  for (int64_t j = threadIdx.x; j < blocks; j += kThreads) {
    const unsigned long long errors = plan.block_errors[2 * j];
    if (errors) {
      atomicOr(&all_errors, errors);
      atomicMin(&all_bad_row, plan.block_errors[2 * j + 1]);
    }
  }
  __syncthreads();
  if (all_errors) {  // the same in every block: all leave together (no barrier is left half-met)
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      plan.status[kErrors] = static_cast<int64_t>(all_errors);
      plan.status[kBadRow] = static_cast<int64_t>(all_bad_row);
      plan.status[kOutputs] = 0;
      plan.status[kPairs] = 0;
    }
    return;
  }
  // From here the input is valid: the pairs fit the capacity and merged is a permutation of each row.

  // 2. Output rows: row r creates the window rows oy that no earlier input row of its batch reaches
  //    (scan 2), then fills their table: batch, oy, input rows [r0, r1), number of inputs.
  const int64_t out_rows = grid_scan(
      grid, rows, plan.count_incl, plan.block_sums + blocks,
      [&](int64_t r) -> int64_t {
        const int64_t b = in.b(plan.row_start[r]), y = in.y(plan.row_start[r]);
        const int64_t first = first_window(y, g.kh, g.sh), last = last_window(y, g.sh, g.limit_h);
        const bool same_batch = r > 0 && in.b(plan.row_start[r - 1]) == b;
        const int64_t prev_last = same_batch ? last_window(in.y(plan.row_start[r - 1]), g.sh, g.limit_h) : -1;
        const int64_t c = max(int64_t{0}, last - max(first, prev_last + 1) + 1);
        plan.count[r] = c;
        return c;
      },
      [&](int64_t r, int64_t inclusive) {
        const int64_t b = in.b(plan.row_start[r]), y = in.y(plan.row_start[r]);
        const int64_t last = last_window(y, g.sh, g.limit_h), count = plan.count[r];
        for (int64_t t = 0; t < count; ++t) {
          const int64_t o = inclusive - count + t, oy = last - count + 1 + t;
          int64_t r1 = r + 1;  // rows with y < oy*sh + kh: at most kh of them, all after r
          while (r1 < min(rows, r + g.kh) && in.b(plan.row_start[r1]) == b &&
                 in.y(plan.row_start[r1]) < oy * g.sh + g.kh) {
            ++r1;
          }
          plan.orow_b[o] = b;
          plan.orow_y[o] = oy;
          plan.orow_r0[o] = r;
          plan.orow_r1[o] = r1;
          plan.orow_len[o] = plan.row_start[r1] - plan.row_start[r];
        }
      });
  grid.sync();

  // 3. Where each output row's inputs start in the merged order (scan 3).
  const int64_t pairs = min(capacity, grid_scan(
      grid, out_rows, plan.orow_end, plan.block_sums + 2 * blocks, [&](int64_t o) { return plan.orow_len[o]; },
      [](int64_t, int64_t) {}));
  grid.sync();

  // 4. Merge: each element of an output row goes to (rank in its row) + (ranks in the other rows).
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; q < pairs;
       q += blocks * kThreads) {
    int64_t lo = 0, hi = out_rows - 1;  // the output row o with orow_end[o - 1] <= q < orow_end[o]
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (plan.orow_end[mid] > q) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    const int64_t o = lo, offset = plan.orow_end[o] - plan.orow_len[o], r0 = plan.orow_r0[o], r1 = plan.orow_r1[o];
    const int64_t i = plan.row_start[r0] + (q - offset);
    int64_t row = r0;
    while (row + 1 < r1 && plan.row_start[row + 1] <= i) ++row;
    const int64_t x = in.x(i);
    int64_t pos = i - plan.row_start[row];
    for (int64_t other = r0; other < r1; ++other) {
      if (other != row) {
        pos += in.count_before(plan.row_start[other], plan.row_start[other + 1], x, other < row);
      }
    }
    plan.merged[offset + pos] = i;
    plan.pair_orow[q] = o;
  }
  grid.sync();

  // 5. Windows: merged position p creates the columns beyond its predecessor's last (scan 4, which
  //    numbers them in canonical order), and the input -> window map.
  const int64_t windows = grid_scan(
      grid, pairs, plan.win_end, plan.block_sums + 3 * blocks,
      [&](int64_t p) -> int64_t {
        const int64_t o = plan.pair_orow[p];
        int64_t first, start, last;
        new_windows(in, g, plan.merged, plan.orow_end[o] - plan.orow_len[o], p, first, start, last);
        return max(int64_t{0}, last - start + 1);
      },
      [&](int64_t p, int64_t win_end) {
        const int64_t o = plan.pair_orow[p];
        int64_t first, start, last;
        new_windows(in, g, plan.merged, plan.orow_end[o] - plan.orow_len[o], p, first, start, last);
        // The windows [first, last] of this input all exist and are numbered consecutively.
        const int64_t i = plan.merged[p];
        const int64_t dy = plan.orow_y[o] - first_window(in.y(i), g.kh, g.sh);
        for (int64_t ox = first; ox <= last; ++ox) {
          window_map[i * slots + dy * px + (ox - first)] = static_cast<int32_t>(win_end - 1 - (last - ox));
        }
      });
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    plan.status[kErrors] = 0;
    plan.status[kBadRow] = -1;
    plan.status[kOutputs] = windows;
    plan.status[kPairs] = pairs;
  }
}

// Each window's coordinates and channel max: a group of `group` threads per window, each over
// kVec-channel vectors; the argmax is the window offset of the max.
template <typename T, int kVec, typename index_t>
__global__ void __launch_bounds__(kThreads)
pool_kernel(CoordView<index_t> in, Geometry g, const T* __restrict__ feats, const int64_t* __restrict__ merged,
            const int64_t* __restrict__ pair_orow, const int64_t* __restrict__ orow_b,
            const int64_t* __restrict__ orow_y, const int64_t* __restrict__ orow_len,
            const int64_t* __restrict__ orow_end, const int64_t* __restrict__ win_end, int64_t pairs,
            int64_t windows, int64_t vecs, int group, int offset_bytes, index_t* __restrict__ out_coords,
            T* __restrict__ out, void* __restrict__ argmax) {
  using V = Vec<T, kVec>;
  using acc_t = at::opmath_type<T>;
  const int per_block = kThreads / group;
  const int lane = threadIdx.x % group;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * per_block + threadIdx.x / group; w < windows;
       w += static_cast<int64_t>(gridDim.x) * per_block) {
    int64_t lo = 0, hi = pairs - 1;  // the merged position that creates w: the first with win_end > w
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (win_end[mid] > w) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    const int64_t begin = lo, o = pair_orow[begin], end = orow_end[o];
    int64_t first, start, last;
    new_windows(in, g, merged, end - orow_len[o], begin, first, start, last);
    const int64_t ox = last - (win_end[begin] - 1 - w), oy = orow_y[o];
    if (lane == 0) {
      out_coords[3 * w] = static_cast<index_t>(orow_b[o]);
      out_coords[3 * w + 1] = static_cast<index_t>(oy);
      out_coords[3 * w + 2] = static_cast<index_t>(ox);
    }
    const int64_t x0 = ox * g.sw, x_end = x0 + g.kw, y0 = oy * g.sh;
    for (int64_t c = lane; c < vecs; c += group) {
      V best;
      int64_t best_off[kVec];
      for (int64_t p = begin; p < end; ++p) {
        const int64_t i = merged[p];
        const int64_t x = in.x(i);
        if (x >= x_end) break;
        const int64_t off = (in.y(i) - y0) * g.kw + (x - x0);
        const V v = reinterpret_cast<const V*>(feats)[i * vecs + c];
        if (p == begin) {
          best = v;
#pragma unroll
          for (int k = 0; k < kVec; ++k) best_off[k] = off;
          continue;
        }
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          if (better(static_cast<acc_t>(v.v[k]), off, static_cast<acc_t>(best.v[k]), best_off[k])) {
            best.v[k] = v.v[k];
            best_off[k] = off;
          }
        }
      }
      reinterpret_cast<V*>(out)[w * vecs + c] = best;
      store_offsets<kVec>(argmax, offset_bytes, (w * vecs + c) * kVec, best_off);
    }
  }
}

// Backward: each input sums, over the windows holding it, the gradients of the channels whose argmax
// is its offset in that window.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
backward_kernel(Geometry g, const T* __restrict__ grad, const void* __restrict__ argmax, const void* __restrict__ site,
                int offset_bytes, const int32_t* __restrict__ window_map, int64_t n, int64_t slots, int64_t m,
                int64_t vecs, int group, T* __restrict__ grad_feats) {
  using V = Vec<T, kVec>;
  using acc_t = at::opmath_type<T>;
  const int per_block = kThreads / group;
  const int lane = threadIdx.x % group;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * per_block + threadIdx.x / group; i < n;
       i += static_cast<int64_t>(gridDim.x) * per_block) {
    int64_t site_offset;
    load_offsets<1>(site, offset_bytes, i, &site_offset);
    for (int64_t c = lane; c < vecs; c += group) {
      acc_t acc[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc[k] = acc_t(0);
      for (int64_t s = 0; s < slots; ++s) {
        const int64_t w = window_map[i * slots + s];
        if (w < 0 || w >= m) continue;
        const int64_t mine = sparse_pool::slot_offset(site_offset, s, g);
        if (mine < 0) continue;
        int64_t arg[kVec];
        load_offsets<kVec>(argmax, offset_bytes, (w * vecs + c) * kVec, arg);
        const V gv = reinterpret_cast<const V*>(grad)[w * vecs + c];
#pragma unroll
        for (int k = 0; k < kVec; ++k) acc[k] += arg[k] == mine ? static_cast<acc_t>(gv.v[k]) : acc_t(0);
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

// The one resident grid of a cooperative launch of `kernel`: at most what fits on the device at once.
int cooperative_grid(const void* kernel, int64_t items) {
  int device = 0, cooperative = 0, sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  TORCH_CHECK(cooperative, "sparse_max_pool2d: the CUDA kernel needs a device with cooperative launch");
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  TORCH_CHECK(per_sm > 0, "sparse_max_pool2d: the planning kernel does not fit on this device");
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(int64_t{per_sm} * sms, (items + kThreads - 1) / kThreads)));
}

// The first bad row's error, worded as the CPU kernel words it (error path only: reads two rows).
void refuse_coords(const at::Tensor& coords, int64_t row, std::pair<int64_t, int64_t> bound) {
  const at::Tensor rows = coords.narrow(0, std::max<int64_t>(0, row - 1), row > 0 ? 2 : 1).to(at::kLong).cpu();
  const int64_t* r = rows.const_data_ptr<int64_t>() + (row > 0 ? 3 : 0);
  const int64_t b = r[0], y = r[1], x = r[2];
  TORCH_CHECK_VALUE(b >= 0 && y >= 0 && x >= 0, "coords must be non-negative, row ", row, " is [", b, ", ", y, ", ",
                    x, "]");
  constexpr int64_t limit = sparse_pool::kCoordLimit;
  TORCH_CHECK_VALUE(b < limit && y < limit && x < limit, "coords must be below 2**62 (window arithmetic is int64), row ",
                    row, " is [", b, ", ", y, ", ", x, "]");
  TORCH_CHECK_VALUE(y < bound.first && x < bound.second, "coords must lie inside spatial_shape (", bound.first, ", ",
                    bound.second, "), row ", row, " is [", b, ", ", y, ", ", x, "]");
  const int64_t* p = rows.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(false, "coords must be sorted lexicographically by (batch, y, x) without duplicates; row ",
                    row - 1, " is [", p[0], ", ", p[1], ", ", p[2], "] and row ", row, " is [", b, ", ", y, ", ", x,
                    "]");
}

template <typename index_t>
Outputs forward_impl(const at::Tensor& coords, const at::Tensor& feats, const Geometry& g,
                     std::pair<int64_t, int64_t> bound) {
  const int64_t n = coords.size(0), channels = feats.size(1);
  const int64_t py = g.py(), slots = py * g.px();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType offsets = offset_dtype(g);
  const int offset_bytes = static_cast<int>(c10::elementSize(offsets));
  at::Tensor window_map = at::empty({n, slots}, feats.options().dtype(at::kInt));  // plan_kernel fills it
  at::Tensor site = at::empty({n}, feats.options().dtype(offsets));
  if (n == 0) {
    return {at::empty({0, 3}, coords.options()), at::empty({0, channels}, feats.options()),
            at::empty({0, channels}, feats.options().dtype(offsets)), window_map, site};
  }
  const CoordView<index_t> in{coords.data_ptr<index_t>()};
  const int64_t capacity = n * py;  // bound on output rows and on (input, output row) pairs
  const void* plan_fn = reinterpret_cast<const void*>(&plan_kernel<index_t>);
  const int grid = cooperative_grid(plan_fn, capacity);

  // One allocation for every buffer of the plan (no fill: each entry is written before it is read).
  const int64_t words = 5 * n + 1 + 9 * capacity + 6 * int64_t{grid} + kStatusWords;
  at::Tensor scratch = at::empty({words}, coords.options().dtype(at::kLong));
  int64_t* next = scratch.data_ptr<int64_t>();
  const auto take = [&](int64_t count) {
    int64_t* p = next;
    next += count;
    return p;
  };
  Plan plan;
  plan.flag = take(n);
  plan.row_incl = take(n);
  plan.row_start = take(n + 1);
  plan.count = take(n);
  plan.count_incl = take(n);
  plan.orow_b = take(capacity);
  plan.orow_y = take(capacity);
  plan.orow_r0 = take(capacity);
  plan.orow_r1 = take(capacity);
  plan.orow_len = take(capacity);
  plan.orow_end = take(capacity);
  plan.merged = take(capacity);
  plan.pair_orow = take(capacity);
  plan.win_end = take(capacity);
  plan.block_sums = take(4 * int64_t{grid});
  plan.block_errors = reinterpret_cast<unsigned long long*>(take(2 * int64_t{grid}));
  const int64_t status_at = next - scratch.data_ptr<int64_t>();
  plan.status = take(kStatusWords);

  Geometry geometry = g;
  CoordView<index_t> view = in;
  int64_t bound_h = bound.first, bound_w = bound.second, count = n, cap = capacity;
  int32_t* map_ptr = window_map.data_ptr<int32_t>();
  void* site_ptr = site.data_ptr();
  int bytes = offset_bytes;
  void* args[] = {&view, &geometry, &bound_h, &bound_w, &count, &cap, &plan, &map_ptr, &site_ptr, &bytes};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(plan_fn, dim3(grid), dim3(kThreads), args, 0, stream));

  // The one host synchronization: error flags, first bad row, output count, pair count.
  const at::Tensor status = scratch.narrow(0, status_at, kStatusWords).cpu();
  const int64_t* word = status.const_data_ptr<int64_t>();
  if (word[kErrors] != 0) refuse_coords(coords, word[kBadRow], bound);
  const int64_t m = word[kOutputs], pairs = word[kPairs];
  // Window-map entries are int32 (the Python wrapper checks N * slots; direct calls land here).
  TORCH_CHECK(m <= std::numeric_limits<int32_t>::max(), "sparse_max_pool2d: ", m,
              " output windows do not fit the int32 window map");

  at::Tensor out_coords = at::empty({m, 3}, coords.options());
  at::Tensor out_feats = at::empty({m, channels}, feats.options());
  at::Tensor argmax = at::empty({m, channels}, feats.options().dtype(offsets));
  if (m == 0) return {out_coords, out_feats, argmax, window_map, site};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "sparse_max_pool2d_cuda", [&] {
    using T = scalar_t;
    const bool pointers_aligned = aligned16(feats.data_ptr()) && aligned16(out_feats.data_ptr()) &&
                                  aligned16(argmax.data_ptr());
    dispatch_vector_width<T>(std::max<int64_t>(channels, 1), pointers_aligned, [&](auto vec_tag) {
      constexpr int kVec = decltype(vec_tag)::value;
      const int64_t vecs = channels / kVec;
      const int group = group_for(vecs);
      pool_kernel<T, kVec, index_t><<<blocks_for(m, kThreads / group), kThreads, 0, stream>>>(
          in, g, feats.data_ptr<T>(), plan.merged, plan.pair_orow, plan.orow_b, plan.orow_y, plan.orow_len,
          plan.orow_end, plan.win_end, pairs, m, vecs, group, offset_bytes, out_coords.data_ptr<index_t>(),
          out_feats.data_ptr<T>(), argmax.data_ptr());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out_coords, out_feats, argmax, window_map, site};
}

Outputs sparse_max_pool2d_forward_cuda(const at::Tensor& coords_in, const at::Tensor& feats_in,
                                       at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                       at::IntArrayRef window_limit, at::IntArrayRef coord_bound) {
  TORCH_CHECK(coords_in.is_cuda() && feats_in.is_cuda(), "sparse_max_pool2d_forward_cuda: tensors must be on CUDA");
  TORCH_CHECK(coords_in.dim() == 2 && coords_in.size(1) == 3, "sparse_max_pool2d: coords must be [N, 3], got ",
              coords_in.sizes());
  TORCH_CHECK(coords_in.scalar_type() == at::kInt || coords_in.scalar_type() == at::kLong,
              "sparse_max_pool2d: coords must be int32 or int64, got ", coords_in.scalar_type());
  TORCH_CHECK(feats_in.dim() == 2 && feats_in.size(0) == coords_in.size(0),
              "sparse_max_pool2d: feats must be [N, C] with N = ", coords_in.size(0), ", got ", feats_in.sizes());
  TORCH_CHECK(coords_in.size(0) < std::numeric_limits<int32_t>::max(),
              "sparse_max_pool2d: more than 2^31 - 1 inputs do not fit the int32 window map");
  TORCH_CHECK(coords_in.device() == feats_in.device(), "sparse_max_pool2d: coords on ", coords_in.device(),
              " and feats on ", feats_in.device(), " must be on one device");
  const c10::cuda::CUDAGuard guard(feats_in.device());
  const Geometry g = make_geometry(kernel_size, stride, window_limit, coords_in.size(0));
  const auto bound = make_coord_bound(coord_bound);
  const at::Tensor coords = coords_in.contiguous();
  const at::Tensor feats = feats_in.contiguous();
  if (coords.scalar_type() == at::kInt) return forward_impl<int32_t>(coords, feats, g, bound);
  return forward_impl<int64_t>(coords, feats, g, bound);
}

at::Tensor sparse_max_pool2d_backward_cuda(const at::Tensor& grad_out_feats, const at::Tensor& argmax_in,
                                           const at::Tensor& window_map_in, const at::Tensor& site_in,
                                           at::IntArrayRef kernel_size, at::IntArrayRef stride) {
  TORCH_CHECK(grad_out_feats.is_cuda() && argmax_in.is_cuda() && window_map_in.is_cuda() && site_in.is_cuda(),
              "sparse_max_pool2d_backward_cuda: tensors must be on CUDA");
  TORCH_CHECK(argmax_in.device() == grad_out_feats.device() && window_map_in.device() == grad_out_feats.device() &&
                  site_in.device() == grad_out_feats.device(),
              "sparse_max_pool2d_backward: grad_out_feats, argmax, window_map and site_offset must be on one device");
  const c10::cuda::CUDAGuard guard(grad_out_feats.device());
  const Geometry g =
      make_geometry(kernel_size, stride, {-1, -1}, window_map_in.dim() == 2 ? window_map_in.size(0) : 0);
  sparse_pool::check_backward_tables(grad_out_feats, argmax_in, window_map_in, site_in, g);
  const at::Tensor grad = grad_out_feats.contiguous();
  const at::Tensor argmax = argmax_in.contiguous();
  const at::Tensor window_map = window_map_in.contiguous();
  const at::Tensor site = site_in.contiguous();
  const int64_t n = window_map.size(0), slots = window_map.size(1);
  const int64_t m = grad.size(0), channels = grad.size(1);
  const int offset_bytes = static_cast<int>(argmax.element_size());
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
          g, grad.data_ptr<T>(), argmax.data_ptr(), site.data_ptr(), offset_bytes, window_map.data_ptr<int32_t>(), n,
          slots, m, vecs, group, grad_feats.data_ptr<T>());
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
