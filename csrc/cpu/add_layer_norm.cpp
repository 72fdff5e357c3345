// Fused residual add + LayerNorm on the CPU: rows in parallel with at::parallel_for; inside a row,
// 16- or 8-wide (AVX-512 or AVX2, chosen at build time) math through at::vec::Vectorized in the op
// math type (float for float/half/bfloat16, double for double), half/bfloat16 widened per chunk.
// Each row's sum x + residual is formed once in a per-thread buffer (and written out in x's dtype when
// the caller asks for it) and its statistics are two-pass over that buffer (mean shifted by the row's
// first element; variance mean-subtracted, and scaled by the largest deviation where its squares
// would overflow). Sums and differences are taken of halves where a full-size one could overflow
// (values near the float32 maximum), which leaves every other result unchanged. dweight/dbias are summed per block of rows into a [blocks, D] buffer and reduced
// afterwards: no atomics, and the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/vec_chunk.h"

namespace fastvision {
namespace {

using cpu::AccChunk;
using cpu::AccVec;
using cpu::kChunk;
using cpu::kParts;
using cpu::load_acc;
using cpu::load_chunk;
using cpu::store_acc;
using cpu::store_chunk;

// Horizontal sum, once per row. (Through a store: GCC 12 flags ATen's shuffle-based vec_reduce_all
// with a false -Wmaybe-uninitialized.)
template <typename acc_t>
acc_t reduce_lanes(const at::vec::Vectorized<acc_t>& v) {
  alignas(64) acc_t lanes[at::vec::Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t total = 0;
  for (const acc_t lane : lanes) total += lane;
  return total;
}

// Sum over a row of term(j, count), the vector of elements j..j+count (zeros past count), with four
// accumulators: one accumulator would make every add wait for the previous one's latency.
template <typename acc_t, typename Term>
C10_ALWAYS_INLINE acc_t reduce_row(int64_t n, const Term& term) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t width = Vec::size();
  Vec acc0(0), acc1(0), acc2(0), acc3(0);
  int64_t j = 0;
  for (; j + 4 * width <= n; j += 4 * width) {
    acc0 = acc0 + term(j, width);
    acc1 = acc1 + term(j + width, width);
    acc2 = acc2 + term(j + 2 * width, width);
    acc3 = acc3 + term(j + 3 * width, width);
  }
  for (; j < n; j += width) acc0 = acc0 + term(j, std::min(width, n - j));
  return reduce_lanes<acc_t>((acc0 + acc1) + (acc2 + acc3));
}

// Largest |row[j] / 2 - center / 2| over a row (halves: no overflow near the float maximum).
template <typename acc_t>
acc_t max_abs_half_deviation(const acc_t* row, int64_t n, acc_t center) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t width = Vec::size();
  const Vec half(acc_t(0.5)), half_center(center * acc_t(0.5));
  Vec largest(0);
  for (int64_t j = 0; j < n; j += width) {
    const int64_t count = std::min(width, n - j);
    const Vec deviation = Vec::set(Vec(0), (Vec::loadu(row + j, count) * half - half_center).abs(), count);
    largest = at::vec::maximum(largest, deviation);
  }
  alignas(64) acc_t lanes[Vec::size()];
  largest.store(lanes);
  acc_t result = 0;
  for (const acc_t lane : lanes) result = std::isnan(lane) ? lane : std::max(result, lane);
  return result;
}

// The row's mean as shift + mean(row - shift), shift = row[0]: a row of identical values has exactly
// that value as its mean (and normalizes to exactly 0), which a plain sum / n does not guarantee.
// Where row - shift or its sum could overflow (values near the float maximum), the terms are
// (row / 2 - shift / 2) * (2 / n), whose partial sums stay within the largest magnitude.
template <typename acc_t>
acc_t row_mean(const acc_t* row, int64_t dim) {
  using Vec = at::vec::Vectorized<acc_t>;
  const acc_t shift = row[0];
  const acc_t mean = shift + reduce_row<acc_t>(dim, [&](int64_t j, int64_t count) {
                               return Vec::set(Vec(0), Vec::loadu(row + j, count) - Vec(shift), count);
                             }) / static_cast<acc_t>(dim);
  if (std::isfinite(mean)) return mean;  // else an overflow (inf - inf is NaN too) or a NaN input
  const Vec half(acc_t(0.5)), half_shift(shift * acc_t(0.5)), weight(acc_t(2) / static_cast<acc_t>(dim));
  return shift + reduce_row<acc_t>(dim, [&](int64_t j, int64_t count) {
                   return Vec::set(Vec(0), (Vec::loadu(row + j, count) * half - half_shift) * weight, count);
                 });
}

// 1 / sqrt(var + eps) with the mean-subtracted variance. Where the squares overflow (|row - mean|
// near 1e19 and above in float), they are taken of (row/2 - mean/2) / scale, scale =
// max|row/2 - mean/2|, and the result is formed without overflow.
template <typename acc_t>
acc_t row_rstd(const acc_t* row, int64_t dim, acc_t mean, acc_t eps) {
  using Vec = at::vec::Vectorized<acc_t>;
  const acc_t n = static_cast<acc_t>(dim);
  const acc_t var = reduce_row<acc_t>(dim, [&](int64_t j, int64_t count) {
                      const Vec centered = Vec::set(Vec(0), Vec::loadu(row + j, count) - Vec(mean), count);
                      return centered * centered;
                    }) / n;
  if (std::isfinite(var) || std::isnan(var)) return acc_t(1) / std::sqrt(var + eps);
  const acc_t scale = max_abs_half_deviation<acc_t>(row, dim, mean);  // > 1 here: some square overflowed
  const Vec inv(acc_t(1) / scale), half(acc_t(0.5)), half_mean(mean * acc_t(0.5));
  const acc_t var_scaled = reduce_row<acc_t>(dim, [&](int64_t j, int64_t count) {
                             const Vec scaled =
                                 Vec::set(Vec(0), (Vec::loadu(row + j, count) * half - half_mean) * inv, count);
                             return scaled * scaled;
                           }) / n;
  // var = (2 scale)^2 var_scaled
  return acc_t(0.5) / (scale * std::sqrt(var_scaled + eps / scale / scale * acc_t(0.25)));
}

int64_t grain_rows(int64_t dim) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1)); }

