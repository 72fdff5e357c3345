// GEGLU on the CPU: rows split across threads with at::parallel_for; inside a row, 16- or 8-wide
// (AVX-512 or AVX2, chosen at build time) float math through at::vec::Vectorized, with half/bfloat16
// widened to float per chunk.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>

#include "cpu/vec_chunk.h"
#include "geglu_common.h"
#include "geglu_math.h"

namespace fastvision {
namespace {

using FloatVec = at::vec::Vectorized<float>;

// erf and exp come from ATen's vector headers (SLEEF-backed exp, 1 ulp). The tanh form is written with
// sigmoids, as in geglu_math.h, so that it does not cancel where tanh is near +-1, and with the same
// limits at infinite or overflowing gates: e = exp(-2u) is not clamped, 1 - s = 1 / (1 + 1/e), and
// the products that would be inf * 0 there take their limit 0 (NaN gates stay NaN: == is false).
void tanh_gate_vec(const FloatVec& g, FloatVec& s, FloatVec& one_minus_s) {
  const FloatVec one(1.0f);
  const FloatVec u = FloatVec(kSqrt2OverPi) * (g + FloatVec(kTanhCubic) * g * g * g);
  const FloatVec e = (FloatVec(-2.0f) * u).exp();
  s = one / (one + e);
  one_minus_s = one / (one + one / e);
}

// `product` where `factor` is not 0, else 0.
FloatVec zero_where_zero(const FloatVec& factor, const FloatVec& product) {
  return FloatVec::blendv(product, FloatVec(0.0f), factor == FloatVec(0.0f));
}

template <bool kTanh>
FloatVec gelu_vec(const FloatVec& g) {
  if constexpr (kTanh) {
    FloatVec s, one_minus_s;
    tanh_gate_vec(g, s, one_minus_s);
    return zero_where_zero(s, g * s);
  } else {
    const FloatVec cdf = FloatVec(0.5f) * (FloatVec(1.0f) + (g * FloatVec(kSqrtHalf)).erf());
    return zero_where_zero(cdf, g * cdf);
  }
}

template <bool kTanh>
void gelu_and_grad_vec(const FloatVec& g, FloatVec& gelu_out, FloatVec& grad_out) {
  if constexpr (kTanh) {
    FloatVec s, one_minus_s;
    tanh_gate_vec(g, s, one_minus_s);
    const FloatVec ss = s * one_minus_s;
    const FloatVec du = FloatVec(kSqrt2OverPi) * (FloatVec(1.0f) + FloatVec(3.0f * kTanhCubic) * g * g);
    gelu_out = zero_where_zero(s, g * s);
    grad_out = s + zero_where_zero(ss, FloatVec(2.0f) * g * ss * du);
  } else {
    const FloatVec cdf = FloatVec(0.5f) * (FloatVec(1.0f) + (g * FloatVec(kSqrtHalf)).erf());
    const FloatVec pdf = (FloatVec(-0.5f) * g * g).exp();
    gelu_out = zero_where_zero(cdf, g * cdf);
    grad_out = cdf + zero_where_zero(pdf, g * FloatVec(kInvSqrt2Pi) * pdf);
  }
}

// Chunks of a storage vector widened to float (csrc/cpu/vec_chunk.h): float math for every dtype here.
template <typename scalar_t>
using FloatChunk = cpu::AccChunk<scalar_t>;
using cpu::kChunk;
using cpu::kParts;
using cpu::load_chunk;
using cpu::store_chunk;

int64_t rows_per_task(int64_t hidden) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(hidden, 1)); }

template <typename scalar_t, bool kTanh>
void geglu_forward_rows(const scalar_t* x, scalar_t* out, int64_t rows, int64_t hidden) {
  constexpr int64_t chunk = kChunk<scalar_t>;
  at::parallel_for(0, rows, rows_per_task(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* value = x + r * 2 * hidden;
      const scalar_t* gate = value + hidden;
      scalar_t* y = out + r * hidden;
      for (int64_t j = 0; j < hidden; j += chunk) {
        const int64_t count = std::min(chunk, hidden - j);
        const FloatChunk<scalar_t> g = load_chunk(gate + j, count);
        FloatChunk<scalar_t> result = load_chunk(value + j, count);
        for (int p = 0; p < kParts<scalar_t>; ++p) result[p] = result[p] * gelu_vec<kTanh>(g[p]);
        store_chunk(result, y + j, count);
      }
    }
  });
}

