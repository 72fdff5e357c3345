// GEGLU on the CPU: one pass over rows with at::parallel_for, float32 (or float64) math.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "geglu_common.h"
#include "geglu_math.h"

namespace fastvision {
namespace {

template <typename scalar_t, bool kTanh>
void geglu_forward_rows(const scalar_t* x, scalar_t* out, int64_t rows, int64_t hidden) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(hidden, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* value = x + r * 2 * hidden;
      const scalar_t* gate = value + hidden;
      scalar_t* y = out + r * hidden;
      for (int64_t j = 0; j < hidden; ++j) {
        const float g = static_cast<float>(gate[j]);
        y[j] = static_cast<scalar_t>(static_cast<float>(value[j]) * gelu<kTanh>(g));
      }
    }
  });
}

template <typename scalar_t, bool kTanh>
void geglu_backward_rows(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t rows, int64_t hidden) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(hidden, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* value = x + r * 2 * hidden;
      const scalar_t* gate = value + hidden;
      const scalar_t* grad = dy + r * hidden;
      scalar_t* dvalue = dx + r * 2 * hidden;
      scalar_t* dgate = dvalue + hidden;
      for (int64_t j = 0; j < hidden; ++j) {
        const float g = static_cast<float>(gate[j]);
        const float d = static_cast<float>(grad[j]);
        dvalue[j] = static_cast<scalar_t>(d * gelu<kTanh>(g));
        dgate[j] = static_cast<scalar_t>(d * static_cast<float>(value[j]) * gelu_grad<kTanh>(g));
      }
    }
  });
}

at::Tensor geglu_forward_cpu(const at::Tensor& x, c10::string_view approximate) {
  const bool tanh = geglu_is_tanh(std::string(approximate));
  const at::Tensor rows = geglu_as_rows(x);
  at::Tensor out = at::empty(geglu_out_shape(x), x.options());
  const int64_t hidden = rows.size(1) / 2;
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "geglu_forward_cpu", [&] {
    if (tanh) {
      geglu_forward_rows<scalar_t, true>(rows.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows.size(0), hidden);
    } else {
      geglu_forward_rows<scalar_t, false>(rows.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows.size(0), hidden);
    }
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
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "geglu_backward_cpu", [&] {
      if (tanh) {
        geglu_backward_rows<scalar_t, true>(dy.data_ptr<scalar_t>(), rows.data_ptr<scalar_t>(),
                                            dx.data_ptr<scalar_t>(), rows.size(0), hidden);
      } else {
        geglu_backward_rows<scalar_t, false>(dy.data_ptr<scalar_t>(), rows.data_ptr<scalar_t>(),
                                             dx.data_ptr<scalar_t>(), rows.size(0), hidden);
      }
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
