// masked_gather on the CPU: threads over samples. Each sample walks its mask row once, numbering the
// True sites into slots, then copies channels: per slot when channels are contiguous (channels-last),
// else per channel across the slots, so that x is read along its fast axis either way.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "masked_gather_common.h"

namespace fastvision {
namespace {

constexpr int64_t kSlotChunk = 64;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_gather_forward_cpu(const at::Tensor& x,
                                                                                    const at::Tensor& mask,
                                                                                    int64_t max_count) {
  auto out = masked_gather_check_and_allocate(x, mask, max_count);
  const int64_t batch = x.size(0), channels = x.size(1), width = x.size(3);
  const int64_t num_sites = x.size(2) * width;
  const at::Tensor flat_mask = mask.reshape({batch, num_sites}).contiguous();
  const bool* mask_data = flat_mask.data_ptr<bool>();
  int64_t* sites = out.sites.data_ptr<int64_t>();
  bool* valid = out.valid.data_ptr<bool>();
  int64_t* counts = out.counts.data_ptr<int64_t>();
  const int64_t sb = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_gather_forward_cpu", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* values = out.values.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const bool* row = mask_data + b * num_sites;
        int64_t* slot_site = sites + b * max_count;
        int64_t count = 0;
        for (int64_t s = 0; s < num_sites; ++s) {
          if (row[s]) {
            if (count < max_count) slot_site[count] = s;
            ++count;
          }
        }
        counts[b] = count;
        const int64_t filled = std::min(count, max_count);
        std::fill(slot_site + filled, slot_site + max_count, int64_t{-1});
        std::fill(valid + b * max_count, valid + b * max_count + filled, true);
        std::fill(valid + b * max_count + filled, valid + (b + 1) * max_count, false);
        scalar_t* out_rows = values + b * max_count * channels;
        std::fill(out_rows + filled * channels, out_rows + max_count * channels, scalar_t(0));
        const scalar_t* sample = x_data + b * sb;
        std::vector<int64_t> offsets(filled);
        for (int64_t m = 0; m < filled; ++m) {
          offsets[m] = (slot_site[m] / width) * sh + (slot_site[m] % width) * sw;
        }
        if (sc == 1) {
          for (int64_t m = 0; m < filled; ++m) {
            std::copy_n(sample + offsets[m], channels, out_rows + m * channels);
          }
        } else {
          // Channel planes read in site order; slots in chunks whose output rows stay in L1.
          for (int64_t first = 0; first < filled; first += kSlotChunk) {
            const int64_t last = std::min(first + kSlotChunk, filled);
            for (int64_t c = 0; c < channels; ++c) {
              const scalar_t* plane = sample + c * sc;
              for (int64_t m = first; m < last; ++m) out_rows[m * channels + c] = plane[offsets[m]];
            }
          }
        }
      }
    });
  });
  return {out.values, out.sites, out.valid, out.counts};
}

at::Tensor masked_gather_backward_cpu(const at::Tensor& grad_values, const at::Tensor& sites, int64_t height,
                                      int64_t width) {
  at::Tensor grad_x = masked_gather_backward_check_and_allocate(grad_values, sites, height, width);
  const int64_t batch = grad_values.size(0), max_count = grad_values.size(1), channels = grad_values.size(2);
  const int64_t num_sites = height * width;
  masked_gather_check_sites(sites, num_sites);
  if (grad_x.numel() == 0 || max_count == 0) return grad_x;
  const at::Tensor grad = grad_values.contiguous();
  const at::Tensor slot_sites = sites.contiguous();
  const int64_t* site_data = slot_sites.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "masked_gather_backward_cpu", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t* slot_site = site_data + b * max_count;
        const scalar_t* rows = g + b * max_count * channels;
        scalar_t* sample = gx + b * channels * num_sites;
        for (int64_t c = 0; c < channels; ++c) {
          scalar_t* plane = sample + c * num_sites;
          for (int64_t m = 0; m < max_count; ++m) {
            const int64_t s = slot_site[m];
            if (s >= 0 && s < num_sites) plane[s] = rows[m * channels + c];
          }
        }
      }
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvision, CPU, m) {
  m.impl("masked_gather_forward", &masked_gather_forward_cpu);
  m.impl("masked_gather_backward", &masked_gather_backward_cpu);
}

}  // namespace fastvision
