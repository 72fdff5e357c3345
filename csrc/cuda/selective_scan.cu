// selective_scan on CUDA: chunks of the sequence held in registers, scanned by the whole block.
//
// Forward: one block of kFwdThreads per (batch, channel); a chunk is kFwdThreads x kFwdItems = 2048
// steps, each thread holding kFwdItems consecutive steps. Per state n: every thread folds its steps
// into one (decay product, drive) pair sequentially (exp2 with log2(e) folded into A: one FFMA and one
// MUFU per step), a block scan of the pairs (warp shuffles, warp totals in shared memory) gives each
// thread the state entering its run, composed with the state carried from the previous chunk; the
// thread then replays its steps, adding C_t . h_t to its outputs in registers.
//
// Backward: one block of kBwdThreads per (batch, tile of channels); the tile's channels run one after
// the other. Per channel, a first pass computes the state entering every chunk (block totals only,
// into a workspace of L / 2048 x N floats per block); then the chunks run from the last to the first:
// per state n the chunk's forward is recomputed from its entering state (states kept in registers),
// and the gradient of the state runs backwards as a second block scan (reverse lane and warp order)
// of r_t = a_t (r_{t+1} + C_t dy_t), whose carry across chunks starts at grad_last. No float atomics:
// per-channel gradients of A, D, delta_bias and fixed B/C are block sums in a fixed order, written per
// (batch, channel) and summed over the batch by a deterministic reduction; varying B/C gradients are
// accumulated per tile (the tile's channels in order, each thread on its own steps) and the tiles of a
// group summed in a fixed order. The backward is bit-identical run to run.
//
// reverse: step s reads and writes time index L - 1 - s. Products of decays across a run can overflow
// (A > 0): they never multiply a zero state (see `scale`).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <tuple>

#include "cuda/cuda_helpers.cuh"
#include "selective_scan_common.h"

namespace fastvision {
namespace {

constexpr int kMaxState = 256;
constexpr int kFwdThreads = 128, kFwdItems = 16;
constexpr int kBwdThreads = 256, kBwdItems = 8;
constexpr int kChunk = kFwdThreads * kFwdItems;
static_assert(kChunk == kBwdThreads * kBwdItems, "forward and backward share the chunk length");
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFull = 0xffffffffu;

// h -> a h + b: the affine map of a run of steps.
struct Pair {
  float a, b;
};

// a h, and 0 when h is 0 (a product of decays may be inf where the state it would scale is 0).
__device__ __forceinline__ float scale(float a, float h) { return h == 0.f ? 0.f : a * h; }

// The map of `first` then `second`.
__device__ __forceinline__ Pair compose(Pair first, Pair second) {
  return {first.a * second.a, scale(second.a, first.b) + second.b};
}

__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(__expf(x)); }
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

template <typename T>
__device__ __forceinline__ float load(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// Exclusive scan of one Pair per thread in thread order (kReverse: from the last thread to the first),
// and the composition of all of them. Double-buffered scratch: one barrier per call.
template <int kThreads, bool kReverse>
__device__ __forceinline__ void block_scan(Pair value, Pair& exclusive, Pair& total,
                                           Pair (*scratch)[kThreads / 32], int& parity) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int pos = kReverse ? 31 - lane : lane;
  const int warp_pos = kReverse ? kWarps - 1 - warp : warp;
  Pair inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    Pair other;
    other.a = kReverse ? __shfl_down_sync(kFull, inclusive.a, offset) : __shfl_up_sync(kFull, inclusive.a, offset);
    other.b = kReverse ? __shfl_down_sync(kFull, inclusive.b, offset) : __shfl_up_sync(kFull, inclusive.b, offset);
    if (pos >= offset) inclusive = compose(other, inclusive);
  }
  Pair before;
  before.a = kReverse ? __shfl_down_sync(kFull, inclusive.a, 1) : __shfl_up_sync(kFull, inclusive.a, 1);
  before.b = kReverse ? __shfl_down_sync(kFull, inclusive.b, 1) : __shfl_up_sync(kFull, inclusive.b, 1);
  if (pos == 0) before = Pair{1.f, 0.f};
  if (pos == 31) scratch[parity][warp_pos] = inclusive;
  __syncthreads();
  Pair prefix{1.f, 0.f};
  total = scratch[parity][0];
  if (warp_pos > 0) prefix = total;
#pragma unroll
  for (int w = 1; w < kWarps; ++w) {
    const Pair t = scratch[parity][w];
    if (w < warp_pos) prefix = compose(prefix, t);
    total = compose(total, t);
  }
  exclusive = compose(prefix, before);
  parity ^= 1;
}

