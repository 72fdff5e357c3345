"""Selective scan (Mamba's S6): ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``,
``y_t = C_t . h_t + D u_t``.

The semantics and shapes of mamba-ssm's ``selective_scan_fn``: ``u``, ``delta``, ``z`` ``[batch, dim, L]``;
``A`` ``[dim, N]`` real; ``B`` and ``C`` each ``[dim, N]`` (fixed), ``[batch, N, L]`` (varying) or
``[batch, G, N, L]`` (``G`` groups, each shared by ``dim / G`` consecutive channels); ``D`` and
``delta_bias`` ``[dim]`` float32. ``delta = softplus(delta + delta_bias)`` when asked; the output is
multiplied by ``silu(z)`` when ``z`` is given. ``return_last_state`` also returns ``h_L``
``[batch, dim, N]`` (float32). Inputs float32, float16 or bfloat16; state and accumulation float32.
``B`` and ``C`` may differ in form and group count (fixed ``B`` with grouped ``C``, 2 groups of ``B``
with 1 of ``C``).

Backends: ``reference`` (below: sequential over ``L`` in plain PyTorch), ``cpu``
(csrc/cpu/selective_scan.cpp: threads over (batch, dim), a sequential scan over ``L`` vectorized
over ``N``; the backward recomputes the states of one (batch, channel) in a workspace of ``L x N``
floats per thread), ``triton`` (triton_kernels/selective_scan.py: chunked scans with the state on
chip, carried across chunks; the backward recomputes inside chunks from the chunk-boundary states) and
``cuda`` (csrc/cuda/selective_scan.cu: one block per channel, 2048-step chunks in registers, a block
scan per state; the backward recomputes each chunk from its entering state, gradients reduced in a
fixed order). ``mamba_ssm`` runs mamba-ssm's ``selective_scan_fn`` where it imports (forced only,
never chosen automatically; no ``reverse``, no gradient of the last state, its dtype rules).
Nothing of size ``L x N`` is saved for the backward: the forward ops return the output and the last
state, and the Triton forward also its chunk-entering states (``[batch, dim, L / chunk + 1, N]``
float32, chunk 128 or 256), which its backward reads instead of rerunning a states pass.
``reverse=True`` runs the recurrence from ``L - 1`` down to 0 in every backend (each kernel
reads and writes time index ``L - 1 - s`` at its step ``s``): the flipped-input result without flipped
copies.

The kernel ops take every input as a tensor, with empty tensors for the absent ``D``, ``z`` and
``delta_bias`` (op inputs cannot be None), ``B``/``C`` always in the grouped form ``[batch, G, N, L]``
or the fixed form ``[dim, N]``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from fastvision.ops._checks import check_dtype, check_same_device, check_tensor
from fastvision.ops._contract import (
    AutogradRule,
    KernelBackend,
    OpCost,
    OpSpec,
    define_op,
    leaf,
    triton_launch,
)

MAX_STATE = 256


def _expand_groups(bc: torch.Tensor, dim: int) -> torch.Tensor:
    """``[batch, N, L]`` or ``[batch, G, N, L]`` -> ``[batch, dim, N, L]`` (a group per dim / G channels)."""
    if bc.dim() == 3:
        bc = bc.unsqueeze(1)
    return bc.repeat_interleave(dim // bc.shape[1], dim=1)


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    reverse: bool = False,
):
    """The definition: a sequential loop over ``L`` in float32 (as mamba-ssm's ``selective_scan_ref``);
    ``reverse`` walks the steps from ``L - 1`` down to 0 (the last state is then the one after step 0)."""
    dtype = u.dtype
    compute = torch.promote_types(dtype, torch.float32)
    u, delta, A = u.to(compute), delta.to(compute), A.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    state = A.shape[1]
    decay = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # [batch, dim, L, N]
    if B.dim() == 2:
        drive = (delta * u).unsqueeze(-1) * B.to(compute)[:, None, :]
    else:
        drive = (delta * u).unsqueeze(-1) * _expand_groups(B.to(compute), dim).transpose(2, 3)
    readout = C.to(compute) if C.dim() == 2 else _expand_groups(C.to(compute), dim).transpose(2, 3)
    h = u.new_zeros((batch, dim, state))
    ys: list[torch.Tensor | None] = [None] * length
    for t in range(length - 1, -1, -1) if reverse else range(length):
        h = decay[:, :, t] * h + drive[:, :, t]
        c = readout if C.dim() == 2 else readout[:, :, t]
        ys[t] = (h * c).sum(-1)
    y = torch.stack(ys, dim=2) if ys else u.new_zeros((batch, dim, 0))
    if D is not None:
        y = y + u * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    out = y.to(dtype)
    return (out, h) if return_last_state else out


# --- kernel ops ----------------------------------------------------------------------------------------


def _optional(t: torch.Tensor) -> torch.Tensor | None:
    return None if t.numel() == 0 else t


def _backward_op_reference(
    grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False
):
    """The backward ops' definition by autograd of the reference (differentiable: the higher-order rule)."""
    compute = torch.promote_types(u.dtype, torch.float32)
    with torch.enable_grad():
        inputs = [leaf(t.to(compute)) for t in (u, delta, A, B, C)]
        optional = [None if t.numel() == 0 else leaf(t.to(compute)) for t in (D, z, delta_bias)]
        out, last = selective_scan_reference(*inputs, *optional, delta_softplus, True, reverse)
        wanted = inputs + [t for t in optional if t is not None]
        grads = torch.autograd.grad(
            (out, last), wanted, (grad_out.to(compute), grad_last.to(compute)), create_graph=True,
            allow_unused=True,
        )  # fmt: skip
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wanted, strict=True)]
    found = iter(grads[5:])
    rest = [next(found) if t.numel() else t.new_empty(0) for t in (D, z, delta_bias)]
    first = [g.to(t.dtype) for g, t in zip(grads[:5], (u, delta, A, B, C), strict=True)]
    return (*first, rest[0].to(D.dtype), rest[1].to(z.dtype), rest[2].to(delta_bias.dtype))


