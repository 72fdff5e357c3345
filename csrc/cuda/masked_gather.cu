// masked_gather on CUDA, without host synchronization (M is an argument).
//   1. scan: one block per sample walks its mask in tiles of kScanThreads sites; each warp numbers its
//      True sites with a ballot and popcount, warp totals are scanned in shared memory, and the tile's
//      slots continue from the running count. Slots past min(count, M) get site -1.
//   2. gather: for channels-last x, a 2-D block of (channel lanes x slots) per tile of slots, the lanes
//      reading consecutive channels of one site; for NCHW-like x, tiles of (32 slots x 32 channels)
//      read along slots (nearby sites of one plane) and written along channels through shared memory.
//   3. backward: a site-to-slot map (one scatter_ of the slot table), then tiles of (32 sites x 32
//      channels) write every element of grad_x once, staged through shared memory so that the reads
//      run along channels and the writes along sites.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/full.h>
#include <ATen/ops/where.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "masked_gather_common.h"

namespace fastvision {
namespace {

constexpr int kScanThreads = 512;
constexpr int kWarps = kScanThreads / 32;
constexpr int kChannelLanes = 32;
constexpr int kSlotsPerBlock = 8;
// The shared-memory tiles of the NCHW gather and of the backward: kTileLanes slots or sites by
// kTileChannels channels, on kTileLanes x kTileRows threads.
constexpr int kTileLanes = 32;
constexpr int kTileChannels = 32;
constexpr int kTileRows = 8;

__global__ void __launch_bounds__(kScanThreads)
masked_gather_scan_kernel(const bool* __restrict__ mask, int64_t num_sites, int64_t max_count,
                          int64_t* __restrict__ sites, bool* __restrict__ valid, int64_t* __restrict__ counts) {
  __shared__ int warp_totals[kWarps];
  __shared__ int64_t running;
  const int64_t b = blockIdx.x;
  const bool* row = mask + b * num_sites;
  int64_t* slot_site = sites + b * max_count;
  bool* slot_valid = valid + b * max_count;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) running = 0;
  __syncthreads();
  for (int64_t start = 0; start < num_sites; start += kScanThreads) {
    const int64_t s = start + threadIdx.x;
    const bool active = s < num_sites && row[s];
    const unsigned ballot = __ballot_sync(0xffffffffu, active);
    const int before_in_warp = __popc(ballot & ((1u << lane) - 1u));
    if (lane == 0) warp_totals[warp] = __popc(ballot);
    __syncthreads();
    int before_warps = 0, tile_total = 0;
    for (int w = 0; w < kWarps; ++w) {
      before_warps += w < warp ? warp_totals[w] : 0;
      tile_total += warp_totals[w];
    }
    const int64_t slot = running + before_warps + before_in_warp;
    if (active && slot < max_count) {
      slot_site[slot] = s;
      slot_valid[slot] = true;
    }
    __syncthreads();  // every thread has read running and warp_totals
    if (threadIdx.x == 0) running += tile_total;
    __syncthreads();
  }
  const int64_t filled = running < max_count ? running : max_count;
  for (int64_t slot = filled + threadIdx.x; slot < max_count; slot += kScanThreads) {
    slot_site[slot] = -1;
    slot_valid[slot] = false;
  }
  if (threadIdx.x == 0) counts[b] = running;
}

template <typename T>
__global__ void __launch_bounds__(kChannelLanes * kSlotsPerBlock)
masked_gather_values_kernel(const T* __restrict__ x, const int64_t* __restrict__ sites, T* __restrict__ values,
                            int64_t total_slots, int64_t max_count, int64_t channels, int64_t width,
                            int64_t sb, int64_t sc, int64_t sh, int64_t sw) {
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kSlotsPerBlock + threadIdx.y;
  if (slot >= total_slots) return;
  const int64_t site = sites[slot];
  const int64_t b = slot / max_count;
  const T* source = x + b * sb + (site >= 0 ? (site / width) * sh + (site % width) * sw : 0);
  T* out = values + slot * channels;
  for (int64_t c = threadIdx.x; c < channels; c += kChannelLanes) {
    out[c] = site >= 0 ? source[c * sc] : T(0);
  }
}

// x with channels not innermost (NCHW-like): a tile of kTileLanes slots by kTileChannels channels, read
// along slots (neighbouring slots' sites are close in one channel plane) into shared memory, then
// written along channels (contiguous in [B, M, C]).
template <typename T>
__global__ void __launch_bounds__(kTileLanes * kTileRows)
masked_gather_values_by_slot_kernel(const T* __restrict__ x, const int64_t* __restrict__ sites,
                                    T* __restrict__ values, int64_t total_slots, int64_t max_count,
                                    int64_t channels, int64_t width, int64_t sb, int64_t sc, int64_t sh,
                                    int64_t sw) {
  __shared__ T tile[kTileLanes][kTileChannels + 1];  // +1: the column accesses hit distinct banks
  __shared__ int64_t site_offset[kTileLanes];        // of each slot's site in x; -1: an empty slot
  const int64_t slot0 = static_cast<int64_t>(blockIdx.x) * kTileLanes;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTileChannels;
  const int tx = threadIdx.x, ty = threadIdx.y;
  if (ty == 0) {
    const int64_t slot = slot0 + tx;
    const int64_t site = slot < total_slots ? sites[slot] : -1;
    site_offset[tx] = site >= 0 ? (slot / max_count) * sb + (site / width) * sh + (site % width) * sw : -1;
  }
  __syncthreads();
  for (int j = ty; j < kTileChannels; j += kTileRows) {
    const int64_t c = c0 + j, offset = site_offset[tx];
    tile[tx][j] = offset >= 0 && c < channels ? x[offset + c * sc] : T(0);
  }
  __syncthreads();
  for (int i = ty; i < kTileLanes; i += kTileRows) {
    const int64_t slot = slot0 + i, c = c0 + tx;
    if (slot < total_slots && c < channels) values[slot * channels + c] = tile[i][tx];
  }
}

// One tile of kTileLanes consecutive sites of one sample by kTileChannels channels: lanes read each
// site's slot row along channels (contiguous in [B, M, C]) into shared memory, then write the tile
// along sites (contiguous in [B, C, H, W]); every element of grad_x is written once, 0 where no slot
// holds the site.
template <typename T>
__global__ void __launch_bounds__(kTileLanes * kTileRows)
masked_gather_grad_kernel(const T* __restrict__ grad_values, const int32_t* __restrict__ slot_of_site,
                          T* __restrict__ grad_x, int64_t num_sites, int64_t max_count, int64_t channels,
                          int64_t site_tiles) {
  __shared__ T tile[kTileChannels][kTileLanes + 1];  // +1: the column reads hit distinct banks
  __shared__ int32_t slots[kTileLanes];
  const int64_t b = blockIdx.x / site_tiles;
  const int64_t site0 = (blockIdx.x % site_tiles) * kTileLanes;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTileChannels;
  const int tx = threadIdx.x, ty = threadIdx.y;
  if (ty == 0) {
    const int64_t s = site0 + tx;
    slots[tx] = s < num_sites ? slot_of_site[b * (num_sites + 1) + s] : -1;
  }
  __syncthreads();
  for (int i = ty; i < kTileLanes; i += kTileRows) {
    const int32_t slot = slots[i];
    const int64_t c = c0 + tx;
    tile[tx][i] = slot >= 0 && c < channels ? grad_values[(b * max_count + slot) * channels + c] : T(0);
  }
  __syncthreads();
  for (int j = ty; j < kTileChannels; j += kTileRows) {
    const int64_t c = c0 + j, s = site0 + tx;
    if (c < channels && s < num_sites) grad_x[(b * channels + c) * num_sites + s] = tile[j][tx];
  }
}

unsigned slot_blocks(int64_t total_slots) {
  return static_cast<unsigned>((total_slots + kSlotsPerBlock - 1) / kSlotsPerBlock);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_gather_forward_cuda(const at::Tensor& x,
                                                                                     const at::Tensor& mask,
                                                                                     int64_t max_count) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = masked_gather_check_and_allocate(x, mask, max_count);
  const int64_t batch = x.size(0), channels = x.size(1), width = x.size(3);
  const int64_t num_sites = x.size(2) * width;
  if (batch == 0) return {out.values, out.sites, out.valid, out.counts};
  TORCH_CHECK(batch <= 2147483647LL, "masked_gather: at most 2**31 - 1 samples");
  const at::Tensor flat_mask = mask.reshape({batch, num_sites}).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  masked_gather_scan_kernel<<<static_cast<unsigned>(batch), kScanThreads, 0, stream>>>(
      flat_mask.const_data_ptr<bool>(), num_sites, max_count, out.sites.data_ptr<int64_t>(),
      out.valid.data_ptr<bool>(), out.counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t total_slots = batch * max_count;
  if (total_slots == 0 || channels == 0) return {out.values, out.sites, out.valid, out.counts};
  TORCH_CHECK(total_slots / kSlotsPerBlock < 2147483647LL, "masked_gather: too many slots for one launch");
  const int64_t channel_tiles = (channels + kTileChannels - 1) / kTileChannels;
  // Lanes along slots where x's channels are a plane apart, along channels where they are contiguous.
  const bool by_slot = channels > 1 && x.stride(1) != 1 && channel_tiles <= 65535;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_gather_forward_cuda", [&] {
    if (by_slot) {
      const dim3 grid(static_cast<unsigned>((total_slots + kTileLanes - 1) / kTileLanes),
                      static_cast<unsigned>(channel_tiles));
      masked_gather_values_by_slot_kernel<scalar_t><<<grid, dim3(kTileLanes, kTileRows), 0, stream>>>(
          x.const_data_ptr<scalar_t>(), out.sites.const_data_ptr<int64_t>(), out.values.data_ptr<scalar_t>(),
          total_slots, max_count, channels, width, x.stride(0), x.stride(1), x.stride(2), x.stride(3));
    } else {
      masked_gather_values_kernel<scalar_t><<<slot_blocks(total_slots), dim3(kChannelLanes, kSlotsPerBlock), 0,
                                              stream>>>(
          x.const_data_ptr<scalar_t>(), out.sites.const_data_ptr<int64_t>(), out.values.data_ptr<scalar_t>(),
          total_slots, max_count, channels, width, x.stride(0), x.stride(1), x.stride(2), x.stride(3));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out.values, out.sites, out.valid, out.counts};
}

at::Tensor masked_gather_backward_cuda(const at::Tensor& grad_values, const at::Tensor& sites, int64_t height,
                                       int64_t width) {
  const c10::cuda::CUDAGuard guard(grad_values.device());
  at::Tensor grad_x = masked_gather_backward_check_and_allocate(grad_values, sites, height, width, false);
  const int64_t batch = grad_values.size(0), max_count = grad_values.size(1), channels = grad_values.size(2);
  const int64_t num_sites = height * width;
  TORCH_CHECK(max_count <= 2147483647LL, "masked_gather: at most 2**31 - 1 slots per sample");
  masked_gather_check_sites(sites, num_sites);
  if (grad_x.numel() == 0) return grad_x;
  if (max_count == 0) return grad_x.zero_();
  const int64_t site_tiles = (num_sites + kTileLanes - 1) / kTileLanes;
  const int64_t channel_tiles = (channels + kTileChannels - 1) / kTileChannels;
  TORCH_CHECK(batch * site_tiles <= 2147483647LL, "masked_gather: too many sites for one launch");
  TORCH_CHECK(channel_tiles <= 65535, "masked_gather: at most ", 65535 * kTileChannels, " channels");
  // The slot of each site (-1: none); slots whose site is outside [0, H W) land in the last column.
  const at::Tensor slot_sites = sites.contiguous();
  const at::Tensor in_range = slot_sites.ge(0).logical_and_(slot_sites.lt(num_sites));
  at::Tensor slot_of_site = at::full({batch, num_sites + 1}, -1, sites.options().dtype(at::kInt));
  slot_of_site.scatter_(1, at::where(in_range, slot_sites, num_sites),
                        at::arange(max_count, sites.options().dtype(at::kInt)).expand({batch, max_count}));
  const at::Tensor grad = grad_values.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(batch * site_tiles), static_cast<unsigned>(channel_tiles));
  const dim3 block(kTileLanes, kTileRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "masked_gather_backward_cuda", [&] {
    masked_gather_grad_kernel<scalar_t><<<grid, block, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), slot_of_site.const_data_ptr<int32_t>(), grad_x.data_ptr<scalar_t>(),
        num_sites, max_count, channels, site_tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvision, CUDA, m) {
  m.impl("masked_gather_forward", &masked_gather_forward_cuda);
  m.impl("masked_gather_backward", &masked_gather_backward_cuda);
}

}  // namespace fastvision
