"""FlashAttention-2-style attention: tiled online softmax, forward and backward, no seq x seq matrix in memory.

q ``[batch, q_heads, seq_q, head_dim]``, k/v ``[batch, kv_heads, seq_k, head_dim]`` (grouped-query heads
are read in place, never repeated); the output is ``[batch, seq_q, q_heads, head_dim]``, the layout HF's
attention functions return. Queries are the last ``seq_q`` positions of the keys (a KV cache before them).
Masks: causal, sliding window (HF's semantics: key ``j`` is seen by query ``i`` when
``i - window < j <= i``), a 2-D key padding mask, and a dense boolean mask ``[batch or 1, 1, seq_q, seq_k]``
(what HF builds for SDPA: padding, windows and static-cache positions in one). A query row with no visible
key outputs zeros. The user masks (padding, dense) are read only in the blocks where they hide something: a pass
over them per forward finds, per 128 queries (keys), the span of keys (queries) they hide anything from, and the
kernels split their loops around it; outside it, blocks run the unmasked loop.
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch

from ._backend import (
    check_float,
    check_same_device,
    differentiable,
    eager_or_compiled,
    interpreting,
    register_fake,
    sm_count,
    tile_choices,
    unit_last_stride,
    use_triton,
)
from ._triton import TensorDescriptor, cached_launch, cdiv, last_to_finish, next_power_of_2, split_counters, tl, triton

LOG2E = 1.4426950408889634
# Each kernel's tile (BLOCK_M, BLOCK_N, warps, stages) by head dim where TMA copies its tiles (one tile: the host
# builds the descriptors for it). Measured on an H100 at (4, 32/8 and 32/32, 2048), (1, 32, 8192) and
# (8, 32/8, 1024), against the same tiles through plain loads: forward +6-15%; dQ +3-5%; dK/dV +4% at
# (4, 32, 2048, 128), +32% at (8, 32/8, 1024, 128), even at head dim 64, -3% at (1, 32, 8192, 128).
# "fwd_long": the forward's tile from LONG_QUERIES queries on, where the larger tile's cheaper key loop outweighs
# its larger masked diagonal (H100, TFLOP/s against 64 x 64 / 4 / 3): head dim 128 with 128 x 128 / 8 / 3 at
# 4096 queries 482 vs 465 (GQA 500 vs 470), 8192 515 vs 489, 16384 564 vs 524, but 2048 412 vs 432; head dim 64
# with 64 x 128 / 4 / 3 at 8192 405 vs 394, 16384 440 vs 417, 4096 382 vs 384.
TMA_TILES = {
    "fwd": {64: (64, 64, 4, 3), 128: (64, 64, 4, 3)},
    "fwd_long": {64: (64, 128, 4, 3), 128: (128, 128, 8, 3)},
    "dq": {64: (64, 64, 4, 3), 128: (128, 64, 8, 3)},
    "dkdv": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2)},
}
LONG_QUERIES = {64: 8192, 128: 4096}
H100_L2_BYTES = 50 * 2**20  # the L2 cache that _heads_first assumes where there is none (the CPU interpreter)
HEADS_FIRST_UP_TO = {"forward": 1 / 2, "backward": 3 / 4}  # of the L2 cache, for K and V: see _heads_first
# Every tile side in the lists below divides this: sequences of a multiple of it have no ragged tile.
LARGEST_TILE = 128
# The masks' spans (see _mask_spans) are kept per MASK_CELL queries or keys: every tile lies in one cell.
MASK_CELL = tl.constexpr(LARGEST_TILE)
SPAN_FAR = tl.constexpr(1 << 30)  # past any position: a span's first position is stored as SPAN_FAR - first


@triton.jit
def _head_base(T, b, h, stride_b, stride_h, TMA: tl.constexpr):
    """Where one (batch, head)'s rows are read: with TMA the tensor descriptor itself (indexed by [batch, head, row,
    0] at each load), otherwise a pointer to the head's first row."""
    return T if TMA else T + b * stride_b + h * stride_h