def _check_kernel_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, grads=None):
    """The public checks for a direct call of a kernel op (empty ``D``, ``z``, ``delta_bias`` = absent;
    ``B``/``C`` fixed ``[dim, N]`` or grouped ``[batch, G, N, L]``), and for the backward the shapes of
    ``grads = (grad_out, grad_last)``: what a kernel relies on to stay in bounds."""
    for name, bc in (("B", B), ("C", C)):
        if isinstance(bc, torch.Tensor) and bc.dim() not in (2, 4):
            raise ValueError(
                f"{name} of a kernel op must be [dim, N] or [batch, G, N, L], got {list(bc.shape)}"
            )
    optional = (_optional(D), _optional(z), _optional(delta_bias))
    _check(u, delta, A, B, C, *optional, delta_softplus, False, reverse)
    if grads is None:
        return
    grad_out, grad_last = grads
    expected = (("grad_out", grad_out, u.shape), ("grad_last", grad_last, (*u.shape[:2], A.shape[1])))
    for name, grad, shape in expected:
        check_tensor(name, grad)
        check_dtype(name, grad)
        if tuple(grad.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(grad.shape)}")
    check_same_device(u=u, grad_out=grad_out, grad_last=grad_last)


@triton_launch("selective_scan_triton_forward")
def selective_scan_triton_forward(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, delta_softplus: bool, reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(out, last_state, chunk_states)``: the third output, float32 ``[batch, dim, chunks + 1, N]``, is
    what the backward needs to skip the forward's states pass (saved by the autograd rule)."""
    from fastvision.triton_kernels.selective_scan import selective_scan_forward

    return selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)


@triton_launch("selective_scan_triton_backward")
def selective_scan_triton_backward(
    grad_out: torch.Tensor, grad_last: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
    B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor,
    delta_softplus: bool, reverse: bool = False, chunk_states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:  # fmt: skip
    """The gradients; ``chunk_states`` from the forward op, or ``None`` (recomputed)."""
    from fastvision.triton_kernels.selective_scan import selective_scan_backward

    return selective_scan_backward(
        grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk_states
    )


def _check_forward_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False) -> None:
    """The forward op's own arguments, as a direct torch.ops call passes them."""
    _check_kernel_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)


def _check_backward_op(
    grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False
) -> None:
    """The backward op's own arguments: the forward's and the gradients of both outputs."""
    _check_kernel_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, (grad_out, grad_last))


def _forward_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False):
    return u.new_empty(u.shape), u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=torch.float32)


def _backward_fake(grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False):
    return tuple(t.new_empty(t.shape) for t in (u, delta, A, B, C, D, z, delta_bias))


