"""W8A16 matmul: ``x @ (w_int8 * scale[:, None]).T + bias``, the int8 weight dequantized in registers (or, from
``DEQUANT_ROWS`` rows on, in one pass ahead of cuBLAS). Three kernels by row count: one row (batch-1 decode), a
few rows (decode: split-K over small tiles), more rows (prefill: autotuned tiles); see ``DECODE_ROWS``.

Weights are symmetric per-output-channel INT8 (``scale = max|w_row| / 127``); activations stay in
float16/bfloat16/float32; products accumulate in float32 and the scale (and bias) are applied in the
epilogue. The gradient to the input, ``dy @ (w_int8 * scale)``, runs through the same kernel with the scale
applied along its reduction dimension; the int8 weight itself gets no gradient.

From ``DEQUANT_ROWS`` rows on (long prefill, training) the matmul is compute-bound and the int8 weight saves no time:
there the weight is dequantized to the activations' dtype in one pass (a transient ``[N, K]`` copy, freed after
the call) and cuBLAS multiplies. On an H100, Triton GEMMs (TMA, 12 tile shapes) reached at best 0.76-0.84x
cuBLAS at 2048 and 8192 rows even on bf16 weights, 0.68-0.72x with the int8 conversion inside; dequantizing first
costs one read of the int8 bytes and one write of the 16-bit ones (in all, over three runs timed as a stream of
layers: 0.78-0.94x cuBLAS at 2048 rows, 0.83-1.07x at 8192; cuBLAS's own time moved up to 9% between runs).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

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
from ._triton import cached_launch, cdiv, last_to_finish, next_power_of_2, split_counters, tl, triton

# int8 -> float32 by bit tricks, four values per 32-bit register, for the one-row kernel (the tensor-core
# kernels convert to 16 bits, where Triton already does so without I2F). Triton's own int8 -> float32 is I2F,
# a quarter of the FP32 rate on Hopper, plus byte unpacking: ~4x the instructions of this. After the XOR each
# byte b holds x + 128; placed in the low mantissa byte of 0x4B000000 it reads as the float 2^23 + b, from which
# 2^23 + 128 is subtracted: x, exactly.
_INT8X4_TO_F32 = tl.constexpr("""{
.reg .b32 u, c;
mov.b32 c, 0x4B000000;
xor.b32 u, $4, 0x80808080;
prmt.b32 $0, u, c, 0x7650;
prmt.b32 $1, u, c, 0x7651;
prmt.b32 $2, u, c, 0x7652;
prmt.b32 $3, u, c, 0x7653;
sub.f32 $0, $0, 0f4B000080;
sub.f32 $1, $1, 0f4B000080;
sub.f32 $2, $2, 0f4B000080;
sub.f32 $3, $3, 0f4B000080;
}""")
# PTX: NVIDIA GPUs only, and not the CPU interpreter (which takes the plain conversion)
FAST_CONVERT = not interpreting() and torch.version.hip is None


@triton.jit
def _int8_to_f32(w, FAST: tl.constexpr):
    if FAST:
        out = tl.inline_asm_elementwise(_INT8X4_TO_F32, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
    else:
        out = w.to(tl.float32)
    return out


@triton.jit
def _store_split(acc, C, offsets, PARTIAL, COUNTERS, tile, split, splits, mn, mask):
    """Store a split-K program's float32 ``acc`` at ``offsets`` of the contiguous ``[M, N]`` C: directly with one
    split; else as partial sum ``split`` of ``PARTIAL`` (float32 ``[splits, M, N]``, ``mn`` = M * N apart), and the
    last of the tile's programs to finish (counted in ``COUNTERS[tile]``, which it sets back to 0 for the next
    launch) adds the partial sums in split order and stores them. One launch, where a separate summing kernel was
    a second one: a decode step is host-bound."""
    if splits == 1:
        tl.store(C + offsets, acc.to(C.dtype.element_ty), mask=mask)
    else:
        tl.store(PARTIAL + split * mn + offsets, acc, mask=mask)
        if last_to_finish(COUNTERS, tile, splits):
            total = tl.zeros_like(acc)
            for s in range(splits):  # .cg: from L2, where the other programs' stores are
                total += tl.load(PARTIAL + s * mn + offsets, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(C + offsets, total.to(C.dtype.element_ty), mask=mask)
            tl.store(COUNTERS + tile, 0)


# Launch shapes of the tiled kernel (BLOCK_N, BLOCK_M, BLOCK_K, warps, stages, K splits), autotuned per (N, K, which
# operand the scale runs along, the rows' power of two): those that won somewhere in a sweep of 15 tiles x 1-8 K
# splits at LLaMA-3-8B shapes and 64-1024 rows (H100). Small tiles with K split where the rows are few, 128 x 256
# on wide weights from 256 rows. The CPU interpreter: one small tile, K split in two.
TILED_SHAPES = [(64, 128, 128, 4, 3, 1), (64, 128, 128, 4, 3, 2), (64, 128, 128, 4, 3, 4), (64, 64, 128, 4, 3, 1),
                (64, 64, 128, 4, 3, 2), (64, 64, 128, 4, 3, 4), (128, 256, 64, 8, 3, 1), (128, 256, 64, 8, 3, 2)]
_INTERPRETER_SHAPE = (16, 16, 32, 4, 1, 2)


def _tiled_shapes(every: bool = False) -> list[tuple[int, ...]]:
    """The shapes the autotuner tries (:func:`tile_choices`), or ``every`` one it could be given."""
    if interpreting():
        return [_INTERPRETER_SHAPE]
    return list(TILED_SHAPES) if every else tile_choices(TILED_SHAPES)


def _tiled_config(block_n: int, block_m: int, block_k: int, warps: int, stages: int, splits: int):
    return triton.Config({"BLOCK_N": block_n, "BLOCK_M": block_m, "BLOCK_K": block_k, "SPLITS": splits},
                         num_warps=warps, num_stages=stages)  # fmt: skip


def _gpu_sms(device: torch.device) -> int:
    """The device's SM count; 0 for the CPU interpreter."""
    return sm_count(device.index) if device.type == "cuda" else 0


