// GEGLU on CUDA: a memory-bound elementwise pass. Each thread moves 16-byte vectors of value,
// gate and output (8 bf16/fp16 or 4 fp32 per access) when the hidden size and pointers allow it,
// else single elements. Math in float32.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "cuda/cuda_helpers.cuh"
#include "geglu_common.h"
#include "geglu_math.h"

namespace fastvision {
namespace {

using cuda::aligned16;
using cuda::Vec;

constexpr int kThreads = 256;

template <typename T, int kVec, bool kTanh, typename index_t>
__global__ void __launch_bounds__(kThreads)
geglu_forward_kernel(const T* __restrict__ x, T* __restrict__ out, index_t hidden_vecs, index_t total_vecs) {
  using V = Vec<T, kVec>;
  const index_t stride = static_cast<index_t>(gridDim.x) * kThreads;
  for (index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; i < total_vecs; i += stride) {
    const index_t row = i / hidden_vecs;
    const index_t col = i - row * hidden_vecs;
    const V* row_in = reinterpret_cast<const V*>(x) + row * 2 * hidden_vecs;
    const V value = row_in[col];
    const V gate = row_in[hidden_vecs + col];
    V y;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      y.v[k] = static_cast<T>(static_cast<float>(value.v[k]) * gelu<kTanh>(static_cast<float>(gate.v[k])));
    }
    reinterpret_cast<V*>(out)[i] = y;
  }
}

template <typename T, int kVec, bool kTanh, typename index_t>
__global__ void __launch_bounds__(kThreads)
geglu_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, index_t hidden_vecs,
                      index_t total_vecs) {
  using V = Vec<T, kVec>;
  const index_t stride = static_cast<index_t>(gridDim.x) * kThreads;
  for (index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; i < total_vecs; i += stride) {
    const index_t row = i / hidden_vecs;
    const index_t col = i - row * hidden_vecs;
    const index_t in_offset = row * 2 * hidden_vecs + col;
    const V value = reinterpret_cast<const V*>(x)[in_offset];
    const V gate = reinterpret_cast<const V*>(x)[in_offset + hidden_vecs];
    const V grad = reinterpret_cast<const V*>(dy)[i];
    V dvalue, dgate;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float g = static_cast<float>(gate.v[k]);
      const float d = static_cast<float>(grad.v[k]);
      dvalue.v[k] = static_cast<T>(d * gelu<kTanh>(g));
      dgate.v[k] = static_cast<T>(d * static_cast<float>(value.v[k]) * gelu_grad<kTanh>(g));
    }
    reinterpret_cast<V*>(dx)[in_offset] = dvalue;
    reinterpret_cast<V*>(dx)[in_offset + hidden_vecs] = dgate;
  }
}

// Picks vector width and index type, then launches `launch(kVec, index_t)` via the callback.
template <typename T, typename Launch>
void dispatch_vector_width(int64_t hidden, int64_t rows, bool pointers_aligned, Launch&& launch) {
  constexpr int kWide = cuda::kWideVec<T>;
  const bool vectorize = pointers_aligned && hidden % kWide == 0;
  const int64_t vec = vectorize ? kWide : 1;
  // The largest index formed is (2 * rows * hidden) / vec, over the input.
  const bool small = 2 * rows * hidden / vec < std::numeric_limits<int32_t>::max();
  if (vectorize) {
    small ? launch(std::integral_constant<int, kWide>{}, int32_t{}) : launch(std::integral_constant<int, kWide>{}, int64_t{});
  } else {
    small ? launch(std::integral_constant<int, 1>{}, int32_t{}) : launch(std::integral_constant<int, 1>{}, int64_t{});
  }
}

