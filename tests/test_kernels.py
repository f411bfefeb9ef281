"""Each kernel (Triton and reference backends) against an independent float64 formula, fwd and bwd."""

import importlib
import logging

import pytest
import torch

from accel_patch.kernels import (
    _backend,
    apply_rope,
    attention,
    attention_ref,
    choose_backend,
    force_backend,
    rms_norm,
    rms_norm_keeping_input,
    shared_input_linears,
    swiglu,
    swiglu_linear,
)
from accel_patch.kernels._backend import tracing

from helpers import CPU_DTYPES, TOL, backends_for, rel_err

CASES = [("cpu", dtype, backend) for dtype in CPU_DTYPES for backend in backends_for("cpu")] + [
    pytest.param("cuda", dtype, backend, marks=pytest.mark.gpu)
    for dtype in (torch.bfloat16, torch.float16)
    for backend in ("triton", "reference")
]
CASE_IDS = "device,dtype,backend"


def _grads_match(inputs64, out64, inputs, out, tol):
    """Backprop one random upstream gradient through both and compare each named input's gradient."""
    dy = torch.randn_like(out64)
    (out64 * dy).sum().backward()
    (out.double() * dy).sum().backward()
    for name, leaf in inputs.items():
        err = rel_err(leaf.grad, inputs64[name].grad)
        assert err < tol, f"grad of {name}: relative error {err:.2e} >= {tol:.0e}"


def _leaf(t, dtype=None):
    return t.to(dtype or t.dtype).detach().requires_grad_()


# ---------------------------------------------------------------- RMSNorm

RMS_SHAPES = {
    "cpu": [(1, 33), (7, 128), (3, 5, 96)],
    "cuda": [(16384, 4096), (1000, 5120), (37, 2880), (4096, 128)],
}


def rms_norm64(x, w, eps, residual=None):
    h = x + residual if residual is not None else x
    return w * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps), h


@pytest.mark.parametrize(CASE_IDS, CASES)
@pytest.mark.parametrize("fused_residual", [False, True])
def test_rms_norm(device, dtype, backend, fused_residual):
    for shape in RMS_SHAPES[device]:
        x = torch.randn(shape, device=device)
        w = torch.rand(shape[-1], device=device) + 0.5
        res = torch.randn(shape, device=device) if fused_residual else None
        x64, w64 = _leaf(x, torch.float64), _leaf(w, torch.float64)
        r64 = _leaf(res, torch.float64) if fused_residual else None
        y64, h64 = rms_norm64(x64, w64, 1e-6, r64)
        xl, wl = _leaf(x, dtype), _leaf(w, dtype)
        rl = _leaf(res, dtype) if fused_residual else None
        with force_backend(backend):
            out = rms_norm(xl, wl, 1e-6, residual=rl)
            y, h = out if fused_residual else (out, None)
            assert y.dtype == dtype and y.shape == x.shape
            assert rel_err(y, y64) < TOL[dtype]
            dy = torch.randn_like(y64)
            loss64 = (y64 * dy).sum()
            loss = (y.double() * dy).sum()
            if fused_residual:
                dh = torch.randn_like(h64)
                assert rel_err(h, h64) < TOL[dtype]
                loss64 = loss64 + (h64 * dh).sum()
                loss = loss + (h.double() * dh).sum()
            loss64.backward()
            loss.backward()
        pairs = [("x", xl, x64), ("weight", wl, w64)] + ([("residual", rl, r64)] if fused_residual else [])
        for name, ours, ref in pairs:
            # dW sums over every row; half-precision inputs round the normalised rows it sums.
            assert rel_err(ours.grad, ref.grad) < TOL[dtype], f"grad of {name}, shape {shape}"


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_rms_norm_non_contiguous_and_empty(backend):
    base = torch.randn(6, 2, 40)
    x = base[:, 1, :33]  # row stride 80, a window of each row
    w = torch.rand(33) + 0.5
    with force_backend(backend):
        assert rel_err(rms_norm(x, w), rms_norm64(x.double(), w.double(), 1e-6)[0]) < 1e-5
        xt = torch.randn(33, 6).t()  # last dim not unit-stride
        assert rel_err(rms_norm(xt, w), rms_norm64(xt.double(), w.double(), 1e-6)[0]) < 1e-5
        assert rms_norm(torch.randn(0, 33), w).shape == (0, 33)


