"""Triton flash attention against an explicit float64 softmax built from independently written masks."""

import importlib

import pytest
import torch

from accel_patch.kernels import attention, force_backend

from helpers import TOL, TRITON_ON_CPU, backends_for, rel_err


def allowed64(seq_q, seq_k, *, causal, window, key_padding, dense, batch):
    """Which keys each query sees, written out position by position (float64 test reference)."""
    ok = torch.zeros(batch, seq_q, seq_k, dtype=torch.bool)
    for b in range(batch):
        for i in range(seq_q):
            pos = i + seq_k - seq_q  # queries are the last seq_q positions
            for j in range(seq_k):
                visible = (not causal or j <= pos) and (not window or j > pos - window)
                if key_padding is not None:
                    visible = visible and bool(key_padding[b, j])
                if dense is not None:
                    visible = visible and bool(dense[b if dense.shape[0] > 1 else 0, 0, i, j])
                ok[b, i, j] = visible
    return ok


def attention64(q, k, v, ok, scale):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~ok[:, None], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # rows with no visible key give zeros
    return (probs @ v).transpose(1, 2)


CASES = {  # name: (batch, q_heads, kv_heads, seq_q, seq_k, mask kind); head dims are parametrized
    "causal": (2, 4, 4, 17, 17, "causal"),
    "gqa4_causal_len1": (1, 4, 1, 1, 1, "causal"),
    "gqa2_cache_offset": (2, 4, 2, 5, 21, "causal"),
    "decode_one_query": (2, 4, 1, 1, 33, "causal"),
    "sliding_window": (1, 2, 1, 40, 40, "window"),
    "left_padding": (3, 4, 2, 19, 19, "left_pad"),
    "right_padding": (2, 2, 2, 19, 19, "right_pad"),
    "dense_hf_mask": (2, 4, 2, 18, 18, "dense"),
    "not_causal": (1, 2, 2, 9, 13, "none"),
    "long_129": (1, 2, 1, 129, 129, "causal"),
    # windows wider than the 16-wide interpreter tiles: whole blocks between the window's edge and the diagonal
    "wide_window": (1, 2, 1, 100, 100, "wide_window"),
    "wide_window_cache_offset": (1, 4, 2, 37, 90, "wide_window"),
    # lengths that are multiples of every tile side: the kernels' unbounded loads (WHOLE_TILES)
    "whole_tiles": (1, 4, 2, 128, 128, "causal"),
    "whole_tiles_window_cache_offset": (1, 2, 1, 128, 256, "wide_window"),
    # one query per sequence: the split-K decode kernel
    "decode_long_padded": (2, 8, 2, 1, 300, "left_pad"),
    "decode_window": (1, 4, 1, 1, 150, "window"),
    "decode_dense_mask": (2, 4, 2, 1, 90, "dense"),
    "decode_no_grouping": (1, 2, 2, 1, 150, "causal"),
    # masks that hide keys in some 128 x 128 cells of the kernels' block maps and not in others
    "padding_across_cells": (2, 2, 1, 300, 300, "cell_pad"),
    "dense_holes_across_cells": (2, 2, 1, 260, 260, "dense_holes"),
    "dense_holes_one_for_the_batch": (2, 2, 1, 140, 270, "dense_holes_broadcast"),
    # and cells that masks hide whole, skipped: a window in a dense mask (HF's under torch.compile), padding
    "dense_window_across_cells": (1, 2, 1, 300, 300, "dense_window"),
}


