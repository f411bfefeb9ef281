"""SwiGLU gate: ``silu(gate) * up``, forward and backward each in one pass over memory.

``gate`` and ``up`` may be row-strided views (halves of a fused gate_up projection) as long as their
last dim is contiguous.

``swiglu_linear`` adds the MLP's down projection in the same autograd node, so that the gate's output (the
projection's input, ``[tokens, intermediate]``) is not kept for the backward but recomputed there from
``gate`` and ``up``, which the gate's own backward keeps anyway. The backward kernel writes it next to the
gradients, in the pass that reads ``gate`` and ``up`` for them: no extra read buys back the largest activation
of a decoder layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import (
    as_rows,
    autocast_cast,
    check_float,
    check_same_device,
    differentiable,
    eager_or_compiled,
    register_fake,
    use_triton,
)
from ._triton import cached_launch, cdiv, next_power_of_2, tl, triton

# Columns per program and warps, from benchmarks/tune_kernels.py on an H100 at 16384 x 14336 bf16:
# 8192 x 16 warps reached 99% of copy bandwidth forward and backward in row layout (1024 x 4 warps: 96%).
MAX_BLOCK = 8192


def _launch_config(n: int) -> tuple[int, int]:
    block = min(MAX_BLOCK, next_power_of_2(n))
    return block, min(16, max(4, block // 512))


@cached_launch
@triton.jit
def _swiglu_fwd_kernel(G, U, Y, stride_g, stride_u, stride_y, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@cached_launch
@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU, Y, stride_dy, stride_g, stride_u, stride_dg, stride_du, stride_y, N,
    BLOCK: tl.constexpr, WRITE_Y: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DU + row * stride_du + cols, (dy * silu).to(DU.dtype.element_ty), mask=mask)
    if WRITE_Y:  # the forward's output, for the down projection's weight gradient
        tl.store(Y + row * stride_y + cols, (silu * u).to(Y.dtype.element_ty), mask=mask)
    dg = dy * u * (sig + silu * (1.0 - sig))
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)


def _as_2d(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], int, int]:
    """2-D views for the kernels, with (BLOCK, warps).

    The op is elementwise, so contiguous inputs whose size divides by MAX_BLOCK are viewed as rows of
    exactly one block: no partly masked tail block per row (100.6% vs 98.9% of copy bandwidth on the H100
    at 16384 x 14336). Anything else keeps its own rows.
    """
    numel = tensors[0].numel()
    if numel and numel % MAX_BLOCK == 0 and all(t.is_contiguous() for t in tensors):
        return [t.view(-1, MAX_BLOCK) for t in tensors], MAX_BLOCK, 16
    views = [as_rows(t) for t in tensors]
    return views, *_launch_config(views[0].shape[1])


def _swiglu_fwd_triton(gate, up, block=None, warps=None):
    (g2, u2), default_block, default_warps = _as_2d(gate, up)
    block, warps = block or default_block, warps or default_warps
    m, n = g2.shape
    y = gate.new_empty((m, n))
    if y.numel():
        _swiglu_fwd_kernel[(m, cdiv(n, block))](
            g2, u2, y, g2.stride(0), u2.stride(0), y.stride(0), n, BLOCK=block, num_warps=warps
        )
    return y.view(gate.shape)


def _swiglu_bwd_triton(dy, gate, up, with_output=False, block=None, warps=None):
    (dy2, g2, u2), default_block, default_warps = _as_2d(dy, gate, up)
    block, warps = block or default_block, warps or default_warps
    m, n = g2.shape
    dg = gate.new_empty((m, n))
    du = up.new_empty((m, n))
    y = gate.new_empty((m, n) if with_output else (0, n))
    if dg.numel():
        _swiglu_bwd_kernel[(m, cdiv(n, block))](
            dy2, g2, u2, dg, du, y, dy2.stride(0), g2.stride(0), u2.stride(0), dg.stride(0), du.stride(0),
            y.stride(0), n, BLOCK=block, WRITE_Y=with_output, num_warps=warps,
        )  # fmt: skip
    return dg.view(gate.shape), du.view(up.shape), y.view(gate.shape) if with_output else y.view(0)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(gate.dtype).contiguous()


def swiglu_bwd_ref(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, with_output: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d gate, d up, and the forward's output if ``with_output``, else an empty tensor)."""
    g, u, d = gate.float(), up.float(), dy.float()
    sig = torch.sigmoid(g)
    silu = g * sig
    y = (silu * u).to(gate.dtype).contiguous() if with_output else gate.new_empty(0)
    return (d * u * (sig + silu * (1 - sig))).to(gate.dtype).contiguous(), (d * silu).to(up.dtype).contiguous(), y


def _forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate):
        return _swiglu_fwd_triton(gate, up)
    return swiglu_ref(gate, up)


