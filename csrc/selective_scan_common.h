// Argument checks shared by the selective_scan kernels. The Python op checks user input first;
// these guard direct calls to torch.ops.fastvision.selective_scan_*: everything a kernel relies on to
// stay in bounds (ranks, shapes, dtypes read through typed pointers, one device) is checked here.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

namespace fastvision {

struct ScanShape {
  int64_t batch, dim, length, state;
  int64_t groups_b, groups_c;  // 0: fixed [dim, N]
};

inline bool selective_scan_float_dtype(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

// B or C: [dim, N] (fixed, returns 0) or [batch, G, N, L] with G dividing dim (returns G).
inline int64_t selective_scan_check_bc(const char* name, const at::Tensor& bc, int64_t batch, int64_t dim,
                                       int64_t state, int64_t length) {
  TORCH_CHECK(selective_scan_float_dtype(bc), "selective_scan: ", name, " must be float32, float16 or bfloat16");
  if (bc.dim() == 2) {
    TORCH_CHECK(bc.size(0) == dim && bc.size(1) == state, "selective_scan: ", name, " fixed must be [dim, N] = [",
                dim, ", ", state, "], got ", bc.sizes());
    return 0;
  }
  TORCH_CHECK(bc.dim() == 4 && bc.size(0) == batch && bc.size(2) == state && bc.size(3) == length,
              "selective_scan: ", name, " must be [dim, N] or [batch, G, N, L] = [", batch, ", G, ", state, ", ",
              length, "], got ", bc.sizes());
  TORCH_CHECK(bc.size(1) >= 1 && dim % bc.size(1) == 0, "selective_scan: ", name, "'s groups G = ", bc.size(1),
              " must divide dim = ", dim);
  return bc.size(1);
}

inline ScanShape selective_scan_check(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                      const at::Tensor& B, const at::Tensor& C, const at::Tensor& D,
                                      const at::Tensor& z, const at::Tensor& delta_bias) {
  TORCH_CHECK(u.dim() == 3, "selective_scan: u must be [batch, dim, L], got ", u.sizes());
  TORCH_CHECK(delta.sizes() == u.sizes(), "selective_scan: delta must have u's shape ", u.sizes(), ", got ",
              delta.sizes());
  TORCH_CHECK(z.numel() == 0 || z.sizes() == u.sizes(), "selective_scan: z must have u's shape or be empty");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"u", &u}, {"delta", &delta}, {"z", &z}}) {
    TORCH_CHECK(t->numel() == 0 || selective_scan_float_dtype(*t), "selective_scan: ", name,
                " must be float32, float16 or bfloat16");
  }
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1) && A.scalar_type() == at::kFloat,
              "selective_scan: A must be float32 [dim, N]");
  TORCH_CHECK(A.size(1) >= 1 && A.size(1) <= 256, "selective_scan: N must be in [1, 256]");
  const int64_t batch = u.size(0), dim = u.size(1), length = u.size(2), state = A.size(1);
  const int64_t groups_b = selective_scan_check_bc("B", B, batch, dim, state, length);
  const int64_t groups_c = selective_scan_check_bc("C", C, batch, dim, state, length);
  for (const at::Tensor* vec : {&D, &delta_bias}) {
    TORCH_CHECK(vec->numel() == 0 || (vec->dim() == 1 && vec->size(0) == dim && vec->scalar_type() == at::kFloat),
                "selective_scan: D and delta_bias must be float32 [dim] or empty");
  }
  for (const at::Tensor* t : {&delta, &A, &B, &C, &D, &z, &delta_bias}) {
    TORCH_CHECK(t->device() == u.device(), "selective_scan: every tensor must be on u's device ", u.device(),
                ", got one on ", t->device());
  }
  return {batch, dim, length, state, groups_b, groups_c};
}

// The backward's incoming gradients: grad_out like u, grad_last [batch, dim, N], on u's device.
inline void selective_scan_check_grads(const ScanShape& s, const at::Tensor& u, const at::Tensor& grad_out,
                                       const at::Tensor& grad_last) {
  TORCH_CHECK(grad_out.sizes() == u.sizes() && selective_scan_float_dtype(grad_out),
              "selective_scan_backward: grad_out must be a float tensor of u's shape ", u.sizes());
  TORCH_CHECK(grad_last.dim() == 3 && grad_last.size(0) == s.batch && grad_last.size(1) == s.dim &&
                  grad_last.size(2) == s.state && selective_scan_float_dtype(grad_last),
              "selective_scan_backward: grad_last must be a float tensor [batch, dim, N] = [", s.batch, ", ", s.dim,
              ", ", s.state, "]");
  TORCH_CHECK(grad_out.device() == u.device() && grad_last.device() == u.device(),
              "selective_scan_backward: grad_out and grad_last must be on u's device");
}

}  // namespace fastvision