def _inputs(case, head_dim, dtype, device):
    batch, n_q, n_kv, seq_q, seq_k, kind = CASES[case]
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    shapes = ((n_q, seq_q), (n_kv, seq_k), (n_kv, seq_k))
    q, k, v = (torch.randn(batch, h, s, head_dim, generator=gen) for h, s in shapes)
    kwargs = dict(causal=kind != "none")
    key_padding = dense = None
    window = 0
    if kind in ("window", "wide_window"):
        window = 7 if kind == "window" else 40
        kwargs["sliding_window"] = window
    if kind in ("left_pad", "right_pad"):
        key_padding = torch.ones(batch, seq_k, dtype=torch.int64)
        for b in range(1, batch):
            pad = 3 * b
            if kind == "left_pad":
                key_padding[b, :pad] = 0
            else:
                key_padding[b, seq_k - pad :] = 0
        kwargs["key_padding_mask"] = key_padding.to(device)
    if kind == "cell_pad":  # the last cell and more padded in one sequence, the first cell and more in the other
        key_padding = torch.ones(batch, seq_k, dtype=torch.bool)
        key_padding[0, -50:] = False
        key_padding[1, :140] = False
        kwargs["key_padding_mask"] = key_padding.to(device)
    if kind == "dense":
        dense = torch.rand(batch, 1, seq_q, seq_k, generator=gen) > 0.3
        kwargs["attn_mask"] = dense.to(device)
    if kind == "dense_window":
        position = torch.arange(seq_k)
        dense = (position[None, :] > position[:, None] - 70)[None, None].expand(batch, 1, seq_q, seq_k)
        kwargs["attn_mask"] = dense.to(device)
    if kind in ("dense_holes", "dense_holes_broadcast"):  # a few hidden keys, most cells whole
        dense = torch.ones(batch if kind == "dense_holes" else 1, 1, seq_q, seq_k, dtype=torch.bool)
        for b in range(dense.shape[0]):
            for _ in range(3):
                i = int(torch.randint(seq_q, (), generator=gen))
                dense[b, 0, i, int(torch.randint(i + seq_k - seq_q + 1, (), generator=gen))] = False  # not future
        kwargs["attn_mask"] = dense.to(device)
    ok = allowed64(seq_q, seq_k, causal=kind != "none", window=window, key_padding=key_padding, dense=dense,
                   batch=batch)  # fmt: skip
    return [t.to(device, dtype) for t in (q, k, v)], kwargs, ok


CPU_HEAD_DIMS = [16, 80]
GPU_HEAD_DIMS = [64, 80, 96, 128, 256]
PARAMS = [
    ("cpu", d, dt, be) for d in CPU_HEAD_DIMS for dt in (torch.float32, torch.float16) for be in backends_for("cpu")
]
PARAMS += [pytest.param("cuda", d, torch.bfloat16, "triton", marks=pytest.mark.gpu) for d in GPU_HEAD_DIMS]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("device,head_dim,dtype,backend", PARAMS)
def test_attention_forward_and_gradients(case, device, head_dim, dtype, backend):
    (q, k, v), kwargs, ok = _inputs(case, head_dim, dtype, device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    scale = head_dim**-0.5
    expected = attention64(*leaves64, ok, scale)
    with force_backend(backend):
        out = attention(*leaves, **kwargs)
        assert out.shape == expected.shape and out.dtype == dtype
        assert rel_err(out.cpu(), expected) < TOL[dtype]
        dout = torch.randn_like(expected)
        (expected * dout).sum().backward()
        (out.double() * dout.to(device)).sum().backward()
    for name, ours, ref in zip("qkv", leaves, leaves64, strict=True):
        if ref.grad.norm() > 0:
            assert rel_err(ours.grad.cpu(), ref.grad) < 2 * TOL[dtype], f"d{name}"
        else:  # e.g. dq with a single visible key: zero up to rounding
            assert ours.grad.abs().max() < TOL[dtype], f"d{name} should be zero"


@pytest.mark.skipif(not TRITON_ON_CPU, reason="runs our kernels on the CPU: set TRITON_INTERPRET=1")
def test_masks_changed_in_place_are_read_again():
    """The kernels remember where a mask hides keys (per mask tensor, for the next layers): a mask edited in place
    between calls must not be answered from that memory."""
    (q, k, v), kwargs, _ = _inputs("dense_holes_across_cells", 16, torch.float32, "cpu")
    mask, scale = kwargs["attn_mask"], 16**-0.5
    with force_backend("triton"):
        attention(q, k, v, attn_mask=mask)
        mask[:, :, 200:, 10:40] = False  # keys hidden in a cell that hid none
        out = attention(q, k, v, attn_mask=mask)
    ok = allowed64(260, 260, causal=True, window=0, key_padding=None, dense=mask, batch=2)
    assert rel_err(out, attention64(q.double(), k.double(), v.double(), ok, scale)) < TOL[torch.float32]


@pytest.mark.skipif(not TRITON_ON_CPU, reason="runs our kernels on the CPU: set TRITON_INTERPRET=1")
def test_the_registered_op_reads_its_masks_on_every_call():
    """torch.compile's graphs call the registered op, and inductor may write a new value into a dead mask's buffer
    without a version bump: the op must not answer from what it saw of that buffer before."""
    (q, k, v), kwargs, _ = _inputs("dense_holes_across_cells", 16, torch.float32, "cpu")
    mask, scale = kwargs["attn_mask"], 16**-0.5
    torch.ops.accel_patch.attention(q, k, v, mask, None, True, 0, scale)
    mask.data[:, :, 200:, 10:40] = False  # .data: a write the mask's version counter does not see
    out, _ = torch.ops.accel_patch.attention(q, k, v, mask, None, True, 0, scale)
    ok = allowed64(260, 260, causal=True, window=0, key_padding=None, dense=mask, batch=2)
    assert rel_err(out, attention64(q.double(), k.double(), v.double(), ok, scale)) < TOL[torch.float32]


def cell_spans(hidden, cell):
    """Per cell of ``cell`` queries, the first and past-the-last key of the key cells where ``hidden`` ([seq_q,
    seq_k] bool) is True anywhere, and per key cell the same over the queries; None where it is nowhere."""
    rows, cols = -(-hidden.shape[0] // cell), -(-hidden.shape[1] // cell)
    any_hidden = [[bool(hidden[i * cell : (i + 1) * cell, j * cell : (j + 1) * cell].any()) for j in range(cols)]
                  for i in range(rows)]  # fmt: skip

    def span(flags):
        cells = [c for c, flag in enumerate(flags) if flag]
        return (cells[0] * cell, (cells[-1] + 1) * cell) if cells else None

    return ([span(row) for row in any_hidden], [span(column) for column in zip(*any_hidden, strict=True)])


SPAN_DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not TRITON_ON_CPU, reason="set TRITON_INTERPRET=1")),
                pytest.param("cuda", marks=pytest.mark.gpu)]  # fmt: skip


