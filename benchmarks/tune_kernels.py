"""Sweep launch configs of the memory-bound backward kernels at LLaMA-3-8B shapes (bf16, CUDA), and print what the
attention kernels' autotuner measured for each of its configs. Modes: (none), attention, swiglu, gemv (INT8 one row),
int8decode (INT8 at 16 rows), decode (the attention decode kernel's launch constants).

Prints GB/s of the fewest bytes for each config, so the defaults in kernels/ can be chosen by measurement.
"""

from __future__ import annotations

import functools
import importlib
import itertools

import torch
import triton

from common import copies_beyond_l2, copy_bandwidth, median_ms, stream_ms

# the package exports functions of the same names, so fetch the modules themselves
rms_norm_module = importlib.import_module("accel_patch.kernels.rms_norm")
rope_module = importlib.import_module("accel_patch.kernels.rope")
swiglu_module = importlib.import_module("accel_patch.kernels.swiglu")
attention_module = importlib.import_module("accel_patch.kernels.attention")
int8_module = importlib.import_module("accel_patch.kernels.int8_matmul")


def _sweep(title: str, configs, run, flops: float) -> None:
    print(title)
    for config in configs:
        try:
            print(f"  {config}: {flops / median_ms(lambda c=config: run(c)) / 1e9:5.0f}")
        except Exception as error:  # out of shared memory or registers at this config
            print(f"  {config}: failed {type(error).__name__}")


def _print_stream_rate(label, calls, nbytes: int, copy_bw: float) -> None:
    """One line: ``label``, then the GB/s of ``nbytes`` per call in a stream of ``calls`` (and the share of copy
    bandwidth), or why the config failed."""
    try:
        ms = stream_ms(calls)
    except Exception as error:  # out of shared memory or registers at this config
        print(f"    {label}: failed {type(error).__name__}")
        return
    rate = nbytes / (ms * 1e-3)
    print(f"    {label}: {ms * 1e3:7.1f} µs {rate / 1e9:6.0f} GB/s ({rate / copy_bw:.0%})")


def _tune_attention_dim(d: int) -> None:
    """Run the autotuned attention kernels once and print every config's time, as the autotuner measured it.
    The shape is LLaMA-3's (32 query heads over 8 KV heads) at batch 4 x 2048 tokens."""
    b, h, h_kv, n = 4, 32, 8, 2048
    q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, h_kv, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    flops = 2 * b * h * n * n * d  # causal forward
    out, lse = attention_module._attn_fwd_triton(q, k, v, None, None, True, 0, d**-0.5)
    attention_module._attn_bwd_triton(torch.randn_like(out), q, k, v, out, lse, None, None, True, 0, d**-0.5)
    kernels = (("fwd", attention_module._attn_fwd_kernel, 1.0), ("bwd dK/dV", attention_module._attn_bwd_dkdv_kernel,
               1.5), ("bwd dQ", attention_module._attn_bwd_dq_kernel, 1.0))  # fmt: skip
    for name, kernel, share in kernels:
        print(f"attention {name} ({b}, {h}/{h_kv}, {n}, {d}) causal: BLOCK_M, BLOCK_N, warps, stages -> ms, TFLOP/s")
        for config, timing in sorted(kernel.configs_timings.items(), key=lambda item: item[1][0]):
            shape = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
            print(f"  {shape}: {timing[0]:.3f} ms, {share * flops / timing[0] / 1e9:5.0f}")


def tune_attention() -> None:
    for d in (128, 64):
        _tune_attention_dim(d)

