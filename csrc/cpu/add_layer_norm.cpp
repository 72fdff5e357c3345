// Fused residual add + LayerNorm on the CPU: rows in parallel with at::parallel_for, float32 math
// (double for double inputs). Each row's sum x + residual is formed once in a per-thread buffer and
// the statistics are two-pass over it. dweight/dbias are summed per block of rows into a
// [blocks, D] buffer and reduced afterwards: no atomics, and the result does not depend on threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

namespace fastvision {
namespace {

// Eight independent partial sums: vectorizes without -ffast-math and loses less to rounding.
constexpr int64_t kLanes = 8;

template <typename acc_t>
acc_t lane_sum(const acc_t* v, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += v[j + l];
  }
  acc_t total = 0;
  for (; j < n; ++j) total += v[j];
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

template <typename acc_t>
acc_t lane_centered_square_sum(const acc_t* v, acc_t mean, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t d = v[j + l] - mean;
      lanes[l] += d * d;
    }
  }
  acc_t total = 0;
  for (; j < n; ++j) total += (v[j] - mean) * (v[j] - mean);
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

template <typename acc_t>
acc_t lane_dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[j + l] * b[j + l];
  }
  acc_t total = 0;
  for (; j < n; ++j) total += a[j] * b[j];
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

int64_t grain_rows(int64_t dim) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1)); }

template <typename scalar_t>
void forward_rows(const scalar_t* x, const scalar_t* residual, const at::opmath_type<scalar_t>* weight,
                  const at::opmath_type<scalar_t>* bias, scalar_t* out, float* mean_out, float* rstd_out,
                  int64_t rows, int64_t dim, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, grain_rows(dim), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> summed(dim);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* x_row = x + r * dim;
      const scalar_t* residual_row = residual + r * dim;
      for (int64_t j = 0; j < dim; ++j) {
        summed[j] = static_cast<acc_t>(x_row[j]) + static_cast<acc_t>(residual_row[j]);
      }
      const acc_t mean = lane_sum(summed.data(), dim) / static_cast<acc_t>(dim);
      const acc_t var = lane_centered_square_sum(summed.data(), mean, dim) / static_cast<acc_t>(dim);
      const acc_t rstd = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
      scalar_t* out_row = out + r * dim;
      for (int64_t j = 0; j < dim; ++j) {
        acc_t y = (summed[j] - mean) * rstd;
        if (weight != nullptr) y *= weight[j];
        if (bias != nullptr) y += bias[j];
        out_row[j] = static_cast<scalar_t>(y);
      }
      mean_out[r] = static_cast<float>(mean);
      rstd_out[r] = static_cast<float>(rstd);
    }
  });
}

template <typename scalar_t>
void backward_rows(const scalar_t* grad, const scalar_t* x, const scalar_t* residual,
                   const at::opmath_type<scalar_t>* weight, const float* mean_in, const float* rstd_in,
                   scalar_t* dx, at::opmath_type<scalar_t>* dweight_partial,
                   at::opmath_type<scalar_t>* dbias_partial, int64_t rows, int64_t dim, int64_t blocks,
                   int64_t rows_per_block) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<acc_t> x_hat(dim), grad_hat(dim);
    for (int64_t block = block_begin; block < block_end; ++block) {
      acc_t* dweight_row = dweight_partial == nullptr ? nullptr : dweight_partial + block * dim;
      acc_t* dbias_row = dbias_partial == nullptr ? nullptr : dbias_partial + block * dim;
      const int64_t row_end = std::min(rows, (block + 1) * rows_per_block);
      for (int64_t r = block * rows_per_block; r < row_end; ++r) {
        const scalar_t* x_row = x + r * dim;
        const scalar_t* residual_row = residual + r * dim;
        const scalar_t* grad_row = grad + r * dim;
        const acc_t mean = mean_in[r];
        const acc_t rstd = rstd_in[r];
        for (int64_t j = 0; j < dim; ++j) {
          x_hat[j] = (static_cast<acc_t>(x_row[j]) + static_cast<acc_t>(residual_row[j]) - mean) * rstd;
          const acc_t g = static_cast<acc_t>(grad_row[j]);
          grad_hat[j] = weight == nullptr ? g : g * weight[j];
          if (dweight_row != nullptr) {
            dweight_row[j] += g * x_hat[j];
            dbias_row[j] += g;
          }
        }
        // d/ds of LayerNorm: rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = dy * weight.
        const acc_t mean_grad = lane_sum(grad_hat.data(), dim) / static_cast<acc_t>(dim);
        const acc_t mean_grad_x_hat = lane_dot(grad_hat.data(), x_hat.data(), dim) / static_cast<acc_t>(dim);
        scalar_t* dx_row = dx + r * dim;
        for (int64_t j = 0; j < dim; ++j) {
          dx_row[j] = static_cast<scalar_t>((grad_hat[j] - mean_grad - x_hat[j] * mean_grad_x_hat) * rstd);
        }
      }
    }
  });
}

