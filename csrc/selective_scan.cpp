// selective_scan (Mamba's S6): u, delta [batch, dim, L] (float32/float16/bfloat16); A [dim, N] float32;
// B and C either [dim, N] (fixed) or [batch, G, N, L] (G groups of dim / G channels); D, delta_bias
// [dim] float32 or empty (absent); z [batch, dim, L] or empty (absent); delta_softplus applies
// softplus(delta + delta_bias). h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t; y_t = C_t . h_t + D u_t,
// times silu(z_t) when z is given. The forward returns (out [batch, dim, L] of u's dtype, h_L
// [batch, dim, N] float32). The backward takes the gradients of both and returns the gradients of
// (u, delta, A, B, C, D, z, delta_bias), empty for an absent input; it saves nothing of size L x N
// between the passes (the CPU kernel recomputes one channel's states in a per-thread workspace, the
// CUDA kernel each 2048-step chunk from its entering state, cuda/selective_scan.cu). reverse runs
// the recurrence from step L - 1 down to 0 (the flipped-input scan, flipped back, without copies); the
// last state is then the state after step 0. B and C may differ in form and in group count.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastvision, m) {
  m.def(
      "selective_scan_forward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, Tensor z, "
      "Tensor delta_bias, bool delta_softplus, bool reverse=False) -> (Tensor, Tensor)");
  m.def(
      "selective_scan_backward(Tensor grad_out, Tensor grad_last, Tensor u, Tensor delta, Tensor A, Tensor B, "
      "Tensor C, Tensor D, Tensor z, Tensor delta_bias, bool delta_softplus, bool reverse=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