def tune_swiglu() -> None:
    """Row layout (16384 rows of 14336: a 75%-full tail block per row) vs the same bytes as full blocks."""
    copy_bw = copy_bandwidth()
    m, n = 16384, 14336
    g, u, dy = (torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for block, warps in ((8192, 16), (8192, 8), (4096, 8), (16384, 16), (16384, 32)):
        for layout in ("rows", "full blocks"):
            shape = (m, n) if layout == "rows" else (m * n // block, block)
            gs, us, dys = g.view(shape), u.view(shape), dy.view(shape)
            try:
                fwd = median_ms(lambda: swiglu_module._swiglu_fwd_triton(gs, us, block, warps))  # noqa: B023
                bwd = median_ms(lambda: swiglu_module._swiglu_bwd_triton(dys, gs, us, block=block, warps=warps))  # noqa: B023
            except Exception as error:
                print(f"  {block} {warps} {layout}: failed {type(error).__name__}")
                continue
            fwd_rate, bwd_rate = 3 * m * n * 2 / fwd / 1e-3, 5 * m * n * 2 / bwd / 1e-3
            print(f"  {block:>5} {warps:>2} {layout:<11}: fwd {fwd_rate / copy_bw:.1%}  bwd {bwd_rate / copy_bw:.1%}")


def _int8_weight_streams():
    """Per LLaMA-3-8B Linear shape ``(in, out)``: ``(in, out, [(int8 weight, scale), ...])``, enough copies to make
    4x the L2 cache (as a decode step's layers stream them)."""
    for k, n in ((4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)):
        yield k, n, [int8_module.quantize_per_channel(torch.randn(n, k, device="cuda"))
                     for _ in range(copies_beyond_l2(n * k))]  # fmt: skip


def tune_gemv() -> None:
    """The INT8 one-row (batch-1 decode) kernel at LLaMA-3-8B shapes, device time per call in a stream of layers
    (``common.stream_ms``: weights beyond the L2 cache, as in a decode step)."""
    copy_bw = copy_bandwidth()
    print(f"W8A16 one row: (in, out), BLOCK_N, BLOCK_K, warps, stages -> µs, int8 weight GB/s (copy "
          f"{copy_bw / 1e9:.0f})")  # fmt: skip
    for k, n, layers in _int8_weight_streams():
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        print(f"  {k}->{n}: default {int8_module._gemv_blocks(n, k, x.device)}")
        for launch in itertools.product((2, 4, 8, 16, 32, 64), (256, 512, 1024, 2048, 4096), (4, 8), (1, 2, 3, 4)):
            if not 2048 <= launch[0] * launch[1] <= 32768:
                continue
            calls = [functools.partial(int8_module._gemv_triton, x, w, scale, None, n, (1, k), launch)
                     for w, scale in layers]  # fmt: skip
            _print_stream_rate(launch, calls, n * k, copy_bw)


def tune_int8_decode() -> None:
    """The INT8 decode kernel at 16 rows (issue 5's memory-bound target), LLaMA-3-8B shapes, over its tile: (BLOCK_N,
    BLOCK_K, stages, programs per SM) as ``_decode_launch`` takes them; device time per call in a stream of layers,
    GB/s of the int8 weight."""
    copy_bw = copy_bandwidth()
    print(f"W8A16 decode, 16 rows: (in, out), (BLOCK_N, BLOCK_K, stages, per SM) -> µs, int8 weight GB/s (copy "
          f"{copy_bw / 1e9:.0f})")  # fmt: skip
    for k, n, layers in _int8_weight_streams():
        x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
        default = int8_module._decode_launch(16, n, k, x.device)
        print(f"  {k}->{n}: default grid {default[0]}, {default[2]}")
        for tile in itertools.product((16, 32, 64), (128, 256, 512), (2, 3, 4, 5), (1, 2)):
            calls = [functools.partial(int8_module._matmul_triton, x, w, scale, None, True, n, (1, k), tile)
                     for w, scale in layers]  # fmt: skip
            _print_stream_rate(tile, calls, n * k, copy_bw)


DECODE_CONSTANTS = ("DECODE_BLOCK_N", "DECODE_MIN_KEYS", "DECODE_WARPS", "DECODE_STAGES")


def _set_decode_constants(values: tuple[int, ...]) -> None:
    for name, value in zip(DECODE_CONSTANTS, values, strict=True):
        setattr(attention_module, name, value)


def tune_decode() -> None:
    """The attention decode kernel (one query; 32 query / 8 KV heads x 128, bf16) over its launch constants: keys per
    block, the fewest keys per split, warps and pipeline stages. Device time per call in a stream of layers, each
    with its own cache (``common.stream_ms``), as bench_attention's decode table times it."""
    copy_bw = copy_bandwidth()
    defaults = tuple(getattr(attention_module, name) for name in DECODE_CONSTANTS)
    print(f"decode: BLOCK_N, MIN_KEYS, warps, stages -> µs, K+V GB/s (copy {copy_bw / 1e9:.0f}); default {defaults}")
    for batch, kv_len in ((1, 4096), (1, 32768), (16, 4096)):
        kv_bytes = 2 * batch * 8 * kv_len * 128 * 2
        layers = [(torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16),
                   *(torch.randn(batch, 8, kv_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)))
                  for _ in range(copies_beyond_l2(kv_bytes))]  # fmt: skip
        print(f"  batch {batch} x {kv_len} keys")
        for block_n, blocks, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (4, 8), (2, 3, 4)):
            launch = (block_n, blocks * block_n, warps, stages)
            _set_decode_constants(launch)
            calls = [functools.partial(attention_module._attn_decode_triton, q, k, v, None, None, 0, 128**-0.5)
                     for q, k, v in layers]  # fmt: skip
            _print_stream_rate(launch, calls, kv_bytes, copy_bw)
        del layers
    _set_decode_constants(defaults)