template <typename scalar_t>
void forward_rows(const scalar_t* x, const scalar_t* residual, const at::opmath_type<scalar_t>* weight,
                  const at::opmath_type<scalar_t>* bias, scalar_t* out, float* mean_out, float* rstd_out,
                  scalar_t* summed_out, int64_t rows, int64_t dim, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t chunk = kChunk<scalar_t>;
  at::parallel_for(0, rows, grain_rows(dim), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> summed(dim);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* x_row = x + r * dim;
      const scalar_t* residual_row = residual + r * dim;
      for (int64_t j = 0; j < dim; j += chunk) {
        const int64_t count = std::min(chunk, dim - j);
        AccChunk<scalar_t> s = load_chunk(x_row + j, count);
        const AccChunk<scalar_t> res = load_chunk(residual_row + j, count);
        for (int p = 0; p < kParts<scalar_t>; ++p) s[p] = s[p] + res[p];
        store_acc<scalar_t>(s, summed.data() + j, count);
        if (summed_out != nullptr) store_chunk(s, summed_out + r * dim + j, count);
      }
      // Two-pass statistics over the row buffer, which stays in L1/L2 for these row lengths.
      const acc_t* row = summed.data();
      const acc_t mean = row_mean<acc_t>(row, dim);
      const acc_t rstd = row_rstd<acc_t>(row, dim, mean, static_cast<acc_t>(eps));
      scalar_t* out_row = out + r * dim;
      // (s - mean) * rstd as (s/2 - mean/2) * (2 rstd): the same bits, and no overflow of s - mean.
      const Vec half(acc_t(0.5)), half_mean(mean * acc_t(0.5)), twice_rstd(rstd * acc_t(2));
      for (int64_t j = 0; j < dim; j += chunk) {
        const int64_t count = std::min(chunk, dim - j);
        AccChunk<scalar_t> y = load_acc<scalar_t>(summed.data() + j, count);
        const AccChunk<scalar_t> w = load_acc<scalar_t>(weight + j, count);
        const AccChunk<scalar_t> b = load_acc<scalar_t>(bias + j, count);
        for (int p = 0; p < kParts<scalar_t>; ++p) {
          y[p] = at::vec::fmadd((y[p] * half - half_mean) * twice_rstd, w[p], b[p]);
        }
        store_chunk(y, out_row + j, count);
      }
      mean_out[r] = static_cast<float>(mean);
      rstd_out[r] = static_cast<float>(rstd);
    }
  });
}

