// grn on the CPU: threads over (sample, block of kSiteBlock sites), at::vec over the channels.
// Pass 1 sums, per block, x^2 over the kept sites (the backward also g * x and g over every site) into
// op-math partials [B, blocks, C]; a sample's partials are then added in block order, and the blocks
// depend on the shape alone, so the result is the same bits for any thread count, without atomics.
// From the [B, C] sums come the per-channel coefficients; pass 2 writes out = x * (gamma Nx + 1) + beta
// (backward: dx = g * (gamma Nx + 1) + coef * x * keep), reading x (and g) a second time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/vec_chunk.h"
#include "grn_common.h"

namespace fastvision {
namespace {

using cpu::AccChunk;
using cpu::kChunk;
using cpu::kParts;
using cpu::load_acc;
using cpu::load_chunk;
using cpu::store_acc;
using cpu::store_chunk;

// Sites per partial sum: small enough that a sample of a few hundred sites still spreads over threads.
constexpr int64_t kSiteBlock = 64;

// The channel rows of a tensor whose channel stride is 1: site h * W + w of sample b.
template <typename scalar_t>
struct SiteRows {
  const scalar_t* data;
  int64_t stride_b, stride_h, stride_w, width;

  const scalar_t* operator()(int64_t b, int64_t site) const {
    return data + b * stride_b + (site / width) * stride_h + (site % width) * stride_w;
  }
};

template <typename scalar_t>
SiteRows<scalar_t> site_rows(const at::Tensor& t) {
  return {t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), t.size(2)};
}

// Channels read along their fast axis: x itself when its channel stride is 1, else a copy.
at::Tensor unit_channel_stride(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

// The mask as [B, H W] bytes, or nullptr for none; `storage` keeps a copy alive.
const bool* flat_mask(const at::Tensor& mask, int64_t batch, int64_t num_sites, at::Tensor& storage) {
  if (mask.numel() == 0) return nullptr;
  storage = mask.reshape({batch, num_sites}).contiguous();
  return storage.const_data_ptr<bool>();
}

struct Blocks {
  int64_t batch, num_sites, per_sample;

  Blocks(int64_t batch_, int64_t num_sites_)
      : batch(batch_), num_sites(num_sites_), per_sample((num_sites_ + kSiteBlock - 1) / kSiteBlock) {}
  int64_t count() const { return batch * per_sample; }
  int64_t sample(int64_t block) const { return block / per_sample; }
  int64_t first(int64_t block) const { return (block % per_sample) * kSiteBlock; }
  int64_t last(int64_t block) const { return std::min(num_sites, first(block) + kSiteBlock); }

  // Each block's work in parallel: fn(b, first site, last site, block).
  template <typename Fn>
  void parallel(const Fn& fn) const {
    at::parallel_for(0, count(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) fn(sample(block), first(block), last(block), block);
    });
  }

  // sum over a sample's blocks of partial[b, block, :] into out[b, :], in block order.
  template <typename acc_t>
  void add_partials(const std::vector<acc_t>& partial, int64_t channels, std::vector<acc_t>& out) const {
    out.assign(batch * channels, acc_t(0));
    for (int64_t b = 0; b < batch; ++b) {
      acc_t* sums = out.data() + b * channels;
      for (int64_t k = 0; k < per_sample; ++k) {
        const acc_t* part = partial.data() + (b * per_sample + k) * channels;
        for (int64_t c = 0; c < channels; ++c) sums[c] += part[c];
      }
    }
  }
};

// sums[c] += term(chunk of row, chunk of other) over the channels, chunk by chunk.
template <typename scalar_t, typename Term>
C10_ALWAYS_INLINE void accumulate(at::opmath_type<scalar_t>* sums, const scalar_t* row, const scalar_t* other,
                                  int64_t channels, const Term& term) {
  for (int64_t c = 0; c < channels; c += kChunk<scalar_t>) {
    const int64_t n = std::min(kChunk<scalar_t>, channels - c);
    const AccChunk<scalar_t> a = load_chunk(row + c, n);
    const AccChunk<scalar_t> b = load_chunk(other + c, n);
    AccChunk<scalar_t> acc = load_acc<scalar_t>(sums + c, n);
    for (int p = 0; p < kParts<scalar_t>; ++p) acc[p] = term(a[p], b[p], acc[p]);
    store_acc<scalar_t>(acc, sums + c, n);
  }
}

// out[c] = a[c] * scale[c] + b[c] * coef[c] over one site's channels (b = nullptr: + coef[c]).
template <typename scalar_t>
C10_ALWAYS_INLINE void apply_row(scalar_t* out, const scalar_t* a, const at::opmath_type<scalar_t>* scale,
                                 const scalar_t* b, const at::opmath_type<scalar_t>* coef, int64_t channels) {
  for (int64_t c = 0; c < channels; c += kChunk<scalar_t>) {
    const int64_t n = std::min(kChunk<scalar_t>, channels - c);
    const AccChunk<scalar_t> va = load_chunk(a + c, n);
    const AccChunk<scalar_t> vs = load_acc<scalar_t>(scale + c, n);
    const AccChunk<scalar_t> vc = load_acc<scalar_t>(coef + c, n);
    AccChunk<scalar_t> result;
    if (b == nullptr) {
      for (int p = 0; p < kParts<scalar_t>; ++p) result[p] = at::vec::fmadd(va[p], vs[p], vc[p]);
    } else {
      const AccChunk<scalar_t> vb = load_chunk(b + c, n);
      for (int p = 0; p < kParts<scalar_t>; ++p) result[p] = at::vec::fmadd(vb[p], vc[p], va[p] * vs[p]);
    }
    store_chunk(result, out + c, n);
  }
}

// Per sample and channel: Gx = sqrt(sum of kept x^2) and Nx = Gx / (mean over channels of Gx + eps).
template <typename acc_t>
void normalized_responses(const std::vector<acc_t>& sum_sq, int64_t batch, int64_t channels, double eps,
                          std::vector<acc_t>& gx, std::vector<acc_t>& denom, std::vector<acc_t>& nx) {
  gx.resize(batch * channels);
  nx.resize(batch * channels);
  denom.resize(batch);
  for (int64_t b = 0; b < batch; ++b) {
    acc_t total = 0;
    for (int64_t c = 0; c < channels; ++c) {
      gx[b * channels + c] = std::sqrt(sum_sq[b * channels + c]);
      total += gx[b * channels + c];
    }
    denom[b] = total / static_cast<acc_t>(channels) + static_cast<acc_t>(eps);
    for (int64_t c = 0; c < channels; ++c) nx[b * channels + c] = gx[b * channels + c] / denom[b];
  }
}

template <typename acc_t>
std::vector<acc_t> param_values(const at::Tensor& param) {
  const at::Tensor values = param.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* data = values.const_data_ptr<acc_t>();
  return std::vector<acc_t>(data, data + values.numel());
}

at::Tensor grn_forward_cpu(const at::Tensor& x_in, const at::Tensor& gamma, const at::Tensor& beta,
                           const at::Tensor& mask, double eps) {
  grn_check_forward(x_in, gamma, beta, mask, eps);
  at::Tensor out = at::empty(x_in.sizes(), x_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor x = unit_channel_stride(x_in);
  const int64_t channels = x.size(3);
  const Blocks blocks(x.size(0), x.size(1) * x.size(2));
  at::Tensor mask_storage;
  const bool* masked = flat_mask(mask, blocks.batch, blocks.num_sites, mask_storage);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SiteRows<scalar_t> rows = site_rows<scalar_t>(x);
    std::vector<acc_t> partial(blocks.count() * channels, acc_t(0));
    blocks.parallel([&](int64_t b, int64_t first, int64_t last, int64_t block) {
      acc_t* sums = partial.data() + block * channels;
      for (int64_t s = first; s < last; ++s) {
        if (masked != nullptr && masked[b * blocks.num_sites + s]) continue;
        const scalar_t* row = rows(b, s);
        accumulate(sums, row, row, channels, [](auto v, auto, auto acc) { return at::vec::fmadd(v, v, acc); });
      }
    });
    std::vector<acc_t> sum_sq, gx, denom, nx;
    blocks.add_partials(partial, channels, sum_sq);
    normalized_responses(sum_sq, blocks.batch, channels, eps, gx, denom, nx);
    const std::vector<acc_t> gamma_v = param_values<acc_t>(gamma), beta_v = param_values<acc_t>(beta);
    std::vector<acc_t> scale(blocks.batch * channels);
    for (int64_t i = 0; i < blocks.batch * channels; ++i) scale[i] = gamma_v[i % channels] * nx[i] + acc_t(1);
    scalar_t* out_data = out.data_ptr<scalar_t>();
    blocks.parallel([&](int64_t b, int64_t first, int64_t last, int64_t) {
      for (int64_t s = first; s < last; ++s) {
        apply_row<scalar_t>(out_data + (b * blocks.num_sites + s) * channels, rows(b, s),
                            scale.data() + b * channels, nullptr, beta_v.data(), channels);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grn_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                const at::Tensor& gamma, const at::Tensor& beta,
                                                                const at::Tensor& mask, double eps) {
  grn_check_backward(grad_in, x_in, gamma, beta, mask, eps);
  const int64_t channels = x_in.size(3);
  at::Tensor dx = at::empty(x_in.sizes(), x_in.options());
  at::Tensor dgamma = at::zeros({channels}, x_in.options().dtype(at::kFloat));
  at::Tensor dbeta = at::zeros({channels}, x_in.options().dtype(at::kFloat));
  if (dx.numel() == 0) return {dx, dgamma, dbeta};
  const at::Tensor x = unit_channel_stride(x_in), grad = unit_channel_stride(grad_in);
  const Blocks blocks(x.size(0), x.size(1) * x.size(2));
  at::Tensor mask_storage;
  const bool* masked = flat_mask(mask, blocks.batch, blocks.num_sites, mask_storage);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SiteRows<scalar_t> x_rows = site_rows<scalar_t>(x), g_rows = site_rows<scalar_t>(grad);
    // [3, blocks, C]: kept x^2, g * x, g.
    const int64_t plane = blocks.count() * channels;
    std::vector<acc_t> partial(3 * plane, acc_t(0));
    blocks.parallel([&](int64_t b, int64_t first, int64_t last, int64_t block) {
      acc_t* sum_sq = partial.data() + block * channels;
      acc_t* dot = sum_sq + plane;
      acc_t* gsum = dot + plane;
      for (int64_t s = first; s < last; ++s) {
        const scalar_t* xr = x_rows(b, s);
        const scalar_t* gr = g_rows(b, s);
        if (masked == nullptr || !masked[b * blocks.num_sites + s]) {
          accumulate(sum_sq, xr, xr, channels, [](auto v, auto, auto acc) { return at::vec::fmadd(v, v, acc); });
        }
        accumulate(dot, gr, xr, channels, [](auto g, auto v, auto acc) { return at::vec::fmadd(g, v, acc); });
        accumulate(gsum, gr, gr, channels, [](auto g, auto, auto acc) { return acc + g; });
      }
    });
    std::vector<acc_t> sum_sq, dot, gsum, gx, denom, nx;
    const auto plane_of = [&](int k) {
      return std::vector<acc_t>(partial.begin() + k * plane, partial.begin() + (k + 1) * plane);
    };
    blocks.add_partials(plane_of(0), channels, sum_sq);
    blocks.add_partials(plane_of(1), channels, dot);
    blocks.add_partials(plane_of(2), channels, gsum);
    normalized_responses(sum_sq, blocks.batch, channels, eps, gx, denom, nx);
    const std::vector<acc_t> gamma_v = param_values<acc_t>(gamma);
    // dNx = gamma S (S = sum of g x), dGx = dNx / D - mean_c(dNx Gx) / D^2, dx's x term coef = dGx / Gx.
    std::vector<acc_t> scale(blocks.batch * channels), coef(blocks.batch * channels);
    std::vector<acc_t> dgamma_sum(channels, acc_t(0)), dbeta_sum(channels, acc_t(0));
    for (int64_t b = 0; b < blocks.batch; ++b) {
      const int64_t row = b * channels;
      acc_t weighted = 0;
      for (int64_t c = 0; c < channels; ++c) weighted += gamma_v[c] * dot[row + c] * gx[row + c];
      const acc_t mean_term = weighted / static_cast<acc_t>(channels) / (denom[b] * denom[b]);
      for (int64_t c = 0; c < channels; ++c) {
        const acc_t dgx = gamma_v[c] * dot[row + c] / denom[b] - mean_term;
        coef[row + c] = gx[row + c] > 0 ? dgx / gx[row + c] : acc_t(0);
        scale[row + c] = gamma_v[c] * nx[row + c] + acc_t(1);
        dgamma_sum[c] += nx[row + c] * dot[row + c];
        dbeta_sum[c] += gsum[row + c];
      }
    }
    std::copy(dgamma_sum.begin(), dgamma_sum.end(), dgamma.data_ptr<float>());
    std::copy(dbeta_sum.begin(), dbeta_sum.end(), dbeta.data_ptr<float>());
    scalar_t* dx_data = dx.data_ptr<scalar_t>();
    const std::vector<scalar_t> zeros(channels, scalar_t(0));
    blocks.parallel([&](int64_t b, int64_t first, int64_t last, int64_t) {
      for (int64_t s = first; s < last; ++s) {
        const bool keep = masked == nullptr || !masked[b * blocks.num_sites + s];
        apply_row<scalar_t>(dx_data + (b * blocks.num_sites + s) * channels, g_rows(b, s),
                            scale.data() + b * channels, keep ? x_rows(b, s) : zeros.data(),
                            coef.data() + b * channels, channels);
      }
    });
  });
  return {dx, dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvision, CPU, m) {
  m.impl("grn_forward", &grn_forward_cpu);
  m.impl("grn_backward", &grn_backward_cpu);
}

}  // namespace fastvision