@triton.jit
def _load_rows(base, rows, n_rows, stride_row, offs_d, HEAD_DIM: tl.constexpr):
    """[rows, BLOCK_D] tile of a (seq, head_dim) matrix, zero outside it."""
    mask = (rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    return tl.load(base + rows[:, None] * stride_row + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _load_tile(ptrs, rows_ok, d_ok, CHECK_ROWS: tl.constexpr, CHECK_D: tl.constexpr):
    """Load a tile, masking rows and the head-dim padding only where they can be out of range."""
    if CHECK_ROWS:
        tile = tl.load(ptrs, mask=rows_ok & d_ok, other=0.0)
    elif CHECK_D:
        tile = tl.load(ptrs, mask=d_ok, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _visible(offs_m, offs_n, b, seq_q, seq_k, q_offset, window, MASK, sm_b, sm_q, sm_k, KPM, skpm_b,
             IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr,
             WHOLE_TILES: tl.constexpr, KEYS_AS_ROWS: tl.constexpr = False):
    """Boolean tile: which keys each query may attend to; [BLOCK_M, BLOCK_N], or [BLOCK_N, BLOCK_M] with
    ``KEYS_AS_ROWS`` (the dK/dV kernel's transposed scores)."""
    if KEYS_AS_ROWS:
        queries = offs_m[None, :]
        keys = offs_n[:, None]
    else:
        queries = offs_m[:, None]
        keys = offs_n[None, :]
    q_pos = queries + q_offset
    in_range = (keys < seq_k) & (queries < seq_q)
    ok = in_range
    if IS_CAUSAL:
        ok &= keys <= q_pos
    if HAS_WINDOW:
        ok &= keys > q_pos - window
    if HAS_KPM:
        ok &= tl.load(KPM + b * skpm_b + keys, mask=keys < seq_k, other=0) != 0
    if HAS_MASK:  # bounded by the tile's range only, and whole tiles not at all: loads that can be vectorised
        mask_ptrs = MASK + b * sm_b + queries * sm_q + keys * sm_k
        if WHOLE_TILES:
            ok &= tl.load(mask_ptrs) != 0
        else:
            ok &= tl.load(mask_ptrs, mask=in_range, other=0) != 0
    return ok


@triton.jit
def _grid_position(HEADS_FIRST: tl.constexpr):
    """A program's (batch-and-head index, block index, number of blocks) in a grid laid out by ``_grid``."""
    if HEADS_FIRST:
        head, block, n_blocks = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    else:
        head, block, n_blocks = tl.program_id(1), tl.program_id(0), tl.num_programs(0)
    return head, block, n_blocks


@triton.jit
def _query_block(n_q_heads, group, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 HEADS_FIRST: tl.constexpr):
    """A query-block program's (first query, batch, query head, KV head, query rows, head-dim columns, columns in
    the head). Query blocks run last first: under a causal mask those see the most keys. ``HEADS_FIRST``: the grid
    is (heads, query blocks), else (query blocks, heads); see :func:`_heads_first`."""
    head, block, n_blocks = _grid_position(HEADS_FIRST)
    start_m = (n_blocks - 1 - block) * BLOCK_M
    b = head // n_q_heads
    h = head % n_q_heads
    offs_d = tl.arange(0, BLOCK_D)
    return start_m, b, h, h // group, start_m + tl.arange(0, BLOCK_M), offs_d, offs_d < HEAD_DIM


@triton.jit
def _key_range(start_m, seq_k, q_offset, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key blocks a query block can see: skip those the causal and window limits rule out."""
    lo = 0
    hi = seq_k
    if IS_CAUSAL:
        hi = tl.minimum(seq_k, start_m + BLOCK_M + q_offset)
    if HAS_WINDOW:
        lo = tl.maximum(0, start_m + q_offset - window + 1) // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def _stage_range(stage: tl.constexpr, lo, full_lo, span_lo, span_hi, full_hi, hi):
    """Blocks of one stage. The even stages need masking: 0 = [lo, full_lo) and 4 = [full_hi, hi) for causality,
    the window and the sequences' ends, 2 = [span_lo, span_hi) for the user masks (:func:`_masked_span`); the odd
    ones, 1 = [full_lo, span_lo) and 3 = [span_hi, full_hi), none."""
    if stage == 0:
        start, end = lo, full_lo
    elif stage == 1:
        start, end = full_lo, span_lo
    elif stage == 2:
        start, end = span_lo, span_hi
    elif stage == 3:
        start, end = span_hi, full_hi
    else:
        start, end = full_hi, hi
    return start, end


@triton.jit
def _masked_span(SPANS, b, cell, ss_b, full_lo, full_hi, USER_MASKS: tl.constexpr):
    """The part of the whole blocks [full_lo, full_hi) where a user mask hides something from cell ``cell`` (of
    MASK_CELL queries, or keys for the dK/dV kernel): ``SPANS[b, cell]`` holds the first and past-the-last position
    of the cells that do, from :func:`_mask_spans_kernel` (the first as SPAN_FAR - first)."""
    span_lo = full_hi
    span_hi = full_hi
    if USER_MASKS:
        entry = SPANS + b * ss_b + cell * 2
        span_lo = tl.minimum(tl.maximum(SPAN_FAR - tl.load(entry), full_lo), full_hi)
        span_hi = tl.maximum(tl.minimum(tl.load(entry + 1), full_hi), span_lo)
    return span_lo, span_hi


@triton.jit
def _full_key_blocks(start_m, lo, hi, seq_k, q_offset, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The key blocks in [lo, hi) that every query row of the block sees whole: no mask needed there."""
    full_hi = seq_k // BLOCK_N * BLOCK_N
    if IS_CAUSAL:  # keys up to the block's first query position
        full_hi = tl.minimum(full_hi, (start_m + q_offset + 1) // BLOCK_N * BLOCK_N)
    full_lo = lo
    if HAS_WINDOW:  # keys after the block's last query position minus the window
        full_lo = tl.maximum(lo, (start_m + BLOCK_M + q_offset - window + BLOCK_N - 1) // BLOCK_N * BLOCK_N)
    full_lo = tl.minimum(full_lo, hi)
    return full_lo, tl.maximum(full_lo, full_hi)


@triton.jit
def _attn_fwd_blocks(
    acc, m_i, l_i, q, k_base, v_base, sk_s, sv_s, offs_m, offs_d, lo, hi,
    b, kv_h, seq_q, seq_k, q_offset, window, qk_scale, MASK, sm_b, sm_q, sm_k, KPM, skpm_b,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, BOUNDARY: tl.constexpr,
    WHOLE_TILES: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax over key blocks [lo, hi). Off the boundary (BOUNDARY=False) every key is in range and
    visible, user masks included, so the block needs no bounds, no masking and no empty-row guard. With ``TMA``,
    ``k_base`` and ``v_base`` are the K and V tensor descriptors."""
    CHECK_ROWS: tl.constexpr = BOUNDARY and not WHOLE_TILES
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + offs_n
        if TMA:  # the copy engine fetches the tiles (keys past the end arrive as zeros, masked below)
            k = k_base.load([b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
            v = v_base.load([b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        else:
            k_ok = keys < seq_k
            k = _load_tile(k_base + keys[None, :] * sk_s + offs_d[:, None], k_ok[None, :], d_ok[:, None],
                           CHECK_ROWS, BLOCK_D != HEAD_DIM)
            v = _load_tile(v_base + keys[:, None] * sv_s + offs_d[None, :], k_ok[:, None], d_ok[None, :],
                           CHECK_ROWS, BLOCK_D != HEAD_DIM)
            s = tl.dot(q, k, input_precision=DOT_PRECISION)  # unscaled: the scale rides in exp2's argument (an FMA)
        if BOUNDARY:
            ok = _visible(offs_m, keys, b, seq_q, seq_k, q_offset, window, MASK, sm_b, sm_q, sm_k, KPM, skpm_b,
                          IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_KPM, WHOLE_TILES)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # base-2 running maximum
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_safe = m_new
        p = tl.exp2(s * qk_scale - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


def _autotune(for_head_dim_up_to_128, for_head_dim_256, tma_tiles, long_tma_tiles=None):
    """``triton.autotune`` over (BLOCK_M, BLOCK_N, warps, stages) shapes: one list for head dims up to 128, one
    for larger ones (whose tiles must be smaller to fit shared memory). Autotuning happens on the first call per
    key: head dim, dtype, which masks apply and the grid's order (see _heads_first: it flips once as K and V
    outgrow half the L2 cache); not the lengths, so that training and generation with ever-new lengths do not
    recompile and retune (each new key compiles every config: seconds per kernel).
    ``ACCEL_PATCH_AUTOTUNE=0`` keeps only the first shape of each list: one compile per key, no tuning. With TMA,
    the one tile of ``tma_tiles`` for the head dim (the host built its descriptors for it), or of ``long_tma_tiles``
    where the kernel's ``LONG_SEQ`` is set."""

    def config(shape):
        block_m, block_n, warps, stages = shape
        return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)

    if interpreting():  # the CPU interpreter: one small tile keeps tests fast
        return triton.autotune(configs=[config((16, 16, 4, 1))], key=[])
    small, large = set(tile_choices(for_head_dim_up_to_128)), set(tile_choices(for_head_dim_256))

    def by_head_dim(configs, named_args, **kwargs):
        if kwargs["TMA"]:
            wanted = {(long_tma_tiles if kwargs.get("LONG_SEQ") else tma_tiles)[kwargs["HEAD_DIM"]]}
        else:
            wanted = large if kwargs["BLOCK_D"] > 128 else small
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]

    tma_shapes = set(tma_tiles.values()) | set((long_tma_tiles or {}).values())
    return triton.autotune(
        configs=[config(shape) for shape in sorted(small | large | tma_shapes)],
        key=["HEAD_DIM", "IS_CAUSAL", "HAS_WINDOW", "HAS_MASK", "HAS_KPM", "WHOLE_TILES", "TMA", "HEADS_FIRST"]
        + (["LONG_SEQ"] if long_tma_tiles else []),
        prune_configs_by={"early_config_prune": by_head_dim},
    )


@cached_launch
@_autotune(
    ((64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)),  # first: last session's hand-tuned best
    ((64, 32, 8, 2), (32, 32, 4, 2)),
    TMA_TILES["fwd"],
    TMA_TILES["fwd_long"],
)
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, OUT, LSE, MASK, KPM, SPANS,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_s, so_h,
    sm_b, sm_q, sm_k, skpm_b, ss_b,
    n_q_heads, group, seq_q, seq_k, q_offset, window, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr,
    WHOLE_TILES: tl.constexpr, TMA: tl.constexpr, LONG_SEQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
):
    # LONG_SEQ only picks the tile (TMA_TILES["fwd_long"]).
    start_m, b, h, kv_h, offs_m, offs_d, d_ok = _query_block(n_q_heads, group, HEAD_DIM, BLOCK_D, BLOCK_M,
                                                             HEADS_FIRST)
    if TMA:  # Q, K, V: descriptors over [batch, heads, seq, head_dim]; OUT over [batch, seq, heads, head_dim]
        q = Q.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q = _load_rows(Q + b * sq_b + h * sq_h, offs_m, seq_q, sq_s, offs_d, HEAD_DIM)
    k_base = _head_base(K, b, kv_h, sk_b, sk_h, TMA)
    v_base = _head_base(V, b, kv_h, sv_b, sv_h, TMA)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m, seq_k, q_offset, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    full_lo, full_hi = _full_key_blocks(start_m, lo, hi, seq_k, q_offset, window, BLOCK_M, BLOCK_N,
                                        IS_CAUSAL, HAS_WINDOW)
    USER_MASKS: tl.constexpr = HAS_MASK or HAS_KPM
    span_lo, span_hi = _masked_span(SPANS, b, start_m // MASK_CELL, ss_b, full_lo, full_hi, USER_MASKS)
    # the window's edge, whole blocks, the user masks' span, whole blocks, the diagonal
    for stage in tl.static_range(0 if HAS_WINDOW else 1, 5):
        if USER_MASKS or stage < 2 or stage == 4:
            stage_lo, stage_hi = _stage_range(stage, lo, full_lo, span_lo, span_hi, full_hi, hi)
            acc, m_i, l_i = _attn_fwd_blocks(
                acc, m_i, l_i, q, k_base, v_base, sk_s, sv_s, offs_m, offs_d, stage_lo, stage_hi,
                b, kv_h, seq_q, seq_k, q_offset, window, qk_scale, MASK, sm_b, sm_q, sm_k, KPM, skpm_b,
                HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_KPM, stage % 2 == 0, WHOLE_TILES,
                TMA, DOT_PRECISION,
            )  # fmt: skip
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if TMA:  # rows past the end are clipped by the copy engine
        OUT.store([b, start_m, h, 0], out.to(OUT.dtype).reshape(1, BLOCK_M, 1, BLOCK_D))
    else:
        tl.store(OUT + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=(offs_m < seq_q)[:, None] & d_ok[None, :])
    # base-2 logsumexp; +inf for empty rows makes every probability 0 in the backward
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + (b * n_q_heads + h) * seq_q + offs_m, lse, mask=offs_m < seq_q)


@triton.jit
def _full_query_blocks(start_n, lo, hi, seq_q, seq_k, q_offset, window, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The query blocks in [lo, hi) that see every key of the block [start_n, start_n + BLOCK_N) whole."""
    full_lo = lo
    if IS_CAUSAL:  # the block's first query is at or after its last key
        full_lo = tl.maximum(lo, tl.maximum(0, start_n + BLOCK_N - 1 - q_offset + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
    full_lo = tl.minimum(full_lo, hi)
    full_hi = seq_q // BLOCK_M * BLOCK_M
    if HAS_WINDOW:  # the block's last query is less than a window past its first key
        full_hi = tl.minimum(full_hi, tl.maximum(0, start_n + window - q_offset) // BLOCK_M * BLOCK_M)
    if start_n + BLOCK_N > seq_k:  # keys past the end need masking in every block
        full_hi = full_lo
    return full_lo, tl.maximum(full_lo, full_hi)


@triton.jit
def _attn_bwd_dkdv_blocks(
    dk, dv, k, v, keys, q_base, do_base, row_base, LSE, DELTA, sq_s, sdo_s, offs_d, lo, hi,
    b, h, seq_q, seq_k, q_offset, window, qk_scale, MASK, sm_b, sm_q, sm_k, KPM, skpm_b,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, BOUNDARY: tl.constexpr,
    WHOLE_TILES: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Scores are computed transposed, keys as rows (S^T = K Q^T), so that P^T and dS^T come out of their dots in
    # the layout the dV and dK dots take as their left operand: no transposes of register tiles. With TMA,
    # q_base and do_base are the Q and dO tensor descriptors.
    CHECK_ROWS: tl.constexpr = BOUNDARY and not WHOLE_TILES
    d_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seq_q
        if TMA:  # rows past the end arrive as zeros
            q_t = tl.trans(q_base.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D))
            do = do_base.load([b, start_m, h, 0]).reshape(BLOCK_M, BLOCK_D)
        else:
            q_t = _load_tile(q_base + offs_m[None, :] * sq_s + offs_d[:, None], m_ok[None, :], d_ok[:, None],
                             CHECK_ROWS, BLOCK_D != HEAD_DIM)
            do = _load_tile(do_base + offs_m[:, None] * sdo_s + offs_d[None, :], m_ok[:, None], d_ok[None, :],
                            CHECK_ROWS, BLOCK_D != HEAD_DIM)
        if CHECK_ROWS:
            lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        else:
            lse = tl.load(LSE + row_base + offs_m)
            delta = tl.load(DELTA + row_base + offs_m)
        s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.exp2(s_t - lse[None, :])
        if BOUNDARY:
            ok = _visible(offs_m, keys, b, seq_q, seq_k, q_offset, window, MASK, sm_b, sm_q, sm_k, KPM, skpm_b,
                          IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_KPM, WHOLE_TILES, KEYS_AS_ROWS=True)
            p_t = tl.where(ok, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
    return dk, dv


# From sweeps on an H100 at (4, 32/8 and 32/32, 2048, 64 and 128) and (1, 32, 8192, 128), causal, whole tiles
# (TFLOP/s of each kernel's own matmuls). dQ: 128 x 64 / 8 warps / 3 stages 456 at head dim 128 (64 x 64 / 4 / 2:
# 439), 64 x 64 / 4 / 3 452 at 64. dK/dV (transposed scores): 64 x 64 / 4 / 2 first everywhere (337, 463, 532),
# 32 x 64 / 4 / 3 second (324, 436, 483). Tiles split as FlashAttention-2's Triton tutorial does (dK/dV: 32
# queries x 128 keys, dQ: 128 x 32) measured 1.1-4.9x slower.
_BWD_SHAPES = ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3))
_BWD_SHAPES_256 = ((32, 32, 8, 1), (32, 32, 4, 1))
_DKDV_SHAPES = ((64, 64, 4, 2), (32, 64, 4, 3), (64, 64, 4, 3))


@cached_launch
@_autotune(_DKDV_SHAPES, _BWD_SHAPES_256, TMA_TILES["dkdv"])
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, MASK, KPM, SPANS,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_s, sdo_h,
    sdk_b, sdk_h, sdk_s, sdv_b, sdv_h, sdv_s, sm_b, sm_q, sm_k, skpm_b, ss_b,
    n_q_heads, n_kv_heads, group, seq_q, seq_k, q_offset, window, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr,
    WHOLE_TILES: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, HEADS_FIRST: tl.constexpr,
):
    # One program owns a block of keys of one KV head and sums over every query head of its group,
    # so grouped-query gradients need no atomics. Key blocks run from the first: under a causal mask those see the
    # most queries. The grid's axes are as in _query_block. With TMA, Q and DO are tensor descriptors.
    head, block, _ = _grid_position(HEADS_FIRST)
    start_n = block * BLOCK_N
    b = head // n_kv_heads
    kv_h = head % n_kv_heads
    keys = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (keys < seq_k)[:, None] & d_ok[None, :]
    k = _load_rows(K + b * sk_b + kv_h * sk_h, keys, seq_k, sk_s, offs_d, HEAD_DIM)
    v = _load_rows(V + b * sv_b + kv_h * sv_h, keys, seq_k, sv_s, offs_d, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    hi = seq_q
    if IS_CAUSAL:
        lo = tl.maximum(0, start_n - q_offset) // BLOCK_M * BLOCK_M
    if HAS_WINDOW:  # (never below lo: the stages below split [lo, hi))
        hi = tl.maximum(lo, tl.minimum(seq_q, start_n + BLOCK_N - 1 + window - q_offset))
    full_lo, full_hi = _full_query_blocks(start_n, lo, hi, seq_q, seq_k, q_offset, window, BLOCK_M, BLOCK_N,
                                          IS_CAUSAL, HAS_WINDOW)
    USER_MASKS: tl.constexpr = HAS_MASK or HAS_KPM
    span_lo, span_hi = _masked_span(SPANS, b, start_n // MASK_CELL, ss_b, full_lo, full_hi, USER_MASKS)
    TAIL: tl.constexpr = HAS_WINDOW or not WHOLE_TILES
    for g in range(0, group):
        h = kv_h * group + g
        q_base = _head_base(Q, b, h, sq_b, sq_h, TMA)
        do_base = _head_base(DO, b, h, sdo_b, sdo_h, TMA)
        row_base = (b * n_q_heads + h) * seq_q
        # the causal diagonal, whole blocks, the user masks' span, whole blocks, and the window's edge and the
        # ragged tail (none with whole tiles)
        for stage in tl.static_range(5):
            if (USER_MASKS or stage < 2 or stage == 4) and (TAIL or stage < 4):
                stage_lo, stage_hi = _stage_range(stage, lo, full_lo, span_lo, span_hi, full_hi, hi)
                dk, dv = _attn_bwd_dkdv_blocks(
                    dk, dv, k, v, keys, q_base, do_base, row_base, LSE, DELTA, sq_s, sdo_s, offs_d, stage_lo,
                    stage_hi, b, h, seq_q, seq_k, q_offset, window, qk_scale, MASK, sm_b, sm_q, sm_k, KPM, skpm_b,
                    HEAD_DIM, BLOCK_D, BLOCK_M, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_KPM, stage % 2 == 0,
                    WHOLE_TILES, TMA, DOT_PRECISION,
                )  # fmt: skip
    dk_ptrs = DK + b * sdk_b + kv_h * sdk_h + keys[:, None] * sdk_s + offs_d[None, :]
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    dv_ptrs = DV + b * sdv_b + kv_h * sdv_h + keys[:, None] * sdv_s + offs_d[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_blocks(
    dq, q, do, lse, delta, k_base, v_base, sk_s, sv_s, offs_m, offs_d, lo, hi,
    b, kv_h, seq_q, seq_k, q_offset, window, qk_scale, MASK, sm_b, sm_q, sm_k, KPM, skpm_b,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, BOUNDARY: tl.constexpr,
    WHOLE_TILES: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    CHECK_ROWS: tl.constexpr = BOUNDARY and not WHOLE_TILES
    d_ok = (offs_d < HEAD_DIM)[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        if TMA:  # k_base and v_base are the K and V tensor descriptors; keys past the end arrive as zeros
            k = k_base.load([b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
            v = v_base.load([b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            k_ok = (keys < seq_k)[:, None]
            k = _load_tile(k_base + keys[:, None] * sk_s + offs_d[None, :], k_ok, d_ok, CHECK_ROWS,
                           BLOCK_D != HEAD_DIM)
            v = _load_tile(v_base + keys[:, None] * sv_s + offs_d[None, :], k_ok, d_ok, CHECK_ROWS,
                           BLOCK_D != HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if BOUNDARY:
            ok = _visible(offs_m, keys, b, seq_q, seq_k, q_offset, window, MASK, sm_b, sm_q, sm_k, KPM, skpm_b,
                          IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_KPM, WHOLE_TILES)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@cached_launch
@_autotune(_BWD_SHAPES, _BWD_SHAPES_256, TMA_TILES["dq"])
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, OUT, DO, LSE, DELTA, DQ, MASK, KPM, SPANS,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_s, so_h, sdo_b, sdo_s, sdo_h, sdq_b, sdq_h, sdq_s,
    sm_b, sm_q, sm_k, skpm_b, ss_b,
    n_q_heads, group, seq_q, seq_k, q_offset, window, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr,
    WHOLE_TILES: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, HEADS_FIRST: tl.constexpr,
):
    # With TMA, K and V are tensor descriptors.
    start_m, b, h, kv_h, offs_m, offs_d, d_ok = _query_block(n_q_heads, group, HEAD_DIM, BLOCK_D, BLOCK_M,
                                                             HEADS_FIRST)
    m_ok = offs_m < seq_q
    q = _load_rows(Q + b * sq_b + h * sq_h, offs_m, seq_q, sq_s, offs_d, HEAD_DIM)
    do = _load_rows(DO + b * sdo_b + h * sdo_h, offs_m, seq_q, sdo_s, offs_d, HEAD_DIM)
    row_base = (b * n_q_heads + h) * seq_q
    lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
    # delta = rowsum(dO * O), computed here (this kernel runs before dK/dV's, which reads it back) rather than in
    # a separate pass over dO and O
    o = _load_rows(OUT + b * so_b + h * so_h, offs_m, seq_q, so_s, offs_d, HEAD_DIM)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + row_base + offs_m, delta, mask=m_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = _head_base(K, b, kv_h, sk_b, sk_h, TMA)
    v_base = _head_base(V, b, kv_h, sv_b, sv_h, TMA)
    lo, hi = _key_range(start_m, seq_k, q_offset, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    full_lo, full_hi = _full_key_blocks(start_m, lo, hi, seq_k, q_offset, window, BLOCK_M, BLOCK_N,
                                        IS_CAUSAL, HAS_WINDOW)
    USER_MASKS: tl.constexpr = HAS_MASK or HAS_KPM
    span_lo, span_hi = _masked_span(SPANS, b, start_m // MASK_CELL, ss_b, full_lo, full_hi, USER_MASKS)
    for stage in tl.static_range(0 if HAS_WINDOW else 1, 5):  # as forward
        if USER_MASKS or stage < 2 or stage == 4:
            stage_lo, stage_hi = _stage_range(stage, lo, full_lo, span_lo, span_hi, full_hi, hi)
            dq = _attn_bwd_dq_blocks(
                dq, q, do, lse, delta, k_base, v_base, sk_s, sv_s, offs_m, offs_d, stage_lo, stage_hi,
                b, kv_h, seq_q, seq_k, q_offset, window, qk_scale, MASK, sm_b, sm_q, sm_k, KPM, skpm_b,
                HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_WINDOW, HAS_MASK, HAS_KPM, stage % 2 == 0, WHOLE_TILES,
                TMA, DOT_PRECISION,
            )  # fmt: skip
    dq_ptrs = DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_s + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@cached_launch
@triton.jit
def _attn_decode_kernel(
    Q, K, V, OUT, LSE, PART_OUT, PART_LSE, COUNTERS, MASK, KPM,
    sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, sm_k, skpm_b,
    n_kv_heads, group, seq_k, window, keys_per_split, n_splits, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    MERGE_HEADS: tl.constexpr, MERGE_SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Flash-decoding: one query per sequence, the keys split across programs so that even batch 1 fills the
    # GPU. The query heads sharing a KV head form the rows of one tile, so K and V are read once per group.
    split = tl.program_id(0)
    b = tl.program_id(1) // n_kv_heads
    kv_h = tl.program_id(1) % n_kv_heads
    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < group
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(Q + b * sq_b + kv_h * group * sq_h, rows, group, sq_h, offs_d, HEAD_DIM)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, seq_k)
    for start_n in range(start, end, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k_ok = keys < end
        k = tl.load(K + b * sk_b + kv_h * sk_h + keys[None, :] * sk_s + offs_d[:, None],
                    mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        v = _load_rows(V + b * sv_b + kv_h * sv_h, keys, end, sv_s, offs_d, HEAD_DIM)  # in flight with K's
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if HAS_WINDOW:
            k_ok &= keys > seq_k - 1 - window
        if HAS_KPM:
            k_ok &= tl.load(KPM + b * skpm_b + keys, mask=k_ok, other=0) != 0
        if HAS_MASK:
            k_ok &= tl.load(MASK + b * sm_b + keys * sm_k, mask=k_ok, other=0) != 0
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    first_row = b * n_kv_heads * group + kv_h * group  # the group's first (batch, head) row of OUT and LSE
    if n_splits == 1:
        _store_softmax_rows(OUT, LSE, first_row + rows, acc, m_i, l_i, row_ok, offs_d, HEAD_DIM, float("inf"))
    else:
        # each split's partial softmax; an empty one gets log-sum-exp -inf, so that the merge weighs it 0
        _store_softmax_rows(PART_OUT, PART_LSE, (first_row + rows) * n_splits + split, acc, m_i, l_i, row_ok, offs_d,
                            HEAD_DIM, float("-inf"))
        # The last of the group's programs to finish merges the splits: one launch, where a separate merging
        # kernel was a second one (a decode step is host-bound, and batch-1 decode short).
        if last_to_finish(COUNTERS, tl.program_id(1), n_splits):
            _merge_splits(PART_OUT, PART_LSE, OUT, LSE, first_row, group, n_splits, HEAD_DIM, BLOCK_D, MERGE_HEADS,
                          MERGE_SPLITS)
            tl.store(COUNTERS + tl.program_id(1), 0)


@triton.jit
def _store_softmax_rows(OUT, LSE, rows, acc, m_i, l_i, row_ok, offs_d, HEAD_DIM: tl.constexpr,
                        EMPTY_LSE: tl.constexpr):  # fmt: skip
    """Store the softmax rows ``acc / l_i`` at ``OUT[rows]`` (in OUT's dtype) and their base-2 log-sum-exps
    ``m_i + log2(l_i)`` at ``LSE[rows]``; a row with nothing visible (l_i = 0) stores zeros and ``EMPTY_LSE``."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    tl.store(OUT + rows[:, None] * HEAD_DIM + offs_d[None, :], (acc / l_safe[:, None]).to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(LSE + rows, tl.where(empty, EMPTY_LSE, m_i + tl.log2(l_safe)), mask=row_ok)


@triton.jit
def _merge_splits(PART_OUT, PART_LSE, OUT, LSE, first_row, n_rows, n_splits, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge rows ``first_row ..`` (``n_rows`` of them, one per query head)'s split partial softmaxes by their
    log-sum-exps, ``BLOCK_S`` splits at a time, all the rows' loads at once: an online softmax over the splits."""
    heads = tl.arange(0, BLOCK_H)
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = heads < n_rows
    d_ok = offs_d < HEAD_DIM
    lse_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for first in range(0, n_splits, BLOCK_S):
        part = (first_row + heads)[:, None] * n_splits + first + splits[None, :]
        ok = row_ok[:, None] & (first + splits < n_splits)[None, :]
        # .cg: from L2, where the other programs' stores are
        lse = tl.load(PART_LSE + part, mask=ok, other=float("-inf"), cache_modifier=".cg")
        out = tl.load(PART_OUT + part[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                      mask=ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")
        max_new = tl.maximum(lse_max, tl.max(lse, 1))
        max_safe = tl.where(max_new == float("-inf"), 0.0, max_new)
        weights = tl.exp2(lse - max_safe[:, None])  # 0 for empty splits
        alpha = tl.exp2(lse_max - max_safe)
        total = total * alpha + tl.sum(weights, 1)
        acc = acc * alpha[:, None] + tl.sum(weights[:, :, None] * out, 1)
        lse_max = max_new
    _store_softmax_rows(OUT, LSE, first_row + heads, acc, lse_max, total, row_ok, offs_d, HEAD_DIM, float("inf"))


def _mask_args(attn_mask, key_padding_mask, q):
    """Kernel arguments for the optional masks (a dummy pointer and zero strides when absent)."""
    dummy = q
    if attn_mask is not None:
        mask = attn_mask.view(torch.uint8) if attn_mask.dtype == torch.bool else attn_mask
        strides = (0 if mask.shape[0] == 1 else mask.stride(0), mask.stride(2), mask.stride(3))
    else:
        mask, strides = dummy, (0, 0, 0)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
        kpm_stride = kpm.stride(0)
    else:
        kpm, kpm_stride = dummy, 0
    return mask, strides, kpm, kpm_stride


@cached_launch
@triton.jit
def _mask_spans_kernel(MASK, KPM, SPANS, seq_q, seq_k, q_cells, sm_b, sm_q, sm_k, skpm_b, ss_b,
                       HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr):  # fmt: skip
    """Program (b, i, j): whether the masks hide any key of cell j from any query of cell i (cells of MASK_CELL
    positions; past the sequences' ends everything counts as visible). If they do, it widens query cell i's span of
    keys, ``SPANS[b, i]``, and key cell j's span of queries, ``SPANS[b, q_cells + j]``. A span is held as
    (SPAN_FAR - first, past-the-last position) so that both grow by atomic max from zero; zero is an empty span."""
    b = tl.program_id(0)
    q_cell = tl.program_id(1)
    k_cell = tl.program_id(2)
    rows = q_cell * MASK_CELL + tl.arange(0, MASK_CELL)
    cols = k_cell * MASK_CELL + tl.arange(0, MASK_CELL)
    visible = 1  # the minimum over the cell of "this query sees this key", as far as the masks say
    if HAS_MASK:
        tile = tl.load(MASK + b * sm_b + rows[:, None] * sm_q + cols[None, :] * sm_k,
                       mask=(rows < seq_q)[:, None] & (cols < seq_k)[None, :], other=1)
        visible = tl.min(tl.min((tile != 0).to(tl.int32), 1), 0)
    if HAS_KPM:
        real = tl.load(KPM + b * skpm_b + cols, mask=cols < seq_k, other=1)
        visible = tl.minimum(visible, tl.min((real != 0).to(tl.int32), 0))
    if visible == 0:
        by_query = SPANS + b * ss_b + q_cell * 2
        tl.atomic_max(by_query, SPAN_FAR - k_cell * MASK_CELL)
        tl.atomic_max(by_query + 1, (k_cell + 1) * MASK_CELL)
        by_key = SPANS + b * ss_b + (q_cells + k_cell) * 2
        tl.atomic_max(by_key, SPAN_FAR - q_cell * MASK_CELL)
        tl.atomic_max(by_key + 1, (q_cell + 1) * MASK_CELL)


def _mask_spans(attn_mask, key_padding_mask, q, mask_args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """``(by query cell, by key cell)``, int32 ``[batch, cells, 2]``: per cell of MASK_CELL queries, the span of
    keys that the user masks (at least one given) hide anything from, and per cell of keys the span of queries, for
    :func:`_masked_span`. Over the keys, what the forward and dQ kernels mask beyond the diagonal; over the queries,
    the dK/dV kernel's. HF's dense causal masks hide only the diagonal's cells there, a padded batch only its
    padding's. One pass over the masks; where every sequence shares them, once for all (batch stride 0).
    ``mask_args``: :func:`_mask_args` of the masks, which the launcher already has."""
    mask, (sm_b, sm_q, sm_k), kpm, skpm_b = mask_args
    seq_q, seq_k = q.shape[2], (attn_mask if attn_mask is not None else key_padding_mask).shape[-1]
    q_cells, k_cells = cdiv(seq_q, LARGEST_TILE), cdiv(seq_k, LARGEST_TILE)
    batch = q.shape[0] if key_padding_mask is not None or sm_b else 1
    spans = torch.zeros((batch, q_cells + k_cells, 2), dtype=torch.int32, device=q.device)
    if q_cells and k_cells:
        _mask_spans_kernel[(batch, q_cells, k_cells)](
            mask, kpm, spans, seq_q, seq_k, q_cells, sm_b, sm_q, sm_k, skpm_b, spans.stride(0),
            HAS_MASK=attn_mask is not None, HAS_KPM=key_padding_mask is not None, num_warps=4,
        )  # fmt: skip
    spans = spans.expand(q.shape[0], -1, -1)
    return spans[:, :q_cells], spans[:, q_cells:]


class _SpanMemo:
    """The masks' spans per pair of mask tensors, while both live unmodified: HF hands every layer of a forward,
    and the backward, the same masks, so the passes over them run once per step, not once per layer (each is a
    zeroed buffer and a kernel launch: host time the layers' kernels would wait for). Tensors are held weakly,
    checked by identity and version counter; a few pairs at a time (models with sliding and full layers alternate
    two masks).

    Eager calls only. Not while a CUDA graph is captured (its replays must recompute the spans for their masks),
    nor inside the registered ops (:func:`_uncached`), which run in torch.compile's graphs: inductor may write a
    new value into a dead mask's buffer, which the version counter does not see."""

    SIZE = 4

    def __init__(self) -> None:
        self.entries: dict[tuple[int, int], tuple] = {}
        self.lock = threading.Lock()
        self.off = threading.local()  # per thread: the CUDA backward runs on the autograd engine's own

    @staticmethod
    def _state(t: torch.Tensor | None) -> tuple | None:
        return None if t is None else (weakref.ref(t), t._version)

    @staticmethod
    def _same(state: tuple | None, t: torch.Tensor | None) -> bool:
        return state is None if t is None else state is not None and state[0]() is t and state[1] == t._version

    def spans(self, attn_mask, key_padding_mask, q, mask_args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`_mask_spans`; ``(q, q)``, dummy pointers the kernels never read, without masks."""
        masks = (attn_mask, key_padding_mask)
        if attn_mask is None and key_padding_mask is None:
            return q, q
        remember = not (
            getattr(self.off, "depth", 0) or (q.is_cuda and torch.cuda.is_current_stream_capturing())
            or any(t is not None and t.is_inference() for t in masks)  # (inference tensors: no version counter)
        )  # fmt: skip
        key = (id(attn_mask), id(key_padding_mask))
        if remember:
            with self.lock:
                entry = self.entries.get(key)
            if entry is not None and entry[0] == tuple(q.shape[:3]) and all(map(self._same, entry[1], masks)):
                return entry[2]
        spans = _mask_spans(attn_mask, key_padding_mask, q, mask_args)
        if remember:
            with self.lock:
                if len(self.entries) >= self.SIZE:
                    del self.entries[next(iter(self.entries))]
                self.entries[key] = (tuple(q.shape[:3]), tuple(map(self._state, masks)), spans)
        return spans


_span_memo = _SpanMemo()


def _uncached(impl):
    """``impl`` (same signature, for the op's schema) with :class:`_SpanMemo` off while it runs."""

    @functools.wraps(impl)
    def run(*args):
        memo_off = _span_memo.off
        memo_off.depth = getattr(memo_off, "depth", 0) + 1
        try:
            return impl(*args)
        finally:
            memo_off.depth -= 1

    return run


def _flags(attn_mask, key_padding_mask, causal, window, dtype, seq_q, seq_k):
    """The kernels' specialisations. ``WHOLE_TILES``: no tile reaches past the sequences, so no load needs bounds
    and the dK/dV kernel has no ragged tail to walk. Its empty tail loop and bounded loads had cost it 6-8% at
    its best tile and up to 22% at others (H100, 2048 and 8192 tokens, head dims 64 and 128)."""
    return dict(
        IS_CAUSAL=causal, HAS_WINDOW=window > 0, HAS_MASK=attn_mask is not None, HAS_KPM=key_padding_mask is not None,
        WHOLE_TILES=seq_q % LARGEST_TILE == 0 and seq_k % LARGEST_TILE == 0,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )


@functools.cache
def _has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9  # Hopper and later


def _on_tma_device(t: torch.Tensor) -> bool:
    """The device half of :func:`_tma_ready`, apart so that tests/sm90_compile.py can stand CPU tensors in for an
    H100's."""
    return t.is_cuda and _has_tma(t.get_device())


def _tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether the copy engine can fetch tiles of ``tensors`` (the first one a query-like ``[..., head_dim]``): Hopper
    or later, 16-bit floats, head dim 64 or 128 (the kernels' tile is the head dim, unpadded), bases and strides
    16-byte aligned."""
    first = tensors[0]
    if (
        TensorDescriptor is None or first.shape[-1] not in (64, 128)
        or first.dtype not in (torch.float16, torch.bfloat16) or not _on_tma_device(first)
    ):  # fmt: skip
        return False
    for t in tensors:  # plain loops: on every attention launch's path
        if t.data_ptr() & 15:
            return False
        for stride in t.stride()[:-1]:
            if stride <= 0 or stride & 7:
                return False
    return True


def _heads_first(k: torch.Tensor, v: torch.Tensor, which_pass: str) -> bool:
    """The order of a grid's programs: every head's longest programs (the causal mask's, see _query_block) before
    any shorter one, or each head's programs together. Heads first gives the shortest tail, but the programs that
    run at once then read every head's K and V (dK/dV: Q and dO): that pays only while those fit the L2 cache with
    room to spare, ``HEADS_FIRST_UP_TO`` of it for ``which_pass`` (``"forward"`` or ``"backward"``). H100 (50 MB
    L2), bf16 causal, heads first against per head, forward / backward speed: K+V 16.8 MB at (4, 32/8, 2048, 64)
    1.05 / 1.08 and (8, 32/8, 1024, 64) 1.04 / 1.075; 33.5 MB at (4, 32/8, 2048, 128) 0.98 / 1.04 and
    (8, 32/8, 1024, 128) 0.94 / 1.00; 67 MB 0.94 / 0.88 and 0.98 / 0.93; 134 MB at (4, 32/32, 2048, 128)
    0.66 / 0.83. A second run of the backward alone: 1.09 and 1.08 at 16.8 MB, 1.03 and 1.01 at 33.5 MB, 0.89 and
    0.96 at 67 MB. The CPU has no L2: it takes the H100's, for the same choice."""
    l2_bytes = _l2_bytes(k.get_device()) if k.is_cuda else H100_L2_BYTES
    return k.numel() * k.element_size() + v.numel() * v.element_size() <= HEADS_FIRST_UP_TO[which_pass] * l2_bytes


@functools.cache
def _l2_bytes(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).L2_cache_size


def _grid(heads_first: bool, heads: int, blocks: int) -> tuple[int, int]:
    return (heads, blocks) if heads_first else (blocks, heads)


def _descriptor(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """A TMA descriptor of ``t`` (which ``_tma_ready`` accepted) in ``block`` tiles, built without the dataclass's
    own checks, which repeat ``_tma_ready``'s (alignment, strides): four descriptors took 22.3 us of host time with
    them, 9.9 without (H100 host, one run). Triton encodes each at launch; remembering the encodings saved nothing
    there (A/B in one run: 56-64 against 54-57 us per forward launch), so they are not cached."""
    descriptor = TensorDescriptor.__new__(TensorDescriptor)
    descriptor.__dict__.update(base=t, shape=list(t.shape), strides=list(t.stride()), block_shape=block, padding="zero")
    return descriptor


def _attn_fwd_triton(q, k, v, attn_mask, key_padding_mask, causal, window, scale):
    if q.shape[2] == 1 and q.numel():  # decode; causality is implicit for the last position
        return _attn_decode_triton(q, k, v, attn_mask, key_padding_mask, window, scale)
    batch, n_q, seq_q, head_dim = q.shape
    n_kv, seq_k = k.shape[1], k.shape[2]
    out = q.new_empty((batch, seq_q, n_q, head_dim))
    lse = q.new_empty((batch, n_q, seq_q), dtype=torch.float32)
    mask_args = _mask_args(attn_mask, key_padding_mask, q)
    mask, (sm_b, sm_q, sm_k), kpm, skpm_b = mask_args
    if out.numel():
        spans = _span_memo.spans(attn_mask, key_padding_mask, q, mask_args)[0]
        tma = _tma_ready(q, k, v, out)
        heads_first = _heads_first(k, v, "forward")
        long_seq = tma and seq_q >= LONG_QUERIES[head_dim]
        q_, k_, v_, out_ = q, k, v, out
        if tma:  # q, k, v [batch, heads, seq, head_dim], out [batch, seq, heads, head_dim]
            block_m, block_n = TMA_TILES["fwd_long" if long_seq else "fwd"][head_dim][:2]
            q_ = _descriptor(q, [1, 1, block_m, head_dim])
            k_, v_ = _descriptor(k, [1, 1, block_n, head_dim]), _descriptor(v, [1, 1, block_n, head_dim])
            out_ = _descriptor(out, [1, block_m, 1, head_dim])
        _attn_fwd_kernel[lambda meta: _grid(heads_first, batch * n_q, cdiv(seq_q, meta["BLOCK_M"]))](
            q_, k_, v_, out_, lse, mask, kpm, spans,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            sm_b, sm_q, sm_k, skpm_b, spans.stride(0),
            n_q, n_q // n_kv, seq_q, seq_k, seq_k - seq_q, window, scale * LOG2E,
            HEAD_DIM=head_dim, BLOCK_D=max(16, next_power_of_2(head_dim)), TMA=tma, LONG_SEQ=long_seq,
            HEADS_FIRST=heads_first,
            **_flags(attn_mask, key_padding_mask, causal, window, q.dtype, seq_q, seq_k),
        )  # fmt: skip
    return out, lse


DECODE_BLOCK_N = 64
# Keys per split at least. H100, batch 1, 8 KV heads x 128, a stream of layers, a probe of this kernel's loop: 4096
# keys ran fastest in 16 splits of 256 (11.3 us; 12.1 in 32 of 128), 8192 in 32 of 256 and 32768 in 32 of 1024
# (which the GPU-filling target gives anyway). bench_attention at 4096 keys: 11.4 us, 12.3 before this floor.
# Swept again once the merge moved into the launch (H100, one run, 4096 keys): DECODE_BLOCK_N x DECODE_MIN_KEYS
# 64 x 256 10.9 us, 128 x 256 11.0, 128 x 512 11.2, 64 x 512 11.7, 32 x 128 11.9, 64 x 128 12.1, 32 x 512 16.7.
DECODE_MIN_KEYS = 4 * DECODE_BLOCK_N
DECODE_WARPS, DECODE_STAGES = 4, 3  # Triton's defaults, named for probes to sweep
# The last program of a split decode merges at most this many float32 partial outputs at once (64 registers a
# thread at 4 warps): all of a group's heads and as many splits as fit.
MERGE_VALUES = 8192


def _decode_splits(batch_kv: int, seq_k: int, device: torch.device) -> int:
    """Enough key splits that batch x kv_heads x splits programs fill the GPU twice over, none shorter than
    ``DECODE_MIN_KEYS`` (so that a program's fixed costs, its query load and partial-sum store, stay small)."""
    on_gpu = device.type == "cuda"
    # on the CPU interpreter, 16 programs of one block each still split the test sequences several ways
    target = 2 * sm_count(device.index) if on_gpu else 16
    min_keys = DECODE_MIN_KEYS if on_gpu else DECODE_BLOCK_N
    return max(1, min(cdiv(target, batch_kv), cdiv(seq_k, min_keys)))


def _attn_decode_triton(q, k, v, attn_mask, key_padding_mask, window, scale):
    """One query per sequence: split-K partial softmaxes, merged by their log-sum-exps in the same launch."""
    batch, n_q, _, head_dim = q.shape
    n_kv, seq_k = k.shape[1], k.shape[2]
    group = n_q // n_kv
    splits = _decode_splits(batch * n_kv, seq_k, q.device)
    keys_per_split = cdiv(cdiv(seq_k, splits), DECODE_BLOCK_N) * DECODE_BLOCK_N
    splits = cdiv(seq_k, keys_per_split)
    out = torch.empty((batch, 1, n_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_q, 1), dtype=torch.float32, device=q.device)
    if splits == 1:
        part_out, part_lse, counters = out, lse, lse  # unused
    else:
        part_out = torch.empty((batch, n_q, splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, n_q, splits), dtype=torch.float32, device=q.device)
        counters = split_counters(q.device, batch * n_kv)
    block_d = max(16, next_power_of_2(head_dim))
    merge_heads = next_power_of_2(group)
    merge_splits = min(next_power_of_2(splits), max(1, MERGE_VALUES // (merge_heads * block_d)))
    mask, (sm_b, _, sm_k), kpm, skpm_b = _mask_args(attn_mask, key_padding_mask, q)
    flags = _flags(attn_mask, key_padding_mask, True, window, q.dtype, 1, seq_k)
    _attn_decode_kernel[(splits, batch * n_kv)](
        q, k, v, out, lse, part_out, part_lse, counters, mask, kpm,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        sm_b, sm_k, skpm_b, n_kv, group, seq_k, window, keys_per_split, splits, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_G=max(16, merge_heads), BLOCK_N=DECODE_BLOCK_N,
        MERGE_HEADS=merge_heads, MERGE_SPLITS=merge_splits,
        HAS_WINDOW=flags["HAS_WINDOW"], HAS_MASK=flags["HAS_MASK"], HAS_KPM=flags["HAS_KPM"],
        DOT_PRECISION=flags["DOT_PRECISION"], num_warps=DECODE_WARPS, num_stages=DECODE_STAGES,
    )  # fmt: skip
    return out, lse


def _attn_bwd_triton(dout, q, k, v, out, lse, attn_mask, key_padding_mask, causal, window, scale):
    batch, n_q, seq_q, head_dim = q.shape
    n_kv, seq_k = k.shape[1], k.shape[2]
    delta = q.new_empty((batch, n_q, seq_q), dtype=torch.float32)  # written by the dQ kernel
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask_args = _mask_args(attn_mask, key_padding_mask, q)
    mask, (sm_b, sm_q, sm_k), kpm, skpm_b = mask_args
    heads_first = _heads_first(k, v, "backward")
    common = dict(
        HEAD_DIM=head_dim, BLOCK_D=max(16, next_power_of_2(head_dim)), HEADS_FIRST=heads_first,
        **_flags(attn_mask, key_padding_mask, causal, window, q.dtype, seq_q, seq_k),
    )
    if dout.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    spans_by_query, spans_by_key = _span_memo.spans(attn_mask, key_padding_mask, q, mask_args)
    # Not without causality: Triton 3.6's ptxas crashed (SIGSEGV) compiling a non-causal TMA backward on the H100.
    # Nor for one query (a decode step's backward), whose 64-row tiles hold one row: ptxas crashed on the TMA dK/dV
    # kernel specialised to seq_q = group = 1 at head dim 128 (H100; reproduced compiling for sm_90a on a CPU).
    tma = causal and seq_q > 1 and _tma_ready(q, k, v, dout)
    k_, v_, q_, dout_ = k, v, q, dout  # what the copy engine fetches: dQ's keys and values, dK/dV's queries and dO
    if tma:  # q, k, v [batch, heads, seq, head_dim], dout [batch, seq, heads, head_dim]
        block_n = TMA_TILES["dq"][head_dim][1]
        k_, v_ = _descriptor(k, [1, 1, block_n, head_dim]), _descriptor(v, [1, 1, block_n, head_dim])
        block_m = TMA_TILES["dkdv"][head_dim][0]
        q_, dout_ = _descriptor(q, [1, 1, block_m, head_dim]), _descriptor(dout, [1, block_m, 1, head_dim])
    _attn_bwd_dq_kernel[lambda meta: _grid(heads_first, batch * n_q, cdiv(seq_q, meta["BLOCK_M"]))](
        q, k_, v_, out, dout, lse, delta, dq, mask, kpm, spans_by_query,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), sm_b, sm_q, sm_k, skpm_b, spans_by_query.stride(0),
        n_q, n_q // n_kv, seq_q, seq_k, seq_k - seq_q, window, scale * LOG2E, scale, TMA=tma, **common,
    )  # fmt: skip
    _attn_bwd_dkdv_kernel[lambda meta: _grid(heads_first, batch * n_kv, cdiv(seq_k, meta["BLOCK_N"]))](
        q_, k, v, dout_, lse, delta, dk, dv, mask, kpm, spans_by_key,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        sm_b, sm_q, sm_k, skpm_b, spans_by_key.stride(0),
        n_q, n_kv, n_q // n_kv, seq_q, seq_k, seq_k - seq_q, window, scale * LOG2E, scale, TMA=tma, **common,
    )  # fmt: skip
    return dq, dk, dv


def visible_keys(
    seq_q: int, seq_k: int, *, causal: bool, window: int, attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, device: torch.device,
) -> torch.Tensor:
    """Boolean ``[batch or 1, 1, seq_q, seq_k]``: which keys each query sees (the reference's mask)."""
    q_pos = torch.arange(seq_q, device=device)[:, None] + (seq_k - seq_q)
    keys = torch.arange(seq_k, device=device)[None, :]
    ok = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    if causal:
        ok &= keys <= q_pos
    if window > 0:
        ok &= keys > q_pos - window
    ok = ok[None, None]
    if key_padding_mask is not None:
        ok = ok & key_padding_mask.bool()[:, None, None, :]
    if attn_mask is not None:
        ok = ok & attn_mask.bool()
    return ok


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, causal: bool, window: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax in float32 with the same masks; returns ``(out [b, s, h, d], base-2 lse)``."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    ok = visible_keys(q.shape[2], k.shape[2], causal=causal, window=window, attn_mask=attn_mask,
                      key_padding_mask=key_padding_mask, device=q.device)  # fmt: skip
    scores = scores.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - lse.masked_fill(empty, 0.0)[..., None]).masked_fill(~ok, 0.0)
    out = torch.matmul(probs, vf).transpose(1, 2).to(q.dtype).contiguous()
    return out, (lse * LOG2E).masked_fill(empty, float("inf"))


def _attn_bwd_ref(dout, q, k, v, out, lse, attn_mask, key_padding_mask, causal, window, scale):
    """Analytic backward in float32 (no autograd: custom-op bodies run below the autograd key)."""
    batch, n_q, seq_q, head_dim = q.shape
    n_kv, seq_k = k.shape[1], k.shape[2]
    group = n_q // n_kv
    qf, dof = q.float(), dout.float().transpose(1, 2)  # [b, h, s, d]
    kf, vf = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    ok = visible_keys(seq_q, seq_k, causal=causal, window=window, attn_mask=attn_mask,
                      key_padding_mask=key_padding_mask, device=q.device)  # fmt: skip
    probs = torch.exp2(torch.matmul(qf, kf.transpose(-1, -2)) * (scale * LOG2E) - lse[..., None]).masked_fill(~ok, 0)
    delta = (dof * out.float().transpose(1, 2)).sum(-1, keepdim=True)
    dscores = probs * (torch.matmul(dof, vf.transpose(-1, -2)) - delta)
    dq = torch.matmul(dscores, kf) * scale
    dk = torch.matmul(dscores.transpose(-1, -2), qf).view(batch, n_kv, group, seq_k, head_dim).sum(2) * scale
    dv = torch.matmul(probs.transpose(-1, -2), dof).view(batch, n_kv, group, seq_k, head_dim).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, causal: bool, window: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q):
        return _attn_fwd_triton(q, k, v, attn_mask, key_padding_mask, causal, window, scale)
    return attention_ref(q, k, v, attn_mask, key_padding_mask, causal, window, scale)


def _backward_impl(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, causal: bool, window: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(q):
        return _attn_bwd_triton(dout, q, k, v, out, lse, attn_mask, key_padding_mask, causal, window, scale)
    return _attn_bwd_ref(dout, q, k, v, out, lse, attn_mask, key_padding_mask, causal, window, scale)


_forward_op = torch.library.custom_op("accel_patch::attention", _uncached(_forward), mutates_args=())
_backward_op = torch.library.custom_op("accel_patch::attention_backward", _uncached(_backward_impl), mutates_args=())


@register_fake(_forward_op)
def _(q, k, v, attn_mask, key_padding_mask, causal, window, scale):
    batch, n_q, seq_q, head_dim = q.shape
    return q.new_empty((batch, seq_q, n_q, head_dim)), q.new_empty((batch, n_q, seq_q), dtype=torch.float32)


@register_fake(_backward_op)
def _(dout, q, k, v, out, lse, attn_mask, key_padding_mask, causal, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_attention_backward = eager_or_compiled(_backward_op, _backward_impl)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, key_padding_mask, causal, window, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], attn_mask, key_padding_mask)
    ctx.options = (causal, window, scale)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, attn_mask, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = _attention_backward(dout.contiguous(), q, k, v, out, lse, attn_mask, key_padding_mask, *ctx.options)
    return dq, dk, dv, None, None, None, None, None


_attention = differentiable(_forward_op, _forward, _setup_context, _backward)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, sliding_window: int | None = None,
    key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention; returns ``[batch, seq_q, q_heads, head_dim]``.

    ``key_padding_mask``: ``[batch, seq_k]``, nonzero where a key is real. ``attn_mask``: boolean
    ``[batch or 1, 1, seq_q, seq_k]``, True where a query may see a key (combined with ``causal`` and
    ``sliding_window``). ``scale`` defaults to ``head_dim ** -0.5``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
    if q.dim() != 4 or k.dim() != 4 or tuple(k.shape) != tuple(v.shape):
        raise ValueError(
            f"q must be [batch, heads, seq, head_dim] and k, v [batch, kv_heads, seq_k, head_dim] alike; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, n_q, seq_q, head_dim = tuple(q.shape)
    _, n_kv, seq_k, kv_dim = tuple(k.shape)
    if k.shape[0] != batch or kv_dim != head_dim:
        raise ValueError(f"k/v {tuple(k.shape)} must share batch and head_dim with q {tuple(q.shape)}")
    if n_q % n_kv:
        raise ValueError(f"{n_q} query heads are not a multiple of {n_kv} key/value heads")
    if seq_q > seq_k:
        raise ValueError(f"seq_q={seq_q} exceeds seq_k={seq_k}: queries must be the last positions of the keys")
    if head_dim > 256:
        raise ValueError(f"head_dim {head_dim} is larger than the 256 the kernel supports")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, seq_k):
        raise ValueError(f"key_padding_mask must be [{batch}, {seq_k}], got {tuple(key_padding_mask.shape)}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise TypeError(f"attn_mask must be boolean (True = attend), got {attn_mask.dtype}")
        if attn_mask.dim() != 4 or attn_mask.shape[0] not in (1, batch) or attn_mask.shape[1] != 1 or tuple(
            attn_mask.shape[2:]
        ) != (seq_q, seq_k):
            raise ValueError(f"attn_mask must be [{batch} or 1, 1, {seq_q}, {seq_k}], got {tuple(attn_mask.shape)}")
    masks = {name: t for name, t in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)) if t is not None}
    check_same_device(q=q, k=k, v=v, **masks)
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive or None, got {sliding_window}")
    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    scale = head_dim**-0.5 if scale is None else float(scale)
    if not scale > 0:  # the kernels take the row maximum of unscaled scores
        raise ValueError(f"scale must be positive, got {scale}")
    out, _ = _attention(q, k, v, attn_mask, key_padding_mask, bool(causal), int(sliding_window or 0), scale)
    return out

