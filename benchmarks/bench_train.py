"""Training step (forward + backward) of ~1B-parameter configs, random init, bf16, batch 4 x 2048, side by side:
stock HF (sdpa), Liger-Kernel (rope + rms_norm + swiglu, and with its fused linear cross-entropy), torch.compile of
the stock model, ours (patch_model: every kernel, fused linear cross-entropy included), and ours compiled.

Every variant runs the step as a training loop does, ``use_cache=False``: otherwise HF builds a KV cache in
training too, copying every layer's keys and values into it. Each variant runs in its own process: Liger patches
transformers' classes globally, and peak memory must not carry over. Reports tokens/s (median step) and peak
GPU memory; writes benchmarks/results/train-<GPU>.md.

    python benchmarks/bench_train.py              # all configs and variants, on a CUDA GPU
    python benchmarks/bench_train.py --tiny       # a seconds-long smoke run of the script itself (CPU works)
    python benchmarks/bench_train.py --configs LLaMA-3.2-1B --variants "HF sdpa" ours
    python benchmarks/bench_train.py --profile LLaMA-3.2-1B ours   # the step's CUDA kernels, by total time
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from accel_patch.cli import positive

CONFIGS = {  # family, config fields
    "LLaMA-3.2-1B": ("llama", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                    num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                    tie_word_embeddings=True)),
    "Mistral-style 1.2B": ("mistral", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                           num_key_value_heads=8, intermediate_size=8192, vocab_size=32768,
                                           sliding_window=1024)),
    "Qwen3-1.7B": ("qwen3", dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, head_dim=128,
                                 num_key_value_heads=8, intermediate_size=6144, vocab_size=151936,
                                 tie_word_embeddings=True)),
}  # fmt: skip
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256)  # fmt: skip
VARIANTS = ["HF sdpa", "Liger rope+rms_norm+swiglu", "Liger + fused linear CE", "torch.compile", "ours",
            "ours + torch.compile"]


def build(config_name: str, variant: str, tiny: bool, device: str) -> torch.nn.Module:
    family, fields = CONFIGS[config_name]
    config = AutoConfig.for_model(family, **(TINY if tiny else fields))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    if variant.startswith("Liger"):
        import liger_kernel.transformers as liger

        fused = variant == "Liger + fused linear CE"
        getattr(liger, f"apply_liger_kernel_to_{family}")(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                                          fused_linear_cross_entropy=fused, model=model)  # fmt: skip
    elif variant == "torch.compile":
        model = torch.compile(model)
    elif variant.startswith("ours"):
        import accel_patch

        accel_patch.patch_model(model)
        if variant == "ours + torch.compile":
            model = torch.compile(model)
    return model.train()


def model_flops_per_token(config_name: str, tiny: bool, seq: int) -> float:
    """Matmul FLOPs of forward + backward per token (3x the forward's): every Linear and the LM head, and causal
    attention over the whole sequence (a sliding window is not discounted). What MFU counts, not what a variant
    runs: recomputation is not included."""
    family, fields = CONFIGS[config_name]
    c = AutoConfig.for_model(family, **(TINY if tiny else fields))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q_dim, kv_dim = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    per_layer = c.hidden_size * (2 * q_dim + 2 * kv_dim) + 3 * c.hidden_size * c.intermediate_size
    linear = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size  # multiply-adds per token
    attention = c.num_hidden_layers * seq * q_dim  # QK^T and PV (2x), over half the keys on average (causal)
    return 3 * 2 * (linear + attention)  # forward + backward, 2 FLOPs per multiply-add


def profile(config_name: str, variant: str, tiny: bool) -> None:
    """Print the CUDA kernels of one training step, by total device time: where the step's time goes."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    measure(config_name, variant, tiny, steps=1)  # warm-up: compilation and autotuning stay out of the trace
    batch, seq = (2, 32) if tiny else (4, 2048)
    model = build(config_name, variant, tiny, device)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] * (device == "cuda"))
    with torch.profiler.profile(activities=activities) as trace:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(trace.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90))
    if device == "cuda":
        print_device_idle(trace)


