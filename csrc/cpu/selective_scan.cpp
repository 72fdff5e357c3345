// selective_scan on the CPU: threads over channels (batch, dim), a sequential scan over L per channel
// with the N states in registers or L1 (the inner loops over N vectorize). Inputs are read as float32.
// The backward recomputes one channel's states into a per-thread workspace of L x N floats, then walks
// time backwards carrying d(loss)/d(h). With B or C varying, a thread owns runs of channels that hold
// whole groups of both (lcm of their group sizes), so the per-time gradients of a group's B and C rows
// are summed by one thread, in channel order, without atomics (the result is the same run to run);
// per-channel gradients of A, D, delta_bias and fixed B/C go to per-sample partials summed at the end.
// reverse: step s of the recurrence reads time index L - 1 - s (Order below).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>
#include <vector>

#include "selective_scan_common.h"

namespace fastvision {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kWidth = Vec::size();

// One step of the scan over the N states: h = exp(dt a) h + dt u b; returns C . h.
// Lanes past N load as zero and are not stored.
inline float scan_step(float* h, const float* a, const float* b, const float* c, float dt, float ut,
                       int64_t n_states) {
  Vec y(0.f);
  const Vec vdt(dt), vdu(dt * ut);
  for (int64_t n = 0; n < n_states; n += kWidth) {
    const int64_t count = std::min(kWidth, n_states - n);
    Vec hv = Vec::loadu(h + n, count);
    hv = (vdt * Vec::loadu(a + n, count)).exp() * hv + vdu * Vec::loadu(b + n, count);
    y = y + Vec::loadu(c + n, count) * hv;
    hv.store(h + n, count);
  }
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& z) { return x + z; }, y);
}

inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

// The time index of step s of the recurrence: s forward, L - 1 - s reversed.
struct Order {
  int64_t length;
  bool reverse;
  int64_t operator()(int64_t s) const { return reverse ? length - 1 - s : s; }
};

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// B or C as the kernels read them: fixed [dim, N], or grouped with time before state, [batch, G, L, N].
at::Tensor as_rows(const at::Tensor& bc) {
  return bc.dim() == 2 ? as_float(bc) : bc.to(at::kFloat).transpose(2, 3).contiguous();
}

// The rows of B (or C) that channel (b, d) reads: row t at base + t * step (step 0 when fixed).
struct Rows {
  float* base;
  int64_t step;
};

Rows rows_of(const at::Tensor& bc, const ScanShape& s, int64_t b, int64_t d) {
  if (bc.dim() == 2) return {bc.data_ptr<float>() + d * s.state, 0};
  const int64_t groups = bc.size(1), g = d / (s.dim / groups);
  return {bc.data_ptr<float>() + (b * groups + g) * s.length * s.state, s.state};
}

struct Inputs {
  at::Tensor u, delta, z, A, B, C, D, bias;
  bool has_z, has_d, has_bias, softplus;
  // The row of time steps of channel (b, d): dt = softplus(delta + bias) (or delta + bias), and, when
  // asked, the derivative of dt by the raw value, sigmoid(delta + bias) (1 without softplus).
  void steps(int64_t bd, int64_t d, int64_t length, float* dt, float* ddt_draw) const {
    const float* raw = delta.data_ptr<float>() + bd * length;
    const Vec vbias(has_bias ? bias.data_ptr<float>()[d] : 0.f), zero(0.f), one(1.f);
    for (int64_t t = 0; t < length; t += kWidth) {
      const int64_t count = std::min(kWidth, length - t);
      const Vec x = Vec::loadu(raw + t, count) + vbias;
      if (softplus) {
        (at::vec::maximum(x, zero) + (zero - x.abs()).exp().log1p()).store(dt + t, count);
        if (ddt_draw != nullptr) (one / (one + (zero - x).exp())).store(ddt_draw + t, count);
      } else {
        x.store(dt + t, count);
        if (ddt_draw != nullptr) one.store(ddt_draw + t, count);
      }
    }
  }
};