// Sums of kK values over the block, in a fixed order (the same bits every run); every thread gets them.
template <int kThreads, int kK>
__device__ __forceinline__ void block_sum(float (&v)[kK], float (*scratch)[kK][kThreads / 32], int& parity) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < kK; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v[k] += __shfl_xor_sync(kFull, v[k], offset);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kK; ++k) scratch[parity][k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kK; ++k) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += scratch[parity][k][w];
    v[k] = sum;
  }
  parity ^= 1;
}

struct Params {
  const void *u, *delta, *z, *B, *C, *grad_out;
  const float *A, *D, *bias, *B_fixed, *C_fixed, *grad_last;
  int64_t batch, dim, length;
  int state;
  int64_t group_b, group_c;  // channels per group of varying B / C
  int64_t groups_b, groups_c;
  bool softplus, reverse;
  // forward
  void* out;
  float* last;
  // backward
  int64_t per_tile;          // channels of one backward block
  float* workspace;          // [blocks, chunks, N]: the state entering each chunk
  void *du, *ddelta, *dz;    // [batch, dim, L] of the input dtype
  float *dA, *dD, *dbias;    // per (batch, channel): [batch, dim, N], [batch, dim], [batch, dim]
  float *dB_fixed, *dC_fixed;  // [batch, dim, N]
  float *dB_tiles, *dC_tiles;  // [batch, dim / per_tile, N, L]
};

