"""RMSNorm, RoPE and SwiGLU at LLaMA-3-8B shapes, bf16: ours vs HF eager, torch.compile and Liger-Kernel.

Run on a CUDA GPU: ``python benchmarks/bench_kernels.py``. Bytes are the fewest any implementation must
move (each input read once, each output written once); GB/s divides those by the median CUDA-graph replay
time. Eager times (host overhead included) are reported beside them.
"""

from __future__ import annotations

import torch
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from accel_patch.kernels import apply_rope, rms_norm, swiglu

from common import copy_bandwidth, graph_ms, has, median_ms, pass_step, write_table

TOKENS, HIDDEN, INTERMEDIATE, Q_HEADS, KV_HEADS, HEAD_DIM = 16384, 4096, 14336, 32, 8, 128
BATCH, SEQ = 4, 4096  # TOKENS = BATCH * SEQ for RoPE
DT = torch.bfloat16
EPS = 1e-5


def _impls_rms_norm():
    x = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=DT, requires_grad=True)
    hf = LlamaRMSNorm(HIDDEN, eps=EPS).to("cuda", DT)
    hf.weight.data.uniform_(0.5, 1.5)
    w = hf.weight
    compiled = torch.compile(hf)
    impls = {
        "ours": lambda: (rms_norm(x, w, EPS),),
        "HF eager": lambda: (hf(x),),
        "torch.compile": lambda: (compiled(x),),
    }
    if has("liger_kernel"):
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        impls["Liger"] = lambda: (LigerRMSNormFunction.apply(x, w, EPS),)
    unit = TOKENS * HIDDEN * 2
    return impls, [x, w], 2 * unit, 5 * unit


def _impls_rope():
    q = torch.randn(BATCH, SEQ, Q_HEADS, HEAD_DIM, device="cuda", dtype=DT).transpose(1, 2).requires_grad_()
    k = torch.randn(BATCH, SEQ, KV_HEADS, HEAD_DIM, device="cuda", dtype=DT).transpose(1, 2).requires_grad_()
    positions = torch.arange(SEQ, device="cuda")[None].expand(BATCH, -1)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
    emb = torch.cat([positions[..., None].float() * inv_freq] * 2, -1)
    cos, sin = emb.cos().to(DT), emb.sin().to(DT)
    compiled = torch.compile(apply_rotary_pos_emb)
    impls = {
        "ours": lambda: apply_rope(q, k, cos, sin),
        "HF eager": lambda: apply_rotary_pos_emb(q, k, cos, sin),
        "torch.compile": lambda: compiled(q, k, cos, sin),
    }
    if has("liger_kernel"):
        from liger_kernel.ops.rope import LigerRopeFunction

        impls["Liger"] = lambda: LigerRopeFunction.apply(q, k, cos, sin)
    unit = 2 * BATCH * SEQ * (Q_HEADS + KV_HEADS) * HEAD_DIM * 2  # read + write of q and k
    return impls, [q, k], unit, 2 * unit


def _impls_swiglu():
    g = torch.randn(TOKENS, INTERMEDIATE, device="cuda", dtype=DT, requires_grad=True)
    u = torch.randn(TOKENS, INTERMEDIATE, device="cuda", dtype=DT, requires_grad=True)
    act = ACT2FN["silu"]

    def hf(gate, up):
        return act(gate) * up

    compiled = torch.compile(hf)
    impls = {
        "ours": lambda: (swiglu(g, u),),
        "HF eager": lambda: (hf(g, u),),
        "torch.compile": lambda: (compiled(g, u),),
    }
    if has("liger_kernel"):
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        impls["Liger"] = lambda: (LigerSiLUMulFunction.apply(g, u),)
    unit = TOKENS * INTERMEDIATE * 2
    return impls, [g, u], 3 * unit, 8 * unit


def main() -> None:
    copy_bw = copy_bandwidth()
    rows, verdicts = [], []
    ops = {
        f"RMSNorm {TOKENS}x{HIDDEN}": _impls_rms_norm,
        f"RoPE b{BATCH} s{SEQ} {Q_HEADS}/{KV_HEADS}x{HEAD_DIM}": _impls_rope,
        f"SwiGLU {TOKENS}x{INTERMEDIATE}": _impls_swiglu,
    }
    for op, make in ops.items():
        impls, leaves, bytes_fwd, bytes_fwd_bwd = make()
        for label, backward, nbytes in (("fwd", False, bytes_fwd), ("fwd+bwd", True, bytes_fwd_bwd)):
            graph, eager = {}, {}
            for name, run in impls.items():
                step = pass_step(run, backward)
                eager[name] = median_ms(step, grad_to_none=leaves)
                graph[name] = graph_ms(step, leaves)
            for name, ms in graph.items():
                rate = nbytes / (ms * 1e-3)
                rows.append([op, label, name, f"{ms:.3f}", f"{rate / 1e9:.0f}", f"{rate / copy_bw:.0%}",
                             f"{ms / graph['ours']:.2f}x", f"{eager[name]:.3f}", f"{eager[name] / eager['ours']:.2f}x"])
            best_rival = min(t for n, t in graph.items() if n in ("torch.compile", "Liger"))
            frac = nbytes / (graph["ours"] * 1e-3) / copy_bw
            verdicts.append(f"{op} {label}: ours at {frac:.0%} of copy bandwidth "
                            f"({'meets' if frac >= 0.85 else 'misses'} 85%), "
                            f"{best_rival / graph['ours']:.2f}x the best of torch.compile/Liger (graph replay)")
        del impls, leaves
        torch.cuda.empty_cache()
    header = ["op", "pass", "implementation", "graph ms", "GB/s", "of copy BW", "ours faster by",
              "eager ms", "ours faster by (eager)"]
    notes = [f"device-to-device copy measured in this run: {copy_bw / 1e9:.0f} GB/s (read + write)",
             "graph ms: median CUDA-graph replay of the pass (device work alone); eager ms: median of plain calls, "
             "host launch overhead included; GB/s and the copy fraction use graph ms"] + verdicts
    notes.append("Liger-Kernel " + ("included" if has("liger_kernel") else "not installed: its rows are absent"))
    write_table("kernels", "Kernel benchmark: bf16, LLaMA-3-8B shapes", header, rows, notes)


if __name__ == "__main__":
    main()