def _split_fits(block_n: int, block_m: int, splits: int, m_bucket: int, n: int, k: int, sms: int) -> bool:
    """Whether a tile may split K ``splits`` ways at this size: one split always; more only while the tiles x splits
    stay within two programs per SM and each split keeps >= 4 blocks of 128 along K. That bounds the float32 partial
    sums to 2 x SMs tiles' worth. The CPU interpreter (``sms`` 0) splits anyway, to exercise the split path."""
    if splits == 1 or not sms:
        return True
    return cdiv(m_bucket, block_m) * cdiv(n, block_n) * splits <= 2 * sms and k >= splits * 4 * 128


def _prune_tiled(configs, named_args, **_):
    a = named_args["A"]
    sizes = named_args["m_bucket"], named_args["N"], named_args["K"], _gpu_sms(a.device)
    return [c for c in configs if _split_fits(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.kwargs["SPLITS"], *sizes)]


@functools.cache  # on every prefill call's path
def _tiled_max_splits(m_bucket: int, n: int, k: int, device: torch.device) -> int:
    """The most K splits any shape the autotuner may run here has (whatever it is told to try): what the partial
    sums are sized for."""
    sms = _gpu_sms(device)
    return max(s[5] for s in _tiled_shapes(every=True) if _split_fits(s[0], s[1], s[5], m_bucket, n, k, sms))


@cached_launch
@triton.autotune(configs=[_tiled_config(*shape) for shape in _tiled_shapes()], key=["N", "K", "SCALE_OUT", "m_bucket"],
                 prune_configs_by={"early_config_prune": _prune_tiled})  # fmt: skip
