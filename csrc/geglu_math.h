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

// Exact GELU: g * Phi(g). At g = -inf, g * Phi(g) would be inf * 0: the limit there is 0. A NaN gate
// stays NaN (comparisons with NaN are false).
FV_HOST_DEVICE float gelu_erf(float g) {
  const float cdf = 0.5f * (1.0f + erff(g * kSqrtHalf));
  return cdf == 0.0f ? 0.0f : g * cdf;
}

FV_HOST_DEVICE float gelu_erf_grad(float g) {
  const float cdf = 0.5f * (1.0f + erff(g * kSqrtHalf));
  const float pdf = expf(-0.5f * g * g);
  return cdf + (pdf == 0.0f ? 0.0f : g * kInvSqrt2Pi * pdf);  // 0, not inf * 0, at g = +-inf
}

// Tanh approximation: 0.5 g (1 + tanh(u)), u = sqrt(2/pi) (g + 0.044715 g^3). Since
// 0.5 (1 + tanh(u)) = sigmoid(2u), it is computed as g * s with s = sigmoid(2u) = 1 / (1 + e) and
// 1 - s = sigmoid(-2u) = 1 / (1 + 1/e), e = exp(-2u): neither 1 + tanh(u) nor 1 - tanh(u)^2 is
// formed, so nothing cancels where tanh(u) is near -1 or 1 (there the derivative would otherwise lose
// most of its digits). e is not clamped: for very negative gates (u = -inf once g^3 overflows) it is
// inf, and s = 0, 1 - s = 1 are the exact limits.
FV_HOST_DEVICE void tanh_gate(float g, float& s, float& one_minus_s) {
  const float u = kSqrt2OverPi * (g + kTanhCubic * g * g * g);
  const float e = expf(-2.0f * u);
  s = 1.0f / (1.0f + e);
  one_minus_s = 1.0f / (1.0f + 1.0f / e);
}

// g * s is inf * 0 at g = -inf: the limit there is 0.
FV_HOST_DEVICE float gelu_tanh(float g) {
  float s, one_minus_s;
  tanh_gate(g, s, one_minus_s);
  return s == 0.0f ? 0.0f : g * s;
}

// du grows like g^2 and overflows for huge |g|, where s (1 - s) is 0: the second term is 0 there.
FV_HOST_DEVICE float gelu_tanh_grad(float g) {
  float s, one_minus_s;
  tanh_gate(g, s, one_minus_s);
  const float ss = s * one_minus_s;
  const float du = kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * g * g);
  return s + (ss == 0.0f ? 0.0f : 2.0f * g * ss * du);
}

template <bool kTanh>
FV_HOST_DEVICE float gelu(float g) { return kTanh ? gelu_tanh(g) : gelu_erf(g); }

template <bool kTanh>
FV_HOST_DEVICE float gelu_grad(float g) { return kTanh ? gelu_tanh_grad(g) : gelu_erf_grad(g); }

}  // namespace fastvision