template <typename T, bool kVaryB, bool kVaryC>
__global__ void __launch_bounds__(kFwdThreads) selective_scan_forward_kernel(const Params p) {
  constexpr int kWarps = kFwdThreads / 32;
  __shared__ float s_carry[2][kMaxState];
  __shared__ Pair s_scan[2][kWarps];
  int parity = 0;
  const int64_t bd = blockIdx.x, b = bd / p.dim, d = bd % p.dim, L = p.length;
  const int N = p.state;
  const T* u = static_cast<const T*>(p.u) + bd * L;
  const T* delta = static_cast<const T*>(p.delta) + bd * L;
  const T* z = p.z != nullptr ? static_cast<const T*>(p.z) + bd * L : nullptr;
  T* out = static_cast<T*>(p.out) + bd * L;
  const float* A = p.A + d * N;
  const T* B = kVaryB ? static_cast<const T*>(p.B) + (b * p.groups_b + d / p.group_b) * N * L : nullptr;
  const T* C = kVaryC ? static_cast<const T*>(p.C) + (b * p.groups_c + d / p.group_c) * N * L : nullptr;
  const float* B_fixed = kVaryB ? nullptr : p.B_fixed + d * N;
  const float* C_fixed = kVaryC ? nullptr : p.C_fixed + d * N;
  const float bias = p.bias != nullptr ? p.bias[d] : 0.f, skip = p.D != nullptr ? p.D[d] : 0.f;
  for (int n = threadIdx.x; n < N; n += kFwdThreads) s_carry[0][n] = 0.f;
  __syncthreads();
  const int64_t chunks = (L + kChunk - 1) / kChunk;
  for (int64_t k = 0; k < chunks; ++k) {
    const int cur = k & 1;
    const int64_t first = k * kChunk + static_cast<int64_t>(threadIdx.x) * kFwdItems;
    float dt[kFwdItems], dtu[kFwdItems], y[kFwdItems];
    int64_t time[kFwdItems];
#pragma unroll
    for (int i = 0; i < kFwdItems; ++i) {
      const int64_t s = first + i;
      time[i] = s < L ? (p.reverse ? L - 1 - s : s) : -1;
      dt[i] = 0.f;
      dtu[i] = 0.f;
      y[i] = 0.f;
      if (time[i] >= 0) {
        const float x = load(delta, time[i]) + bias;
        dt[i] = p.softplus ? softplus(x) : x;
        dtu[i] = dt[i] * load(u, time[i]);
      }
    }
    for (int n = 0; n < N; ++n) {
      const float a2 = A[n] * kLog2e;
      const float b_fixed = kVaryB ? 0.f : B_fixed[n], c_fixed = kVaryC ? 0.f : C_fixed[n];
      float decay[kFwdItems], drive[kFwdItems];
      Pair run{1.f, 0.f};
#pragma unroll
      for (int i = 0; i < kFwdItems; ++i) {
        float bv = b_fixed;
        if (kVaryB) bv = time[i] >= 0 ? load(B, n * L + time[i]) : 0.f;
        decay[i] = exp2f(dt[i] * a2);
        drive[i] = dtu[i] * bv;
        run.a *= decay[i];
        run.b = decay[i] * run.b + drive[i];
      }
      Pair exclusive, total;
      block_scan<kFwdThreads, false>(run, exclusive, total, s_scan, parity);
      const float carry = s_carry[cur][n];
      float h = scale(exclusive.a, carry) + exclusive.b;
#pragma unroll
      for (int i = 0; i < kFwdItems; ++i) {
        float cv = c_fixed;
        if (kVaryC) cv = time[i] >= 0 ? load(C, n * L + time[i]) : 0.f;
        h = decay[i] * h + drive[i];
        y[i] += cv * h;
      }
      if (threadIdx.x == 0) {
        const float next = scale(total.a, carry) + total.b;
        s_carry[cur ^ 1][n] = next;
        if (k == chunks - 1) p.last[bd * N + n] = next;
      }
    }
#pragma unroll
    for (int i = 0; i < kFwdItems; ++i) {
      if (time[i] < 0) continue;
      float v = y[i] + skip * load(u, time[i]);
      if (z != nullptr) {
        const float zv = load(z, time[i]);
        v *= zv * sigmoid(zv);
      }
      out[time[i]] = static_cast<T>(v);
    }
  }
}