template <typename scalar_t, bool kTanh>
void geglu_backward_rows(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t rows, int64_t hidden) {
  constexpr int64_t chunk = kChunk<scalar_t>;
  at::parallel_for(0, rows, rows_per_task(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* value = x + r * 2 * hidden;
      const scalar_t* gate = value + hidden;
      const scalar_t* grad = dy + r * hidden;
      scalar_t* dvalue = dx + r * 2 * hidden;
      scalar_t* dgate = dvalue + hidden;
      for (int64_t j = 0; j < hidden; j += chunk) {
        const int64_t count = std::min(chunk, hidden - j);
        const FloatChunk<scalar_t> g = load_chunk(gate + j, count);
        const FloatChunk<scalar_t> d = load_chunk(grad + j, count);
        const FloatChunk<scalar_t> v = load_chunk(value + j, count);
        FloatChunk<scalar_t> d_value, d_gate;
        for (int p = 0; p < kParts<scalar_t>; ++p) {
          FloatVec gelu, gelu_grad;
          gelu_and_grad_vec<kTanh>(g[p], gelu, gelu_grad);
          d_value[p] = d[p] * gelu;
          d_gate[p] = d[p] * v[p] * gelu_grad;
        }
        store_chunk(d_value, dvalue + j, count);
        store_chunk(d_gate, dgate + j, count);
      }
    }
  });
}

#define FASTVISION_DISPATCH_GEGLU_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

at::Tensor geglu_forward_cpu(const at::Tensor& x, c10::string_view approximate) {
  const bool tanh = geglu_is_tanh(std::string(approximate));
  const at::Tensor rows = geglu_as_rows(x);
  at::Tensor out = at::empty(geglu_out_shape(x), x.options());
  const int64_t hidden = rows.size(1) / 2;
  if (out.numel() == 0) return out;
  FASTVISION_DISPATCH_GEGLU_TYPES(x.scalar_type(), "geglu_forward_cpu", [&] {
    const auto* in = rows.const_data_ptr<scalar_t>();
    auto* y = out.mutable_data_ptr<scalar_t>();
    tanh ? geglu_forward_rows<scalar_t, true>(in, y, rows.size(0), hidden)
         : geglu_forward_rows<scalar_t, false>(in, y, rows.size(0), hidden);
  });
  return out;
}

at::Tensor geglu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, c10::string_view approximate) {
  const bool tanh = geglu_is_tanh(std::string(approximate));
  const at::Tensor rows = geglu_as_rows(x);
  TORCH_CHECK(grad_out.sizes().vec() == geglu_out_shape(x), "geglu_backward: grad_out has shape ",
              grad_out.sizes(), ", expected x's shape with the last dimension halved");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "geglu_backward: grad_out dtype ", grad_out.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  const at::Tensor dy = grad_out.contiguous();
  at::Tensor dx = at::empty(rows.sizes(), x.options());
  const int64_t hidden = rows.size(1) / 2;
  if (dx.numel() > 0) {
    FASTVISION_DISPATCH_GEGLU_TYPES(x.scalar_type(), "geglu_backward_cpu", [&] {
      const auto* g = dy.const_data_ptr<scalar_t>();
      const auto* in = rows.const_data_ptr<scalar_t>();
      auto* d = dx.mutable_data_ptr<scalar_t>();
      tanh ? geglu_backward_rows<scalar_t, true>(g, in, d, rows.size(0), hidden)
           : geglu_backward_rows<scalar_t, false>(g, in, d, rows.size(0), hidden);
    });
  }
  return dx.view(x.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvision, CPU, m) {
  m.impl("geglu_forward", &geglu_forward_cpu);
  m.impl("geglu_backward", &geglu_backward_cpu);
}

}  // namespace fastvision