def _setup_context(ctx, inputs, output):
    *tensors, delta_softplus, reverse = inputs
    ctx.save_for_backward(*tensors)
    ctx.delta_softplus, ctx.reverse = delta_softplus, reverse


def _backward(ctx, backward_op, grad_out, grad_last, **extra):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors[:8]
    if grad_out is None:
        grad_out = torch.zeros_like(u)
    if grad_last is None:
        grad_last = u.new_zeros((u.shape[0], u.shape[1], A.shape[1]), dtype=torch.float32)
    grads = backward_op(
        grad_out.contiguous(), grad_last.contiguous(), u, delta, A, B, C, D, z, delta_bias,
        ctx.delta_softplus, ctx.reverse, **extra,
    )  # fmt: skip
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return (*(g if t.numel() else None for g, t in zip(grads, inputs, strict=True)), None, None)


def _check_triton_backward_op(
    grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False, chunk_states=None
) -> None:
    """The Triton backward's arguments: the shared ones, and ``chunk_states`` float32 of the forward op's
    shape (its kernel reads every entry of it)."""
    _check_backward_op(grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    if chunk_states is None:
        return
    from fastvision.triton_kernels.selective_scan import chunk_states_shape

    check_tensor("chunk_states", chunk_states)
    shape = chunk_states_shape(*u.shape, A.shape[1], u.element_size())
    if chunk_states.dtype != torch.float32 or tuple(chunk_states.shape) != shape:
        raise ValueError(
            f"chunk_states must be the forward op's float32 {list(shape)}, got {chunk_states.dtype} "
            f"{list(chunk_states.shape)}"
        )
    check_same_device(u=u, chunk_states=chunk_states)


def _triton_forward_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False):
    from fastvision.triton_kernels.selective_scan import chunk_states_shape

    out, last = _forward_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    shape = chunk_states_shape(*u.shape, A.shape[1], u.element_size())
    return out, last, u.new_empty(shape, dtype=torch.float32)


def _triton_backward_fake(
    grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False, chunk_states=None
):
    return _backward_fake(grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)


def _triton_setup_context(ctx, inputs, output):
    *tensors, delta_softplus, reverse = inputs
    ctx.save_for_backward(*tensors, output[2])
    ctx.delta_softplus, ctx.reverse = delta_softplus, reverse
    ctx.mark_non_differentiable(output[2])


def _triton_backward(ctx, backward_op, grad_out, grad_last, grad_chunk_states=None):
    # Detached: the backward op is not differentiable in the states (backward_differentiable), and a
    # higher-order gradient must not walk back into this forward node, which torch 2.11 runs after its
    # saved tensors were freed (opcheck's AOT check fails), as in topk_attention.
    return _backward(ctx, backward_op, grad_out, grad_last, chunk_states=ctx.saved_tensors[8].detach())


def _triton_backward_op_reference(
    grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False, chunk_states=None
):
    """The Triton backward's definition: the shared one (the chunk states only save time)."""
    return _backward_op_reference(
        grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse
    )


AUTOGRAD = AutogradRule(
    forward_fake=_forward_fake,
    backward_fake=_backward_fake,
    setup_context=_setup_context,
    backward=_backward,
    backward_reference=_backward_op_reference,
    backward_differentiable=tuple(range(10)),
    forward_check=_check_forward_op,
    backward_check=_check_backward_op,
)


# The Triton pair: the forward also returns its chunk states, which the backward takes.
TRITON_AUTOGRAD = AutogradRule(
    forward_fake=_triton_forward_fake,
    backward_fake=_triton_backward_fake,
    setup_context=_triton_setup_context,
    backward=_triton_backward,
    backward_reference=_triton_backward_op_reference,
    backward_differentiable=tuple(range(10)),
    forward_check=_check_forward_op,
    backward_check=_check_triton_backward_op,
)


