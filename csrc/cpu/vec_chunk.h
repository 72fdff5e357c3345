// Chunked at::vec loads and stores shared by the CPU kernels: a chunk is one storage vector of
// scalar_t, held as one op-math vector (float, double) or, for half/bfloat16, widened to two float
// vectors. Lanes past `count` load as zero (Vectorized::loadu with a count zero-fills).
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

namespace fastvision {
namespace cpu {

template <typename scalar_t>
using AccVec = at::vec::Vectorized<at::opmath_type<scalar_t>>;

template <typename scalar_t>
constexpr int64_t kChunk = at::vec::Vectorized<scalar_t>::size();

template <typename scalar_t>
constexpr int kParts = kChunk<scalar_t> / AccVec<scalar_t>::size();

template <typename scalar_t>
using AccChunk = std::array<AccVec<scalar_t>, kParts<scalar_t>>;

template <typename scalar_t>
C10_ALWAYS_INLINE AccChunk<scalar_t> load_chunk(const scalar_t* src, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
    return {AccVec<scalar_t>::loadu(src, count)};
  } else {
    const auto [low, high] = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(src, count));
    return {low, high};
  }
}

template <typename scalar_t>
C10_ALWAYS_INLINE void store_chunk(const AccChunk<scalar_t>& v, scalar_t* dst, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
    v[0].store(dst, count);
  } else {
    at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(dst, count);
  }
}

// A chunk of an op-math buffer (float for half/bfloat16: two vectors), loaded or stored in pieces; lanes
// past `count` load as zero and are not stored.
template <typename scalar_t>
C10_ALWAYS_INLINE AccChunk<scalar_t> load_acc(const at::opmath_type<scalar_t>* src, int64_t count) {
  constexpr int64_t width = AccVec<scalar_t>::size();
  AccChunk<scalar_t> v;
  for (int p = 0; p < kParts<scalar_t>; ++p) {
    v[p] = AccVec<scalar_t>::loadu(src + p * width, std::clamp<int64_t>(count - p * width, 0, width));
  }
  return v;
}

template <typename scalar_t>
C10_ALWAYS_INLINE void store_acc(const AccChunk<scalar_t>& v, at::opmath_type<scalar_t>* dst, int64_t count) {
  constexpr int64_t width = AccVec<scalar_t>::size();
  for (int p = 0; p < kParts<scalar_t>; ++p) {
    const int64_t n = std::clamp<int64_t>(count - p * width, 0, width);
    if (n > 0) v[p].store(dst + p * width, n);
  }
}

}  // namespace cpu
}  // namespace fastvision
