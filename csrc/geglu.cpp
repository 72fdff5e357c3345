// geglu: x[..., 2H] -> value * gelu(gate), value = x[..., :H], gate = x[..., H:]; approximate is
// "none" (erf) or "tanh". Backward returns d/dx given d/d(out).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastvision, m) {
  m.def("geglu_forward(Tensor x, str approximate) -> Tensor");
  m.def("geglu_backward(Tensor grad_out, Tensor x, str approximate) -> Tensor");
}