@pytest.mark.parametrize("device", SPAN_DEVICES)
@pytest.mark.parametrize("masks", ["dense", "dense_shared", "padding", "both"])
def test_mask_spans_cover_exactly_the_cells_masks_hide_keys_in(device, masks):
    """The one-pass span kernel against the masks read cell by cell: ragged lengths, queries after a cache, a
    dense mask per sequence or shared by all, an int64 padding mask."""
    attention_module = importlib.import_module("accel_patch.kernels.attention")
    batch, seq_q, seq_k, cell = 3, 200, 330, attention_module.LARGEST_TILE
    gen = torch.Generator().manual_seed(7)
    dense = key_padding = None
    if masks != "padding":
        dense = torch.ones(batch if masks != "dense_shared" else 1, 1, seq_q, seq_k, dtype=torch.bool)
        for b in range(dense.shape[0]):
            for _ in range(2 + b):
                i, j = (int(torch.randint(n, (), generator=gen)) for n in (seq_q, seq_k))
                dense[b, 0, i, j] = False
    if masks in ("padding", "both"):
        key_padding = torch.ones(batch, seq_k, dtype=torch.int64)
        key_padding[1, -(cell + 20) :] = 0  # a whole cell and some
        key_padding[2, :5] = 0
    q = torch.empty(batch, 2, seq_q, 16, device=device)
    on_device = [None if t is None else t.to(device) for t in (dense, key_padding)]
    by_query, by_key = attention_module._mask_spans(*on_device, q, attention_module._mask_args(*on_device, q))
    for b in range(batch):
        hidden = torch.zeros(seq_q, seq_k, dtype=torch.bool)
        if dense is not None:
            hidden |= ~dense[b if dense.shape[0] > 1 else 0, 0]
        if key_padding is not None:
            hidden |= (key_padding[b] == 0)[None, :]
        expected = cell_spans(hidden, cell)
        for got, want in zip((by_query[b].tolist(), by_key[b].tolist()), expected, strict=True):
            decoded = [None if stored == 0 else (attention_module.SPAN_FAR.value - stored, end) for stored, end in got]
            assert decoded == want, (b, got, want)


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_fully_masked_rows_output_zeros(backend):
    q, k, v = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    dense = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    dense[0, 0, 2] = False  # query 2 sees nothing
    with force_backend(backend):
        out = attention(q, k, v, attn_mask=dense)
    assert torch.isfinite(out).all() and out[0, 2].abs().max() == 0


