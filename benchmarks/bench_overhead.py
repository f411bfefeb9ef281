"""Host time per call on tiny CUDA tensors, where launch overhead (not bandwidth) sets the speed.

Small models and decode steps are host-bound; this shows each layer of our call path next to Liger-Kernel
and HF eager. Run on a CUDA GPU: ``python benchmarks/bench_overhead.py``.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable, Iterator

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from accel_patch.kernels import apply_rope, rms_norm
from accel_patch.kernels._triton import _CachedLaunch

from common import has, write_table

rope_module = importlib.import_module("accel_patch.kernels.rope")
rms_module = importlib.import_module("accel_patch.kernels.rms_norm")


def host_us(fn: Callable[[], object], calls: int = 2000) -> float:
    """Median over 5 rounds of host microseconds per call (the GPU is never waited on inside a round)."""
    for _ in range(50):
        fn()
    rounds = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(rounds)[2]


@contextlib.contextmanager
def triton_launch_path() -> Iterator[None]:
    """Our kernels launched through Triton's own path: the cached direct launch off, for its before/after."""
    launchers = [value for module in (rope_module, rms_module) for value in vars(module).values()
                 if isinstance(value, _CachedLaunch) and value.direct]  # fmt: skip
    for launcher in launchers:
        launcher.direct = False
    try:
        yield
    finally:
        for launcher in launchers:
            launcher.direct = True


def main() -> None:
    dt = torch.bfloat16
    q = torch.randn(1, 1, 8, 64, device="cuda", dtype=dt).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 1, 2, 64, device="cuda", dtype=dt).transpose(1, 2).requires_grad_()
    cos, sin = torch.randn(1, 1, 64, device="cuda", dtype=dt), torch.randn(1, 1, 64, device="cuda", dtype=dt)
    x = torch.randn(4, 256, device="cuda", dtype=dt, requires_grad=True)
    norm = LlamaRMSNorm(256).to("cuda", dt)
    w = norm.weight

    def fwd_bwd(run):
        def step():
            outputs = run()
            torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])

        return step

    cases = {
        "RoPE fwd": {
            "ours (apply_rope)": lambda: apply_rope(q, k, cos, sin),
            "ours, launcher only": lambda: rope_module._rope_triton(q, k, cos, sin, False),
            "HF eager": lambda: apply_rotary_pos_emb(q, k, cos, sin),
        },
        "RoPE fwd+bwd": {
            "ours (apply_rope)": fwd_bwd(lambda: apply_rope(q, k, cos, sin)),
            "HF eager": fwd_bwd(lambda: apply_rotary_pos_emb(q, k, cos, sin)),
        },
        "RMSNorm fwd": {
            "ours (rms_norm)": lambda: rms_norm(x, w),
            "ours, launcher only": lambda: rms_module._fwd_triton(x, w, None, 1e-6, dt),
            "HF eager": lambda: norm(x),
        },
        "RMSNorm fwd+bwd": {
            "ours (rms_norm)": fwd_bwd(lambda: (rms_norm(x, w),)),
            "HF eager": fwd_bwd(lambda: (norm(x),)),
        },
    }
    if has("liger_kernel"):
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction

        cases["RoPE fwd"]["Liger"] = lambda: LigerRopeFunction.apply(q, k, cos, sin)
        cases["RoPE fwd+bwd"]["Liger"] = fwd_bwd(lambda: LigerRopeFunction.apply(q, k, cos, sin))
        cases["RMSNorm fwd"]["Liger"] = lambda: LigerRMSNormFunction.apply(x, w, 1e-6)
        cases["RMSNorm fwd+bwd"]["Liger"] = fwd_bwd(lambda: (LigerRMSNormFunction.apply(x, w, 1e-6),))
    rows = []
    for case, impls in cases.items():
        for name, fn in impls.items():
            rows.append([case, name, f"{host_us(fn):.1f}"])
            if name.startswith("ours ("):
                with triton_launch_path():
                    rows.append([case, name.replace("ours", "ours, Triton's launch path"), f"{host_us(fn):.1f}"])
    write_table("overhead", "Host time per call on tiny tensors (µs, median of 5 rounds)",
                ["call", "implementation", "host µs per call"], rows,
                ["tiny shapes make GPU time negligible: this is the cost of the Python/launch path",
                 "Triton's launch path: the same calls with our cached direct launch turned off (one run, one "
                 "machine): what the cached launch saves"])


if __name__ == "__main__":
    main()
