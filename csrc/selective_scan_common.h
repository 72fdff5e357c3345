// Argument checks shared by the selective_scan kernels. The Python op checks user input first;
// these guard direct calls to torch.ops.fastvision.selective_scan_*.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace fastvision {

struct ScanShape {
  int64_t batch, dim, length, state, groups;  // groups == 0: fixed B and C
  bool fixed_b, fixed_c;
};

inline void selective_scan_check_bc(const char* name, const at::Tensor& bc, int64_t batch, int64_t dim,
                                    int64_t state, int64_t length) {
  if (bc.dim() == 2) {
    TORCH_CHECK(bc.size(0) == dim && bc.size(1) == state, "selective_scan: ", name, " fixed must be [dim, N]");
  } else {
    TORCH_CHECK(bc.dim() == 4 && bc.size(0) == batch && bc.size(2) == state && bc.size(3) == length,
                "selective_scan: ", name, " must be [dim, N] or [batch, G, N, L]");
    TORCH_CHECK(bc.size(1) >= 1 && dim % bc.size(1) == 0, "selective_scan: ", name, "'s groups must divide dim");
  }
}

inline ScanShape selective_scan_check(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                      const at::Tensor& B, const at::Tensor& C, const at::Tensor& D,
                                      const at::Tensor& z, const at::Tensor& delta_bias) {
  TORCH_CHECK(u.dim() == 3, "selective_scan: u must be [batch, dim, L]");
  TORCH_CHECK(delta.sizes() == u.sizes(), "selective_scan: delta must have u's shape");
  TORCH_CHECK(z.numel() == 0 || z.sizes() == u.sizes(), "selective_scan: z must have u's shape or be empty");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1) && A.scalar_type() == at::kFloat,
              "selective_scan: A must be float32 [dim, N]");
  TORCH_CHECK(A.size(1) >= 1 && A.size(1) <= 256, "selective_scan: N must be in [1, 256]");
  const int64_t batch = u.size(0), dim = u.size(1), length = u.size(2), state = A.size(1);
  selective_scan_check_bc("B", B, batch, dim, state, length);
  selective_scan_check_bc("C", C, batch, dim, state, length);
  for (const at::Tensor* vec : {&D, &delta_bias}) {
    TORCH_CHECK(vec->numel() == 0 || (vec->dim() == 1 && vec->size(0) == dim && vec->scalar_type() == at::kFloat),
                "selective_scan: D and delta_bias must be float32 [dim] or empty");
  }
  const bool fixed_b = B.dim() == 2, fixed_c = C.dim() == 2;
  const int64_t groups = !fixed_b ? B.size(1) : (!fixed_c ? C.size(1) : 0);
  TORCH_CHECK(fixed_b || fixed_c || B.size(1) == C.size(1), "selective_scan: B and C must have the same groups");
  return {batch, dim, length, state, groups, fixed_b, fixed_c};
}

}  // namespace fastvision