def print_device_idle(trace: torch.profiler.profile, top: int = 12) -> None:
    """Where the GPU waited for the host: the gaps between one kernel's end and the next one's start."""
    from common import device_gaps

    span, gaps = device_gaps(trace)
    idle = sum(gap for gap, _, _ in gaps)
    print(f"device busy span {span / 1e3:.1f} ms, idle {idle / 1e3:.1f} ms in {len(gaps)} gaps; the largest:")
    for gap, before, after in sorted(gaps, reverse=True)[:top]:
        print(f"  {gap:8.0f} us  after {before[:60]}  before {after[:60]}")


def measure(config_name: str, variant: str, tiny: bool, steps: int) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch, seq = (2, 32) if tiny else (4, 2048)
    model = build(config_name, variant, tiny, device)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)

    def step() -> float:
        start = time.perf_counter()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(3):  # warm-up steps: compilation, autotuning, allocator
        step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    from common import ClockSampler

    with ClockSampler() as sampler:
        times = [step() for _ in range(steps)]
    clock, power = sampler.medians()
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else math.nan
    return {"tokens_per_s": batch * seq / statistics.median(times), "peak_gb": peak, "sm_mhz": clock,
            "watts": power}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=positive(int), default=10)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--profile", nargs=2, metavar=("CONFIG", "VARIANT"))
    parser.add_argument("--only", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.profile:
        profile(*args.profile, args.tiny)
        return
    if args.only:
        print(json.dumps(measure(*args.only, args.tiny, args.steps)))
        return
    from common import has, peak_bf16_tflops, slug, write_table

    variants = [v for v in args.variants if has("liger_kernel") or not v.startswith("Liger")]
    shape = "2 x 32 (--tiny)" if args.tiny else "4 x 2048"
    peak = None if args.tiny else peak_bf16_tflops()
    notes = [f"batch {shape} tokens, bf16 weights (float32 on CPU), forward + backward, median of "
                       f"{args.steps} steps after 3 warm-up, use_cache=False; each variant in its own process",
                       f"MFU: model matmul FLOPs (6 x Linear and LM-head parameters + causal attention, per token) "
                       f"x tokens/s over the GPU's dense bf16 peak ({peak or 'unknown'} TFLOP/s)",
                       "SM MHz, W: medians of the GPU's SM clock and board power, sampled by nvidia-smi every "
                       "50 ms over the timed steps: a power-capped GPU lowers its clock under dense tensor-core "
                       "work"]  # fmt: skip
    if not has("liger_kernel"):
        notes.append("liger-kernel is not installed: its rows are missing")
    for config_name in args.configs:
        rows, baseline = [], None
        for variant in variants:
            child = subprocess.run([sys.executable, __file__, "--only", config_name, variant, "--steps",
                                    str(args.steps), *(["--tiny"] if args.tiny else [])],
                                   capture_output=True, text=True)  # fmt: skip
            if child.returncode != 0:
                last = (child.stderr.strip().splitlines() or ["no output"])[-1]
                notes.append(f"{config_name} / {variant}: failed: {last[:200]}")
                print(notes[-1], flush=True)
                continue
            result = json.loads(child.stdout.strip().splitlines()[-1])
            baseline = baseline or result["tokens_per_s"]
            flops = model_flops_per_token(config_name, args.tiny, 32 if args.tiny else 2048) * result["tokens_per_s"]
            rows.append([config_name, variant, f"{result['tokens_per_s'] / 1e3:.1f}k",
                         f"{result['tokens_per_s'] / baseline:.2f}x", f"{flops / 1e12:.0f}",
                         f"{flops / 1e12 / peak:.0%}" if peak else "n/a", f"{result['peak_gb']:.1f}",
                         *(f"{result.get(key, math.nan):.0f}" for key in ("sm_mhz", "watts"))])  # fmt: skip
            print(" | ".join(rows[-1]), flush=True)  # as it comes: a long run cut short still reports
        if args.tiny:  # a check of the script, not a measurement: nothing goes to results/
            print(*notes, sep="\n")
            continue
        header = ["config", "variant", "tokens/s", "vs HF sdpa", "model TFLOP/s", "MFU", "peak GB", "SM MHz", "W"]
        # one table per config, so that configs measured in separate runs do not overwrite each other
        write_table(f"train-{slug(config_name)}",
                    f"Training step (forward + backward), {config_name} config, bf16", header, rows, notes)


if __name__ == "__main__":
    main()