Inputs prepare(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
               const at::Tensor& C, const at::Tensor& D, const at::Tensor& z, const at::Tensor& delta_bias,
               bool delta_softplus) {
  return {as_float(u),        as_float(delta),        z.numel() ? as_float(z) : z, as_float(A),
          as_rows(B),         as_rows(C),             D.contiguous(),             delta_bias.contiguous(),
          z.numel() > 0,      D.numel() > 0,          delta_bias.numel() > 0,     delta_softplus};
}

// out = (y + D u) * silu(z) over a row (silu only when z is given); out may alias y.
void gate(const Inputs& in, int64_t bd, int64_t d, int64_t length, const float* y, float* out) {
  const float* up = in.u.data_ptr<float>() + bd * length;
  const float* zp = in.has_z ? in.z.data_ptr<float>() + bd * length : nullptr;
  const Vec skip(in.has_d ? in.D.data_ptr<float>()[d] : 0.f), zero(0.f), one(1.f);
  for (int64_t t = 0; t < length; t += kWidth) {
    const int64_t count = std::min(kWidth, length - t);
    Vec v = Vec::loadu(y + t, count) + skip * Vec::loadu(up + t, count);
    if (zp != nullptr) {
      const Vec zv = Vec::loadu(zp + t, count);
      v = v * zv / (one + (zero - zv).exp());
    }
    v.store(out + t, count);
  }
}

std::tuple<at::Tensor, at::Tensor> selective_scan_forward_cpu(const at::Tensor& u, const at::Tensor& delta,
                                                              const at::Tensor& A, const at::Tensor& B,
                                                              const at::Tensor& C, const at::Tensor& D,
                                                              const at::Tensor& z, const at::Tensor& delta_bias,
                                                              bool delta_softplus, bool reverse) {
  const ScanShape s = selective_scan_check(u, delta, A, B, C, D, z, delta_bias);
  const Inputs in = prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
  at::Tensor out = at::empty({s.batch, s.dim, s.length}, u.options().dtype(at::kFloat));
  at::Tensor last = at::empty({s.batch, s.dim, s.state}, u.options().dtype(at::kFloat));
  const int64_t L = s.length, N = s.state;
  const Order order{L, reverse};
  at::parallel_for(0, s.batch * s.dim, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(N), dts(L);
    for (int64_t bd = begin; bd < end; ++bd) {
      const int64_t b = bd / s.dim, d = bd % s.dim;
      const float* up = in.u.data_ptr<float>() + bd * L;
      const float* a = in.A.data_ptr<float>() + d * N;
      const Rows rb = rows_of(in.B, s, b, d), rc = rows_of(in.C, s, b, d);
      float* op = out.data_ptr<float>() + bd * L;
      in.steps(bd, d, L, dts.data(), nullptr);
      std::fill(h.begin(), h.end(), 0.f);
      for (int64_t step = 0; step < L; ++step) {
        const int64_t t = order(step);
        op[t] = scan_step(h.data(), a, rb.base + t * rb.step, rc.base + t * rc.step, dts[t], up[t], N);
      }
      gate(in, bd, d, L, op, op);
      std::copy(h.begin(), h.end(), last.data_ptr<float>() + bd * N);
    }
  });
  return {out.to(u.scalar_type()), last};
}

struct Grads {
  at::Tensor du, ddelta, dz;                        // [batch, dim, L] float32
  at::Tensor dA, dD, dbias, dB_fixed, dC_fixed;     // per-sample partials [batch, dim, (N)]
  at::Tensor dB_rows, dC_rows;                      // grouped: [batch, G, L, N]
};