at::Tensor geglu_forward_cuda(const at::Tensor& x, c10::string_view approximate) {
  const bool tanh = geglu_is_tanh(std::string(approximate));
  TORCH_CHECK(x.is_cuda(), "geglu_forward_cuda: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rows = geglu_as_rows(x);
  at::Tensor out = at::empty(geglu_out_shape(x), x.options());
  if (out.numel() == 0) return out;
  const int64_t hidden = rows.size(1) / 2, n_rows = rows.size(0);
  const bool pointers_aligned = aligned16(rows.data_ptr()) && aligned16(out.data_ptr());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "geglu_forward_cuda", [&] {
    using T = scalar_t;
    dispatch_vector_width<T>(hidden, n_rows, pointers_aligned, [&](auto vec_tag, auto index_tag) {
      constexpr int kVec = decltype(vec_tag)::value;
      using index_t = decltype(index_tag);
      const index_t hidden_vecs = hidden / kVec, total = n_rows * (hidden / kVec);
      const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 4LL * cuda::max_resident_blocks(kThreads));
      const auto* in_ptr = reinterpret_cast<const T*>(rows.data_ptr());
      auto* out_ptr = reinterpret_cast<T*>(out.data_ptr());
      if (tanh) {
        geglu_forward_kernel<T, kVec, true, index_t><<<blocks, kThreads, 0, stream>>>(in_ptr, out_ptr, hidden_vecs, total);
      } else {
        geglu_forward_kernel<T, kVec, false, index_t><<<blocks, kThreads, 0, stream>>>(in_ptr, out_ptr, hidden_vecs, total);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor geglu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, c10::string_view approximate) {
  const bool tanh = geglu_is_tanh(std::string(approximate));
  TORCH_CHECK(x.is_cuda() && grad_out.is_cuda(), "geglu_backward_cuda: tensors must be on CUDA");
  TORCH_CHECK(x.device() == grad_out.device(), "geglu_backward: grad_out on ", grad_out.device(), " and x on ",
              x.device(), " must be on one device");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rows = geglu_as_rows(x);
  TORCH_CHECK(grad_out.sizes().vec() == geglu_out_shape(x), "geglu_backward: grad_out has shape ", grad_out.sizes(),
              ", expected x's shape with the last dimension halved");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "geglu_backward: grad_out dtype ", grad_out.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  const at::Tensor dy = grad_out.contiguous();
  at::Tensor dx = at::empty(rows.sizes(), x.options());
  if (dx.numel() == 0) return dx.view(x.sizes());
  const int64_t hidden = rows.size(1) / 2, n_rows = rows.size(0);
  const bool pointers_aligned = aligned16(rows.data_ptr()) && aligned16(dy.data_ptr()) && aligned16(dx.data_ptr());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "geglu_backward_cuda", [&] {
    using T = scalar_t;
    dispatch_vector_width<T>(hidden, n_rows, pointers_aligned, [&](auto vec_tag, auto index_tag) {
      constexpr int kVec = decltype(vec_tag)::value;
      using index_t = decltype(index_tag);
      const index_t hidden_vecs = hidden / kVec, total = n_rows * (hidden / kVec);
      const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 4LL * cuda::max_resident_blocks(kThreads));
      const auto* dy_ptr = reinterpret_cast<const T*>(dy.data_ptr());
      const auto* x_ptr = reinterpret_cast<const T*>(rows.data_ptr());
      auto* dx_ptr = reinterpret_cast<T*>(dx.data_ptr());
      if (tanh) {
        geglu_backward_kernel<T, kVec, true, index_t><<<blocks, kThreads, 0, stream>>>(dy_ptr, x_ptr, dx_ptr, hidden_vecs, total);
      } else {
        geglu_backward_kernel<T, kVec, false, index_t><<<blocks, kThreads, 0, stream>>>(dy_ptr, x_ptr, dx_ptr, hidden_vecs, total);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return dx.view(x.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvision, CUDA, m) {
  m.impl("geglu_forward", &geglu_forward_cuda);
  m.impl("geglu_backward", &geglu_backward_cuda);
}

}  // namespace fastvision
