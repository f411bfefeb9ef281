"""Fused linear cross-entropy: ``cross_entropy(hidden @ weight.T, labels)`` without the ``[tokens, vocab]`` logits.

The tokens go through in chunks of ``hidden_size`` rows, so a chunk's logits are no larger than the LM head's
weight. For each chunk: one matmul gives its logits; a Triton kernel, one program per row, finds the row's
logsumexp and loss and overwrites the logits in place with d(loss)/d(logits) (``softmax - onehot``, already
divided by the number of counted tokens); two more matmuls give the chunk's rows of d(loss)/d(hidden) and add
its share into d(loss)/d(weight). So the forward pass also does the backward's work (three matmuls in all, as
unfused), and the backward only scales the stored gradients by the incoming one.

d(loss)/d(weight) is accumulated across chunks inside the matmul (``addmm``) in the weight's dtype: one rounding
per chunk and no float32 ``[vocab, hidden]`` buffer (1 GB at LLaMA-3.2-1B's sizes; batch 4 x 2048 is four
chunks). An earlier form walked the vocabulary instead, which needs a second logits matmul; on the H100 that
matmul took ~5.7 ms of a 134 ms training step, and this form took the step from 61.4k to 65.4k tokens/s.

Numerics follow HF's ``ForCausalLMLoss``: logits in the input dtype, softmax in float32, mean over the labels
that are not ``ignore_index`` (or a sum divided by ``num_items``, as HF's Trainer passes it).

A tied LM head (the embedding's weight) gets a second gradient from the embedding lookup, which PyTorch builds as a
zero-filled ``[vocab, hidden]`` tensor with the tokens' rows added, then adds to this one over the whole
``[vocab, hidden]`` (H100, LLaMA-3.2-1B: 1.0 ms of a training step). :func:`embedding_for_tied_head` does the
lookup so that the loss's backward, which runs first, hands its gradient over instead, and the lookup's backward
adds its tokens' rows into it (:func:`add_embedding_rows`) and returns the one sum: the same numbers.
"""

from __future__ import annotations

import threading
import weakref

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
    tracing,
    use_triton,
)
from ._triton import cached_launch, cdiv, next_power_of_2, tl, triton

MAX_BLOCK_V = 4096  # vocab columns per step of a row's loop


