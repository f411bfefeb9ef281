"""Fused linear cross-entropy: ``cross_entropy(hidden @ weight.T, labels)`` without the ``[tokens, vocab]`` logits.

The vocabulary goes through in column chunks, twice. Pass 1 computes each chunk's logits and folds them into
every row's running max and sum of exponentials (and picks up the label's logit), which gives the rows'
logsumexp and loss. Pass 2 recomputes each chunk's logits, a Triton kernel turns them in place into
d(loss)/d(logits) (``softmax - onehot``, already divided by the number of counted tokens), and the chunk's
gradients follow: its rows of d(loss)/d(weight) in one matmul over all tokens (accumulated in float32 inside
the matmul, rounded once), and its share of d(loss)/d(hidden), summed over chunks in float32. So the forward
pass also does the backward's work, and the backward only scales the stored gradients by the incoming one.

Chunking the vocabulary rather than the tokens costs one more logits matmul, but no float32 ``[vocab, hidden]``
buffer and no read-modify-write of it per chunk (measured on the H100: token chunks spent more time adding
into that buffer than the extra matmul costs here).

Numerics follow HF's ``ForCausalLMLoss``: logits in the input dtype, softmax in float32, mean over the labels
that are not ``ignore_index`` (or a sum divided by ``num_items``, as HF's Trainer passes it).
"""

from __future__ import annotations

import torch

from ._backend import autocast_cast, check_float, check_same_device, differentiable, use_triton
from ._triton import tl, triton

MAX_BLOCK_V = 4096  # vocab columns per step of a row's loop
COLUMNS_PER_HIDDEN = 4  # chunk logits hold 4x the hidden states' elements: large matmuls, a bounded buffer


