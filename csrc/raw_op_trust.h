// Index-range checks of the C++ ops' own arguments, for direct torch.ops.fastvision calls.
//
// raw_op_calls_trusted(): whether the call running on this thread comes from the Python op contract
// itself, autograd's backward on tensors the op's own forward made (fastvision/ops/_native_trust.py
// sets it around those calls). check_entries_in_range() is a loop on the CPU, cheap next to any kernel,
// and always runs; on CUDA it costs a reduction and a host read, so it runs on direct calls only, and
// the public op's backward stays sync-free.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/logical_or.h>
#include <ATen/ops/nonzero.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace fastvision {

bool raw_op_calls_trusted();

// Every entry of the integer tensor ``t`` in [low, high); the first one outside is refused with
// "<op>: <name> must hold <what>, got <value> at [<row>, <column>]" (ValueError in Python).
inline void check_entries_in_range(const at::Tensor& t, int64_t low, int64_t high, const char* op,
                                   const char* name, const char* what) {
  if (t.numel() == 0) return;
  const int64_t columns = t.dim() >= 2 ? t.numel() / t.size(0) : t.numel();
  const auto refuse = [&](int64_t index, int64_t value) {
    TORCH_CHECK_VALUE(false, op, ": ", name, " must hold ", what, ", got ", value, " at [", index / columns, ", ",
                      index % columns, "]");
  };
  if (t.is_cpu()) {
    const at::Tensor flat = t.contiguous();
    AT_DISPATCH_INTEGRAL_TYPES(flat.scalar_type(), "check_entries_in_range", [&] {
      const scalar_t* data = flat.const_data_ptr<scalar_t>();
      const int64_t n = flat.numel();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t v = static_cast<int64_t>(data[i]);
        if (v < low || v >= high) refuse(i, v);
      }
    });
    return;
  }
  if (raw_op_calls_trusted()) return;
  const at::Tensor wide = t.reshape({-1}).to(at::kLong);
  const at::Tensor bad = at::logical_or(wide.lt(low), wide.ge(high));
  if (!bad.any().item<bool>()) return;
  const int64_t index = at::nonzero(bad)[0][0].item<int64_t>();
  refuse(index, wide[index].item<int64_t>());
}

}  // namespace fastvision
