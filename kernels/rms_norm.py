"""RMSNorm, optionally fused with the residual add that precedes it in a decoder layer.

Numerics follow HF's LlamaRMSNorm exactly: statistics in float32, the normalised row rounded to the
input dtype before it meets the weight, output in ``promote(x.dtype, weight.dtype)``.
"""

from __future__ import annotations

import torch

from ._backend import (
    as_rows,
    check_float,
    check_same_device,
    differentiable,
    eager_or_compiled,
    register_fake,
    sm_count,
    use_triton,
)
from ._triton import cached_launch, cdiv, next_power_of_2, tl, triton

MAX_WIDTH = 65536  # one row is held in registers by one program


@cached_launch
@triton.jit
def _rms_norm_fwd_kernel(
    X,
    RES,
    W,
    Y,
    H,
    RSTD,
    stride_x,
    stride_res,
    stride_y,
    stride_h,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(RES + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        # HF adds in the activation dtype, so the normalised value is that rounded sum.
        x_rounded = x.to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, x_rounded, mask=mask)
        x = x_rounded.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    x_hat = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (x_hat * w).to(Y.dtype.element_ty), mask=mask)


@cached_launch
@triton.jit
def _rms_norm_bwd_kernel(
    DY, DH, X, W, RSTD, DX, DW_PARTIAL,
    stride_dy, stride_dh, stride_x, stride_dx,
    M, N, rows_per_program,
    HAS_DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Each program owns a band of rows and keeps its share of dW in registers, so the weight
    # gradient needs one small [programs, N] reduction instead of M atomic adds. BLOCK_M rows per
    # step keep several rows' loads in flight.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(0, rows_per_program, BLOCK_M):
        rows = pid.to(tl.int64) * rows_per_program + i + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)[:, None]
        x_hat = x * rstd
        dw += tl.sum(dy * x_hat.to(X.dtype.element_ty).to(tl.float32), axis=0)
        g = dy * w[None, :]
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=1) / N)[:, None])
        if HAS_DH:
            dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_mask)


