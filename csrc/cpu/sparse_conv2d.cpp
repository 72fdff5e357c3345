// Submanifold sparse convolution on the CPU: gather-GEMM-scatter per kernel offset, blocked by output
// site, with register-tiled at::vec micro-kernels and no atomics.
//
// * forward (and the input gradient, the same kernel over the mirrored offsets of a symmetric map):
//   threads own disjoint blocks of kBlock output sites. For each offset, a block lists its (input,
//   output) pairs (the absent neighbours skipped: only useful multiply-adds) and runs a 6-row x
//   2-vector tile: 6 pairs' gathered input rows (read in place through the table, no copy) times
//   weight[k], accumulated into the block's float (or double) output rows, written once at the end.
// * weight gradient: grad_weight[k] = sum over pairs of feats[i]^T grad_out[o]. Tasks are (site chunk,
//   offset); each gathers its pairs' rows kGather at a time into contiguous buffers and adds their
//   outer products into its own partial [Cin, Cout] (6-row x 2-vector register tiles); the partials
//   are summed in chunk order. The chunks depend only on N, so results are bit-identical run to run
//   and for any thread count.
// float16/bfloat16 inputs are widened to float32 once and the results rounded once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "sparse_conv2d_common.h"

namespace fastvision {
namespace {

using sparse_conv::kRangeMessage;
using sparse_conv::kSymmetryMessage;

constexpr int64_t kBlock = 64;         // output sites per forward task
constexpr int kRows = 6;               // pairs (or weight-gradient rows) per register tile
constexpr int64_t kChunk = 2048;       // sites per weight-gradient partial sum
constexpr int64_t kMaxPartials = 16;   // at most this many partials (larger chunks beyond)

template <typename T>
constexpr int64_t kVec = at::vec::Vectorized<T>::size();

// Columns are processed in tiles of two vectors: channel counts are padded to a multiple of that.
template <typename T>
int64_t padded(int64_t channels) {
  const int64_t tile = 2 * kVec<T>;
  return (channels + tile - 1) / tile * tile;
}

// c[r][col : col + 2V] += sum_c a[r][c] * w[c * w_ld + col : ... + 2V] for R rows.
template <typename T, int R>
C10_ALWAYS_INLINE void row_tile(const T* const* a, T* const* c, const T* w, int64_t w_ld, int64_t depth,
                                int64_t col) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = kVec<T>;
  Vec acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = Vec::loadu(c[r] + col);
    acc[r][1] = Vec::loadu(c[r] + col + V);
  }
  for (int64_t d = 0; d < depth; ++d) {
    const T* wd = w + d * w_ld + col;
    const Vec w0 = Vec::loadu(wd), w1 = Vec::loadu(wd + V);
    for (int r = 0; r < R; ++r) {
      const Vec b(a[r][d]);
      acc[r][0] = at::vec::fmadd(b, w0, acc[r][0]);
      acc[r][1] = at::vec::fmadd(b, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    acc[r][0].store(c[r] + col);
    acc[r][1].store(c[r] + col + V);
  }
}

template <typename T, int R>
void rows_times_weight(const T* const* a, T* const* c, const T* w, int64_t depth, int64_t width) {
  for (int64_t col = 0; col < width; col += 2 * kVec<T>) row_tile<T, R>(a, c, w, width, depth, col);
}

// R < kRows rows left over: one instantiation per count.
template <typename T>
void rows_times_weight_tail(int rows, const T* const* a, T* const* c, const T* w, int64_t depth, int64_t width) {
  switch (rows) {
    case 1: return rows_times_weight<T, 1>(a, c, w, depth, width);
    case 2: return rows_times_weight<T, 2>(a, c, w, depth, width);
    case 3: return rows_times_weight<T, 3>(a, c, w, depth, width);
    case 4: return rows_times_weight<T, 4>(a, c, w, depth, width);
    case 5: return rows_times_weight<T, 5>(a, c, w, depth, width);
    default: return;
  }
}

// out[o, :cout] = sum_k src[nb[o, k]] @ w[k], with w padded to [K*K, depth, width] (width = padded cout).
// symmetric: also check nb[nb[o, k], K*K - 1 - k] == o (the input gradient relies on it).
template <typename T>
void gather_gemm(const T* src, const int32_t* nb, const T* w, T* out, int64_t n, int64_t offsets, int64_t depth,
                 int64_t width, int64_t cout, bool symmetric) {
  std::atomic<bool> bad_index{false}, asymmetric{false};
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<T> acc(kBlock * width);
    std::vector<const T*> a(kBlock);
    std::vector<T*> c(kBlock);
    for (int64_t block = first; block < last; ++block) {
      const int64_t o0 = block * kBlock, rows = std::min(kBlock, n - o0);
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t k = 0; k < offsets; ++k) {
        int64_t count = 0;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = nb[(o0 + r) * offsets + k];
          if (i < 0) {
            if (i != -1) bad_index.store(true, std::memory_order_relaxed);
            continue;
          }
          if (i >= n) {
            bad_index.store(true, std::memory_order_relaxed);
            continue;
          }
          if (symmetric && nb[i * offsets + (offsets - 1 - k)] != o0 + r) {
            asymmetric.store(true, std::memory_order_relaxed);
          }
          a[count] = src + i * depth;
          c[count] = acc.data() + r * width;
          ++count;
        }
        const T* wk = w + k * depth * width;
        int64_t p = 0;
        for (; p + kRows <= count; p += kRows) {
          rows_times_weight<T, kRows>(a.data() + p, c.data() + p, wk, depth, width);
        }
        rows_times_weight_tail<T>(static_cast<int>(count - p), a.data() + p, c.data() + p, wk, depth, width);
      }
      for (int64_t r = 0; r < rows; ++r) {
        std::copy(acc.data() + r * width, acc.data() + r * width + cout, out + (o0 + r) * cout);
      }
    }
  });
  TORCH_CHECK_VALUE(!bad_index.load(), "sparse_conv2d: ", kRangeMessage);
  TORCH_CHECK_VALUE(!asymmetric.load(), "sparse_conv2d: ", kSymmetryMessage);
}