@cached_launch
@triton.jit
def _cross_entropy_rows_kernel(LOGITS, LABELS, ROW_LOSS, SCALE, stride_row, V, ignore_index,
                               WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """One row: its loss (``logsumexp - label logit``, 0 if ignored); with WRITE_GRAD its logits become
    ``(softmax - onehot) * SCALE`` in place (0 if ignored)."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):  # a running max and sum of exp per lane
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        d = d * tl.exp(tl.where(m_new == float("-inf"), 0.0, m - m_new)) + tl.where(x == float("-inf"), 0.0,
                                                                                    tl.exp(x - m_new))  # fmt: skip
        m = m_new
    row_max = tl.max(m, 0)
    lse = row_max + tl.log(tl.sum(tl.where(m == float("-inf"), 0.0, d * tl.exp(m - row_max)), 0))
    counted = label != ignore_index
    label_logit = tl.load(base + label, mask=counted, other=0.0).to(tl.float32)
    tl.store(ROW_LOSS + row, tl.where(counted, lse - label_logit, 0.0))
    if WRITE_GRAD:
        scale = tl.where(counted, tl.load(SCALE), 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
            tl.store(base + cols, grad.to(LOGITS.dtype.element_ty), mask=cols < V)


def _cross_entropy_rows_triton(logits, labels, row_loss, scale, ignore_index: int, write_grad: bool) -> None:
    if logits.is_cuda:
        launch = {"BLOCK_V": min(MAX_BLOCK_V, next_power_of_2(logits.shape[1])), "num_warps": 8}
    else:  # the CPU interpreter: small blocks
        launch = {"BLOCK_V": 64, "num_warps": 4}
    _cross_entropy_rows_kernel[(logits.shape[0],)](logits, labels, row_loss, scale, logits.stride(0),
                                                   logits.shape[1], ignore_index, WRITE_GRAD=write_grad,
                                                   **launch)  # fmt: skip


def _cross_entropy_rows_ref(logits, labels, row_loss, scale, ignore_index: int, write_grad: bool) -> None:
    """PyTorch form of the row kernel."""
    logits_f = logits.float()
    lse = torch.logsumexp(logits_f, dim=1)
    counted = labels != ignore_index
    label_col = torch.where(counted, labels, 0)[:, None]
    row_loss.copy_(torch.where(counted, lse - logits_f.gather(1, label_col)[:, 0], 0.0))
    if write_grad:
        grad = torch.exp(logits_f - lse[:, None]).scatter_add_(1, label_col, -torch.ones_like(lse)[:, None])
        logits.copy_(grad * torch.where(counted, scale, 0.0)[:, None])


@cached_launch
@triton.jit
def _scale_kernel(X, FACTOR, n, BLOCK: tl.constexpr):
    """``X *= FACTOR[0]`` in place, the factor read from device memory. A factor of 1 (``loss.backward()``) leaves
    X unread and unwritten: the pass over the LM head's gradient would change nothing."""
    factor = tl.load(FACTOR).to(tl.float32)
    if factor != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(X + offsets, mask=mask).to(tl.float32)
        tl.store(X + offsets, (x * factor).to(X.dtype.element_ty), mask=mask)


SCALE_BLOCK = 8192


def scale_in_place(t: torch.Tensor, factor: torch.Tensor) -> None:
    """``t *= factor`` for a contiguous ``t`` and a one-element ``factor`` on its device. A Triton kernel on CUDA:
    ``mul_`` by a 0-dim CUDA tensor takes PyTorch's broadcasting path, which ran at about half of the copy bandwidth
    on the LM head's [vocab, hidden] gradient (0.7 ms of an H100 training step)."""
    if use_triton(t) and t.is_contiguous() and t.numel():
        _scale_kernel[(cdiv(t.numel(), SCALE_BLOCK),)](t, factor, t.numel(), BLOCK=SCALE_BLOCK, num_warps=8)
        torch.autograd.graph.increment_version(t)  # as mul_ would: a second backward must see t was modified
    else:
        t.mul_(factor.to(t.dtype))


@cached_launch
@triton.jit
def _add_rows_kernel(GRAD, SORTED_IDS, ORDER, ROWS, stride_grad, stride_rows, n_tokens, width, padding_idx,
                     BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    """``GRAD[v] += sum(ROWS[t] for the tokens t of id v)`` over a column block. The ids come sorted (ORDER: each
    one's token); the program at the first of a run of equal ids sums the run's rows in float32, in token order, and
    rounds the sum to ROWS' dtype before adding it, as the lookup's own gradient would be rounded: no atomics, the
    same result every run. ``padding_idx`` rows get nothing, as in ``F.embedding``."""
    start = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < width
    token_id = tl.load(SORTED_IDS + start)
    previous = tl.load(SORTED_IDS + tl.maximum(start - 1, 0))
    if (token_id != padding_idx) & ((start == 0) | (previous != token_id)):
        total = tl.zeros([BLOCK_H], tl.float32)
        first = start
        more = start >= 0
        while more:
            positions = first + tl.arange(0, BLOCK_T)
            same = tl.load(SORTED_IDS + positions, mask=positions < n_tokens, other=-1) == token_id
            tokens = tl.load(ORDER + positions, mask=same, other=0)
            rows = tl.load(ROWS + tokens.to(tl.int64)[:, None] * stride_rows + cols[None, :],
                           mask=same[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
            total += tl.sum(rows.to(tl.float32), 0)
            first += BLOCK_T
            more = tl.sum(same.to(tl.int32), 0) == BLOCK_T  # a full block: the run may go on
        target = GRAD + token_id.to(tl.int64) * stride_grad + cols
        summed = total.to(ROWS.dtype.element_ty).to(tl.float32)
        current = tl.load(target, mask=col_ok).to(tl.float32)
        tl.store(target, (current + summed).to(GRAD.dtype.element_ty), mask=col_ok)


def add_embedding_rows_ref(grad: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, padding_idx: int) -> None:
    """PyTorch reference, with PyTorch's own numbers: the lookup's dense gradient (``padding_idx`` < 0: none), then
    added."""
    grad.add_(torch.ops.aten.embedding_dense_backward(rows, ids, grad.shape[0], padding_idx, False))


def _add_embedding_rows_impl(grad: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, padding_idx: int) -> None:
    if not (use_triton(grad) and grad.is_contiguous()):
        add_embedding_rows_ref(grad, ids, rows, padding_idx)
    elif ids.numel():
        sorted_ids, order = torch.sort(ids, stable=True)
        # H100, 8192 tokens x 2048: 4 x 1024 took 46 us on random ids (8 x 512: 171; PyTorch's dense lookup
        # gradient and its add, 1.04 ms); with a quarter of the tokens one id, 526 us (that run is one program's loop)
        block_t, block_h = (4, min(1024, next_power_of_2(rows.shape[1]))) if grad.is_cuda else (4, 16)
        _add_rows_kernel[(ids.numel(), cdiv(rows.shape[1], block_h))](
            grad, sorted_ids, order, rows, grad.stride(0), rows.stride(0), ids.numel(), rows.shape[1], padding_idx,
            BLOCK_T=block_t, BLOCK_H=block_h,
        )  # fmt: skip
    torch.autograd.graph.increment_version(grad)


_add_embedding_rows = eager_or_compiled(
    torch.library.custom_op("accel_patch::add_embedding_rows", _add_embedding_rows_impl, mutates_args=("grad",)),
    _add_embedding_rows_impl,
)


def add_embedding_rows(grad: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, padding_idx: int | None) -> None:
    """``grad += `` the gradient an embedding lookup of ``ids`` (``[...]``) gets from the output gradient ``rows``
    (``[..., hidden]``), in place, without building that gradient's ``[vocab, hidden]`` tensor."""
    _add_embedding_rows(grad, ids.reshape(-1), as_rows(rows), -1 if padding_idx is None else padding_idx)


class TiedHeadGradient:
    """One forward pass's hand-over of the fused loss's weight gradient to the embedding lookup of the same (tied)
    weight: see the module's docstring. The loss's backward gives its gradient to the lookup only while the lookup's
    backward has not run and will run in this backward pass (else it returns it itself: nothing is lost whatever
    the graph); the lookup's backward takes it, adds its rows and returns the sum. A lock: autograd may run the two
    on different devices' threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._grad: torch.Tensor | None = None
        self._lookup_node = None  # the lookup's autograd node (holds this object only weakly: no cycle)
        self._claimed = False

    def hand_over(self, grad: torch.Tensor) -> bool:
        will_run = getattr(torch._C, "_will_engine_execute_node", None)
        with self._lock:
            if self._claimed or self._lookup_node is None or will_run is None or not will_run(self._lookup_node):
                return False
            self._grad = grad
            return True

    def claim(self) -> torch.Tensor | None:
        with self._lock:
            self._claimed = True
            grad, self._grad, self._lookup_node = self._grad, None, None
            return grad


class _TiedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx, handover):
        ctx.save_for_backward(ids)
        ctx.vocab, ctx.handover = weight.shape[0], weakref.ref(handover)
        ctx.padding_idx = -1 if padding_idx is None else padding_idx  # aten's "none"
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_embeds):
        (ids,) = ctx.saved_tensors
        handover = ctx.handover()
        head_grad = handover.claim() if handover is not None else None
        if head_grad is None:  # the loss kept its gradient: the lookup's own, as nn.Embedding's backward gives it
            own = torch.ops.aten.embedding_dense_backward(grad_embeds, ids, ctx.vocab, ctx.padding_idx, False)
            return None, own, None, None
        add_embedding_rows(head_grad, ids, grad_embeds, ctx.padding_idx)
        return None, head_grad, None, None


def embedding_for_tied_head(
    ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None
) -> tuple[torch.Tensor, TiedHeadGradient | None]:
    """``F.embedding(ids, weight, padding_idx)``, and the object to pass as ``tied_head`` to
    :func:`linear_cross_entropy` over the same ``weight``, so that the weight's two gradients are summed without a
    ``[vocab, hidden]`` pass (None, and a plain lookup, where no gradient is wanted or under ``torch.compile``)."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must be int64 or int32, got {ids.dtype}")
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and weight.requires_grad):
        return F.embedding(ids, weight, padding_idx), None
    handover = TiedHeadGradient()
    embeds = _TiedLookup.apply(ids, weight, padding_idx, handover)
    handover._lookup_node = embeds.grad_fn
    return embeds, handover


def _forward(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_items: torch.Tensor | None,
    ignore_index: int, hidden_grad: bool, weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, d loss / d hidden, d loss / d weight)``; each gradient only when asked for (empty otherwise: a
    frozen LM head, as under LoRA, skips that matmul and its buffer; no gradient at all skips the rewrite)."""
    tokens, width = hidden.shape
    grad_hidden = torch.empty(hidden.shape if hidden_grad else (0,), dtype=hidden.dtype, device=hidden.device)
    grad_weight = torch.empty(weight.shape if weight_grad else (0,), dtype=weight.dtype, device=weight.device)
    if tokens == 0:  # no rows to launch kernels over: a zero loss, as with every label ignored
        return hidden.new_zeros((), dtype=torch.float32), grad_hidden, grad_weight.zero_()
    divisor = (labels != ignore_index).sum() if num_items is None else num_items.to(hidden.device)
    scale = (1.0 / divisor.float().clamp_min(1.0)).reshape(1)  # no host sync: the kernel reads it from memory
    rows = _cross_entropy_rows_triton if use_triton(hidden) else _cross_entropy_rows_ref
    row_loss = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
    for start in range(0, tokens, width):  # chunks of `width` tokens: logits no larger than the weight
        end = min(start + width, tokens)
        logits = hidden[start:end] @ weight.t()
        rows(logits, labels[start:end], row_loss[start:end], scale, ignore_index, hidden_grad or weight_grad)
        if hidden_grad:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if weight_grad and start == 0:
            torch.mm(logits.t(), hidden[start:end], out=grad_weight)
        elif weight_grad:
            grad_weight.addmm_(logits.t(), hidden[start:end])
    return row_loss.sum() * scale[0], grad_hidden, grad_weight


_forward_op = torch.library.custom_op("accel_patch::linear_cross_entropy", _forward, mutates_args=())


@register_fake(_forward_op)
def _(hidden, weight, labels, num_items, ignore_index, hidden_grad, weight_grad):
    grad_hidden = torch.empty_like(hidden) if hidden_grad else hidden.new_empty((0,))
    grad_weight = torch.empty_like(weight) if weight_grad else weight.new_empty((0,))
    return hidden.new_empty((), dtype=torch.float32), grad_hidden, grad_weight


def _setup_context(ctx, inputs, output):
    _, grad_hidden, grad_weight = output
    ctx.mark_non_differentiable(grad_hidden, grad_weight)  # outputs for the backward, not for the caller
    ctx.set_materialize_grads(False)
    ctx.wants = inputs[-2:]
    ctx.save_for_backward(grad_hidden, grad_weight)


def _backward(ctx, dloss, _dgrad_hidden, _dgrad_weight):
    grad_hidden, grad_weight = ctx.saved_tensors
    if dloss is None:
        return None, None, None, None, None, None, None
    if tracing(grad_hidden, grad_weight, dloss):
        grad_hidden, grad_weight = grad_hidden * dloss.to(grad_hidden.dtype), grad_weight * dloss.to(grad_weight.dtype)
    else:
        # In place: a scaled copy would hold a second [vocab, hidden] gradient at the memory peak. The stored
        # gradients are ours alone; a second backward through the same graph is refused by autograd's
        # saved-tensor version check.
        scale_in_place(grad_hidden, dloss)
        scale_in_place(grad_weight, dloss)
    hidden_grad, weight_grad = ctx.wants
    tied_head = getattr(ctx, "tied_head", None)  # set by linear_cross_entropy
    if weight_grad and tied_head is not None and tied_head.hand_over(grad_weight):
        weight_grad = False  # the embedding lookup's backward returns the sum
    return grad_hidden if hidden_grad else None, grad_weight if weight_grad else None, None, None, None, None, None


_linear_cross_entropy = differentiable(_forward_op, _forward, _setup_context, _backward)


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int = -100) -> None:
    """Refuse a label outside ``[0, vocab_size)`` that is not ``ignore_index`` (it would index past the logits).
    Reading the answer waits for the GPU to reach this point (a host sync); under ``torch.compile`` tracing there
    is no answer to read, and the check is skipped."""
    if torch.compiler.is_compiling():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        raise ValueError(f"labels hold {int(labels[bad][0])}, outside [0, {vocab_size}) and not "
                         f"ignore_index={ignore_index}")  # fmt: skip


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
    num_items: int | torch.Tensor | None = None, labels_checked: bool = False,
    tied_head: TiedHeadGradient | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` (already aligned: no shift here), as a float32
    scalar: the mean over labels that are not ``ignore_index``, or their sum divided by ``num_items``.

    ``hidden``: ``[..., H]``; ``weight``: ``[V, H]`` (the LM head, tied or not); ``labels``: ``hidden``'s shape
    without ``H``. The ``[tokens, V]`` logits are never held whole. ``labels_checked=True`` skips
    :func:`check_labels` (for callers that ran it before queueing the forward, where its host sync costs nothing:
    here it would stall the host until the GPU has finished the whole forward). ``tied_head``: from
    :func:`embedding_for_tied_head` over this ``weight``.
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [vocab, {hidden.shape[-1]}] for hidden "
                         f"{tuple(hidden.shape)}")  # fmt: skip
    if tuple(labels.shape) != tuple(hidden.shape[:-1]) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be integer of shape {tuple(hidden.shape[:-1])}, got {labels.dtype} "
                         f"{tuple(labels.shape)}")  # fmt: skip
    lookup_weight = weight
    hidden, weight = autocast_cast(hidden, weight)  # under autocast, logits in its dtype as HF's lm_head makes them
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    check_same_device(hidden=hidden, weight=weight, labels=labels)
    labels = labels.reshape(-1).to(torch.int64)
    if not labels_checked:
        check_labels(labels, weight.shape[0], ignore_index)
    if num_items is not None and not isinstance(num_items, torch.Tensor):
        num_items = torch.tensor(float(num_items))
    hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    grad_on = torch.is_grad_enabled()
    loss, _, _ = _linear_cross_entropy(hidden, weight, labels, num_items, int(ignore_index),
                                       grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    if tied_head is not None and weight is lookup_weight and loss.grad_fn is not None:  # a cast weight: its own
        loss.grad_fn.tied_head = tied_head
    return loss
