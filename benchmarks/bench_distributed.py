"""examples/finetune.py under `accelerate launch` on one GPU, then DDP and FSDP2 on two, with the same global batch:
tokens/s, its scaling over one GPU, peak memory per GPU, and how far each step's loss is from the one-GPU run.

A random-init checkpoint of a bench_train config is saved first; every run loads it (float32 master weights,
bf16 autocast through ``--mixed_precision bf16``, AdamW) and trains the patched model on the synthetic stream.

    python benchmarks/bench_distributed.py                          # needs two CUDA GPUs
    python benchmarks/bench_distributed.py --config "Qwen3-1.7B" --steps 30
    python benchmarks/bench_distributed.py --stock --setups "1 GPU" FSDP2   # the stock HF model, for comparison
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_train import CONFIGS
from transformers import AutoConfig, AutoModelForCausalLM

from accel_patch.cli import positive

from common import slug, write_table

FINETUNE = Path(__file__).parent.parent / "examples" / "finetune.py"
SETUPS = ["1 GPU", "DDP", "FSDP2"]
WARMUP_STEPS = 3  # Triton compilation and autotuning, the allocator, NCCL's first collectives


def launch_flags(setup: str, layer: str) -> list[str]:
    """accelerate launch's flags for each setup, as a user would pass them; FSDP2 wraps each ``layer`` (the
    decoder layer's class name)."""
    if setup == "1 GPU":
        return ["--num_processes", "1"]
    if setup == "DDP":
        return ["--multi_gpu", "--num_processes", "2"]
    return ["--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", layer,
            "--fsdp_state_dict_type", "FULL_STATE_DICT"]  # fmt: skip


def run(setup: str, layer: str, checkpoint: Path, args: argparse.Namespace, log: Path) -> dict | str:
    """The run's record (finetune.py --log-json), or the last lines of its error output."""
    per_process_batch = args.batch_size * (2 if setup == "1 GPU" else 1)  # the same global batch in every setup
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision",
               "bf16", "--dynamo_backend", "no", *launch_flags(setup, layer), str(FINETUNE), "--model",
               str(checkpoint), "--seq-len", str(args.seq_len), "--batch-size", str(per_process_batch),
               "--max-steps", str(args.steps), "--lr", str(args.lr), "--log-json", str(log),
               *(["--no-patch"] if args.stock else [])]  # fmt: skip
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode != 0:
        print(f"{setup} failed:\n{child.stderr[-4000:]}", flush=True)
        return (child.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return json.loads(log.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(CONFIGS), default="LLaMA-3.2-1B")
    parser.add_argument("--steps", type=positive(int), default=20)
    parser.add_argument("--batch-size", type=positive(int), default=4, help="sequences per GPU in the two-GPU runs")
    parser.add_argument("--seq-len", type=positive(int), default=2048)
    parser.add_argument("--lr", type=positive(float), default=1e-5)
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=SETUPS, help="'1 GPU' is the reference")
    parser.add_argument("--stock", action="store_true", help="train the stock HF model instead of the patched one")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit(f"needs two CUDA GPUs; this machine has {torch.cuda.device_count()}")
    family, fields = CONFIGS[args.config]
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = Path(scratch) / "checkpoint"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **fields), dtype=torch.bfloat16)
        model.save_pretrained(checkpoint)
        layer = type(model.model.layers[0]).__name__
        del model
        results = {}
        for setup in [s for s in SETUPS if s in args.setups or s == "1 GPU"]:
            results[setup] = run(setup, layer, checkpoint, args, Path(scratch) / f"{slug(setup)}.json")
            print(setup, results[setup], flush=True)
    failures = [f"{setup} failed: {record}" for setup, record in results.items() if isinstance(record, str)]
    single = results["1 GPU"]
    if isinstance(single, str):
        raise SystemExit(failures[0])
    single_rate = single["tokens_per_step"] / statistics.median(single["step_seconds"][WARMUP_STEPS:])
    rows = []
    for setup, record in results.items():
        if isinstance(record, str):
            continue
        rate = record["tokens_per_step"] / statistics.median(record["step_seconds"][WARMUP_STEPS:])
        drift = max(abs(a - b) / abs(b) for a, b in zip(record["losses"], single["losses"], strict=True))
        rows.append([setup, str(record["processes"]), f"{rate / 1e3:.1f}k", f"{rate / single_rate:.2f}x",
                     f"{record['peak_gpu_bytes_per_process'] / 1e9:.1f}",
                     f"{record['losses'][0]:.4f} → {record['losses'][-1]:.4f}", f"{drift:.2e}"])  # fmt: skip
    header = ["setup", "GPUs", "tokens/s", "vs 1 GPU", "peak GB per GPU", "loss first → last",
              "max rel. loss diff vs 1 GPU"]  # fmt: skip
    notes = [f"{args.config} config, random init; global batch {2 * args.batch_size} x {args.seq_len} tokens per "
             f"step in every setup (1 GPU: {2 * args.batch_size} sequences; 2 GPUs: {args.batch_size} each)",
             "examples/finetune.py under accelerate launch --mixed_precision bf16: float32 master weights, bf16 "
             f"autocast, AdamW lr {args.lr}; " + ("the stock HF model (sdpa), not patched" if args.stock else
                                                  "patched model (every kernel, fused linear cross-entropy)"),
             f"tokens/s from the median step after {WARMUP_STEPS} warm-up steps of {args.steps}; the loss "
             "difference is the largest over all steps",
             "FSDP2 under accelerate's bf16 policy: bf16 parameters in compute, gradients reduced in bf16, and the "
             "loss returned in bf16 (hence its rounding)", *failures]  # fmt: skip
    model = "stock HF" if args.stock else "patched"
    write_table(f"distributed-{slug(args.config)}{'-stock' if args.stock else ''}",
                f"Fine-tuning on 1 and 2 GPUs, {args.config}, {model} model", header, rows, notes)  # fmt: skip


if __name__ == "__main__":
    main()