def _launch_config(n: int) -> tuple[int, int]:
    block = next_power_of_2(n)
    return block, min(max(block // 256, 1), 16)


# Backward tiling, chosen with benchmarks/tune_kernels.py on an H100 at 16384 x 4096 bf16:
# 4 rows x 4096 per step, 8 warps, one program per SM reached 85% of copy bandwidth (2 rows,
# 16 warps, 4 per SM: 70%).
BWD_TILE_ELEMS = 16384
BWD_PROGRAMS_PER_SM = 1


def _bwd_config(n: int, m: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, programs) for the backward of m rows of width n."""
    block_n = next_power_of_2(n)
    block_m = max(1, min(BWD_TILE_ELEMS // block_n, 16))
    warps = 8 if block_m * block_n >= 8192 else 4
    # the CPU interpreter runs programs one by one; a few exercise the split
    programs = sm_count(device.index) * BWD_PROGRAMS_PER_SM if device.type == "cuda" else 4
    return block_m, block_n, warps, max(min(programs, cdiv(m, block_m)), 1)


def _fwd_triton(x, weight, residual, eps, out_dtype):
    n = x.shape[-1]
    x2 = as_rows(x)
    m = x2.shape[0]
    y = x.new_empty((m, n), dtype=out_dtype)
    rstd = x.new_empty(m, dtype=torch.float32)
    if residual is not None:
        res2 = as_rows(residual)
        h = x.new_empty((m, n))
    else:
        res2, h = x2, y  # unused by the kernel; any tensor keeps the signature uniform
    block, warps = _launch_config(n)
    if m > 0:
        _rms_norm_fwd_kernel[(m,)](
            x2,
            res2,
            weight,
            y,
            h,
            rstd,
            x2.stride(0),
            res2.stride(0),
            y.stride(0),
            h.stride(0),
            n,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK_N=block,
            num_warps=warps,
        )
    h_out = h.view(x.shape) if residual is not None else x.new_empty(0)
    return y.view(x.shape), h_out, rstd


def _bwd_triton(dy, dh, x, weight, rstd, config=None):
    n = x.shape[-1]
    dy2, x2 = as_rows(dy), as_rows(x)
    m = x2.shape[0]
    dx = x.new_empty((m, n))
    block_m, block_n, warps, programs = config or _bwd_config(n, m, x.device)
    rows_per_program = cdiv(cdiv(m, programs), block_m) * block_m
    programs = max(cdiv(m, rows_per_program), 1)
    dw_partial = x.new_empty((programs, n), dtype=torch.float32)
    dh2 = as_rows(dh) if dh is not None else dy2
    if m > 0:
        _rms_norm_bwd_kernel[(programs,)](
            dy2, dh2, x2, weight, rstd, dx, dw_partial,
            dy2.stride(0), dh2.stride(0), x2.stride(0), dx.stride(0), m, n, rows_per_program,
            HAS_DH=dh is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )  # fmt: skip
    else:
        dw_partial.zero_()
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch reference: returns ``(y, x + residual or empty, rstd)`` like the kernel."""
    h = x + residual if residual is not None else x
    hf = h.float()
    rstd = torch.rsqrt(hf.pow(2).mean(-1) + eps)
    y = (weight * (hf * rstd.unsqueeze(-1)).to(x.dtype)).contiguous()
    h_out = h.contiguous() if residual is not None else x.new_empty(0)
    return y, h_out, rstd.reshape(-1)


def rms_norm_bwd_ref(
    dy: torch.Tensor, dh: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of the backward; ``x`` is the normalised input (the sum when fused)."""
    n = x.shape[-1]
    xf, dyf = x.float().reshape(-1, n), dy.float().reshape(-1, n)
    x_hat = xf * rstd.unsqueeze(-1)
    dw = (dyf * x_hat.to(x.dtype).float()).sum(0).to(weight.dtype)
    g = dyf * weight.float()
    dx = rstd.unsqueeze(-1) * (g - x_hat * (g * x_hat).sum(-1, keepdim=True) / n)
    if dh is not None:
        dx = dx + dh.float().reshape(-1, n)
    return dx.to(x.dtype).reshape(x.shape).contiguous(), dw


def _forward(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return _fwd_triton(x, weight, residual, eps, torch.promote_types(x.dtype, weight.dtype))
    return rms_norm_ref(x, weight, residual, eps)


def _backward_impl(
    dy: torch.Tensor, dh: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return _bwd_triton(dy, dh, x, weight, rstd)
    return rms_norm_bwd_ref(dy, dh, x, weight, rstd)


_forward_op = torch.library.custom_op("accel_patch::rms_norm", _forward, mutates_args=())
_backward_op = torch.library.custom_op("accel_patch::rms_norm_backward", _backward_impl, mutates_args=())


@register_fake(_forward_op)
def _(x, weight, residual, eps):
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return y, h, x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@register_fake(_backward_op)
def _(dy, dh, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


_rms_norm_backward = eager_or_compiled(_backward_op, _backward_impl)


def _setup_context(ctx, inputs, output):
    x, weight, residual, _ = inputs
    _, h, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)


def _backward(ctx, dy, dh, _drstd):
    normed_input, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_backward(dy, dh if ctx.has_residual else None, normed_input, weight, rstd)
    return dx, dw, dx if ctx.has_residual else None, None


_rms_norm = differentiable(_forward_op, _forward, _setup_context, _backward)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    check_float("x", x)
    check_float("weight", weight)
    if x.dim() == 0 or tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}"
        )
    if x.shape[-1] > MAX_WIDTH:
        raise ValueError(f"rms_norm supports rows of at most {MAX_WIDTH} elements, got {x.shape[-1]}")
    if residual is not None:
        if tuple(residual.shape) != tuple(x.shape) or residual.dtype != x.dtype:
            raise ValueError(
                f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}"
            )
        check_same_device(x=x, weight=weight, residual=residual)
    else:
        check_same_device(x=x, weight=weight)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``weight * x / rms(x)``; with ``residual``, returns ``(rms_norm(x + residual), x + residual)``."""
    _check(x, weight, residual)
    y, h, _ = _rms_norm(x, weight, residual, float(eps))
    return (y, h) if residual is not None else y


class _RMSNormKeepingInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, _, rstd = _forward(x, weight, None, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y, x  # autograd hands x back as a view whose gradient arrives here

    @staticmethod
    def backward(ctx, dy, dx_kept):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_backward(dy, dx_kept, x, weight, rstd)
        return dx, dw, None


def rms_norm_keeping_input(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x), x)``, for a pre-norm layer whose residual stream reads ``x`` too: the gradient reaching ``x``
    through the second output is added by the norm's backward kernel, where autograd would add the two
    gradients in a separate pass over memory."""
    _check(x, weight, None)
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return rms_norm(x, weight, eps), x  # compiled graphs schedule the add themselves
    return _RMSNormKeepingInput.apply(x, weight, float(eps))
