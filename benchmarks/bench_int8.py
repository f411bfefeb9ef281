"""W8A16 GEMM at LLaMA-3-8B Linear shapes, bf16 activations: ours vs cuBLAS bf16, torchao and bitsandbytes.

Small M (decode) is memory-bound: reported as GB/s of weight bytes read and the fraction of copy bandwidth.
Large M is compute-bound: TFLOP/s and the ratio to cuBLAS bf16. Rates come from CUDA-graph replays (device time
only: at small M an eager call's host time exceeds the kernel's); the eager time per call is listed beside it.
Run on a CUDA GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from accel_patch import Int8Linear

from common import copy_bandwidth, graph_ms, has, median_ms, write_table

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)]  # (in, out)
TOKENS = [1, 16, 64, 128, 512, 1024, 2048, 8192]


def _baselines(linear: torch.nn.Linear) -> tuple[dict, list[str]]:
    impls, notes = {"cuBLAS bf16": lambda x: F.linear(x, linear.weight)}, []
    ours = Int8Linear.from_linear(linear)
    impls["ours W8A16"] = ours
    if has("torchao"):
        try:
            import copy

            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            ao = copy.deepcopy(torch.nn.Sequential(linear))
            quantize_(ao, Int8WeightOnlyConfig())
            impls["torchao int8wo"] = ao
        except Exception as error:  # an API that moved between releases: record it, keep measuring the rest
            notes.append(f"torchao: {type(error).__name__}: {str(error).splitlines()[0]}")
    if has("bitsandbytes"):
        try:
            import bitsandbytes as bnb

            lin8 = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False,
                                       has_fp16_weights=False, threshold=0.0)  # fmt: skip
            lin8.weight = bnb.nn.Int8Params(linear.weight.detach().cpu(), requires_grad=False,
                                            has_fp16_weights=False)  # fmt: skip
            impls["bitsandbytes 8bit"] = lin8.cuda()
        except Exception as error:
            notes.append(f"bitsandbytes: {type(error).__name__}: {str(error).splitlines()[0]}")
    notes += [f"{module} is not installed here: no rows for it" for module in ("torchao", "bitsandbytes")
              if not has(module)]  # fmt: skip
    return impls, notes


def main() -> None:
    copy_bw = copy_bandwidth()
    rows, notes = [], [f"copy bandwidth measured in this run: {copy_bw / 1e9:.0f} GB/s"]
    for k, n in SHAPES:
        linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        impls, impl_notes = _baselines(linear)
        notes += [note for note in impl_notes if note not in notes]  # the same per shape: once
        int8_bytes = n * k + 4 * n
        for m in TOKENS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            device_ms, eager_ms = {}, {}
            with torch.no_grad():
                for name, fn in impls.items():
                    try:
                        eager_ms[name] = median_ms(lambda fn=fn, x=x: fn(x))
                        device_ms[name] = graph_ms(lambda fn=fn, x=x: fn(x), [])
                    except Exception as error:  # e.g. a baseline that cannot be captured in a CUDA graph
                        notes.append(f"{name} at M={m}, {k}->{n}: {type(error).__name__}: {str(error)[:120]}")
            for name, ms in device_ms.items():
                weight_bytes = 2 * n * k if name == "cuBLAS bf16" else int8_bytes
                gbps = weight_bytes / (ms * 1e-3) / 1e9
                rows.append([f"{k}->{n}", str(m), name, f"{ms * 1e3:.1f}", f"{eager_ms[name] * 1e3:.1f}", f"{gbps:.0f}",
                             f"{gbps * 1e9 / copy_bw:.0%}", f"{2 * m * n * k / (ms * 1e-3) / 1e12:.0f}",
                             f"{device_ms['cuBLAS bf16'] / ms:.2f}x"])  # fmt: skip
    header = ["shape", "M", "implementation", "µs (graph)", "µs eager", "weight GB/s", "of copy BW", "TFLOP/s",
              "speed vs cuBLAS bf16"]  # fmt: skip
    write_table("int8-gemm", "W8A16 GEMM (bf16 activations)", header, rows, notes)


if __name__ == "__main__":
    main()