def _check_bc(name: str, bc: torch.Tensor, batch: int, dim: int, state: int, length: int) -> None:
    check_tensor(name, bc)
    if bc.is_complex():
        raise TypeError(f"{name} must be real (complex B and C are not supported)")
    check_dtype(name, bc)
    if bc.dim() == 2:
        if tuple(bc.shape) != (dim, state):
            raise ValueError(f"{name} fixed must have shape [dim, N] = [{dim}, {state}], got {list(bc.shape)}"
                             )  # fmt: skip
    elif bc.dim() == 3:
        if tuple(bc.shape) != (batch, state, length):
            raise ValueError(
                f"{name} varying must have shape [batch, N, L] = [{batch}, {state}, {length}], "
                f"got {list(bc.shape)}"
            )
    elif bc.dim() == 4:
        groups = bc.shape[1]
        if bc.shape[0] != batch or bc.shape[2] != state or bc.shape[3] != length:
            raise ValueError(
                f"{name} grouped must have shape [batch, G, N, L] = [{batch}, G, {state}, {length}], "
                f"got {list(bc.shape)}"
            )
        if groups < 1 or dim % groups != 0:
            raise ValueError(f"{name}'s groups G = {groups} must divide dim = {dim}")
    else:
        raise ValueError(f"{name} must be [dim, N], [batch, N, L] or [batch, G, N, L], got {bc.dim()} dims")


def _check_vector(name: str, value: torch.Tensor | None, dim: int) -> None:
    if value is None:
        return
    check_tensor(name, value)
    if value.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {str(value.dtype).removeprefix('torch.')}")
    if tuple(value.shape) != (dim,):
        raise ValueError(f"{name} must have shape [dim] = [{dim}], got {list(value.shape)}")


def _check(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
           reverse=False):  # fmt: skip
    check_tensor("u", u)
    check_dtype("u", u)
    if u.dim() != 3:
        raise ValueError(f"u must have shape [batch, dim, L], got {list(u.shape)}")
    batch, dim, length = u.shape
    for name, t in (("delta", delta), ("z", z)):
        if t is None and name == "z":
            continue
        check_tensor(name, t)
        check_dtype(name, t)
        if t.shape != u.shape:
            raise ValueError(f"{name} must have u's shape {list(u.shape)}, got {list(t.shape)}")
    check_tensor("A", A)
    if A.is_complex():
        raise TypeError("A must be real (complex A is not supported)")
    if A.dtype != torch.float32:
        raise TypeError(f"A must be float32, got {str(A.dtype).removeprefix('torch.')}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must have shape [dim, N] = [{dim}, N], got {list(A.shape)}")
    state = A.shape[1]
    if not 1 <= state <= MAX_STATE:
        raise ValueError(f"the state size N (A.shape[1]) must be in [1, {MAX_STATE}], got {state}")
    _check_bc("B", B, batch, dim, state, length)
    _check_bc("C", C, batch, dim, state, length)
    _check_vector("D", D, dim)
    _check_vector("delta_bias", delta_bias, dim)
    flags = (
        ("delta_softplus", delta_softplus), ("return_last_state", return_last_state), ("reverse", reverse)
    )  # fmt: skip
    for name, flag in flags:
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    present = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    check_same_device(**{k: v for k, v in present.items() if v is not None})
    return u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse


def _kernel_form(bc: torch.Tensor) -> torch.Tensor:
    return bc.unsqueeze(1) if bc.dim() == 3 else bc


def _run_kernel(forward_op, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse):
    empty = u.new_empty((0,), dtype=torch.float32)
    out, last, *_ = forward_op(
        u, delta, A, _kernel_form(B), _kernel_form(C), empty if D is None else D,
        u.new_empty((0,)) if z is None else z, empty if delta_bias is None else delta_bias, delta_softplus,
        reverse,
    )  # fmt: skip
    return (out, last) if return_last_state else out