def test_rms_norm_matches_hf_rounding_with_fp32_weight():
    # HF multiplies the weight by the normalised row already cast to the activation dtype.
    x = torch.randn(4, 64).half()
    w = torch.rand(64) + 0.5
    hf = w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).half()
    for backend in backends_for("cpu"):
        with force_backend(backend):
            y = rms_norm(x, w, 1e-5)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, hf, rtol=1e-6, atol=1e-6)


def _backward_ops(loss: torch.Tensor) -> set[str]:
    """Names of the aten ops the backward of ``loss`` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        loss.backward()
    return {event.name for event in profile.events()}


def _gradient_adds(ops: set[str]) -> set[str]:
    return ops & {"aten::add", "aten::add_"}


@pytest.mark.parametrize(CASE_IDS, CASES)
def test_rms_norm_keeping_input_adds_the_kept_inputs_gradient_in_its_backward(device, dtype, backend):
    for shape in RMS_SHAPES[device]:
        x = torch.randn(shape, device=device)
        w = torch.rand(shape[-1], device=device) + 0.5
        x64, w64 = _leaf(x, torch.float64), _leaf(w, torch.float64)
        y64, _ = rms_norm64(x64, w64, 1e-6)
        dy, dkept = torch.randn_like(y64), torch.randn_like(y64)
        ((y64 * dy).sum() + (x64 * dkept).sum()).backward()
        xl, wl = _leaf(x, dtype), _leaf(w, dtype)
        with force_backend(backend):
            y, kept = rms_norm_keeping_input(xl, wl, 1e-6)
            assert torch.equal(kept, xl) and y.dtype == dtype
            assert rel_err(y, y64) < TOL[dtype]
            ops = _backward_ops((y.double() * dy).sum() + (kept.double() * dkept).sum())
        assert rel_err(xl.grad, x64.grad) < TOL[dtype], f"grad of x, shape {shape}"
        assert rel_err(wl.grad, w64.grad) < TOL[dtype], f"grad of weight, shape {shape}"
        # one autograd node receives both gradients of x (the kernel adds them); the Triton backward has no add
        assert kept.grad_fn is y.grad_fn and type(y.grad_fn).__name__ == "_RMSNormKeepingInputBackward"
        assert backend == "reference" or not _gradient_adds(ops), f"the two gradients of x were added apart: {ops}"


def _weights_and_biases(named: dict, n: int) -> tuple[list, list]:
    return [named[f"w{i}"] for i in range(n)], [named.get(f"b{i}") for i in range(n)]


LINEAR_SHAPES = {"cpu": [((3, 5, 40), (24, 8, 8)), ((7, 33), (10, 12))], "cuda": [((4096, 2048), (2048, 512, 512))]}


@pytest.mark.parametrize(CASE_IDS, CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_shared_input_linears_sum_the_inputs_gradient_inside_the_matmuls(device, dtype, backend, with_bias):
    for shape, out_features in LINEAR_SHAPES[device]:
        inputs = {"x": torch.randn(shape, device=device)}
        for i, n in enumerate(out_features):
            inputs[f"w{i}"] = torch.randn(n, shape[-1], device=device) * shape[-1] ** -0.5
            if with_bias:
                inputs[f"b{i}"] = torch.randn(n, device=device)
        leaves64 = {name: _leaf(t, torch.float64) for name, t in inputs.items()}
        leaves = {name: _leaf(t, dtype) for name, t in inputs.items()}
        n = len(out_features)
        pairs64 = zip(*_weights_and_biases(leaves64, n), strict=True)
        outs64 = [torch.nn.functional.linear(leaves64["x"], w, b) for w, b in pairs64]
        upstream = [torch.randn_like(o) for o in outs64]
        sum((o * d).sum() for o, d in zip(outs64, upstream, strict=True)).backward()
        with force_backend(backend):
            outs = shared_input_linears(leaves["x"], *_weights_and_biases(leaves, n))
            for out, out64 in zip(outs, outs64, strict=True):
                assert out.dtype == dtype and rel_err(out, out64) < TOL[dtype]
            ops = _backward_ops(sum((o.double() * d).sum() for o, d in zip(outs, upstream, strict=True)))
        for name, leaf in leaves.items():
            assert rel_err(leaf.grad, leaves64[name].grad) < 2 * TOL[dtype], f"grad of {name}, shape {shape}"
        assert len({out.grad_fn for out in outs}) == 1  # one node, which sums x's gradient in its GEMMs
        assert "aten::addmm_" in ops and not _gradient_adds(ops), ops


def test_separate_linears_add_their_input_gradients_in_a_pass_of_their_own():
    """The baseline the two tests above improve on: autograd adds a shared input's gradients with ``aten::add``."""
    x = torch.randn(6, 16, requires_grad=True)
    w1, w2 = torch.randn(8, 16), torch.randn(4, 16)
    assert _gradient_adds(_backward_ops((x @ w1.t()).sum() + (x @ w2.t()).sum()))


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_shared_input_linears_frozen_weights_and_autocast(backend):
    x = torch.randn(6, 40, requires_grad=True)
    w1, w2, b2 = torch.randn(12, 40), torch.randn(5, 40), torch.randn(5)
    with force_backend(backend):
        sum(out.sum() for out in shared_input_linears(x, [w1, w2], [None, b2])).backward()  # frozen, as under LoRA
    assert rel_err(x.grad, (w1.sum(0) + w2.sum(0)).expand(6, 40)) < 1e-5
    w1.requires_grad_()  # under autocast the float32 master weight gets a float32 gradient through the cast
    with force_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = shared_input_linears(x.detach(), [w1, w2])
    assert [out.dtype for out in outs] == [torch.bfloat16] * 2
    outs[0].float().sum().backward()
    assert w1.grad.dtype == torch.float32 and rel_err(w1.grad, x.detach().sum(0).expand(12, 40)) < 2e-2