template <typename T, bool kVaryB, bool kVaryC>
__global__ void __launch_bounds__(kBwdThreads) selective_scan_backward_kernel(const Params p) {
  constexpr int kWarps = kBwdThreads / 32;
  __shared__ float s_carry[2][kMaxState];
  __shared__ Pair s_scan[2][kWarps];
  __shared__ float s_sum3[2][3][kWarps];
  __shared__ float s_sum2[2][2][kWarps];
  int scan_parity = 0, sum_parity = 0, sum2_parity = 0;
  const int64_t L = p.length, tiles = p.dim / p.per_tile;
  const int N = p.state;
  const int64_t block = blockIdx.x, b = block / tiles, tile = block % tiles;
  const int64_t chunks = (L + kChunk - 1) / kChunk;
  float* states = p.workspace + block * chunks * N;
  float* dB_tile = kVaryB ? p.dB_tiles + (b * tiles + tile) * N * L : nullptr;
  float* dC_tile = kVaryC ? p.dC_tiles + (b * tiles + tile) * N * L : nullptr;
  for (int64_t c = 0; c < p.per_tile; ++c) {
    const int64_t d = tile * p.per_tile + c, bd = b * p.dim + d;
    const T* u = static_cast<const T*>(p.u) + bd * L;
    const T* delta = static_cast<const T*>(p.delta) + bd * L;
    const T* z = p.z != nullptr ? static_cast<const T*>(p.z) + bd * L : nullptr;
    const T* grad_out = static_cast<const T*>(p.grad_out) + bd * L;
    T* du = static_cast<T*>(p.du) + bd * L;
    T* ddelta = static_cast<T*>(p.ddelta) + bd * L;
    T* dz = p.dz != nullptr ? static_cast<T*>(p.dz) + bd * L : nullptr;
    const float* A = p.A + d * N;
    const T* B = kVaryB ? static_cast<const T*>(p.B) + (b * p.groups_b + d / p.group_b) * N * L : nullptr;
    const T* C = kVaryC ? static_cast<const T*>(p.C) + (b * p.groups_c + d / p.group_c) * N * L : nullptr;
    const float* B_fixed = kVaryB ? nullptr : p.B_fixed + d * N;
    const float* C_fixed = kVaryC ? nullptr : p.C_fixed + d * N;
    const float bias = p.bias != nullptr ? p.bias[d] : 0.f, skip = p.D != nullptr ? p.D[d] : 0.f;
    __syncthreads();  // the previous channel's readers of the carries and the states are done
    for (int n = threadIdx.x; n < N; n += kBwdThreads) {
      s_carry[(chunks - 1) & 1][n] = p.grad_last[bd * N + n];
      states[n] = 0.f;
    }
    __syncthreads();
    // Pass 1: the state entering each chunk (thread 0 carries it; the block only composes runs).
    for (int64_t k = 0; k + 1 < chunks; ++k) {
      const int64_t first = k * kChunk + static_cast<int64_t>(threadIdx.x) * kBwdItems;
      float dt[kBwdItems], dtu[kBwdItems];
      int64_t time[kBwdItems];
#pragma unroll
      for (int i = 0; i < kBwdItems; ++i) {
        const int64_t s = first + i;  // every step of a chunk before the last is in range
        time[i] = p.reverse ? L - 1 - s : s;
        const float x = load(delta, time[i]) + bias;
        dt[i] = p.softplus ? softplus(x) : x;
        dtu[i] = dt[i] * load(u, time[i]);
      }
      for (int n = 0; n < N; ++n) {
        const float a2 = A[n] * kLog2e;
        const float b_fixed = kVaryB ? 0.f : B_fixed[n];
        Pair run{1.f, 0.f};
#pragma unroll
        for (int i = 0; i < kBwdItems; ++i) {
          const float bv = kVaryB ? load(B, n * L + time[i]) : b_fixed;
          const float decay = exp2f(dt[i] * a2);
          run.a *= decay;
          run.b = decay * run.b + dtu[i] * bv;
        }
        Pair exclusive, total;
        block_scan<kBwdThreads, false>(run, exclusive, total, s_scan, scan_parity);
        if (threadIdx.x == 0) states[(k + 1) * N + n] = scale(total.a, states[k * N + n]) + total.b;
      }
    }
    __syncthreads();  // the chunk states are visible to the block
    // Pass 2: chunks from the last to the first.
    float d_skip = 0.f, d_bias = 0.f;
    for (int64_t k = chunks - 1; k >= 0; --k) {
      const int cur = k & 1;
      const int64_t first = k * kChunk + static_cast<int64_t>(threadIdx.x) * kBwdItems;
      float dt[kBwdItems], uv[kBwdItems], dy[kBwdItems], y[kBwdItems], du_sum[kBwdItems], ddt_sum[kBwdItems];
      int64_t time[kBwdItems];
#pragma unroll
      for (int i = 0; i < kBwdItems; ++i) {
        const int64_t s = first + i;
        time[i] = s < L ? (p.reverse ? L - 1 - s : s) : -1;
        dt[i] = uv[i] = dy[i] = y[i] = du_sum[i] = ddt_sum[i] = 0.f;
        if (time[i] >= 0) {
          const float x = load(delta, time[i]) + bias;
          dt[i] = p.softplus ? softplus(x) : x;
          uv[i] = load(u, time[i]);
          float g = load(grad_out, time[i]);
          if (z != nullptr) {
            const float zv = load(z, time[i]);
            g *= zv * sigmoid(zv);
          }
          dy[i] = g;
        }
      }
      for (int n = 0; n < N; ++n) {
        const float an = A[n], a2 = an * kLog2e;
        const float b_fixed = kVaryB ? 0.f : B_fixed[n], c_fixed = kVaryC ? 0.f : C_fixed[n];
        float decay[kBwdItems], h[kBwdItems], bv[kBwdItems], cv[kBwdItems];
        Pair run{1.f, 0.f};
#pragma unroll
        for (int i = 0; i < kBwdItems; ++i) {
          bv[i] = kVaryB ? (time[i] >= 0 ? load(B, n * L + time[i]) : 0.f) : b_fixed;
          cv[i] = kVaryC ? (time[i] >= 0 ? load(C, n * L + time[i]) : 0.f) : c_fixed;
          decay[i] = exp2f(dt[i] * a2);
          h[i] = dt[i] * uv[i] * bv[i];  // the drive, replaced by the state below
          run.a *= decay[i];
          run.b = decay[i] * run.b + h[i];
        }
        Pair exclusive, total;
        block_scan<kBwdThreads, false>(run, exclusive, total, s_scan, scan_parity);
        const float h_enter = scale(exclusive.a, states[k * N + n]) + exclusive.b;
        float state = h_enter;
        Pair back{1.f, 0.f};
#pragma unroll
        for (int i = 0; i < kBwdItems; ++i) {
          state = decay[i] * state + h[i];
          h[i] = state;
          y[i] += cv[i] * state;
        }
#pragma unroll
        for (int i = kBwdItems - 1; i >= 0; --i) {
          back.a *= decay[i];
          back.b = decay[i] * (back.b + cv[i] * dy[i]);
        }
        block_scan<kBwdThreads, true>(back, exclusive, total, s_scan, scan_parity);
        const float carry = s_carry[cur][n];
        float r = scale(exclusive.a, carry) + exclusive.b;  // a_{s+1} dL/dh_{s+1} past this run
        float sums[3] = {0.f, 0.f, 0.f};                   // dA, fixed dB, fixed dC
#pragma unroll
        for (int i = kBwdItems - 1; i >= 0; --i) {
          const float q = cv[i] * dy[i] + r;  // dL/dh at this step
          const float h_prev = i > 0 ? h[i - 1] : h_enter;
          const float dh_decay = q * decay[i] * h_prev;
          sums[0] += dh_decay * dt[i];
          ddt_sum[i] += dh_decay * an + q * bv[i] * uv[i];
          du_sum[i] += q * bv[i];
          const float db = q * dt[i] * uv[i], dc = dy[i] * h[i];
          if (kVaryB) {
            if (time[i] >= 0) {
              float* slot = dB_tile + n * L + time[i];
              *slot = c == 0 ? db : *slot + db;
            }
          } else {
            sums[1] += db;
          }
          if (kVaryC) {
            if (time[i] >= 0) {
              float* slot = dC_tile + n * L + time[i];
              *slot = c == 0 ? dc : *slot + dc;
            }
          } else {
            sums[2] += dc;
          }
          r = decay[i] * q;
        }
        if (threadIdx.x == 0) s_carry[cur ^ 1][n] = scale(total.a, carry) + total.b;
        block_sum<kBwdThreads, 3>(sums, s_sum3, sum_parity);
        if (threadIdx.x == 0) {
          const bool last_chunk = k == chunks - 1;
          float* dA = p.dA + bd * N + n;
          *dA = last_chunk ? sums[0] : *dA + sums[0];
          if (!kVaryB) {
            float* slot = p.dB_fixed + bd * N + n;
            *slot = last_chunk ? sums[1] : *slot + sums[1];
          }
          if (!kVaryC) {
            float* slot = p.dC_fixed + bd * N + n;
            *slot = last_chunk ? sums[2] : *slot + sums[2];
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kBwdItems; ++i) {
        if (time[i] < 0) continue;
        const float x = load(delta, time[i]) + bias;
        if (z != nullptr) {
          const float zv = load(z, time[i]), sz = sigmoid(zv);
          const float pre = y[i] + skip * uv[i];
          dz[time[i]] = static_cast<T>(load(grad_out, time[i]) * pre * sz * (1.f + zv * (1.f - sz)));
        }
        const float ddt = ddt_sum[i] * (p.softplus ? (x > 20.f ? 1.f : sigmoid(x)) : 1.f);
        d_skip += dy[i] * uv[i];
        d_bias += ddt;
        du[time[i]] = static_cast<T>(dy[i] * skip + dt[i] * du_sum[i]);
        ddelta[time[i]] = static_cast<T>(ddt);
      }
    }
    float tail[2] = {d_skip, d_bias};
    block_sum<kBwdThreads, 2>(tail, s_sum2, sum2_parity);
    if (threadIdx.x == 0) {
      p.dD[bd] = tail[0];
      p.dbias[bd] = tail[1];
    }
  }
}

// The dtype the kernels read u, delta, z, varying B/C (and grad_out) in: theirs when they share one,
// else float32 (the others are converted; fixed B/C, A, D, delta_bias are read as float32).
at::ScalarType common_dtype(std::initializer_list<const at::Tensor*> tensors) {
  at::ScalarType dtype = (*tensors.begin())->scalar_type();
  for (const at::Tensor* t : tensors) {
    if (t->numel() > 0 && t->scalar_type() != dtype) return at::kFloat;
  }
  return dtype;
}

struct Prepared {
  at::Tensor u, delta, z, B, C, A, D, bias;
  at::ScalarType dtype;
};

Prepared prepare(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                 const at::Tensor& C, const at::Tensor& D, const at::Tensor& z, const at::Tensor& delta_bias,
                 const at::Tensor* grad_out) {
  const at::Tensor& vary_b = B.dim() == 4 ? B : u;
  const at::Tensor& vary_c = C.dim() == 4 ? C : u;
  const at::ScalarType dtype = grad_out != nullptr ? common_dtype({&u, &delta, &z, &vary_b, &vary_c, grad_out})
                                                   : common_dtype({&u, &delta, &z, &vary_b, &vary_c});
  const auto as = [&](const at::Tensor& t) { return t.to(dtype).contiguous(); };
  const auto bc = [&](const at::Tensor& t) { return t.dim() == 4 ? as(t) : t.to(at::kFloat).contiguous(); };
  return {as(u),         as(delta),   z.numel() ? as(z) : z, bc(B), bc(C), A.contiguous(), D.contiguous(),
          delta_bias.contiguous(), dtype};
}

Params params_of(const Prepared& in, const ScanShape& s, bool softplus, bool reverse) {
  Params p{};
  p.u = in.u.data_ptr();
  p.delta = in.delta.data_ptr();
  p.z = in.z.numel() ? in.z.data_ptr() : nullptr;
  p.A = in.A.data_ptr<float>();
  p.D = in.D.numel() ? in.D.data_ptr<float>() : nullptr;
  p.bias = in.bias.numel() ? in.bias.data_ptr<float>() : nullptr;
  if (s.groups_b > 0) {
    p.B = in.B.data_ptr();
    p.groups_b = s.groups_b;
    p.group_b = s.dim / s.groups_b;
  } else {
    p.B_fixed = in.B.data_ptr<float>();
  }
  if (s.groups_c > 0) {
    p.C = in.C.data_ptr();
    p.groups_c = s.groups_c;
    p.group_c = s.dim / s.groups_c;
  } else {
    p.C_fixed = in.C.data_ptr<float>();
  }
  p.batch = s.batch;
  p.dim = s.dim;
  p.length = s.length;
  p.state = static_cast<int>(s.state);
  p.softplus = softplus;
  p.reverse = reverse;
  return p;
}

// Calls launch(T{}, vary_b, vary_c) with T the kernels' input type and the B/C forms as constants.
template <typename Launch>
void dispatch(at::ScalarType dtype, bool vary_b, bool vary_c, Launch&& launch) {
  const auto forms = [&](auto tag) {
    using T = decltype(tag);
    if (vary_b && vary_c) {
      launch(T{}, std::true_type{}, std::true_type{});
    } else if (vary_b) {
      launch(T{}, std::true_type{}, std::false_type{});
    } else if (vary_c) {
      launch(T{}, std::false_type{}, std::true_type{});
    } else {
      launch(T{}, std::false_type{}, std::false_type{});
    }
  };
  switch (dtype) {
    case at::kFloat:
      forms(float{});
      break;
    case at::kHalf:
      forms(c10::Half{});
      break;
    case at::kBFloat16:
      forms(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "selective_scan: unsupported dtype ", dtype);
  }
}

void check_cuda(const at::Tensor& u) {
  TORCH_CHECK(u.is_cuda(), "selective_scan (cuda): the tensors must be CUDA tensors, got one on ", u.device());
}

std::tuple<at::Tensor, at::Tensor> selective_scan_forward_cuda(const at::Tensor& u, const at::Tensor& delta,
                                                               const at::Tensor& A, const at::Tensor& B,
                                                               const at::Tensor& C, const at::Tensor& D,
                                                               const at::Tensor& z, const at::Tensor& delta_bias,
                                                               bool delta_softplus, bool reverse) {
  const ScanShape s = selective_scan_check(u, delta, A, B, C, D, z, delta_bias);
  check_cuda(u);
  const c10::cuda::CUDAGuard guard(u.device());
  const Prepared in = prepare(u, delta, A, B, C, D, z, delta_bias, nullptr);
  at::Tensor out = at::empty({s.batch, s.dim, s.length}, u.options().dtype(in.dtype));
  at::Tensor last = at::zeros({s.batch, s.dim, s.state}, u.options().dtype(at::kFloat));
  if (s.length == 0 || s.batch * s.dim == 0) return {out.to(u.scalar_type()), last};
  Params p = params_of(in, s, delta_softplus, reverse);
  p.out = out.data_ptr();
  p.last = last.data_ptr<float>();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(in.dtype, s.groups_b > 0, s.groups_c > 0, [&](auto tag, auto vary_b, auto vary_c) {
    using T = decltype(tag);
    selective_scan_forward_kernel<T, decltype(vary_b)::value, decltype(vary_c)::value>
        <<<s.batch * s.dim, kFwdThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out.to(u.scalar_type()), last};
}

// Channels per backward block: a divisor of every varying B/C group size (so that a block's channels
// share their groups), as large as leaves about two blocks per SM (fewer per-tile partials of dB/dC
// to write and sum); 1 without varying B/C.
int64_t channels_per_block(const ScanShape& s) {
  int64_t group = 0;
  for (const int64_t groups : {s.groups_b, s.groups_c}) {
    if (groups > 0) group = std::gcd(group, s.dim / groups);
  }
  if (group <= 1) return 1;
  // max_resident_blocks(2048): blocks of 2048 threads, one per SM, i.e. the SM count.
  const int64_t target = std::max<int64_t>(1, s.batch * s.dim / (2LL * cuda::max_resident_blocks(2048)));
  int64_t best = 1;
  for (int64_t p = 1; p <= std::min(group, target); ++p) {
    if (group % p == 0) best = p;
  }
  return best;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_backward_cuda(const at::Tensor& grad_out, const at::Tensor& grad_last, const at::Tensor& u,
                             const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                             const at::Tensor& D, const at::Tensor& z, const at::Tensor& delta_bias,
                             bool delta_softplus, bool reverse) {
  const ScanShape s = selective_scan_check(u, delta, A, B, C, D, z, delta_bias);
  selective_scan_check_grads(s, u, grad_out, grad_last);
  check_cuda(u);
  const c10::cuda::CUDAGuard guard(u.device());
  const Prepared in = prepare(u, delta, A, B, C, D, z, delta_bias, &grad_out);
  const at::Tensor go = grad_out.to(in.dtype).contiguous();
  const at::Tensor gl = grad_last.to(at::kFloat).contiguous();
  const auto f32 = u.options().dtype(at::kFloat), typed = u.options().dtype(in.dtype);
  const int64_t batch = s.batch, dim = s.dim, L = s.length, N = s.state;
  const bool has_z = z.numel() > 0;
  at::Tensor du = at::empty({batch, dim, L}, typed), ddelta = at::empty({batch, dim, L}, typed);
  at::Tensor dz = has_z ? at::empty({batch, dim, L}, typed) : at::empty({0}, typed);
  const int64_t per_tile = channels_per_block(s), tiles = dim > 0 ? dim / per_tile : 0;
  const bool vary_b = s.groups_b > 0, vary_c = s.groups_c > 0;
  // The kernel writes every element of the partials (the first chunk or channel assigns); with nothing
  // to scan they are zeros.
  const bool launch = L > 0 && batch * dim > 0;
  const auto alloc = [&](at::IntArrayRef shape) { return launch ? at::empty(shape, f32) : at::zeros(shape, f32); };
  at::Tensor dA = alloc({batch, dim, N}), dD = alloc({batch, dim}), dbias = alloc({batch, dim});
  at::Tensor dB = vary_b ? alloc({batch, tiles, N, L}) : alloc({batch, dim, N});
  at::Tensor dC = vary_c ? alloc({batch, tiles, N, L}) : alloc({batch, dim, N});
  if (launch) {
    const int64_t chunks = (L + kChunk - 1) / kChunk, blocks = batch * tiles;
    at::Tensor workspace = at::empty({blocks, chunks, N}, f32);
    Params p = params_of(in, s, delta_softplus, reverse);
    p.grad_out = go.data_ptr();
    p.grad_last = gl.data_ptr<float>();
    p.per_tile = per_tile;
    p.workspace = workspace.data_ptr<float>();
    p.du = du.data_ptr();
    p.ddelta = ddelta.data_ptr();
    p.dz = has_z ? dz.data_ptr() : nullptr;
    p.dA = dA.data_ptr<float>();
    p.dD = dD.data_ptr<float>();
    p.dbias = dbias.data_ptr<float>();
    (vary_b ? p.dB_tiles : p.dB_fixed) = dB.data_ptr<float>();
    (vary_c ? p.dC_tiles : p.dC_fixed) = dC.data_ptr<float>();
    const auto stream = c10::cuda::getCurrentCUDAStream();
    dispatch(in.dtype, vary_b, vary_c, [&](auto tag, auto vb, auto vc) {
      using T = decltype(tag);
      selective_scan_backward_kernel<T, decltype(vb)::value, decltype(vc)::value>
          <<<blocks, kBwdThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    du.zero_();
    ddelta.zero_();
    dz.zero_();
  }
  // Per-(batch, channel) and per-tile partials summed in a fixed order (torch's reductions are
  // deterministic on CUDA), then cast to each input's dtype.
  const auto reduce_bc = [&](const at::Tensor& part, int64_t groups, const at::Tensor& like) {
    if (groups == 0) return part.sum(0).to(like.scalar_type()).contiguous();
    return part.view({batch, groups, tiles / groups, N, L}).sum(2).to(like.scalar_type()).contiguous();
  };
  const auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  return {du.to(u.scalar_type()),
          ddelta.to(delta.scalar_type()),
          dA.sum(0),
          reduce_bc(dB, s.groups_b, B),
          reduce_bc(dC, s.groups_c, C),
          D.numel() ? dD.sum(0) : empty(D),
          has_z ? dz.to(z.scalar_type()) : empty(z),
          delta_bias.numel() ? dbias.sum(0) : empty(delta_bias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvision, CUDA, m) {
  m.impl("selective_scan_forward", &selective_scan_forward_cuda);
  m.impl("selective_scan_backward", &selective_scan_backward_cuda);
}

}  // namespace fastvision