def selective_scan_onnx():
    """The forward ops ``(out, last_state)`` in standard ONNX operators (onnxscript), for
    ``torch.onnx.export``.

    The recurrence is one ONNX ``Scan`` over ``L`` (its body: ``Mul``, ``Add``, ``Identity``), so
    the graph's size does not depend on the sequence length; ``reverse`` sets the Scan's input and
    output directions to 1 (last step first, states stored back in time order). Around it: ``Cast`` to
    float32 and
    ``CastLike`` back; ``Add`` (``delta_bias``), ``Softplus``; ``Exp``, ``Mul`` and ``Unsqueeze`` for
    the per-step decay ``exp(delta A)`` and drive ``delta B u``; ``Reshape``/``Expand``/``Transpose``
    (with ``Shape``, ``Concat``, ``Div``) to spread grouped ``B``/``C`` over their channels;
    ``ConstantOfShape`` for the zero initial state; ``ReduceSum`` for ``C . h``; ``Sigmoid`` for
    ``silu(z)``. Absent ``D``, ``z`` and ``delta_bias`` (empty tensors in the kernel ops) are left
    out of the graph. The Scan sits in a local function (domain ``fastvision.onnx``) that the
    exporter's optimizer inlines (``torch.onnx.export``'s default ``optimize=True``). Memory: the
    per-step decay, drive and states are ``[batch, dim, L, N]`` float32 tensors each.
    """
    import onnxscript
    from onnxscript import FLOAT
    from onnxscript import opset18 as op

    def selective_scan_states(h0, decay, drive):
        @onnxscript.graph()
        def step(h, a, b):
            h_next = op.Add(op.Mul(a, h), b)
            h_out = op.Identity(h_next)
            return h_next, h_out

        last, states = op.Scan(
            h0, decay, drive, body=step, num_scan_inputs=2, scan_input_axes=[2, 2], scan_output_axes=[2]
        )
        return last, states

    def selective_scan_states_reverse(h0, decay, drive):
        """The same Scan from the last step to the first; states come out in the inputs' time order."""

        @onnxscript.graph()
        def step(h, a, b):
            h_next = op.Add(op.Mul(a, h), b)
            h_out = op.Identity(h_next)
            return h_next, h_out

        last, states = op.Scan(
            h0, decay, drive, body=step, num_scan_inputs=2, scan_input_axes=[2, 2], scan_output_axes=[2],
            scan_input_directions=[1, 1], scan_output_directions=[1],
        )  # fmt: skip
        return last, states

    # The exporter reads the function's inputs and its two outputs from the annotations; they are set
    # here because onnxscript is imported only when exporting (postponed annotations could not name it).
    scripted = []
    for fn in (selective_scan_states, selective_scan_states_reverse):
        fn.__annotations__ = {"h0": FLOAT, "decay": FLOAT, "drive": FLOAT, "return": tuple[FLOAT, FLOAT]}
        domain = onnxscript.values.Opset("fastvision.onnx", 1)
        scripted.append(onnxscript.script(domain, default_opset=op)(fn))
    selective_scan_states, selective_scan_states_reverse = scripted

    def absent(value) -> bool:
        return value.shape is not None and len(value.shape) == 1 and value.shape[0] == 0

    def per_step(bc, u):
        """``[dim, N]`` -> ``[dim, 1, N]``; ``[batch, G, N, L]`` -> ``[batch, dim, L, N]`` (float32)."""
        fixed = len(bc.shape) == 2  # the rank, read before any op (traced values carry no shape)
        bc = op.Cast(bc, to=FLOAT.dtype)
        if fixed:
            return op.Unsqueeze(bc, [1])
        per_group = op.Div(op.Shape(u, start=1, end=2), op.Shape(bc, start=1, end=2))
        target = op.Concat(op.Shape(bc, start=0, end=2), per_group, op.Shape(bc, start=2), axis=0)
        spread = op.Expand(op.Unsqueeze(bc, [2]), target)  # [batch, G, dim / G, N, L]
        flat = op.Concat(op.Shape(bc, start=0, end=1), op.Constant(value_ints=[-1]),
                         op.Shape(bc, start=2), axis=0)  # fmt: skip
        return op.Transpose(op.Reshape(spread, flat), perm=[0, 1, 3, 2])

    def selective_scan(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool = False, reverse: bool = False
    ):
        u32, delta = op.Cast(u, to=FLOAT.dtype), op.Cast(delta, to=FLOAT.dtype)
        if not absent(delta_bias):
            delta = op.Add(delta, op.Unsqueeze(delta_bias, [1]))
        if delta_softplus:
            delta = op.Softplus(delta)
        step_delta = op.Unsqueeze(delta, [-1])  # [batch, dim, L, 1]
        decay = op.Exp(op.Mul(step_delta, op.Unsqueeze(A, [1])))  # [batch, dim, L, N]
        drive = op.Mul(op.Mul(step_delta, op.Unsqueeze(u32, [-1])), per_step(B, u))
        state_shape = op.Concat(op.Shape(u, start=0, end=2), op.Shape(A, start=1, end=2), axis=0)
        h0 = op.ConstantOfShape(state_shape)  # float32 zeros [batch, dim, N]
        scan = selective_scan_states_reverse if reverse else selective_scan_states
        last, states = scan(h0, decay, drive)  # states [batch, dim, L, N]
        y = op.ReduceSum(op.Mul(states, per_step(C, u)), [-1], keepdims=0)
        if not absent(D):
            y = op.Add(y, op.Mul(u32, op.Unsqueeze(D, [1])))
        if not absent(z):
            z32 = op.Cast(z, to=FLOAT.dtype)
            y = op.Mul(y, op.Mul(z32, op.Sigmoid(z32)))
        return op.CastLike(y, u), last

    return selective_scan