# ---------------------------------------------------------------- RoPE

ROPE_SHAPES = {  # batch, q heads, kv heads, seq, head_dim
    "cpu": [(1, 4, 2, 1, 8), (2, 4, 1, 7, 12), (2, 3, 3, 5, 64)],
    "cuda": [(4, 32, 8, 4096, 128), (2, 28, 4, 999, 64), (1, 16, 16, 17, 256), (3, 8, 2, 33, 80)],
}


def rope64(x, cos, sin):
    half = x.shape[-1] // 2
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c[..., :half] - x2 * s[..., :half], x2 * c[..., half:] + x1 * s[..., half:]), -1)


def hf_cos_sin(batch, seq, head_dim, device, positions=None):
    """cos/sin as HF's rotary module builds them (cat(freqs, freqs)), for arbitrary positions."""
    if positions is None:
        positions = torch.randint(0, 4096, (batch, seq), device=device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize(CASE_IDS, CASES)
def test_rope(device, dtype, backend):
    for batch, hq, hk, seq, dim in ROPE_SHAPES[device]:
        # HF's layout: projections viewed as [b, s, h, d] then transposed, so not contiguous.
        q = torch.randn(batch, seq, hq, dim, device=device).transpose(1, 2)
        k = torch.randn(batch, seq, hk, dim, device=device).transpose(1, 2)
        cos, sin = hf_cos_sin(batch, seq, dim, device)
        q64, k64 = _leaf(q, torch.float64), _leaf(k, torch.float64)
        ql, kl = _leaf(q, dtype), _leaf(k, dtype)
        with force_backend(backend):
            qo, ko = apply_rope(ql, kl, cos.to(dtype), sin.to(dtype))
        assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
        assert qo.stride() == q.stride() and ko.stride() == k.stride()  # HF's layout is kept
        # cos/sin arrive in the activation dtype (as HF passes them): compare with those rounded values.
        cos64, sin64 = cos.to(dtype).double(), sin.to(dtype).double()
        q_ref, k_ref = rope64(q64, cos64, sin64), rope64(k64, cos64, sin64)
        assert rel_err(qo, q_ref) < TOL[dtype] and rel_err(ko, k_ref) < TOL[dtype]
        with force_backend(backend):
            dq, dk = torch.randn_like(q_ref), torch.randn_like(k_ref)
            ((q_ref * dq).sum() + (k_ref * dk).sum()).backward()
            ((qo.double() * dq).sum() + (ko.double() * dk).sum()).backward()
        assert rel_err(ql.grad, q64.grad) < TOL[dtype] and rel_err(kl.grad, k64.grad) < TOL[dtype]


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_rope_broadcast_positions_and_2d_cos(backend):
    q, k = torch.randn(3, 4, 6, 16), torch.randn(3, 2, 6, 16)
    cos, sin = hf_cos_sin(1, 6, 16, "cpu", positions=torch.arange(6)[None])
    with force_backend(backend):
        out_b1 = apply_rope(q, k, cos, sin)
        out_2d = apply_rope(q, k, cos[0], sin[0])
    for out in (out_b1, out_2d):
        assert rel_err(out[0], rope64(q.double(), cos.double(), sin.double())) < 1e-6
        assert rel_err(out[1], rope64(k.double(), cos.double(), sin.double())) < 1e-6


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_backward_with_expanded_upstream_grads(backend):
    # loss.sum() hands each op a stride-0 gradient; the kernels must not read it as dense.
    q, k = _leaf(torch.randn(2, 4, 5, 8)), _leaf(torch.randn(2, 2, 5, 8))
    cos, sin = hf_cos_sin(2, 5, 8, "cpu")
    x, w = _leaf(torch.randn(3, 24)), _leaf(torch.rand(24) + 0.5)
    g, u = _leaf(torch.randn(3, 24)), _leaf(torch.randn(3, 24))
    with force_backend(backend):
        qo, ko = apply_rope(q, k, cos, sin)
        (qo.sum() + ko.sum() + rms_norm(x, w).sum() + swiglu(g, u).sum()).backward()
    leaves64 = [_leaf(t, torch.float64) for t in (q, k, x, w, g, u)]
    q64, k64, x64, w64, g64, u64 = leaves64
    c64, s64 = cos.double(), sin.double()
    loss64 = rope64(q64, c64, s64).sum() + rope64(k64, c64, s64).sum()
    (loss64 + rms_norm64(x64, w64, 1e-6)[0].sum() + swiglu64(g64, u64).sum()).backward()
    for ours, ref in zip((q, k, x, w, g, u), leaves64, strict=True):
        assert rel_err(ours.grad, ref.grad) < 1e-5


def test_rope_general_cos_halves():
    # Nothing assumes the two halves of cos/sin are equal.
    q, k = torch.randn(2, 2, 5, 8), torch.randn(2, 1, 5, 8)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    for backend in backends_for("cpu"):
        ql, kl = _leaf(q), _leaf(k)
        with force_backend(backend):
            qo, ko = apply_rope(ql, kl, cos, sin)
        q64, k64 = _leaf(q, torch.float64), _leaf(k, torch.float64)
        _grads_match({"q": q64, "k": k64}, rope64(q64, cos.double(), sin.double()), {"q": ql}, qo, 1e-5)
        assert rel_err(ko, rope64(k64, cos.double(), sin.double())) < 1e-5


# ---------------------------------------------------------------- SwiGLU

SWIGLU_SHAPES = {
    "cpu": [(1, 33), (5, 1500), (2, 3, 130), (4, 4096)],  # (4, 4096): viewed as full 8192-wide blocks
    "cuda": [(16384, 14336), (7, 4864), (2, 333, 1408)],
}


def swiglu64(g, u):
    return g / (1 + torch.exp(-g)) * u


@pytest.mark.parametrize(CASE_IDS, CASES)
def test_swiglu(device, dtype, backend):
    for shape in SWIGLU_SHAPES[device]:
        g, u = torch.randn(shape, device=device) * 3, torch.randn(shape, device=device)
        g64, u64 = _leaf(g, torch.float64), _leaf(u, torch.float64)
        gl, ul = _leaf(g, dtype), _leaf(u, dtype)
        with force_backend(backend):
            y = swiglu(gl, ul)
            assert y.dtype == dtype and y.shape == g.shape
            y64 = swiglu64(g64, u64)
            assert rel_err(y, y64) < TOL[dtype]
            _grads_match({"gate": g64, "up": u64}, y64, {"gate": gl, "up": ul}, y, TOL[dtype])


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_swiglu_halves_of_fused_projection(backend):
    fused = torch.randn(4, 7, 2 * 48)
    gate, up = fused.chunk(2, dim=-1)  # row-strided views
    with force_backend(backend):
        assert rel_err(swiglu(gate, up), swiglu64(gate.double(), up.double())) < 1e-6


SWIGLU_LINEAR_SHAPES = {"cpu": [((3, 5, 48), 24), ((7, 33), 10)], "cuda": [((4096, 8192), 2048)]}


@pytest.mark.parametrize(CASE_IDS, CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_swiglu_linear(device, dtype, backend, with_bias):
    for shape, out_features in SWIGLU_LINEAR_SHAPES[device]:
        g, u = torch.randn(shape, device=device) * 3, torch.randn(shape, device=device)
        w = torch.randn(out_features, shape[-1], device=device) * shape[-1] ** -0.5
        b = torch.randn(out_features, device=device) if with_bias else None
        inputs = {"gate": g, "up": u, "weight": w} | ({"bias": b} if with_bias else {})
        leaves64 = {name: _leaf(t, torch.float64) for name, t in inputs.items()}
        leaves = {name: _leaf(t, dtype) for name, t in inputs.items()}
        with force_backend(backend):
            y = swiglu_linear(leaves["gate"], leaves["up"], leaves["weight"], leaves.get("bias"))
        assert y.dtype == dtype and y.shape == (*shape[:-1], out_features)
        y64 = torch.nn.functional.linear(swiglu64(leaves64["gate"], leaves64["up"]), leaves64["weight"],
                                         leaves64.get("bias"))  # fmt: skip
        assert rel_err(y, y64) < TOL[dtype]
        with force_backend(backend):
            _grads_match(leaves64, y64, leaves, y, 2 * TOL[dtype])


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("case", ["in the matmul", "with a bias", "float32 residual under autocast"])
def test_swiglu_linear_adds_a_residual(backend, case):
    g, u = torch.randn(2, 5, 48) * 3, torch.randn(2, 5, 48)
    w, b, r = torch.randn(24, 48) * 48**-0.5, torch.randn(24), torch.randn(2, 5, 24)
    inputs = {"gate": g, "up": u, "weight": w, "residual": r} | ({"bias": b} if case == "with a bias" else {})
    leaves64 = {name: _leaf(t, torch.float64) for name, t in inputs.items()}
    expected = leaves64["residual"] + torch.nn.functional.linear(
        swiglu64(leaves64["gate"], leaves64["up"]), leaves64["weight"], leaves64.get("bias")
    )
    leaves = {name: _leaf(t) for name, t in inputs.items()}
    with force_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.endswith("autocast")):
        y = swiglu_linear(*(leaves[name] for name in ("gate", "up", "weight")), leaves.get("bias"), leaves["residual"])
        tol = 2e-2 if case.endswith("autocast") else TOL[torch.float32]
        assert y.dtype == torch.float32 and rel_err(y, expected) < tol
        _grads_match(leaves64, expected, leaves, y, 2 * tol)
    with pytest.raises(ValueError, match="residual"):
        swiglu_linear(g, u, w, residual=torch.randn(2, 5, 23))


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward while ``fn`` runs."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved)


def test_swiglu_linear_keeps_gate_and_up_but_not_their_product():
    g, u = torch.randn(64, 96, requires_grad=True), torch.randn(64, 96, requires_grad=True)
    w = torch.randn(32, 96, requires_grad=True)
    ours = _saved_bytes(lambda: swiglu_linear(g, u, w))
    composed = _saved_bytes(lambda: torch.nn.functional.linear(swiglu(g, u), w))
    product_bytes = 64 * 96 * 4
    assert ours == 2 * product_bytes + w.numel() * 4
    assert composed >= ours + product_bytes


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_swiglu_linear_frozen_weight_and_autocast(backend):
    g, u = torch.randn(6, 40, requires_grad=True), torch.randn(6, 40, requires_grad=True)
    w, b = torch.randn(12, 40) * 40**-0.5, torch.randn(12)
    with force_backend(backend):
        swiglu_linear(g, u, w, b).sum().backward()  # frozen projection, as under LoRA
    g64, u64 = _leaf(g, torch.float64), _leaf(u, torch.float64)
    torch.nn.functional.linear(swiglu64(g64, u64), w.double(), b.double()).sum().backward()
    assert rel_err(g.grad, g64.grad) < 1e-5 and rel_err(u.grad, u64.grad) < 1e-5
    # under autocast the float32 master weight gets a float32 gradient through the cast, like F.linear's
    w.requires_grad_()
    with force_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        y = swiglu_linear(g.detach(), u.detach(), w)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    expected = torch.ones(6, 12, dtype=torch.float64).t() @ swiglu64(g.detach().double(), u.detach().double())
    assert w.grad.dtype == torch.float32 and rel_err(w.grad, expected) < 2e-2


# ---------------------------------------------------------------- errors, dispatch, compile


def test_bad_inputs_raise_clear_errors():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match="does not match the last dim"):
        rms_norm(x, torch.randn(9))
    with pytest.raises(TypeError, match="dtype torch.int64"):
        rms_norm(x.long(), w)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, w, residual=torch.randn(4, 9))
    with pytest.raises(ValueError, match="one device"):
        rms_norm(x, w.to("meta"))
    q, k = torch.randn(1, 2, 3, 6), torch.randn(1, 1, 3, 6)
    cos, sin = hf_cos_sin(1, 3, 6, "cpu")
    with pytest.raises(ValueError, match="even"):
        apply_rope(q[..., :5], k[..., :5], cos[..., :5], sin[..., :5])
    with pytest.raises(ValueError, match=r"cos/sin must be \[1, 3, 6\] or \[3, 6\] .* got \(1, 2, 6\)"):
        apply_rope(q, k, cos[:, :2], sin[:, :2])
    with pytest.raises(ValueError, match=r"cos/sin must be \[2 or 1, 3, 6\]"):
        apply_rope(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), cos[:, :2], sin[:, :2])
    with pytest.raises(ValueError, match="share batch, seq and head_dim"):
        apply_rope(q, torch.randn(1, 1, 4, 6), cos, sin)
    with pytest.raises(ValueError, match=r"\[batch, heads, seq, head_dim\]"):
        apply_rope(q[0], k[0], cos, sin)
    with pytest.raises(ValueError, match="same shape"):
        swiglu(x, torch.randn(4, 9))
    with pytest.raises(TypeError, match="same dtype"):
        swiglu(x, x.half())
    with pytest.raises(ValueError, match=r"must be \[out, 8\]"):
        swiglu_linear(x, x, torch.randn(3, 9))
    with pytest.raises(ValueError, match=r"bias \(2,\) must be \[3\]"):
        swiglu_linear(x, x, torch.randn(3, 8), torch.randn(2))
    with pytest.raises(TypeError, match="must share a dtype"):
        swiglu_linear(x, x, torch.randn(3, 8).half())
    with pytest.raises(ValueError, match=r"weights\[1\] \(3, 9\) must be \[out, 8\]"):
        shared_input_linears(x, [torch.randn(3, 8), torch.randn(3, 9)])
    with pytest.raises(ValueError, match="one bias"):
        shared_input_linears(x, [torch.randn(3, 8)], [None, None])
    with pytest.raises(TypeError, match="must share a dtype"):
        shared_input_linears(x, [torch.randn(3, 8).half()])
    with pytest.raises(ValueError, match="does not match the last dim"):
        rms_norm_keeping_input(x, torch.randn(9))


