"""W8A16 GEMM at LLaMA-3-8B Linear shapes, bf16 activations: ours vs cuBLAS bf16, torchao and bitsandbytes.

Small M (decode) is memory-bound: reported as GB/s of weight bytes read and the fraction of copy bandwidth.
Large M is compute-bound: TFLOP/s and the ratio to cuBLAS bf16. The rates come from a CUDA graph that runs the
Linear on several copies of its weights back to back, as a decode step runs its layers (device time only, every
call reading its weights from memory: ``common.stream_ms``). Beside it: one graph replay after do_bench's L2
flush (the earlier method, which also charges a memory-bound call the write-back of the flush's dirty lines and
the graph's launch) and the eager time per call, host included. Run on a CUDA GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from accel_patch import Int8Linear

from common import copies_beyond_l2, copy_bandwidth, graph_ms, has, median_ms, read_ms, stream_ms, write_table

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)]  # (in, out)
TOKENS = [1, 16, 64, 128, 256, 512, 1024, 2048, 8192]
SMALL_M = 16  # the decode rows: memory-bound, where the read floor is shown beside them
FLOOR_ROW = "read of int8 weight alone (floor)"


def _torchao(linear: torch.nn.Linear) -> torch.nn.Module:
    import copy

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    module = copy.deepcopy(torch.nn.Sequential(linear))
    quantize_(module, Int8WeightOnlyConfig())
    return module


def _bitsandbytes(linear: torch.nn.Linear) -> torch.nn.Module:
    import bitsandbytes as bnb

    module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False,
                                 threshold=0.0)  # fmt: skip
    module.weight = bnb.nn.Int8Params(linear.weight.detach().cpu(), requires_grad=False, has_fp16_weights=False)
    return module.cuda()


def _cublas(linear: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    weight = linear.weight.detach().clone()
    return lambda x: F.linear(x, weight)


def _builders() -> tuple[dict[str, Callable[[torch.nn.Linear], Callable]], list[str]]:
    """Each implementation as a function from a bf16 Linear to a callable on x (its own copy of the weights)."""
    builders = {"cuBLAS bf16": _cublas, "ours W8A16": Int8Linear.from_linear}
    if has("torchao"):
        builders["torchao int8wo"] = _torchao
    if has("bitsandbytes"):
        builders["bitsandbytes 8bit"] = _bitsandbytes
    notes = [f"{module} is not installed here: no rows for it" for module in ("torchao", "bitsandbytes")
             if not has(module)]  # fmt: skip
    return builders, notes


def _weight_bytes(name: str, n: int, k: int) -> int:
    return 2 * n * k if name == "cuBLAS bf16" else n * k + 4 * n  # int8 values and a float32 scale per row


def main() -> None:
    copy_bw = copy_bandwidth()
    rows, notes = [], [f"copy bandwidth measured in this run: {copy_bw / 1e9:.0f} GB/s"]
    builders, build_notes = _builders()
    notes += build_notes
    for k, n in SHAPES:
        linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        impls = {}
        for name, build in builders.items():
            try:
                impls[name] = [build(linear) for _ in range(copies_beyond_l2(_weight_bytes(name, n, k)))]
            except Exception as error:  # an API that moved between releases: record it, keep measuring the rest
                notes.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0]}")
        # what any kernel reading the int8 weights must take at this size: the floor under the small-M rows
        ours = impls.get("ours W8A16", [])
        floor_ms = read_ms([(layer.weight,) for layer in ours]) if ours else None
        for m in TOKENS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            stream, single, eager = {}, {}, {}
            with torch.no_grad():
                for name, copies in impls.items():
                    try:
                        eager[name] = median_ms(lambda fn=copies[0], x=x: fn(x))
                        single[name] = graph_ms(lambda fn=copies[0], x=x: fn(x), [])
                        stream[name] = stream_ms([lambda fn=fn, x=x: fn(x) for fn in copies])
                    except Exception as error:  # e.g. a baseline that cannot be captured in a CUDA graph
                        notes.append(f"{name} at M={m}, {k}->{n}: {type(error).__name__}: {str(error)[:120]}")
            for name, ms in stream.items():
                speedup = stream["cuBLAS bf16"] / ms
                of_floor = "-" if floor_ms is None or m > SMALL_M or name == "cuBLAS bf16" else f"{floor_ms / ms:.0%}"
                gbps = _weight_bytes(name, n, k) / (ms * 1e-3) / 1e9
                rows.append([f"{k}->{n}", str(m), name, f"{ms * 1e3:.1f}", f"{single[name] * 1e3:.1f}",
                             f"{eager[name] * 1e3:.1f}", f"{gbps:.0f}", f"{gbps * 1e9 / copy_bw:.0%}",
                             f"{2 * m * n * k / (ms * 1e-3) / 1e12:.0f}", f"{speedup:.2f}x", of_floor])  # fmt: skip
            if floor_ms is not None and m <= SMALL_M:
                gbps = n * k / (floor_ms * 1e-3) / 1e9
                rows.append([f"{k}->{n}", str(m), FLOOR_ROW, f"{floor_ms * 1e3:.1f}", "-", "-", f"{gbps:.0f}",
                             f"{gbps * 1e9 / copy_bw:.0%}", "-", f"{stream['cuBLAS bf16'] / floor_ms:.2f}x", "100%"])
        del impls
        torch.cuda.empty_cache()
    header = ["shape", "M", "implementation", "µs (layer stream)", "µs (one call after L2 flush)", "µs eager",
              "weight GB/s", "of copy BW", "TFLOP/s", "speed vs cuBLAS bf16", "of the int8 read floor"]  # fmt: skip
    notes.append("layer stream: one CUDA graph calling the Linear on distinct copies of its weights, 4x the L2 cache "
                 "in all; GB/s, TFLOP/s and the speed ratio come from it")  # fmt: skip
    notes.append(f"{FLOOR_ROW} (shown up to M={SMALL_M}): a kernel that only reads the same int8 weight bytes in the "
                 "same stream, one launch per layer (common.read_ms): no W8A16 kernel can beat it at that size; the "
                 "last column is it over each 8-bit row's time")  # fmt: skip
    write_table("int8-gemm", "W8A16 GEMM (bf16 activations)", header, rows, notes)


if __name__ == "__main__":
    main()