// gw[(c0 + r) * width + col : ...] += sum_j a[j * a_ld + c0 + r] * g[j * width + col : ...] for kRows
// rows of gw and every column tile; a and g are gathered, contiguous rows (L1-resident).
template <typename T>
void outer_tiles(const T* a, int64_t a_ld, const T* g, int64_t count, int64_t c0, T* gw, int64_t width) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = kVec<T>;
  for (int64_t col = 0; col < width; col += 2 * V) {
    Vec acc[kRows][2];
    for (int r = 0; r < kRows; ++r) {
      acc[r][0] = Vec::loadu(gw + (c0 + r) * width + col);
      acc[r][1] = Vec::loadu(gw + (c0 + r) * width + col + V);
    }
    for (int64_t j = 0; j < count; ++j) {
      const T* s = a + j * a_ld + c0;
      const T* gj = g + j * width + col;
      const Vec g0 = Vec::loadu(gj), g1 = Vec::loadu(gj + V);
      for (int r = 0; r < kRows; ++r) {
        const Vec b(s[r]);
        acc[r][0] = at::vec::fmadd(b, g0, acc[r][0]);
        acc[r][1] = at::vec::fmadd(b, g1, acc[r][1]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      acc[r][0].store(gw + (c0 + r) * width + col);
      acc[r][1].store(gw + (c0 + r) * width + col + V);
    }
  }
}

constexpr int64_t kGather = 128;  // pairs gathered at a time by the weight gradient (stays in L1/L2)

// gw [K*K, cin_pad, width] = sum over pairs (i, o) of offset k: src[i]^T g[o], g padded to [n, width],
// cin_pad = cin rounded up to kRows (the padding rows come out zero).
template <typename T>
void weight_grad(const T* src, const int32_t* nb, const T* g, T* gw, int64_t n, int64_t offsets, int64_t cin,
                 int64_t cin_pad, int64_t width) {
  std::atomic<bool> bad_index{false};
  const int64_t chunk = std::max(kChunk, (n + kMaxPartials - 1) / kMaxPartials);
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t slab = offsets * cin_pad * width;
  // Partial sums, one per chunk (the first is gw itself), added in chunk order below.
  std::vector<T> partials((chunks - 1) * slab, T(0));
  std::fill(gw, gw + slab, T(0));
  at::parallel_for(0, chunks * offsets, 1, [&](int64_t first, int64_t last) {
    std::vector<int32_t> ins(chunk), outs(chunk);
    std::vector<T> a(kGather * cin_pad, T(0)), grad(kGather * width);
    for (int64_t task = first; task < last; ++task) {
      const int64_t s = task / offsets, k = task % offsets;
      const int64_t o0 = s * chunk, o1 = std::min(n, o0 + chunk);
      int64_t count = 0;
      for (int64_t o = o0; o < o1; ++o) {
        const int32_t i = nb[o * offsets + k];
        if (i < 0) {
          if (i != -1) bad_index.store(true, std::memory_order_relaxed);
          continue;
        }
        if (i >= n) {
          bad_index.store(true, std::memory_order_relaxed);
          continue;
        }
        ins[count] = i;
        outs[count] = static_cast<int32_t>(o);
        ++count;
      }
      T* target = (s == 0 ? gw : partials.data() + (s - 1) * slab) + k * cin_pad * width;
      for (int64_t p0 = 0; p0 < count; p0 += kGather) {
        const int64_t m = std::min(kGather, count - p0);
        for (int64_t j = 0; j < m; ++j) {
          std::copy(src + int64_t{ins[p0 + j]} * cin, src + int64_t{ins[p0 + j]} * cin + cin, a.data() + j * cin_pad);
          std::copy(g + int64_t{outs[p0 + j]} * width, g + int64_t{outs[p0 + j]} * width + width,
                    grad.data() + j * width);
        }
        for (int64_t c0 = 0; c0 < cin_pad; c0 += kRows) outer_tiles<T>(a.data(), cin_pad, grad.data(), m, c0, target, width);
      }
    }
  });
  TORCH_CHECK_VALUE(!bad_index.load(), "sparse_conv2d: ", kRangeMessage);
  for (int64_t s = 1; s < chunks; ++s) {
    const T* part = partials.data() + (s - 1) * slab;
    at::parallel_for(0, slab, 16384, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) gw[e] += part[e];
    });
  }
}