// The Python wrapper checks user input first; these guard direct calls to torch.ops.fastvision.*.
void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& residual,
                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor, got ",
              x.scalar_type());
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual has shape ", residual.sizes(),
              ", expected x's shape ", x.sizes());
  TORCH_CHECK(residual.scalar_type() == x.scalar_type(), op, ": residual dtype ", residual.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  const std::pair<const char*, const std::optional<at::Tensor>*> params[] = {{"weight", &weight},
                                                                              {"bias", &bias}};
  for (const auto& [name, param] : params) {
    if (!param->has_value()) continue;
    const at::Tensor& p = param->value();
    TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(-1), op, ": ", name, " must have shape [", x.size(-1),
                "], got ", p.sizes());
    TORCH_CHECK(p.scalar_type() == x.scalar_type() || p.scalar_type() == at::kFloat, op, ": ", name,
                " must have x's dtype or float32, got ", p.scalar_type());
  }
}

int64_t leading_rows(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);  // not view(-1, ...): D may be 0
  return rows;
}

// The parameter in the math type, contiguous; undefined when absent.
at::Tensor param_as(const std::optional<at::Tensor>& param, at::ScalarType acc_type) {
  return param.has_value() ? param->to(acc_type).contiguous() : at::Tensor();
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_forward_cpu(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_inputs("add_layer_norm_forward", x, residual, weight, bias);
  const int64_t rows = leading_rows(x);
  const int64_t dim = x.size(-1);
  const auto stats_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor mean = at::empty(stats_shape, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty(stats_shape, x.options().dtype(at::kFloat));
  if (x.numel() == 0) {
    // Rows of length 0 have no statistics; zeros keep the saved tensors finite.
    mean.zero_();
    rstd.zero_();
    return {out, mean, rstd};
  }
  const at::Tensor x_rows = x.contiguous();
  const at::Tensor residual_rows = residual.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_layer_norm_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor weight_acc = param_as(weight, c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor bias_acc = param_as(bias, c10::CppTypeToScalarType<acc_t>::value);
    forward_rows<scalar_t>(x_rows.data_ptr<scalar_t>(), residual_rows.data_ptr<scalar_t>(),
                           data_or_null<acc_t>(weight_acc), data_or_null<acc_t>(bias_acc),
                           out.data_ptr<scalar_t>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, dim,
                           eps);
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& rstd) {
  check_inputs("add_layer_norm_backward", x, residual, weight, bias);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "add_layer_norm_backward: grad_out has shape ", grad_out.sizes(),
              ", expected x's shape ", x.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "add_layer_norm_backward: grad_out dtype ",
              grad_out.scalar_type(), " differs from x dtype ", x.scalar_type());
  const int64_t rows = leading_rows(x);
  const int64_t dim = x.size(-1);
  for (const at::Tensor* stat : {&mean, &rstd}) {
    TORCH_CHECK(stat->scalar_type() == at::kFloat && stat->numel() == rows,
                "add_layer_norm_backward: mean and rstd must be float32 with one value per row");
  }
  at::Tensor dx = at::empty(x.sizes(), x.options());
  const bool param_grads = weight.has_value() || bias.has_value();
  at::Tensor dweight = weight.has_value() ? at::zeros_like(*weight) : at::empty({0}, x.options());
  at::Tensor dbias = bias.has_value() ? at::zeros_like(*bias) : at::empty({0}, x.options());
  if (x.numel() == 0) return {dx, dweight, dbias};

  const at::Tensor x_rows = x.contiguous();
  const at::Tensor residual_rows = residual.contiguous();
  const at::Tensor grad_rows = grad_out.contiguous();
  const at::Tensor mean_rows = mean.contiguous();
  const at::Tensor rstd_rows = rstd.contiguous();
  // A few blocks per thread balance the load; each block owns one row of the partial sums.
  const int64_t wanted_blocks = std::min<int64_t>(rows, 4 * std::max<int64_t>(1, at::get_num_threads()));
  const int64_t rows_per_block = (rows + wanted_blocks - 1) / wanted_blocks;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_layer_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor weight_acc = param_as(weight, acc_type);
    at::Tensor dweight_partial, dbias_partial;
    if (param_grads) {
      dweight_partial = at::zeros({blocks, dim}, x.options().dtype(acc_type));
      dbias_partial = at::zeros({blocks, dim}, x.options().dtype(acc_type));
    }
    backward_rows<scalar_t>(grad_rows.data_ptr<scalar_t>(), x_rows.data_ptr<scalar_t>(),
                            residual_rows.data_ptr<scalar_t>(), data_or_null<acc_t>(weight_acc),
                            mean_rows.data_ptr<float>(), rstd_rows.data_ptr<float>(), dx.data_ptr<scalar_t>(),
                            data_or_null<acc_t>(dweight_partial), data_or_null<acc_t>(dbias_partial), rows, dim,
                            blocks, rows_per_block);
    if (weight.has_value()) dweight.copy_(dweight_partial.sum(0));
    if (bias.has_value()) dbias.copy_(dbias_partial.sum(0));
  });
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvision, CPU, m) {
  m.impl("add_layer_norm_forward", &add_layer_norm_forward_cpu);
  m.impl("add_layer_norm_backward", &add_layer_norm_backward_cpu);
}

}  // namespace fastvision