# --- mamba-ssm's selective_scan_fn as a backend (a peer: forced only, never chosen automatically) ---------


def _mamba_ssm_fn():
    """mamba-ssm's ``selective_scan_fn``, or a clear error where it cannot run here."""
    from fastvision._backend import BackendUnavailableError, mamba_ssm_missing

    missing = mamba_ssm_missing()
    if missing is not None:
        raise BackendUnavailableError(f"selective_scan: the mamba_ssm backend needs mamba-ssm: {missing}")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _mamba_ssm_limits(u, delta, B, C, z, reverse) -> str | None:
    """What mamba-ssm's kernel cannot take (B/C fixed [dim, N], varying [batch, N, L] or grouped)."""
    if reverse:
        return "mamba-ssm's selective_scan_fn has no reverse direction (reverse=True)"
    if u.numel() == 0:
        return "mamba-ssm's kernel takes non-empty inputs (batch, dim and L at least 1)"
    if delta.dtype != u.dtype or (z is not None and z.dtype != u.dtype):
        return f"mamba-ssm's kernel reads delta and z in u's dtype ({_dtype_name(u)})"
    for name, bc in (("B", B), ("C", C)):
        if bc.dim() == 2 and bc.dtype != torch.float32:
            return f"mamba-ssm's kernel takes fixed {name} in float32, got {_dtype_name(bc)}"
        if bc.dim() > 2 and bc.dtype != u.dtype:
            got = _dtype_name(bc)
            return f"mamba-ssm's kernel reads varying {name} in u's dtype ({_dtype_name(u)}), got {got}"
    groups_b = 0 if B.dim() == 2 else 1 if B.dim() == 3 else B.shape[1]
    groups_c = 0 if C.dim() == 2 else 1 if C.dim() == 3 else C.shape[1]
    if groups_c and groups_c != max(groups_b, 1):
        return (f"mamba-ssm's kernel reads varying C in B's group count (1 with fixed B): "
                f"B has {groups_b or 'fixed'}, C has {groups_c}")  # fmt: skip
    return None


def _mamba_ssm_supports(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse):
    reason = _mamba_ssm_limits(u, delta, B, C, z, reverse)
    if reason is not None:
        return reason
    tracked = any(t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    if return_last_state and tracked and torch.is_grad_enabled():
        return ("mamba-ssm's backward ignores the gradient of the last state: return_last_state=True with "
                "inputs that require grad")  # fmt: skip
    return None


def _check_mamba_forward_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False) -> None:
    _check_forward_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    reason = _mamba_ssm_limits(u, delta, B, C, _optional(z), reverse)
    if reason is not None:
        raise ValueError(reason)


