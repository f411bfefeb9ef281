"""Fused linear cross-entropy: ``cross_entropy(hidden @ weight.T, labels)`` without the ``[tokens, vocab]`` logits.

The tokens go through in chunks: a chunk's logits are computed, a Triton kernel turns them in place into the
loss rows and d(loss)/d(logits) (``softmax - onehot``, already divided by the number of counted tokens), and
the chunk's gradients to ``hidden`` and ``weight`` are accumulated before the next chunk reuses the buffer. So
the forward pass also does the backward's work, and the backward only scales the stored gradients by the
incoming one. Numerics follow HF's ``ForCausalLMLoss``: logits in the input dtype, softmax in float32, mean over
the labels that are not ``ignore_index`` (or a sum divided by ``num_items``, as HF's Trainer passes it).
"""

from __future__ import annotations

import torch

from ._backend import check_float, check_same_device, differentiable, use_triton
from ._triton import tl, triton

MAX_BLOCK_V = 4096  # vocab columns per step of a row's two passes


@triton.jit
def _cross_entropy_grad_kernel(LOGITS, LABELS, LOSS, SCALE, stride_row, V, ignore_index, BLOCK_V: tl.constexpr):
    """One row: write its loss, and overwrite its logits with (softmax - onehot) * SCALE (0 if ignored)."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    counted = label != ignore_index
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):  # pass 1: a running max and sum of exp per lane
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        d = d * tl.exp(tl.where(m_new == float("-inf"), 0.0, m - m_new)) + tl.where(x == float("-inf"), 0.0,
                                                                                    tl.exp(x - m_new))  # fmt: skip
        m = m_new
    row_max = tl.max(m, 0)
    lse = row_max + tl.log(tl.sum(d * tl.exp(m - row_max), 0))
    scale = tl.load(SCALE)
    label_logit = tl.load(base + label, mask=counted, other=0.0).to(tl.float32)
    tl.store(LOSS + row, tl.where(counted, lse - label_logit, 0.0))
    for start in range(0, V, BLOCK_V):  # pass 2: the gradient, in place
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
        grad = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
        grad = tl.where(counted, grad, 0.0)
        tl.store(base + cols, grad.to(LOGITS.dtype.element_ty), mask=cols < V)


def _logits_to_grad_triton(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int):
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    block = min(MAX_BLOCK_V, triton.next_power_of_2(vocab)) if logits.is_cuda else 64
    _cross_entropy_grad_kernel[(rows,)](logits, labels, loss, scale, logits.stride(0), vocab, ignore_index,
                                        BLOCK_V=block, num_warps=8 if logits.is_cuda else 4)  # fmt: skip
    return loss


def _logits_to_grad_ref(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int):
    """PyTorch form of the kernel: loss rows out, ``logits`` overwritten by the scaled gradient."""
    logits_f = logits.float()
    counted = labels != ignore_index
    safe_labels = torch.where(counted, labels, 0)
    lse = torch.logsumexp(logits_f, dim=-1)
    loss = torch.where(counted, lse - logits_f.gather(1, safe_labels[:, None])[:, 0], 0.0)
    grad = torch.softmax(logits_f, dim=-1)
    grad[torch.arange(len(labels), device=labels.device), safe_labels] -= 1.0
    logits.copy_(grad * scale * counted[:, None])
    return loss


def _rows_per_chunk(tokens: int, vocab: int, hidden: int) -> int:
    # Chunk logits about the size of the hidden states themselves (Liger's rule): a few hundred rows for a
    # 128k vocabulary, so the [chunk, vocab] buffer stays small and the matmuls stay large.
    return max(1, min(tokens, triton.next_power_of_2(triton.cdiv(tokens, max(1, vocab // hidden)))))


def _forward(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_items: torch.Tensor | None,
    ignore_index: int, weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, d loss / d hidden, d loss / d weight)``; the gradients come out of the same pass (the weight's
    only when ``weight_grad``: a frozen LM head, as under LoRA, skips that matmul and its buffer)."""
    tokens, width = hidden.shape
    vocab = weight.shape[0]
    divisor = (labels != ignore_index).sum() if num_items is None else num_items.to(hidden.device)
    scale = (1.0 / divisor.float().clamp_min(1.0)).reshape(1)  # no host sync: the kernel reads it from memory
    to_grad = _logits_to_grad_triton if use_triton(hidden) else _logits_to_grad_ref
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(weight.shape if weight_grad else (0,), dtype=torch.float32, device=weight.device)
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    step = _rows_per_chunk(tokens, vocab, width)
    for start in range(0, tokens, step):
        rows = slice(start, start + step)
        chunk = hidden[rows]
        logits = chunk @ weight.t()  # [rows, vocab], the input dtype like HF's lm_head
        loss_sum += to_grad(logits, labels[rows], scale, ignore_index).sum()
        grad_hidden[rows] = logits @ weight
        if weight_grad:
            grad_weight += (logits.t() @ chunk).float()
    return loss_sum * scale[0], grad_hidden, grad_weight.to(weight.dtype)


_forward_op = torch.library.custom_op("accel_patch::linear_cross_entropy", _forward, mutates_args=())


@_forward_op.register_fake
def _(hidden, weight, labels, num_items, ignore_index, weight_grad):
    grad_weight = torch.empty_like(weight) if weight_grad else weight.new_empty((0,))
    return hidden.new_empty((), dtype=torch.float32), torch.empty_like(hidden), grad_weight


def _setup_context(ctx, inputs, output):
    _, grad_hidden, grad_weight = output
    ctx.mark_non_differentiable(grad_hidden, grad_weight)  # outputs for the backward, not for the caller
    ctx.set_materialize_grads(False)
    ctx.weight_grad = inputs[-1]
    ctx.save_for_backward(grad_hidden, grad_weight)


def _backward(ctx, dloss, _dgrad_hidden, _dgrad_weight):
    grad_hidden, grad_weight = ctx.saved_tensors
    if dloss is None:
        return None, None, None, None, None, None
    dweight = grad_weight * dloss.to(grad_weight.dtype) if ctx.weight_grad else None
    return grad_hidden * dloss.to(grad_hidden.dtype), dweight, None, None, None, None


_linear_cross_entropy = differentiable(_forward_op, _forward, _setup_context, _backward)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` (already aligned: no shift here), as a float32
    scalar: the mean over labels that are not ``ignore_index``, or their sum divided by ``num_items``.

    ``hidden``: ``[..., H]``; ``weight``: ``[V, H]`` (the LM head, tied or not); ``labels``: ``hidden``'s shape
    without ``H``. The ``[tokens, V]`` logits are never held whole.
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [vocab, {hidden.shape[-1]}] for hidden "
                         f"{tuple(hidden.shape)}")  # fmt: skip
    if tuple(labels.shape) != tuple(hidden.shape[:-1]) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be integer of shape {tuple(hidden.shape[:-1])}, got {labels.dtype} "
                         f"{tuple(labels.shape)}")  # fmt: skip
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    check_same_device(hidden=hidden, weight=weight, labels=labels)
    labels = labels.reshape(-1).to(torch.int64)
    if not torch.compiler.is_compiling():  # a label past the vocabulary would index out of bounds
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"labels hold {int(labels[bad][0])}, outside [0, {weight.shape[0]}) and not "
                             f"ignore_index={ignore_index}")  # fmt: skip
    if num_items is not None and not isinstance(num_items, torch.Tensor):
        num_items = torch.tensor(float(num_items))
    hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    loss, _, _ = _linear_cross_entropy(hidden, weight, labels, num_items, int(ignore_index), weight.requires_grad)
    return loss