def main() -> None:
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    m, n = 16384, 4096
    dy, x = (torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.rand(n, device="cuda", dtype=torch.bfloat16)
    rstd = torch.rand(m, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    nbytes = 3 * m * n * 2
    print("RMSNorm backward 16384x4096: BLOCK_M, warps, programs/SM -> GB/s")
    for block_m in (1, 2, 4, 8):
        for warps in (4, 8, 16):
            for per_sm in (1, 2, 4, 8):
                config = (block_m, triton.next_power_of_2(n), warps, sms * per_sm)
                try:
                    ms = median_ms(lambda c=config: rms_norm_module._bwd_triton(dy, None, x, w, rstd, c))
                except Exception as error:  # out of resources at this config
                    print(f"  {block_m:>2} {warps:>2} {per_sm}: failed {type(error).__name__}")
                    continue
                rate = nbytes / ms / 1e-3
                print(f"  {block_m:>2} {warps:>2} {per_sm}: {rate / 1e9:7.0f} ({rate / copy_bw:.0%})")
    b, s, hq, hk, d = 4, 4096, 32, 8, 128
    cos, sin = (torch.randn(b, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    layouts = {
        "HF transposed": (torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2),
                          torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)),
        "contiguous": (torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16),
                       torch.randn(b, hk, s, d, device="cuda", dtype=torch.bfloat16)),
    }
    nbytes = 2 * b * s * (hq + hk) * d * 2
    print("RoPE: layout, tile elements -> GB/s")
    for name, (q, k) in layouts.items():
        for tile in (2048, 4096, 8192, 16384, 32768):
            ms = median_ms(lambda q=q, k=k, t=tile: rope_module._rope_triton(q, k, cos, sin, True, t))
            rate = nbytes / ms / 1e-3
            print(f"  {name:<14} {tile:>6}: {rate / 1e9:7.0f} ({rate / copy_bw:.0%})")

    m, n = 16384, 14336
    g, u, dy = (torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    print("SwiGLU 16384x14336: block, warps -> fwd GB/s, bwd GB/s")
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            fwd = median_ms(lambda b=block, w=warps: swiglu_module._swiglu_fwd_triton(g, u, b, w))
            bwd = median_ms(lambda b=block, w=warps: swiglu_module._swiglu_bwd_triton(dy, g, u, block=b, warps=w))
            fwd_rate, bwd_rate = 3 * m * n * 2 / fwd / 1e-3, 5 * m * n * 2 / bwd / 1e-3
            print(f"  {block:>5} {warps:>2}: {fwd_rate / 1e9:6.0f} ({fwd_rate / copy_bw:.0%})"
                  f" {bwd_rate / 1e9:6.0f} ({bwd_rate / copy_bw:.0%})")


if __name__ == "__main__":
    import sys

    if "attention" in sys.argv[1:]:
        tune_attention()
    elif "swiglu" in sys.argv[1:]:
        tune_swiglu()
    elif "gemv" in sys.argv[1:]:
        tune_gemv()
    elif "int8decode" in sys.argv[1:]:
        tune_int8_decode()
    elif "decode" in sys.argv[1:]:
        tune_decode()
    else:
        main()
