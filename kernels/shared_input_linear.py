"""Several linear layers over one input (q/k/v projections, gate/up projections), with one input gradient.

Autograd gives a tensor read by several layers one gradient per reader and then adds them, one bf16 add
kernel per extra reader over ``[tokens, hidden]``. Here the backward accumulates the input's gradient inside
the GEMMs instead (``addmm_`` with beta=1: the add rides in cuBLAS's epilogue), so the sum is never a
separate pass over memory. Forward and weight gradients are exactly what separate ``F.linear`` calls give.

There is no Triton kernel: cuBLAS runs every product. The reference is the plain ``F.linear`` calls, which
is also what ``torch.compile`` traces (it schedules the additions itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import autocast_cast, check_float, check_same_device


def shared_input_linears_ref(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    """PyTorch reference: ``[F.linear(x, w, b) for w, b in zip(weights, biases)]``."""
    return [F.linear(x, weight, bias) for weight, bias in zip(weights, biases, strict=True)]


class _SharedInputLinears(torch.autograd.Function):
    """``apply(x, n, *weights, *biases)`` for ``n`` layers; a missing bias is None."""

    @staticmethod
    def forward(ctx, x, n, *parameters):
        weights, biases = parameters[:n], parameters[n:]
        ctx.n, ctx.has_bias = n, tuple(bias is not None for bias in biases)
        ctx.save_for_backward(x, *weights)
        return tuple(F.linear(x, weight, bias) for weight, bias in zip(weights, biases, strict=True))

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        n = ctx.n
        x_rows = x.reshape(-1, x.shape[-1])
        grad_rows = [g.reshape(-1, g.shape[-1]) for g in grads]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = grad_rows[0] @ weights[0]
            for g, weight in zip(grad_rows[1:], weights[1:], strict=True):
                dx.addmm_(g, weight)  # accumulated by the GEMM: no separate add over [tokens, hidden]
            dx = dx.view(x.shape)
        needs_weight = ctx.needs_input_grad[2 : 2 + n]
        needs_bias = ctx.needs_input_grad[2 + n :]
        dweights = [g.t() @ x_rows if needed else None for g, needed in zip(grad_rows, needs_weight, strict=True)]
        with_bias = [has and needed for has, needed in zip(ctx.has_bias, needs_bias, strict=True)]
        dbiases = [g.sum(0) if wanted else None for g, wanted in zip(grad_rows, with_bias, strict=True)]
        return dx, None, *dweights, *dbiases


def shared_input_linears(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None
) -> list[torch.Tensor]:
    """``[F.linear(x, w, b) for w, b in zip(weights, biases)]``, with the backward summing the gradients to ``x``
    inside the GEMMs. Under ``torch.autocast`` everything is cast to its dtype first, as ``F.linear`` would."""
    biases = [None] * len(weights) if biases is None else list(biases)
    if not weights or len(biases) != len(weights):
        raise ValueError(f"need one bias (or None) per weight, got {len(weights)} weights and {len(biases)} biases")
    if torch.compiler.is_compiling():
        return shared_input_linears_ref(x, weights, biases)
    x, *parameters = autocast_cast(x, *weights, *biases)
    weights, biases = parameters[: len(weights)], parameters[len(weights) :]
    check_float("x", x)  # the weights and biases must share its dtype, so they are float too
    dtype, width, device = x.dtype, x.shape[-1], x.device
    for i, (weight, bias) in enumerate(zip(weights, biases, strict=True)):  # per call: ints compared, no strings built
        if weight.dim() != 2 or weight.shape[1] != width:
            raise ValueError(f"weights[{i}] {tuple(weight.shape)} must be [out, {width}] for x {tuple(x.shape)}")
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
            raise ValueError(f"biases[{i}] {tuple(bias.shape)} must be [{weight.shape[0]}]")
        if weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
            raise TypeError(f"x ({dtype}), weights[{i}] ({weight.dtype}) and its bias must share a dtype")
        if weight.device != device or (bias is not None and bias.device != device):
            check_same_device(x=x, weight=weight, **({"bias": bias} if bias is not None else {}))
    tensors = [t for t in (*weights, *biases) if t is not None]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors))
    if not needs_grad:  # inference: no autograd node to build
        return shared_input_linears_ref(x, weights, biases)
    return list(_SharedInputLinears.apply(x, len(weights), *weights, *biases))