def _backward_impl(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, with_output: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(gate):
        return _swiglu_bwd_triton(dy, gate, up, with_output)
    return swiglu_bwd_ref(dy, gate, up, with_output)


_forward_op = torch.library.custom_op("accel_patch::swiglu", _forward, mutates_args=())
_backward_op = torch.library.custom_op("accel_patch::swiglu_backward", _backward_impl, mutates_args=())


@register_fake(_forward_op)
def _(gate, up):
    return gate.new_empty(gate.shape)


@register_fake(_backward_op)
def _(dy, gate, up, with_output):
    return gate.new_empty(gate.shape), up.new_empty(up.shape), gate.new_empty(gate.shape if with_output else (0,))


_swiglu_backward = eager_or_compiled(_backward_op, _backward_impl)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup, _ = _swiglu_backward(dy, gate, up, False)
    return dgate, dup


_swiglu = differentiable(_forward_op, _forward, _setup_context, _backward)


def _check_gate_up(gate: torch.Tensor, up: torch.Tensor) -> None:
    check_float("gate", gate)
    check_float("up", up)
    if tuple(gate.shape) != tuple(up.shape):
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype:
        raise TypeError(f"gate ({gate.dtype}) and up ({up.dtype}) must have the same dtype")
    if gate.dim() == 0:
        raise ValueError("swiglu needs at least one dimension")
    check_same_device(gate=gate, up=up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` computed in float32, returned in ``gate``'s dtype."""
    _check_gate_up(gate, up)
    return _swiglu(gate, up)


def _linear_forward(
    gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    hidden = _forward(gate, up)
    if residual is None:
        return F.linear(hidden, weight, bias)
    # the residual add rides in the GEMM's epilogue (beta=1): one rounding of the sum, no pass of its own
    rows = torch.addmm(residual.reshape(-1, weight.shape[0]), hidden.reshape(-1, hidden.shape[-1]), weight.t())
    return rows.view(residual.shape)


_linear_forward_op = torch.library.custom_op("accel_patch::swiglu_linear", _linear_forward, mutates_args=())


@register_fake(_linear_forward_op)
def _(gate, up, weight, bias, residual):
    return gate.new_empty((*gate.shape[:-1], weight.shape[0]))


def _linear_setup_context(ctx, inputs, output):
    gate, up, weight, bias, residual = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(gate, up, weight)  # not silu(gate) * up: recomputed below


def _linear_backward(ctx, dy):
    gate, up, weight = ctx.saved_tensors
    dy_rows = dy.reshape(-1, dy.shape[-1])
    weight_grad = ctx.needs_input_grad[2]  # a frozen projection (LoRA) never needs the gate's output at all
    dgate, dup, hidden = _swiglu_backward(dy @ weight, gate, up, weight_grad)
    dweight = dy_rows.t() @ hidden.reshape(-1, hidden.shape[-1]) if weight_grad else None
    dbias = dy_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return dgate, dup, dweight, dbias, dy if ctx.needs_input_grad[4] else None


_swiglu_linear = differentiable(_linear_forward_op, _linear_forward, _linear_setup_context, _linear_backward)


def swiglu_linear(
    gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(swiglu(gate, up), weight, bias)``, keeping only ``gate`` and ``up`` for the backward; with
    ``residual``, ``residual + F.linear(...)`` (a decoder layer's last residual add).

    Under ``torch.autocast`` the first four are cast to its dtype first, as ``F.linear`` would compute. Without a
    bias, a ``residual`` of the output's dtype is added inside the matmul, rounding the sum once where a separate
    add rounds the product and then the sum (the two differ by at most one unit in the last place); otherwise it
    is added as HF adds it.
    """
    _check_gate_up(gate, up)
    gate, up, weight, bias = autocast_cast(gate, up, weight, bias)
    check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != gate.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [out, {gate.shape[-1]}] for gate {tuple(gate.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} must be [{weight.shape[0]}]")
    extra = {} if bias is None else {"bias": bias}
    if len({t.dtype for t in (gate, weight, *extra.values())}) > 1:
        raise TypeError(f"gate ({gate.dtype}), weight ({weight.dtype}) and bias must share a dtype")
    if residual is not None:
        if tuple(residual.shape) != (*gate.shape[:-1], weight.shape[0]):
            raise ValueError(f"residual {tuple(residual.shape)} must be {(*gate.shape[:-1], weight.shape[0])}")
        extra["residual"] = residual
    check_same_device(gate=gate, weight=weight, **extra)
    if residual is not None and (bias is not None or residual.dtype != gate.dtype):
        return residual + _swiglu_linear(gate, up, weight, bias, None)
    return _swiglu_linear(gate, up, weight, bias, residual)