@triton.jit
def _logsumexp_update_kernel(LOGITS, LABELS, ROW_MAX, ROW_SUM, LABEL_LOGIT, stride_row, V, col_start,
                             BLOCK_V: tl.constexpr):  # fmt: skip
    """One row of a chunk: merge its max and sum of exp into the row's running pair; keep the label's logit."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):  # a running max and sum of exp per lane
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        d = d * tl.exp(tl.where(m_new == float("-inf"), 0.0, m - m_new)) + tl.where(x == float("-inf"), 0.0,
                                                                                    tl.exp(x - m_new))  # fmt: skip
        m = m_new
    chunk_max = tl.max(m, 0)
    chunk_sum = tl.sum(tl.where(m == float("-inf"), 0.0, d * tl.exp(m - chunk_max)), 0)
    old_max = tl.load(ROW_MAX + row)
    new_max = tl.maximum(old_max, chunk_max)
    old_sum = tl.load(ROW_SUM + row)
    new_sum = tl.where(old_max == float("-inf"), 0.0, old_sum * tl.exp(old_max - new_max))
    new_sum += tl.where(chunk_max == float("-inf"), 0.0, chunk_sum * tl.exp(chunk_max - new_max))
    tl.store(ROW_MAX + row, new_max)
    tl.store(ROW_SUM + row, new_sum)
    local = tl.load(LABELS + row) - col_start  # ignore_index and labels of other chunks fall outside [0, V)
    inside = (local >= 0) & (local < V)
    label_logit = tl.load(base + local, mask=inside, other=0.0).to(tl.float32)
    tl.store(LABEL_LOGIT + row, label_logit, mask=inside)


@triton.jit
def _softmax_grad_kernel(LOGITS, LABELS, LSE, SCALE, stride_row, V, col_start, ignore_index, BLOCK_V: tl.constexpr):
    """One row of a chunk: overwrite its logits with (softmax - onehot) * SCALE, or 0 if the row is ignored."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    lse = tl.load(LSE + row)
    scale = tl.where(label != ignore_index, tl.load(SCALE), 0.0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
        grad = (tl.exp(x - lse) - tl.where(cols + col_start == label, 1.0, 0.0)) * scale
        tl.store(base + cols, grad.to(LOGITS.dtype.element_ty), mask=cols < V)


def _row_launch(logits: torch.Tensor) -> dict[str, int]:
    """Block width and warps of the per-row kernels (the CPU interpreter: small blocks)."""
    if not logits.is_cuda:
        return {"BLOCK_V": 64, "num_warps": 4}
    return {"BLOCK_V": min(MAX_BLOCK_V, triton.next_power_of_2(logits.shape[1])), "num_warps": 8}


def _logsumexp_update_triton(logits, labels, row_max, row_sum, label_logit, col_start: int) -> None:
    _logsumexp_update_kernel[(logits.shape[0],)](logits, labels, row_max, row_sum, label_logit, logits.stride(0),
                                                 logits.shape[1], col_start, **_row_launch(logits))  # fmt: skip


def _logsumexp_update_ref(logits, labels, row_max, row_sum, label_logit, col_start: int) -> None:
    """PyTorch form of the pass-1 kernel."""
    logits_f = logits.float()
    new_max = torch.maximum(row_max, logits_f.amax(dim=1))
    row_sum.mul_(torch.exp(row_max - new_max)).add_(torch.exp(logits_f - new_max[:, None]).sum(dim=1))
    row_max.copy_(new_max)
    local = labels - col_start
    inside = (local >= 0) & (local < logits.shape[1])
    picked = logits_f.gather(1, torch.where(inside, local, 0)[:, None])[:, 0]
    label_logit.copy_(torch.where(inside, picked, label_logit))


def _softmax_grad_triton(logits, labels, lse, scale, col_start: int, ignore_index: int) -> None:
    _softmax_grad_kernel[(logits.shape[0],)](logits, labels, lse, scale, logits.stride(0), logits.shape[1],
                                             col_start, ignore_index, **_row_launch(logits))  # fmt: skip


def _softmax_grad_ref(logits, labels, lse, scale, col_start: int, ignore_index: int) -> None:
    """PyTorch form of the pass-2 kernel."""
    grad = torch.exp(logits.float() - lse[:, None])
    cols = torch.arange(col_start, col_start + logits.shape[1], device=logits.device)
    grad -= (cols[None, :] == labels[:, None]).float()
    logits.copy_(grad * torch.where(labels != ignore_index, scale, 0.0)[:, None])


def _forward(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_items: torch.Tensor | None,
    ignore_index: int, weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, d loss / d hidden, d loss / d weight)``; the gradients come out of the same pass (the weight's
    only when ``weight_grad``: a frozen LM head, as under LoRA, skips that matmul and its buffer)."""
    tokens, width = hidden.shape
    vocab = weight.shape[0]
    if tokens == 0:  # no rows to launch kernels over: a zero loss, as with every label ignored
        grad_weight = torch.zeros(weight.shape if weight_grad else (0,), dtype=weight.dtype, device=weight.device)
        return hidden.new_zeros((), dtype=torch.float32), torch.zeros_like(hidden), grad_weight
    divisor = (labels != ignore_index).sum() if num_items is None else num_items.to(hidden.device)
    scale = (1.0 / divisor.float().clamp_min(1.0)).reshape(1)  # no host sync: the kernel reads it from memory
    triton_path = use_triton(hidden)
    update = _logsumexp_update_triton if triton_path else _logsumexp_update_ref
    to_grad = _softmax_grad_triton if triton_path else _softmax_grad_ref
    step = min(vocab, COLUMNS_PER_HIDDEN * width)
    chunks = [(start, min(start + step, vocab)) for start in range(0, vocab, step)]

    row_max = torch.full((tokens,), float("-inf"), dtype=torch.float32, device=hidden.device)
    row_sum = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)
    label_logit = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)
    for start, end in chunks:  # pass 1: logsumexp and the label's logit per row
        update(hidden @ weight[start:end].t(), labels, row_max, row_sum, label_logit, start)
    lse = row_max + torch.log(row_sum)
    loss = torch.where(labels != ignore_index, lse - label_logit, 0.0).sum() * scale[0]

    grad_weight = torch.empty(weight.shape if weight_grad else (0,), dtype=weight.dtype, device=weight.device)
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for start, end in chunks:  # pass 2: the logits' gradient, and from it both inputs' gradients
        logits = hidden @ weight[start:end].t()
        to_grad(logits, labels, lse, scale, start, ignore_index)
        grad_hidden += logits @ weight[start:end]
        if weight_grad:
            torch.mm(logits.t(), hidden, out=grad_weight[start:end])
    return loss, grad_hidden.to(hidden.dtype), grad_weight


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
    if torch.compiler.is_compiling():
        grad_hidden, grad_weight = grad_hidden * dloss.to(grad_hidden.dtype), grad_weight * dloss.to(grad_weight.dtype)
    else:
        # In place: a scaled copy would hold a second [vocab, hidden] gradient at the memory peak. The stored
        # gradients are ours alone; a second backward through the same graph is refused by autograd's
        # saved-tensor version check.
        grad_hidden.mul_(dloss.to(grad_hidden.dtype))
        grad_weight.mul_(dloss.to(grad_weight.dtype))
    return grad_hidden, grad_weight if ctx.weight_grad else None, None, None, None, None


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
    hidden, weight = autocast_cast(hidden, weight)  # under autocast, logits in its dtype as HF's lm_head makes them
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
