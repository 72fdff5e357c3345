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

// Tanh approximation: 0.5 g (1 + tanh(u)), u = sqrt(2/pi) (g + 0.044715 g^3). Since
// 0.5 (1 + tanh(u)) = sigmoid(2u), it is computed as g * s with s = sigmoid(2u) and 1 - s = e * s,
// e = exp(-2u): neither 1 + tanh(u) nor 1 - tanh(u)^2 is formed, so nothing cancels where
// tanh(u) is near -1 or 1 (there the derivative would otherwise lose most of its digits).
FV_HOST_DEVICE void tanh_gate(float g, float& s, float& one_minus_s) {
  const float u = kSqrt2OverPi * (g + kTanhCubic * g * g * g);
  const float e = expf(fminf(-2.0f * u, 80.0f));  // clamped: e * s stays finite
  s = 1.0f / (1.0f + e);
  one_minus_s = e * s;
}

FV_HOST_DEVICE float gelu_tanh(float g) {
  float s, one_minus_s;
  tanh_gate(g, s, one_minus_s);
  return g * s;
}

FV_HOST_DEVICE float gelu_tanh_grad(float g) {
  float s, one_minus_s;
  tanh_gate(g, s, one_minus_s);
  const float du = kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * g * g);
  return s + 2.0f * g * s * one_minus_s * du;
}

template <bool kTanh>
FV_HOST_DEVICE float gelu(float g) { return kTanh ? gelu_tanh(g) : gelu_erf(g); }

template <bool kTanh>
FV_HOST_DEVICE float gelu_grad(float g) { return kTanh ? gelu_tanh_grad(g) : gelu_erf_grad(g); }

}  // namespace fastvision
