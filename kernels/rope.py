"""Rotary position embedding in HF's half-split ("rotate_half") convention, q and k in one launch.

q ``[batch, q_heads, seq, head_dim]`` and k ``[batch, kv_heads, seq, head_dim]`` in any strides: HF's
transposed projections are read in place, and outputs keep the inputs' memory layout. ``cos``/``sin``
exactly as HF's rotary module returns them, ``[batch or 1, seq, head_dim]`` (or ``[seq, head_dim]``), which
covers every rope scaling type and arbitrary position_ids.
"""

from __future__ import annotations

import torch

from ._backend import (
    check_float,
    check_same_device,
    differentiable,
    eager_or_compiled,
    register_fake,
    unit_last_stride,
    use_triton,
)
from ._triton import cached_launch, cdiv, next_power_of_2, tl, triton


@triton.jit
def _rotate_heads(
    IN, OUT, s_in_b, s_in_h, s_in_s, s_out_b, s_out_h, s_out_s, b, s, s_mask, n_heads,
    cos1, cos2, sin1, sin2, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # [tokens, heads, half] tile: coalesced whether heads or tokens are the outer memory dim.
    heads = tl.arange(0, BLOCK_H)[None, :, None]
    dims = tl.arange(0, BLOCK_HALF)[None, None, :]
    mask = s_mask & (heads < n_heads) & (dims < HALF)
    src = IN + b * s_in_b + s * s_in_s + heads * s_in_h + dims
    dst = OUT + b * s_out_b + s * s_out_s + heads * s_out_h + dims
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (x1 * cos1 - x2 * sin1).to(OUT.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos2 + x1 * sin2).to(OUT.dtype.element_ty), mask=mask)


@cached_launch
@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS, SIN,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s,
    sqo_b, sqo_h, sqo_s, sko_b, sko_h, sko_s,
    sc_b, sc_s, seq_len, n_q_heads, n_k_heads,
    HALF: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr,
):
    s_blocks = tl.cdiv(seq_len, BLOCK_S)
    b = (tl.program_id(0) // s_blocks).to(tl.int64)
    s = ((tl.program_id(0) % s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)[:, None, None]
    s_mask = s < seq_len
    dims = tl.arange(0, BLOCK_HALF)[None, None, :]
    trig_mask = s_mask & (dims < HALF)
    trig = b * sc_b + s * sc_s + dims
    cos1 = tl.load(COS + trig, mask=trig_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + trig + HALF, mask=trig_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + trig, mask=trig_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + trig + HALF, mask=trig_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # The transpose of the rotation is the same rotation with the sin halves swapped and negated.
        sin1, sin2 = -sin2, -sin1
    _rotate_heads(Q, QO, sq_b, sq_h, sq_s, sqo_b, sqo_h, sqo_s, b, s, s_mask, n_q_heads,
                  cos1, cos2, sin1, sin2, HALF, BLOCK_Q, BLOCK_HALF)
    _rotate_heads(K, KO, sk_b, sk_h, sk_s, sko_b, sko_h, sko_s, b, s, s_mask, n_k_heads,
                  cos1, cos2, sin1, sin2, HALF, BLOCK_K, BLOCK_HALF)


TILE_ELEMS = 8192  # elements of one [tokens, heads, half] tile: enough bytes in flight per program


def _out_like(t: torch.Tensor) -> torch.Tensor:
    """Output buffer in t's memory layout (HF's transposed q/k stay transposed), last dim contiguous."""
    return torch.empty_like(t) if t.stride(-1) == 1 else t.new_empty(t.shape)


def _trig_strides(cos: torch.Tensor) -> tuple[int, int]:
    """(batch, seq) strides of cos/sin, the batch stride 0 when one row of positions serves all."""
    if cos.dim() == 2:
        return 0, cos.stride(0)
    return (0 if cos.shape[0] == 1 else cos.stride(0)), cos.stride(1)


def _rope_triton(q, k, cos, sin, backward, tile_elems=TILE_ELEMS):
    q_out, k_out = _out_like(q), _out_like(k)
    q, k, cos, sin = (unit_last_stride(t) for t in (q, k, cos, sin))
    batch, n_q, seq, head_dim = q.shape
    n_k = k.shape[1]
    half = head_dim // 2
    sc_b, sc_s = _trig_strides(cos)
    block_half = next_power_of_2(half)
    block_q, block_k = next_power_of_2(n_q), next_power_of_2(n_k)
    block_s = min(max(tile_elems // (block_q * block_half), 1), next_power_of_2(max(seq, 1)))
    if batch * seq > 0:
        _rope_kernel[(batch * cdiv(seq, block_s),)](
            q, k, q_out, k_out, cos, sin, *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3],
            sc_b, sc_s, seq, n_q, n_k,
            HALF=half, BLOCK_S=block_s, BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_HALF=block_half,
            BACKWARD=backward, num_warps=8 if block_s * block_q * block_half >= 4096 else 4,
        )  # fmt: skip
    return q_out, k_out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference in float32; ``backward=True`` applies the transposed rotation."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    if backward:
        half = sin.shape[-1] // 2
        sin = -torch.cat((sin[..., half:], sin[..., :half]), dim=-1)
    # outputs keep the inputs' memory layout, as the kernel's do
    rotated = [_out_like(x).copy_(x.float() * cos + rotate_half(x.float()) * sin) for x in (q, k)]
    return rotated[0], rotated[1]


def _forward(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q):
        return _rope_triton(q, k, cos, sin, backward)
    return rope_ref(q, k, cos, sin, backward)


_rope_op = torch.library.custom_op("accel_patch::apply_rope", _forward, mutates_args=())


@register_fake(_rope_op)
def _(q, k, cos, sin, backward):
    return _out_like(q), _out_like(k)


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, backward = inputs
    ctx.backward = backward
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    # The gradient of a rotation is the transposed rotation: the same kernel with BACKWARD flipped.
    dq_in, dk_in = _rope_transposed(dq, dk, cos, sin, not ctx.backward)
    return dq_in, dk_in, None, None, None


_rope = differentiable(_rope_op, _forward, _setup_context, _backward)
_rope_transposed = eager_or_compiled(_rope_op, _forward)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k like HF's ``apply_rotary_pos_emb(q, k, cos, sin)``; gradients flow to q and k."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(name, t)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be [batch, heads, seq, head_dim], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    # plain tuples: comparing torch.Size goes through symbolic-shape helpers, ~10 µs each
    batch, _, seq, head_dim = tuple(q.shape)
    if k.shape[0] != batch or k.shape[2] != seq or k.shape[3] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} must share batch, seq and head_dim with q {tuple(q.shape)}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for half-split rotary embedding, got {head_dim}")
    if tuple(cos.shape) != tuple(sin.shape):
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    trig_ok = cos.dim() in (2, 3) and tuple(cos.shape[-2:]) == (seq, head_dim)
    if trig_ok and cos.dim() == 3:
        trig_ok = cos.shape[0] in (1, batch)
    if not trig_ok:
        batches = "1" if batch == 1 else f"{batch} or 1"
        raise ValueError(
            f"cos/sin must be [{batches}, {seq}, {head_dim}] or [{seq}, {head_dim}] (as HF's rotary embedding "
            f"returns them), got {tuple(cos.shape)}"
        )
    check_same_device(q=q, k=k, cos=cos, sin=sin)
    return _rope(q, k, cos, sin, False)