// float16/bfloat16 compute in float32; float32 and float64 in their own type.
at::ScalarType compute_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// [rows, cols] -> contiguous [rows, padded(cols)] of the compute type, zeros in the padding.
at::Tensor pad_columns(const at::Tensor& x, int64_t width) {
  const auto type = compute_type(x.scalar_type());
  if (x.size(-1) == width) return x.to(type).contiguous();
  auto shape = x.sizes().vec();
  shape.back() = width;
  at::Tensor out = at::zeros(shape, x.options().dtype(type));
  out.narrow(-1, 0, x.size(-1)).copy_(x);
  return out;
}

// out [N, Cout] (compute type) = conv of src [N, depth] with w [K*K, depth, Cout].
at::Tensor run_gather_gemm(const at::Tensor& src, const at::Tensor& neighbors, const at::Tensor& w, bool symmetric) {
  const auto type = compute_type(src.scalar_type());
  const int64_t n = src.size(0), depth = src.size(1), offsets = w.size(0), cout = w.size(2);
  at::Tensor out = at::zeros({n, cout}, src.options().dtype(type));
  if (n == 0 || cout == 0) return out;
  const at::Tensor source = src.to(type).contiguous();
  const at::Tensor table = neighbors.contiguous();
  AT_DISPATCH_FLOATING_TYPES(type, "sparse_conv2d_cpu", [&] {
    const int64_t width = padded<scalar_t>(cout);
    const at::Tensor weight = pad_columns(w, width);
    gather_gemm<scalar_t>(source.const_data_ptr<scalar_t>(), table.const_data_ptr<int32_t>(),
                          weight.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, offsets, depth,
                          width, cout, symmetric);
  });
  return out;
}

at::Tensor sparse_conv2d_forward_cpu(const at::Tensor& feats, const at::Tensor& neighbors, const at::Tensor& weight) {
  sparse_conv::check_inputs(feats, neighbors, weight);
  return run_gather_gemm(feats, neighbors, weight, /*symmetric=*/false).to(feats.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> sparse_conv2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& feats,
                                                              const at::Tensor& neighbors, const at::Tensor& weight,
                                                              bool need_feats_grad, bool need_weight_grad) {
  sparse_conv::check_inputs(feats, neighbors, weight);
  sparse_conv::check_grad_out(grad_out, feats, weight);
  at::Tensor grad_feats = feats.new_empty({0});
  at::Tensor grad_weight = weight.new_empty({0});
  if (need_feats_grad) {
    // d feats[i] = sum_k grad_out[nb[i, k]] @ weight[K*K - 1 - k]^T on a symmetric map.
    const at::Tensor mirrored = weight.flip(0).transpose(1, 2);
    grad_feats = run_gather_gemm(grad_out, neighbors, mirrored, /*symmetric=*/true).to(feats.scalar_type());
  }
  if (need_weight_grad) {
    const auto type = compute_type(feats.scalar_type());
    const int64_t n = feats.size(0), cin = feats.size(1), offsets = weight.size(0), cout = weight.size(2);
    at::Tensor result = at::zeros({offsets, cin, cout}, weight.options().dtype(type));
    if (n > 0 && cin > 0 && cout > 0) {
      const at::Tensor source = feats.to(type).contiguous();
      const at::Tensor table = neighbors.contiguous();
      AT_DISPATCH_FLOATING_TYPES(type, "sparse_conv2d_cpu_weight_grad", [&] {
        const int64_t width = padded<scalar_t>(cout);
        const int64_t cin_pad = (cin + kRows - 1) / kRows * kRows;
        const at::Tensor grad = pad_columns(grad_out, width);
        at::Tensor padded_grad = at::empty({offsets, cin_pad, width}, result.options());
        weight_grad<scalar_t>(source.const_data_ptr<scalar_t>(), table.const_data_ptr<int32_t>(),
                              grad.const_data_ptr<scalar_t>(), padded_grad.mutable_data_ptr<scalar_t>(), n, offsets,
                              cin, cin_pad, width);
        result.copy_(padded_grad.narrow(1, 0, cin).narrow(2, 0, cout));
      });
    }
    grad_weight = result.to(weight.scalar_type());
  }
  return {grad_feats, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvision, CPU, m) {
  m.impl("sparse_conv2d_forward", &sparse_conv2d_forward_cpu);
  m.impl("sparse_conv2d_backward", &sparse_conv2d_backward_cpu);
}

}  // namespace fastvision