def test_backend_choice_and_override(monkeypatch):
    backend, reason = choose_backend(torch.device("cpu"))
    assert backend == backends_for("cpu")[0] and reason
    with force_backend("reference"):
        assert choose_backend(torch.device("cpu"))[0] == "reference"
    monkeypatch.setenv("ACCEL_PATCH_BACKEND", "fast")
    with pytest.raises(ValueError, match="ACCEL_PATCH_BACKEND"):
        choose_backend(torch.device("cpu"))
    with pytest.raises(ValueError, match="not one of"), force_backend("cuda"):
        pass


def test_fake_tensors_count_as_tracing():
    """AOTAutograd traces CUDA backwards on the autograd engine's thread, where ``is_compiling()`` reads False:
    its fake tensors alone must send the ops to their registered form (tests/test_patching.py runs that case)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = torch.randn(2)
    fake = FakeTensorMode().from_tensor(real)
    assert tracing(real, fake)
    assert not tracing(real, torch.nn.Parameter(real), 3, None)


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_ops_compile_fullgraph(backend):
    def block(x, w, q, k, cos, sin, g, u, down):
        y, h = rms_norm(x, w, 1e-6, residual=x * 2)
        qo, ko = apply_rope(q, k, cos, sin)
        normed, kept = rms_norm_keeping_input(h, w)
        first, second = shared_input_linears(g, [down, down * 2])
        total = y.sum() + h.sum() + qo.sum() + ko.sum() + swiglu(g, u).sum() + swiglu_linear(g, u, down).square().sum()
        return total + (normed * kept).sum() + first.sum() + second.square().sum()

    torch._dynamo.reset()
    args = [torch.randn(3, 16), torch.rand(16) + 0.5, torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)]
    args += list(hf_cos_sin(1, 5, 8, "cpu")) + [torch.randn(3, 24), torch.randn(3, 24), torch.randn(5, 24)]
    leaves = (0, 1, 2, 6, 8)
    args = [a.requires_grad_() if i in leaves else a for i, a in enumerate(args)]
    with force_backend(backend):
        expected = block(*args)
        expected_grads = torch.autograd.grad(expected, [args[i] for i in leaves])
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        got = compiled(*args)
        got_grads = torch.autograd.grad(got, [args[i] for i in leaves])
    torch.testing.assert_close(got, expected)
    # float32 rounding differs: traced, the linears' input gradients are summed by separate adds, eagerly inside
    # the GEMMs (random inputs put one element of 72 at 2e-5 relative once in many runs)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_inductor_runs_our_ops_as_declared_fallbacks():
    """Inductor must not decide by itself to run our ops as fallbacks: deciding, it logs the op's arguments, and
    formatting them for an op first met deep in a graph (the loss after 16 decoder layers) outlasted the compile
    itself (torch < 2.13 formats that line even with the log off; here the log is on to show the decision)."""
    from torch._inductor import lowering
    from torch._subclasses.fake_tensor import FakeTensorMode

    ours = [op for op in list(lowering.lowerings) if getattr(op, "namespace", None) == _backend.OP_NAMESPACE]
    for op in ours:  # undo any earlier compile in this process, so that this one must declare them again
        del lowering.lowerings[op]
    _backend.declare_inductor_fallbacks.cache_clear()
    FakeTensorMode.cache_clear()  # cached fake results would skip our fake implementations, which declare them

    def chain(x, w, gate, up):
        for _ in range(3):
            normed, x = rms_norm(x, w, 1e-6, residual=x)
        return swiglu(gate, up).sum() + normed.square().sum()  # swiglu first met after the chain

    torch._dynamo.reset()
    args = [torch.randn(4, 16), torch.rand(16) + 0.5, torch.randn(4, 24), torch.randn(4, 24)]
    log = logging.getLogger("torch._inductor.graph")  # torch's loggers do not propagate to pytest's capture
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    no_caches = {"fx_graph_cache": False, "fx_graph_remote_cache": False}  # a cache hit would skip the lowering
    try:
        with force_backend("reference"), torch._inductor.config.patch(no_caches):
            expected = chain(*args)
            got = torch.compile(chain, backend="inductor")(*args)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    torch.testing.assert_close(got, expected)
    decided = [message for message in messages if "Creating implicit fallback" in message]
    assert not [message for message in decided if _backend.OP_NAMESPACE in message], decided
    assert all(getattr(torch.ops.accel_patch, name).default in lowering.lowerings for name in ("rms_norm", "swiglu"))


# ---------------------------------------------------------------- cached launches (GPU: the interpreter has none)


def _launcher(module: str, name: str):
    kernel = getattr(importlib.import_module(f"accel_patch.kernels.{module}"), name)
    assert type(kernel).__name__ == "_CachedLaunch" and kernel.direct, "direct launches are off on this Triton"
    return kernel


@pytest.mark.gpu
def test_cached_launch_keeps_one_compiled_kernel_per_specialisation():
    kernel = _launcher("rms_norm", "_rms_norm_fwd_kernel")
    kernel.launches.clear()
    buffer = torch.randn(4 * 80 + 1, device="cuda", dtype=torch.float16)
    cases = {  # each changes what Triton specialises on: pointer alignment, or strides' divisibility by 16
        "aligned rows of 64": buffer[: 4 * 64].view(4, 64),
        "rows of 64 one element off 16-byte alignment": buffer[1 : 1 + 4 * 64].view(4, 64),
        "rows of 17": buffer[: 4 * 17].view(4, 17),
        "rows of 64 strided by 72": buffer[: 4 * 72].view(4, 72)[:, :64],
    }
    for _ in range(3):  # the first round goes through Triton, the next two through the remembered launches
        for name, x in cases.items():
            w = torch.rand(x.shape[-1], device="cuda", dtype=torch.float16) + 0.5
            err = rel_err(rms_norm(x, w, 1e-6), rms_norm64(x.double(), w.double(), 1e-6)[0])
            assert err < TOL[torch.float16], f"{name}: relative error {err:.2e}"
    assert len(kernel.launches) == len(cases)
    # the remembered launches call the compiled launcher's C entry point, not Triton's Python wrapper around it
    assert all(type(launch).__name__ == "builtin_function_or_method" for launch, *_ in kernel.launches.values())


@pytest.mark.gpu
def test_cached_launch_of_an_autotuned_kernel_follows_each_tuning_key():
    kernel = _launcher("attention", "_attn_fwd_kernel")
    kernel.launches.clear()
    for _ in range(3):  # alternating head dims: each must launch its own tuned config's kernel and grid
        for head_dim, seq in ((64, 300), (128, 129)):
            q = torch.randn(2, 8, seq, head_dim, device="cuda", dtype=torch.float16)
            k, v = (torch.randn(2, 2, seq, head_dim, device="cuda", dtype=torch.float16) for _ in range(2))
            expected, _ = attention_ref(q, k, v, None, None, True, 0, head_dim**-0.5)
            assert rel_err(attention(q, k, v), expected) < TOL[torch.float16]
    assert len(kernel.launches) == 2


@pytest.mark.gpu
def test_cached_launch_gives_way_to_triton_launch_hooks():
    from triton import knobs

    _launcher("rms_norm", "_rms_norm_fwd_kernel")
    x, w = torch.randn(8, 64, device="cuda"), torch.rand(64, device="cuda")
    rms_norm(x, w)  # remembered
    seen = []
    hook = lambda metadata: seen.append(metadata)  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        rms_norm(x, w)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(seen) == 1


@pytest.mark.gpu
@pytest.mark.two_gpus
def test_kernels_launch_on_the_gpu_that_holds_their_tensors():
    """cuda:0 is current, the tensors live on cuda:1 (a layer that ``device_map="auto"`` put there)."""
    assert torch.cuda.current_device() == 0
    x = torch.randn(64, 256, device="cuda:1", dtype=torch.float16, requires_grad=True)
    w = torch.rand(256, device="cuda:1", dtype=torch.float16) + 0.5
    x64 = x.detach().double().requires_grad_()
    for _ in range(2):  # through Triton, then the remembered launch
        y = rms_norm(x, w, 1e-6)
        assert y.device == x.device
        assert rel_err(y, rms_norm64(x64, w.double(), 1e-6)[0]) < TOL[torch.float16]
    _grads_match({"x": x64}, rms_norm64(x64, w.double(), 1e-6)[0], {"x": x}, y, TOL[torch.float16])
    q = torch.randn(1, 4, 64, 64, device="cuda:1", dtype=torch.float16)
    k, v = (torch.randn(1, 2, 64, 64, device="cuda:1", dtype=torch.float16) for _ in range(2))
    expected, _ = attention_ref(q, k, v, None, None, True, 0, 64**-0.5)
    for _ in range(2):
        assert rel_err(attention(q, k, v), expected) < TOL[torch.float16]
    assert torch.cuda.current_device() == 0