template <typename scalar_t, bool kParamGrads>
void backward_rows(const scalar_t* grad, const scalar_t* x, const scalar_t* residual,
                   const at::opmath_type<scalar_t>* weight, const float* mean_in, const float* rstd_in,
                   const scalar_t* grad_summed, scalar_t* dx, at::opmath_type<scalar_t>* dweight_partial,
                   at::opmath_type<scalar_t>* dbias_partial, int64_t rows, int64_t dim, int64_t blocks,
                   int64_t rows_per_block) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t chunk = kChunk<scalar_t>;
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<acc_t> x_hat_row(dim), grad_hat_row(dim);
    for (int64_t block = block_begin; block < block_end; ++block) {
      acc_t* dweight_row = kParamGrads ? dweight_partial + block * dim : nullptr;
      acc_t* dbias_row = kParamGrads ? dbias_partial + block * dim : nullptr;
      const int64_t row_end = std::min(rows, (block + 1) * rows_per_block);
      for (int64_t r = block * rows_per_block; r < row_end; ++r) {
        const scalar_t* x_row = x + r * dim;
        const scalar_t* residual_row = residual + r * dim;
        const scalar_t* grad_row = grad + r * dim;
        const Vec mean(static_cast<acc_t>(mean_in[r]));
        const acc_t rstd = rstd_in[r];
        // Tail lanes load dy = 0, so they add nothing to the parameter sums.
        for (int64_t j = 0; j < dim; j += chunk) {
          const int64_t count = std::min(chunk, dim - j);
          AccChunk<scalar_t> x_hat = load_chunk(x_row + j, count);
          const AccChunk<scalar_t> res = load_chunk(residual_row + j, count);
          const AccChunk<scalar_t> g = load_chunk(grad_row + j, count);
          const AccChunk<scalar_t> w = load_acc<scalar_t>(weight + j, count);
          AccChunk<scalar_t> grad_hat;
          for (int p = 0; p < kParts<scalar_t>; ++p) {
            x_hat[p] = (x_hat[p] + res[p] - mean) * Vec(rstd);
            grad_hat[p] = g[p] * w[p];
          }
          if constexpr (kParamGrads) {
            AccChunk<scalar_t> dweight = load_acc<scalar_t>(dweight_row + j, count);
            AccChunk<scalar_t> dbias = load_acc<scalar_t>(dbias_row + j, count);
            for (int p = 0; p < kParts<scalar_t>; ++p) {
              dweight[p] = at::vec::fmadd(g[p], x_hat[p], dweight[p]);
              dbias[p] = dbias[p] + g[p];
            }
            store_acc<scalar_t>(dweight, dweight_row + j, count);
            store_acc<scalar_t>(dbias, dbias_row + j, count);
          }
          store_acc<scalar_t>(x_hat, x_hat_row.data() + j, count);
          store_acc<scalar_t>(grad_hat, grad_hat_row.data() + j, count);
        }
        // d/ds of LayerNorm: rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = dy * weight.
        const acc_t* x_hat_data = x_hat_row.data();
        const acc_t* grad_hat_data = grad_hat_row.data();
        const Vec mean_grad(reduce_row<acc_t>(dim, [&](int64_t j, int64_t count) {
                              return Vec::loadu(grad_hat_data + j, count);
                            }) /
                            static_cast<acc_t>(dim));
        const Vec mean_grad_x_hat(reduce_row<acc_t>(dim, [&](int64_t j, int64_t count) {
                                    return Vec::loadu(grad_hat_data + j, count) * Vec::loadu(x_hat_data + j, count);
                                  }) /
                                  static_cast<acc_t>(dim));
        scalar_t* dx_row = dx + r * dim;
        for (int64_t j = 0; j < dim; j += chunk) {
          const int64_t count = std::min(chunk, dim - j);
          const AccChunk<scalar_t> x_hat = load_acc<scalar_t>(x_hat_row.data() + j, count);
          AccChunk<scalar_t> d = load_acc<scalar_t>(grad_hat_row.data() + j, count);
          for (int p = 0; p < kParts<scalar_t>; ++p) {
            d[p] = (d[p] - mean_grad - x_hat[p] * mean_grad_x_hat) * Vec(rstd);
          }
          if (grad_summed != nullptr) {  // the returned sum's gradient reaches x and residual directly
            const AccChunk<scalar_t> gs = load_chunk(grad_summed + r * dim + j, count);
            for (int p = 0; p < kParts<scalar_t>; ++p) d[p] = d[p] + gs[p];
          }
          store_chunk(d, dx_row + j, count);
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

// The parameter in the math type, contiguous; `fill` (1 for weight, 0 for bias) when absent, so the
// row kernels run one branch-free path.
at::Tensor param_as(const std::optional<at::Tensor>& param, at::ScalarType acc_type, int64_t dim, double fill) {
  if (param.has_value()) return param->to(acc_type).contiguous();
  return at::full({dim}, fill, at::TensorOptions().dtype(acc_type));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_forward_cpu(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool return_residual) {
  check_inputs("add_layer_norm_forward", x, residual, weight, bias);
  // As the Python op: positive (NaN fails too); a negative eps would give NaN or inf rows.
  TORCH_CHECK_VALUE(eps > 0, "add_layer_norm_forward: eps must be a positive number, got ", eps);
  const int64_t rows = leading_rows(x);
  const int64_t dim = x.size(-1);
  const auto stats_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor mean = at::empty(stats_shape, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty(stats_shape, x.options().dtype(at::kFloat));
  at::Tensor summed = return_residual ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  if (x.numel() == 0) {
    // Rows of length 0 have no statistics; zeros keep the saved tensors finite.
    mean.zero_();
    rstd.zero_();
    return {out, mean, rstd, summed};
  }
  const at::Tensor x_rows = x.contiguous();
  const at::Tensor residual_rows = residual.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_layer_norm_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor weight_acc = param_as(weight, c10::CppTypeToScalarType<acc_t>::value, dim, 1.0);
    const at::Tensor bias_acc = param_as(bias, c10::CppTypeToScalarType<acc_t>::value, dim, 0.0);
    forward_rows<scalar_t>(x_rows.data_ptr<scalar_t>(), residual_rows.data_ptr<scalar_t>(),
                           weight_acc.data_ptr<acc_t>(), bias_acc.data_ptr<acc_t>(),
                           out.data_ptr<scalar_t>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                           return_residual ? summed.data_ptr<scalar_t>() : nullptr, rows, dim, eps);
  });
  return {out, mean, rstd, summed};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& grad_summed) {
  check_inputs("add_layer_norm_backward", x, residual, weight, bias);
  const std::pair<const char*, const at::Tensor*> grads[] = {
      {"grad_out", &grad_out}, {"grad_summed", grad_summed.has_value() ? &grad_summed.value() : nullptr}};
  for (const auto& [name, grad] : grads) {
    if (grad == nullptr) continue;
    TORCH_CHECK(grad->sizes() == x.sizes(), "add_layer_norm_backward: ", name, " has shape ", grad->sizes(),
                ", expected x's shape ", x.sizes());
    TORCH_CHECK(grad->scalar_type() == x.scalar_type(), "add_layer_norm_backward: ", name, " dtype ",
                grad->scalar_type(), " differs from x dtype ", x.scalar_type());
  }
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
  const at::Tensor grad_summed_rows = grad_summed.has_value() ? grad_summed->contiguous() : at::Tensor();
  // A few blocks per thread balance the load; each block owns one row of the partial sums.
  const int64_t wanted_blocks = std::min<int64_t>(rows, 4 * std::max<int64_t>(1, at::get_num_threads()));
  const int64_t rows_per_block = (rows + wanted_blocks - 1) / wanted_blocks;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_layer_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor weight_acc = param_as(weight, acc_type, dim, 1.0);
    const auto run = [&](auto param_grads_tag) {
      constexpr bool kParamGrads = decltype(param_grads_tag)::value;
      at::Tensor dweight_partial, dbias_partial;
      if constexpr (kParamGrads) {
        dweight_partial = at::zeros({blocks, dim}, x.options().dtype(acc_type));
        dbias_partial = at::zeros({blocks, dim}, x.options().dtype(acc_type));
      }
      backward_rows<scalar_t, kParamGrads>(
          grad_rows.data_ptr<scalar_t>(), x_rows.data_ptr<scalar_t>(), residual_rows.data_ptr<scalar_t>(),
          weight_acc.data_ptr<acc_t>(), mean_rows.data_ptr<float>(), rstd_rows.data_ptr<float>(),
          grad_summed_rows.defined() ? grad_summed_rows.data_ptr<scalar_t>() : nullptr, dx.data_ptr<scalar_t>(), kParamGrads ? dweight_partial.data_ptr<acc_t>() : nullptr,
          kParamGrads ? dbias_partial.data_ptr<acc_t>() : nullptr, rows, dim, blocks, rows_per_block);
      if constexpr (kParamGrads) {
        if (weight.has_value()) dweight.copy_(dweight_partial.sum(0));
        if (bias.has_value()) dbias.copy_(dbias_partial.sum(0));
      }
    };
    if (param_grads) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvision, CPU, m) {
  m.impl("add_layer_norm_forward", &add_layer_norm_forward_cpu);
  m.impl("add_layer_norm_backward", &add_layer_norm_backward_cpu);
}

}  // namespace fastvision