@pytest.mark.gpu
def test_kernels_copy_tiles_with_tma_where_the_copy_engine_can():
    kernels = importlib.import_module("accel_patch.kernels.attention")

    def hf_layout(heads, head_dim, dtype=torch.bfloat16, offset=0):  # [B, S, H, D] memory seen as [B, H, S, D]
        flat = torch.randn(2 * 40 * heads * head_dim + offset, device="cuda", dtype=dtype)
        return flat[offset:].view(2, 40, heads, head_dim).transpose(1, 2)

    q, k, v = hf_layout(8, 128), hf_layout(2, 128), hf_layout(2, 128)
    assert kernels._tma_ready(q, k, v) == (torch.cuda.get_device_capability()[0] >= 9)
    assert not kernels._tma_ready(hf_layout(8, 80), hf_layout(2, 80), hf_layout(2, 80))  # a padded head dim
    assert not kernels._tma_ready(q.float(), k.float(), v.float())
    shifted = hf_layout(8, 128, offset=1)  # base one element off 16-byte alignment: plain loads
    shifted.copy_(q)
    assert not kernels._tma_ready(shifted, k, v)
    # both paths (40 tokens: ragged tiles, which TMA fills with zeros and clips) against the float64 reference
    ok = allowed64(40, 40, causal=True, window=0, key_padding=None, dense=None, batch=2)
    leaves64 = [t.cpu().double().requires_grad_() for t in (q, k, v)]
    expected = attention64(*leaves64, ok, 128**-0.5)
    dout = torch.randn_like(expected)
    (expected * dout).sum().backward()
    for query in (q, shifted):
        leaves = [t.detach().requires_grad_() for t in (query, k, v)]
        out = attention(*leaves)
        assert rel_err(out.cpu(), expected) < TOL[torch.bfloat16]
        (out.double() * dout.cuda()).sum().backward()
        for name, ours, ref in zip("qkv", leaves, leaves64, strict=True):
            assert rel_err(ours.grad.cpu(), ref.grad) < 2 * TOL[torch.bfloat16], f"d{name}"


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_long_query_sequences_take_the_larger_forward_tile(head_dim):
    kernels = importlib.import_module("accel_patch.kernels.attention")
    seq = kernels.LONG_QUERIES[head_dim] + 40  # ragged last tiles
    q, k, v = (torch.randn(1, 1, seq, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    # one head and a float32 reference: 8k x 8k scores in float64 crowded the GPU that parallel tests share
    leaves32 = [t.float().requires_grad_() for t in (q, k, v)]
    causal = torch.ones(seq, seq, dtype=torch.bool, device="cuda").tril()[None]
    expected = attention64(*leaves32, causal, head_dim**-0.5)
    dout = torch.randn_like(expected)
    (expected * dout).sum().backward()
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = attention(*leaves)
    assert rel_err(out, expected) < TOL[torch.bfloat16]
    (out.float() * dout).sum().backward()
    for name, ours, ref in zip("qkv", leaves, leaves32, strict=True):
        assert rel_err(ours.grad, ref.grad) < 2 * TOL[torch.bfloat16], f"d{name}"
    del expected, leaves32
    torch.cuda.empty_cache()
    tuned = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
             for c in kernels._attn_fwd_kernel.cache.values()}  # fmt: skip
    assert not kernels._tma_ready(q, k, v) or kernels.TMA_TILES["fwd_long"][head_dim] in tuned


ORDER_DEVICES = ["cpu"] * TRITON_ON_CPU + [pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", ORDER_DEVICES)
@pytest.mark.parametrize("case", ["gqa2_cache_offset"])  # the order is mapped before, and apart from, any mask
def test_both_grid_orders_give_the_same_numbers(device, case, monkeypatch):
    """Whether a grid runs every head's longest programs first or each head's programs together is a matter of
    speed (see _heads_first): outputs and gradients must come out bit for bit the same either way."""
    kernels = importlib.import_module("accel_patch.kernels.attention")
    head_dim, dtype = (16, torch.float32) if device == "cpu" else (64, torch.bfloat16)
    (q, k, v), kwargs, _ = _inputs(case, head_dim, dtype, device)
    dout = torch.randn(q.shape[0], q.shape[2], q.shape[1], head_dim, device=device, dtype=dtype)
    orders_launched, grid = set(), kernels._grid

    def recording_grid(heads_first, heads, blocks):
        orders_launched.add(heads_first)
        return grid(heads_first, heads, blocks)

    monkeypatch.setattr(kernels, "_grid", recording_grid)
    results = []
    for heads_first in (True, False):
        monkeypatch.setattr(kernels, "_heads_first", lambda k, v, which_pass, first=heads_first: first)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with force_backend("triton"):
            out = attention(*leaves, **kwargs)
            out.backward(dout)
        results.append([out, *(t.grad for t in leaves)])
    assert orders_launched == {True, False}
    for name, first, per_head in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        assert torch.equal(first, per_head), name


def test_heads_first_only_while_k_and_v_fit_in_half_the_l2_cache_forward_three_quarters_backward():
    kernels = importlib.import_module("accel_patch.kernels.attention")

    def heads_first(batch, heads, seq, head_dim, which_pass):  # on the meta device: sized by the H100's L2 cache
        k = torch.empty(batch, heads, seq, head_dim, dtype=torch.bfloat16, device="meta")
        return kernels._heads_first(k, k, which_pass)

    assert heads_first(4, 8, 2048, 64, "forward") and heads_first(4, 8, 2048, 64, "backward")  # K and V 16.8 MB
    assert not heads_first(4, 8, 2048, 128, "forward") and heads_first(4, 8, 2048, 128, "backward")  # 33.5 MB
    assert not heads_first(4, 32, 2048, 64, "forward") and not heads_first(4, 32, 2048, 64, "backward")  # 67 MB


@pytest.mark.parametrize("device", ORDER_DEVICES)
@pytest.mark.parametrize("splits_per_pass", [1, 2])
@pytest.mark.parametrize("case", ["decode_long_padded", "decode_window", "decode_no_grouping"])
def test_decode_merges_its_splits_in_passes_and_leaves_its_counters_at_zero(device, splits_per_pass, case,
                                                                           monkeypatch):
    """The decode kernel's last program per (batch, KV head) merges the splits' partial softmaxes, a few splits at a
    time (MERGE_VALUES), found by a counter it sets back to 0: a leftover count would make the next call merge too
    early (a partial result) or never (stale output). Passes of one split and of two (the last one ragged)."""
    kernels = importlib.import_module("accel_patch.kernels.attention")
    from accel_patch.kernels import _triton

    head_dim, dtype = (16, torch.float32) if device == "cpu" else (64, torch.bfloat16)
    (q, k, v), kwargs, ok = _inputs(case, head_dim, dtype, device)
    group = q.shape[1] // k.shape[1]
    monkeypatch.setattr(kernels, "DECODE_MIN_KEYS", kernels.DECODE_BLOCK_N)  # the GPU's floor: several splits here
    splits = kernels._decode_splits(q.shape[0] * k.shape[1], k.shape[2], q.device)
    assert splits > splits_per_pass  # the merge runs, in more than one pass
    monkeypatch.setattr(kernels, "MERGE_VALUES", splits_per_pass * _triton.next_power_of_2(group) * max(16, head_dim))
    with force_backend("triton"):
        first, second = attention(q, k, v, **kwargs), attention(q, k, v, **kwargs)
    expected = attention64(*(t.cpu().double() for t in (q, k, v)), ok, head_dim**-0.5)
    assert rel_err(first.cpu(), expected) < TOL[dtype]
    assert torch.equal(first, second)
    counters = [c for (where, _), c in _triton._split_counters.items() if where.type == device]
    assert counters and all(int(c.abs().sum()) == 0 for c in counters)


def test_attention_bad_inputs():
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="not a multiple"):
        attention(q, torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16))
    with pytest.raises(ValueError, match="exceeds seq_k"):
        attention(torch.randn(1, 4, 6, 16), k, k)
    with pytest.raises(TypeError, match="boolean"):
        attention(q, k, k, attn_mask=torch.zeros(1, 1, 5, 5))
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        attention(q, k, k, key_padding_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="head_dim"):
        attention(q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, k.half(), k)
    with pytest.raises(ValueError, match="scale must be positive"):
        attention(q, k, k, scale=-0.25)


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_attention_compiles_fullgraph(backend):
    q, k, v = (torch.randn(1, h, 9, 16, requires_grad=True) for h in (4, 2, 2))

    def fn(q, k, v):
        return attention(q, k, v, sliding_window=4).square().sum()

    torch._dynamo.reset()
    with force_backend(backend):
        expected = torch.autograd.grad(fn(q, k, v), (q, k, v))
        got = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v), (q, k, v))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