@triton.jit
def _w8a16_tiled_kernel(
    A, B, SCALE, BIAS, C, PARTIAL, COUNTERS,
    M, N, K, m_bucket, stride_am, stride_ak, stride_bk, stride_bn,
    SCALE_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr,
    GROUP_N: tl.constexpr = 8,
):
    """C[M, N] = A[M, K] @ dequant(B[K, N]), computed as its transpose ``dequant(B)^T @ A^T``: the int8 tile,
    converted in registers, is the left operand, which Hopper's wgmma reads from registers; a converted right
    operand would first be written back to shared memory. SCALE indexes N (forward) or, if not SCALE_OUT, K.
    Launch shapes: TILED_SHAPES. Program (i, s) covers the s-th of SPLITS equal parts of K (whole BLOCK_K blocks),
    as in the decode kernel (m_bucket, the rows' power of two, keys the autotuning and bounds the split count)."""
    # grouped order: GROUP_N weight-row blocks share each activation block while both sit in L2
    pid = tl.program_id(0)
    blocks_n = tl.cdiv(N, BLOCK_N)
    blocks_m = tl.cdiv(M, BLOCK_M)
    group = pid // (GROUP_N * blocks_m)
    first_n = group * GROUP_N
    group_size = tl.minimum(blocks_n - first_n, GROUP_N)
    offs_n = (first_n + pid % group_size) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (pid % (GROUP_N * blocks_m)) // group_size * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLITS), BLOCK_K) * BLOCK_K
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        w = tl.load(B + offs_n[:, None] * stride_bn + ks[None, :] * stride_bk,
                    mask=(offs_n < N)[:, None] & (ks < k_end)[None, :], other=0)
        a = tl.load(A + offs_m[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(offs_m < M)[:, None] & (ks < k_end)[None, :], other=0.0)
        if not SCALE_OUT:  # the scale runs along the reduction: fold it into A's columns
            a = (a.to(tl.float32) * tl.load(SCALE + ks, mask=ks < k_end, other=0.0)[None, :]).to(A.dtype.element_ty)
        acc += tl.dot(w.to(A.dtype.element_ty), tl.trans(a), input_precision=DOT_PRECISION)
    if SCALE_OUT:
        acc *= tl.load(SCALE + offs_n, mask=offs_n < N, other=0.0)[:, None]
    if HAS_BIAS:  # in the first split's partial sum only
        bias = tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc += tl.where(tl.program_id(1) == 0, bias, 0.0)[:, None]
    _store_split(acc, C, offs_m[None, :] * N + offs_n[:, None], PARTIAL, COUNTERS, pid, tl.program_id(1),
                 tl.num_programs(1), M * N, (offs_m < M)[None, :] & (offs_n < N)[:, None])  # fmt: skip


@cached_launch
@triton.jit
def _w8a16_decode_kernel(
    A, B, SCALE, BIAS, C, PARTIAL, COUNTERS,
    M, N, K, k_per_split, stride_am, stride_ak, stride_bk, stride_bn,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Few rows (decode), forward: C[M, N] = A[M, K] @ dequant(B[K, N]), SCALE indexing N.

    Program (i, j, s) covers K in [s * k_per_split, (s + 1) * k_per_split): that is how a few rows (decode)
    spread the weight read over the whole GPU. The last split to finish a tile adds them (``_store_split``)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(2) * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(A + offs_m[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(offs_m < M)[:, None] & (ks < k_end)[None, :], other=0.0)
        b = tl.load(B + ks[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(ks < k_end)[:, None] & (offs_n < N)[None, :], other=0)
        acc += tl.dot(a, b.to(A.dtype.element_ty), input_precision=DOT_PRECISION)  # |q| <= 127: exact in fp16/bf16
    acc *= tl.load(SCALE + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if HAS_BIAS:  # in the first split's partial sum only
        bias = tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc += tl.where(tl.program_id(2) == 0, bias, 0.0)[None, :]
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    _store_split(acc, C, offs_m[:, None] * N + offs_n[None, :], PARTIAL, COUNTERS, tile, tl.program_id(2),
                 tl.num_programs(2), M * N, (offs_m < M)[:, None] & (offs_n < N)[None, :])  # fmt: skip


@cached_launch
@triton.jit
def _w8a16_gemv_kernel(
    A, B, SCALE, BIAS, C, N, K, stride_bk, stride_bn,
    HAS_BIAS: tl.constexpr, FAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
):
    """One row (batch-1 decode), forward: C[N] = dequant(B)[N, K] @ A[K], without tensor cores. Each program
    reads BLOCK_N whole weight rows along K, keeps float32 products per lane and reduces them once at the end:
    one kernel, no split-K partial sums to add afterwards."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    rows = B + offs_n.to(tl.int64)[:, None] * stride_bn
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    # stages named on the loop itself: without a dot in it, Triton pipelines its loads (cp.async) only then
    for k0 in tl.range(0, K, BLOCK_K, num_stages=LOOP_STAGES):
        ks = k0 + offs_k
        k_ok = ks < K
        w = tl.load(rows + ks[None, :] * stride_bk, mask=n_ok[:, None] & k_ok[None, :], other=0)
        a = tl.load(A + ks, mask=k_ok, other=0.0)
        acc += _int8_to_f32(w, FAST) * a.to(tl.float32)[None, :]  # |q| <= 127 times a 16-bit float: exact
    out = tl.sum(acc, 1) * tl.load(SCALE + offs_n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        out += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(C + offs_n, out.to(C.dtype.element_ty), mask=n_ok)


@functools.cache  # on every decode step's path
def _gemv_blocks(n: int, k: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of the one-row kernel: as many weight rows per program as still gives two programs per
    SM, and about 8K weight bytes per tile (the CPU interpreter: small tiles)."""
    if device.type != "cuda":
        return 4, 32
    block_n = 32
    while block_n > 1 and cdiv(n, block_n) < 2 * sm_count(device.index):
        block_n //= 2
    return block_n, min(8192 // block_n, max(256, next_power_of_2(k)))


def _gemv_triton(a: torch.Tensor, b_int8: torch.Tensor, scale: torch.Tensor, bias, n: int, b_strides: tuple[int, int],
                 launch: tuple[int, int, int, int] | None = None) -> torch.Tensor:  # fmt: skip
    """The one-row kernel: ``a`` holds one row of K (any leading dims of size 1, unit stride along K); the output
    has ``a``'s shape with N for K. ``launch`` = (BLOCK_N, BLOCK_K, warps, stages) overrides the default
    (tune_kernels)."""
    k = a.shape[-1]
    block_n, block_k, warps, stages = launch or (*_gemv_blocks(n, k, a.device), 4, 3)
    c = a.new_empty((*a.shape[:-1], n))
    _w8a16_gemv_kernel[(cdiv(n, block_n),)](
        a, b_int8, scale, bias if bias is not None else scale, c, n, k, *b_strides,
        HAS_BIAS=bias is not None, FAST=FAST_CONVERT, BLOCK_N=block_n, BLOCK_K=block_k, LOOP_STAGES=stages,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return c


@cached_launch
@triton.jit
def _dequantize_kernel(W, SCALE, OUT, N, K, stride_wn, stride_wk, FAST: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):  # fmt: skip
    """OUT[N, K] = W * SCALE[:, None], computed in float32 and rounded once to OUT's dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    w = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=mask, other=0)
    scale = tl.load(SCALE + offs_n, mask=offs_n < N, other=0.0)
    out = _int8_to_f32(w, FAST) * scale[:, None]
    tl.store(OUT + offs_n[:, None] * K + offs_k[None, :], out.to(OUT.dtype.element_ty), mask=mask)


def _dequantize_triton(weight_int8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n, k = weight_int8.shape
    out = torch.empty((n, k), dtype=dtype, device=weight_int8.device)
    block_n, block_k = (32, 256) if weight_int8.is_cuda else (16, 32)  # the CPU interpreter: small tiles
    _dequantize_kernel[(cdiv(n, block_n), cdiv(k, block_k))](
        weight_int8, scale, out, n, k, weight_int8.stride(0), weight_int8.stride(1), FAST=FAST_CONVERT,
        BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out


# Which kernel takes how many rows, from a sweep at LLaMA-3-8B shapes on an H100 (µs in a stream of layers, the four
# shapes of a layer summed as it runs them: q and o, k and v, gate and up, down).
# Forward: up to DECODE_ROWS the decode kernel (at 32 rows 6.99-32.5 µs per shape against the tiled kernel's
# 9.7-37.3), then the tiled one (at 64 rows 10.6-37.7 against 8.0-52.9), and from DEQUANT_ROWS on dequantize, then
# cuBLAS (per layer at 384 rows 505 against the tiled 516 µs, at 512 562 against 545, at 768 687 against 814).
# The gradient to the input never takes the decode kernel (at 16 rows 7.7-53.6 tiled against 8.8-91.1) and
# dequantizes from DEQUANT_ROWS_GRAD_INPUT on (per layer at 128 rows 425 against 300 tiled, at 192 467 against 479).
DECODE_ROWS = 32
DEQUANT_ROWS = 512
DEQUANT_ROWS_GRAD_INPUT = 192


def _split_k(k: int, programs: int, target: int, block_k: int) -> tuple[int, int]:
    """(splits, K per split) for the decode kernel: K split until ``programs`` x splits reach ``target``, each split
    a nonzero multiple of ``block_k`` (K = 0: one split, of zeros)."""
    splits = max(1, min(cdiv(target, programs), k // block_k))
    k_per_split = max(cdiv(cdiv(k, splits), block_k), 1) * block_k
    return max(cdiv(k, k_per_split), 1), k_per_split


@functools.cache  # on every decode step's path
def _decode_launch(
    m: int, n: int, k: int, device: torch.device, tile: tuple[int, int, int, int] | None = None
) -> tuple[tuple[int, int, int], int, dict]:
    """(grid, K per split, launch constants) of the decode kernel: small tiles (the CPU interpreter: smaller), and K
    split until the programs cover the GPU once (up to 16 rows) or twice. H100, LLaMA-3-8B shapes, µs in a stream of
    layers: at 16 rows, 32 columns per tile, 4 stages and one program per SM took 6.9-26.3 against 7.8-28.1 with 64
    columns, 3 stages and two per SM; at 64 rows the latter took 9.0-53.7 against 9.4-62.5. Up to 16 rows, three
    stages instead of four where the programs outnumber 3 per SM (4096->14336, 448 programs: 26.5-26.7 against
    24.7-25.1 µs; at 128-256 programs four stages were as fast or faster). A measured rule, not an occupancy limit:
    with four stages a program holds 48 KB of shared memory (Triton buffers stages - 1 tiles) and 62 registers per
    thread, so four fit on an SM and all 448 run at once either way. ``tile`` = (BLOCK_N, BLOCK_K, stages, programs
    per SM) replaces that choice (tune_kernels)."""
    on_gpu = device.type == "cuda"
    if tile is not None:
        block_n, block_k, stages, per_sm = tile
    elif on_gpu:
        block_n, block_k, stages, per_sm = (32, 256, 4, 1) if m <= 16 else (64, 256, 3, 2)
    else:
        block_n, block_k, stages, per_sm = 32, 32, 1, 1
    block_m = 16
    grid_mn = (cdiv(m, block_m), cdiv(n, block_n))
    sms = _gpu_sms(device)
    # on the CPU interpreter, 8 still splits the test shapes several ways
    splits, k_per_split = _split_k(k, grid_mn[0] * grid_mn[1], per_sm * sms if on_gpu else 8, block_k)
    if on_gpu and tile is None and m <= 16 and grid_mn[0] * grid_mn[1] * splits > 3 * sms:
        stages = 3
    constants = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4, "num_stages": stages}
    return (*grid_mn, splits), k_per_split, constants


def _matmul_triton(a: torch.Tensor, b_int8: torch.Tensor, scale: torch.Tensor, bias, scale_out: bool, n: int,
                   b_strides: tuple[int, int], decode_tile: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``decode_tile``: the decode kernel's tile, in place of the measured choice (see _decode_launch)."""
    m, k = a.shape
    if m == 0 or n == 0:
        return a.new_empty((m, n))
    # b_int8 is the weight [out, in] either way; scale_out: the forward, else the gradient to the input
    if m >= (DEQUANT_ROWS if scale_out else DEQUANT_ROWS_GRAD_INPUT):
        weight = _dequantize_triton(b_int8, scale, a.dtype)
        return F.linear(a, weight, None if bias is None else bias.to(a.dtype)) if scale_out else a @ weight
    flags = dict(HAS_BIAS=bias is not None, DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32")
    c = a.new_empty((m, n))
    bias = bias if bias is not None else scale  # any pointer: not read
    if m > DECODE_ROWS or not scale_out:
        m_bucket = next_power_of_2(m)
        # partial sums for the most splits the autotuner may pick; counters for the smallest tiles any
        # configuration has (16 x 16: the CPU interpreter's)
        partial, counters = _split_buffers(c, _tiled_max_splits(m_bucket, n, k, a.device), cdiv(m, 16) * cdiv(n, 16))
        grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]), meta["SPLITS"])  # noqa: E731
        _w8a16_tiled_kernel[grid](
            a, b_int8, scale, bias, c, partial, counters, m, n, k, m_bucket, a.stride(0), a.stride(1), *b_strides,
            SCALE_OUT=scale_out, **flags,
        )  # fmt: skip
        return c
    grid, k_per_split, constants = _decode_launch(m, n, k, a.device, decode_tile)
    partial, counters = _split_buffers(c, grid[2], grid[0] * grid[1])
    _w8a16_decode_kernel[grid](
        a, b_int8, scale, bias, c, partial, counters, m, n, k, k_per_split, a.stride(0), a.stride(1), *b_strides,
        **constants, **flags,
    )  # fmt: skip
    return c


def _split_buffers(c: torch.Tensor, splits: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partial sums, tile counters)`` for a split-K launch writing ``c`` (one split: ``c`` twice, unused)."""
    if splits == 1:
        return c, c
    counters = split_counters(c.device, tiles)
    return c.new_empty((splits, *c.shape), dtype=torch.float32), counters


def quantize_per_channel(weight: torch.Tensor, rows_per_step: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row INT8, round to nearest: returns ``(int8 [N, K], float32 scale [N])``.

    Works through ``rows_per_step`` rows at a time so that quantizing while loading adds little to the
    peak memory (a float32 copy of the whole weight would be twice a bf16 checkpoint's tensor).
    """
    weight = weight.detach()
    scale = (weight.abs().amax(dim=1).float() / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    for start in range(0, weight.shape[0], rows_per_step):
        rows = slice(start, start + rows_per_step)
        q[rows] = torch.round(weight[rows].float() / scale[rows, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return weight_int8.float() * scale[:, None]


def int8_linear_ref(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    y = x.float() @ dequantize(weight_int8, scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _forward(
    x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    n, k = weight_int8.shape
    triton_ok = use_triton(x)
    b_strides = (weight_int8.stride(1), weight_int8.stride(0))  # the kernels read the weight as [K, N]
    if triton_ok and x.numel() == k and k > 0:  # one row (decode at batch 1): no reshapes on this hot path
        return _gemv_triton(x, weight_int8, scale, bias, n, b_strides)
    x2 = x.reshape(-1, k)
    if triton_ok:
        y = _matmul_triton(x2, weight_int8, scale, bias, True, n, b_strides)
    else:
        y = int8_linear_ref(x2, weight_int8, scale, bias)
    return y.reshape(*x.shape[:-1], n)


def _grad_input_impl(dy: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    dy2 = dy.reshape(-1, dy.shape[-1])
    k = weight_int8.shape[1]
    if use_triton(dy):
        dx = _matmul_triton(dy2, weight_int8, scale, None, False, k, (weight_int8.stride(0), weight_int8.stride(1)))
    else:
        dx = (dy2.float() @ dequantize(weight_int8, scale)).to(dy.dtype)
    return dx.reshape(*dy.shape[:-1], k)


_forward_op = torch.library.custom_op("accel_patch::int8_linear", _forward, mutates_args=())
_grad_input_op = torch.library.custom_op("accel_patch::int8_linear_grad_input", _grad_input_impl, mutates_args=())


@register_fake(_forward_op)
def _(x, weight_int8, scale, bias):
    return x.new_empty((*x.shape[:-1], weight_int8.shape[0]))


@register_fake(_grad_input_op)
def _(dy, weight_int8, scale):
    return dy.new_empty((*dy.shape[:-1], weight_int8.shape[1]))


_grad_input = eager_or_compiled(_grad_input_op, _grad_input_impl)


def _setup_context(ctx, inputs, output):
    _, weight_int8, scale, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(weight_int8, scale)


def _backward(ctx, dy):
    weight_int8, scale = ctx.saved_tensors
    dx = _grad_input(dy.contiguous(), weight_int8, scale) if ctx.needs_input_grad[0] else None
    dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return dx, None, None, dbias


_int8_linear = differentiable(_forward_op, _forward, _setup_context, _backward)


def int8_linear(
    x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ (weight_int8 * scale[:, None]).T + bias``: weight ``[out, in]`` int8, scale ``[out]`` float32."""
    # Every check runs on each call (a decode step makes one per Linear), so they compare ints, not torch.Size.
    check_float("x", x)
    if weight_int8.dtype != torch.int8 or weight_int8.dim() != 2:
        raise TypeError(f"weight must be a 2-D int8 tensor, got {weight_int8.dtype} {tuple(weight_int8.shape)}")
    n, k = weight_int8.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x of shape {tuple(x.shape)} must end in the weight's {k} input features")
    if scale.dtype != torch.float32 or scale.dim() != 1 or scale.shape[0] != n:
        raise ValueError(f"scale must be float32 of shape ({n},), got {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    device = x.device
    if weight_int8.device != device or scale.device != device or (bias is not None and bias.device != device):
        check_same_device(x=x, weight=weight_int8, scale=scale, **({"bias": bias} if bias is not None else {}))
    return _int8_linear(unit_last_stride(x), weight_int8, scale, bias)