// One channel's backward: recompute its states, then walk time backwards.
void channel_backward(const Inputs& in, const ScanShape& s, const Order& order, const Grads& g,
                      const float* grad_out, const float* grad_last, int64_t b, int64_t d, std::vector<float>& states,
                      std::vector<float>& pre_gate, std::vector<float>& carry, std::vector<float>& dts,
                      std::vector<float>& draw, const std::vector<float>& zeros) {
  const int64_t L = s.length, N = s.state, bd = b * s.dim + d;
  const float* up = in.u.data_ptr<float>() + bd * L;
  const float* zp = in.has_z ? in.z.data_ptr<float>() + bd * L : nullptr;
  const float* a = in.A.data_ptr<float>() + d * N;
  const Rows rb = rows_of(in.B, s, b, d), rc = rows_of(in.C, s, b, d);
  const float skip = in.has_d ? in.D.data_ptr<float>()[d] : 0.f;
  // Forward, keeping every state (at its time index) and the output before the gate.
  in.steps(bd, d, L, dts.data(), draw.data());
  std::fill(carry.begin(), carry.end(), 0.f);
  for (int64_t step = 0; step < L; ++step) {
    const int64_t t = order(step);
    const float y = scan_step(carry.data(), a, rb.base + t * rb.step, rc.base + t * rc.step, dts[t], up[t], N);
    std::copy(carry.begin(), carry.end(), states.data() + t * N);
    pre_gate[t] = y + skip * up[t];
  }
  // Backward: carry[n] holds exp(delta A) dL/dh of the next step (dL/dh_L from the last state at first).
  std::copy(grad_last + bd * N, grad_last + (bd + 1) * N, carry.begin());
  Rows db = rb, dc = rc;
  db.base = in.B.dim() == 2 ? g.dB_fixed.data_ptr<float>() + bd * N : g.dB_rows.data_ptr<float>() + (rb.base - in.B.data_ptr<float>());
  dc.base = in.C.dim() == 2 ? g.dC_fixed.data_ptr<float>() + bd * N : g.dC_rows.data_ptr<float>() + (rc.base - in.C.data_ptr<float>());
  float* dA = g.dA.data_ptr<float>() + bd * N;
  float dskip = 0.f, dbias = 0.f;
  float* du = g.du.data_ptr<float>() + bd * L;
  float* ddelta = g.ddelta.data_ptr<float>() + bd * L;
  float* dz = in.has_z ? g.dz.data_ptr<float>() + bd * L : nullptr;
  for (int64_t step = L - 1; step >= 0; --step) {
    const int64_t t = order(step);
    const float dt = dts[t], ut = up[t];
    float dy = grad_out[bd * L + t];
    if (zp != nullptr) {
      const float sz = sigmoid(zp[t]);
      dz[t] = dy * pre_gate[t] * sz * (1.f + zp[t] * (1.f - sz));
      dy *= zp[t] * sz;
    }
    dskip += dy * ut;
    float dut = dy * skip, ddt = 0.f;
    const float* bt = rb.base + t * rb.step;
    const float* ct = rc.base + t * rc.step;
    float* dbt = db.base + t * db.step;
    float* dct = dc.base + t * dc.step;
    const float* ht = states.data() + t * N;
    const float* hprev = step > 0 ? states.data() + order(step - 1) * N : zeros.data();
    Vec vddt(0.f), vdut(0.f);
    const Vec vdy(dy), vdt(dt), vut(ut), vdtu(dt * ut);
    for (int64_t n = 0; n < N; n += kWidth) {
      const int64_t count = std::min(kWidth, N - n);
      const Vec an = Vec::loadu(a + n, count), bn = Vec::loadu(bt + n, count);
      const Vec gn = Vec::loadu(carry.data() + n, count) + Vec::loadu(ct + n, count) * vdy;
      const Vec decay = (vdt * an).exp();
      const Vec prev = Vec::loadu(hprev + n, count);
      (Vec::loadu(dct + n, count) + vdy * Vec::loadu(ht + n, count)).store(dct + n, count);
      vddt = vddt + gn * (an * decay * prev + bn * vut);
      (Vec::loadu(dA + n, count) + gn * decay * prev * vdt).store(dA + n, count);
      (Vec::loadu(dbt + n, count) + gn * vdtu).store(dbt + n, count);
      vdut = vdut + gn * bn;
      (decay * gn).store(carry.data() + n, count);
    }
    const auto sum = [](Vec& x, Vec& z) { return x + z; };
    ddt += at::vec::vec_reduce_all<float>(sum, vddt);
    dut += dt * at::vec::vec_reduce_all<float>(sum, vdut);
    ddelta[t] = ddt * draw[t];
    dbias += ddelta[t];
    du[t] = dut;
  }
  g.dD.data_ptr<float>()[bd] = dskip;
  g.dbias.data_ptr<float>()[bd] = dbias;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_backward_cpu(const at::Tensor& grad_out, const at::Tensor& grad_last, const at::Tensor& u,
                            const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                            const at::Tensor& D, const at::Tensor& z, const at::Tensor& delta_bias,
                            bool delta_softplus, bool reverse) {
  const ScanShape s = selective_scan_check(u, delta, A, B, C, D, z, delta_bias);
  selective_scan_check_grads(s, u, grad_out, grad_last);
  const Inputs in = prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
  const at::Tensor go = as_float(grad_out), gl = as_float(grad_last);
  const auto f32 = u.options().dtype(at::kFloat);
  const int64_t batch = s.batch, dim = s.dim, L = s.length, N = s.state;
  Grads g{at::empty({batch, dim, L}, f32), at::empty({batch, dim, L}, f32),
          in.has_z ? at::empty({batch, dim, L}, f32) : at::empty({0}, f32),
          at::zeros({batch, dim, N}, f32), at::empty({batch, dim}, f32), at::empty({batch, dim}, f32),
          at::zeros({batch, dim, N}, f32), at::zeros({batch, dim, N}, f32),
          B.dim() == 4 ? at::zeros_like(in.B) : at::empty({0}, f32),
          C.dim() == 4 ? at::zeros_like(in.C) : at::empty({0}, f32)};
  // A task is a run of per_task channels of one sample holding whole groups of B and of C (their group
  // sizes divide dim, so their lcm does too): each group's time rows are summed by one thread.
  int64_t per_task = 1;
  for (const int64_t groups : {s.groups_b, s.groups_c}) {
    if (groups > 0) per_task = std::lcm(per_task, dim / groups);
  }
  const int64_t runs = dim > 0 ? dim / per_task : 0, tasks = batch * runs;
  const Order order{L, reverse};
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> states(std::max<int64_t>(L, 1) * N), pre_gate(std::max<int64_t>(L, 1)), carry(N);
    std::vector<float> dts(std::max<int64_t>(L, 1)), draw(std::max<int64_t>(L, 1));
    const std::vector<float> zeros(N, 0.f);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / runs, first = (task % runs) * per_task;
      for (int64_t d = first; d < first + per_task; ++d) {
        channel_backward(in, s, order, g, go.data_ptr<float>(), gl.data_ptr<float>(), b, d, states, pre_gate,
                         carry, dts, draw, zeros);
      }
    }
  });
  const auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  const auto reshape_rows = [&](const at::Tensor& rows, const at::Tensor& fixed, const at::Tensor& like) {
    return (like.dim() == 2 ? fixed.sum(0) : rows.transpose(2, 3)).to(like.scalar_type()).contiguous();
  };
  return {g.du.to(u.scalar_type()),
          g.ddelta.to(delta.scalar_type()),
          g.dA.sum(0),
          reshape_rows(g.dB_rows, g.dB_fixed, B),
          reshape_rows(g.dC_rows, g.dC_fixed, C),
          in.has_d ? g.dD.sum(0) : empty(D),
          in.has_z ? g.dz.to(z.scalar_type()) : empty(z),
          in.has_bias ? g.dbias.sum(0) : empty(delta_bias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvision, CPU, m) {
  m.impl("selective_scan_forward", &selective_scan_forward_cpu);
  m.impl("selective_scan_backward", &selective_scan_backward_cpu);
}

}  // namespace fastvision