def _check_mamba_backward_op(
    grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=False
) -> None:
    _check_backward_op(grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    reason = _mamba_ssm_limits(u, delta, B, C, _optional(z), reverse)
    if reason is not None:
        raise ValueError(reason)
    if bool(grad_last.any()):  # a host read, on direct calls only
        raise ValueError("grad_last must be zero: mamba-ssm's backward ignores the last state's gradient")


def _mamba_optional(D, z, delta_bias):
    return _optional(D), _optional(z), _optional(delta_bias)


@triton_launch("selective_scan_mamba_ssm_forward")
def selective_scan_mamba_ssm_forward(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, delta_softplus: bool, reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    fn = _mamba_ssm_fn()
    with torch.no_grad():
        out, last = fn(u, delta, A, B, C, *_mamba_optional(D, z, delta_bias), delta_softplus, True)
    return out, last.contiguous()


@triton_launch("selective_scan_mamba_ssm_backward")
def selective_scan_mamba_ssm_backward(
    grad_out: torch.Tensor, grad_last: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
    B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor,
    delta_softplus: bool, reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:  # fmt: skip
    """mamba-ssm's backward, its forward recomputed (the op pair saves no chunk states between them);
    ``grad_last`` must be zero (mamba-ssm ignores it)."""
    fn = _mamba_ssm_fn()
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in (u, delta, A, B, C)]
        optional = [None if t.numel() == 0 else t.detach().requires_grad_(True) for t in (D, z, delta_bias)]
        out = fn(*inputs, *optional, delta_softplus, False)
        wanted = inputs + [t for t in optional if t is not None]
        grads = torch.autograd.grad(out, wanted, grad_out.to(out.dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g.to(t.dtype) for g, t in zip(grads, wanted, strict=True)]
    found = iter(grads[5:])
    rest = [next(found) if t.numel() else t.new_empty(0) for t in (D, z, delta_bias)]
    return (*(g.contiguous() for g in grads[:5]), *(g.contiguous() for g in rest))


def _run_mamba_ssm(
    forward_op, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse
):
    """Eagerly mamba-ssm's own autograd function (its forward saves the chunk states that its backward
    reads: the peer at its own cost); traced by torch.compile / torch.export, the opaque op pair."""
    if torch.compiler.is_compiling():
        return _run_kernel(forward_op, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                           reverse)  # fmt: skip
    fn = _mamba_ssm_fn()
    u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
    z = None if z is None else z.contiguous()
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


MAMBA_SSM_AUTOGRAD = dataclasses.replace(
    AUTOGRAD, forward_check=_check_mamba_forward_op, backward_check=_check_mamba_backward_op
)


def _cost(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse) -> OpCost:
    """Read u, delta, z, B, C and write out once (A, D, delta_bias not counted), plus the float32 last
    state when returned; about 6 FLOPs per step, channel and state (exp, decay, input, readout)."""
    batch, dim, length = u.shape
    streams = 3 if z is None else 4
    moved = streams * u.numel() * u.element_size() + sum(t.numel() * t.element_size() for t in (B, C))
    if return_last_state:
        moved += 4 * batch * dim * A.shape[1]
    return OpCost(moved, 6 * A.shape[1] * batch * dim * length)


SELECTIVE_SCAN = define_op(
    OpSpec(
        name="selective_scan",
        cost=_cost,
        reference=selective_scan_reference,
        check=_check,
        device=lambda u, *_: u.device,
        kernels={
            "cpu": KernelBackend(
                "selective_scan_forward", "selective_scan_backward", AUTOGRAD, native=True, call=_run_kernel,
                onnx=selective_scan_onnx,
            ),
            # No ONNX translation of its own (the forward has a third output): export traces the
            # cpu or cuda op's translation, or the reference.
            "triton": KernelBackend(
                "selective_scan_triton_forward", "selective_scan_triton_backward", TRITON_AUTOGRAD,
                call=_run_kernel,
            ),
            "cuda": KernelBackend(
                "selective_scan_forward", "selective_scan_backward", AUTOGRAD, native=True, call=_run_kernel,
                onnx=selective_scan_onnx,
            ),
            # mamba-ssm's selective_scan_fn: forced only (use_backend("mamba_ssm")), for comparison.
            "mamba_ssm": KernelBackend(
                "selective_scan_mamba_ssm_forward", "selective_scan_mamba_ssm_backward", MAMBA_SSM_AUTOGRAD,
                supports=_mamba_ssm_supports, call=_run_mamba_ssm,
            ),
        },
        # Not yet measured on a GPU: the CUDA kernel goes first, as the other ops' unmeasured CUDA
        # kernels do (block scans over 2048-step chunks in registers, Triton's scans in [channels,
        # chunk] tiles); the GPU pass (bench/gpu_pass.sh) decides the order.
        gpu_order=("cuda", "triton"),
        cpu_order=("cpu",),
        triton_module="fastvision.triton_kernels.selective_scan",
        benchmark_module="fastvision.benchmark.selective_scan",
    )
)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    reverse: bool = False,
):
    """Mamba's selective scan with ``selective_scan_fn``'s semantics (see the module docstring).

    ``reverse=True`` scans from the last step to the first, as if every sequence input (``u``,
    ``delta``, ``z``, varying ``B``/``C``) were flipped along ``L`` and the output flipped back, without
    making the flipped copies; the last state is then the state after step 0.

    Returns:
        ``out [batch, dim, L]`` of ``u``'s dtype, and with ``return_last_state`` also ``h_L
        [batch, dim, N]`` float32.
    """
    return SELECTIVE_SCAN(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse)
