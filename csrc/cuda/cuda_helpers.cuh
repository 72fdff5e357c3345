// Helpers shared by the CUDA kernels: 16-byte vector loads and stores, alignment checks, and launch
// sizes. Launch errors are checked after every launch with C10_CUDA_KERNEL_LAUNCH_CHECK().
#pragma once
#include <c10/cuda/CUDAException.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

namespace fastvision {
namespace cuda {

// kVec elements of T moved as one aligned access (16 bytes when kVec * sizeof(T) == 16).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int kWideVec = 16 / sizeof(T) >= 1 ? static_cast<int>(16 / sizeof(T)) : 1;

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Blocks for a grid-stride loop over `items`: enough to cover them, at most `cap` (axis 0 allows
// 2**31 - 1; grid-stride loops need far fewer).
inline int64_t blocks_for(int64_t items, int64_t per_block, int64_t cap) {
  return std::max<int64_t>(1, std::min<int64_t>((items + per_block - 1) / per_block, cap));
}

// Blocks of `threads` that fit on the current device at once; looked up once per device.
inline int max_resident_blocks(int threads) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> sms_cache[kMaxDevices] = {};
  static std::atomic<int> threads_cache[kMaxDevices] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int sms = device < kMaxDevices ? sms_cache[device].load(std::memory_order_relaxed) : 0;
  int per_sm = device < kMaxDevices ? threads_cache[device].load(std::memory_order_relaxed) : 0;
  if (sms == 0 || per_sm == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
    if (device < kMaxDevices) {
      sms_cache[device].store(sms, std::memory_order_relaxed);
      threads_cache[device].store(per_sm, std::memory_order_relaxed);
    }
  }
  return sms * (per_sm / threads);
}

}  // namespace cuda
}  // namespace fastvision
