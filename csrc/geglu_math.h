// GELU and its derivative, shared by the CPU and CUDA GEGLU kernels. Math is in float32 whatever
// the storage type.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define FV_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FV_HOST_DEVICE inline
#endif

namespace fastvision {

constexpr float kSqrtHalf = 0.70710678118654752f;       // 1/sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;     // 1/sqrt(2*pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;    // sqrt(2/pi)
constexpr float kTanhCubic = 0.044715f;

// Exact GELU: g * Phi(g).
FV_HOST_DEVICE float gelu_erf(float g) { return 0.5f * g * (1.0f + erff(g * kSqrtHalf)); }

FV_HOST_DEVICE float gelu_erf_grad(float g) {
  const float cdf = 0.5f * (1.0f + erff(g * kSqrtHalf));
  const float pdf = kInvSqrt2Pi * expf(-0.5f * g * g);
  return cdf + g * pdf;
}

// Tanh approximation: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))).
FV_HOST_DEVICE float gelu_tanh(float g) {
  const float t = tanhf(kSqrt2OverPi * (g + kTanhCubic * g * g * g));
  return 0.5f * g * (1.0f + t);
}

FV_HOST_DEVICE float gelu_tanh_grad(float g) {
  const float t = tanhf(kSqrt2OverPi * (g + kTanhCubic * g * g * g));
  const float dinner = kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * g * g);
  return 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * dinner;
}

template <bool kTanh>
FV_HOST_DEVICE float gelu(float g) { return kTanh ? gelu_tanh(g) : gelu_erf(g); }

template <bool kTanh>
FV_HOST_DEVICE float gelu_grad(float g) { return kTanh ? gelu_tanh_grad(g) : gelu_erf_grad(g); }

}  // namespace fastvision
