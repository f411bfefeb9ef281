"""End to end on a LLaMA-3.2-1B-shaped model (random weights, saved as bf16): weights memory, load time and peak,
and HF ``generate`` greedy decode tokens/s at batch 1 and 16 for bf16, ours (INT8 while loading; and bf16 with our
kernels, to separate the two), bitsandbytes 8-bit and torchao int8 weight-only, in one run. Run on a CUDA GPU.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import accel_patch

from common import device_gaps, has, write_table

NEW_TOKENS = 64
ROUNDS = 3


def _loaders(path: str) -> dict:
    loaders = {
        "bf16 (HF sdpa)": lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda"),
        "ours int8 + kernels": lambda: accel_patch.from_pretrained(path, quantize="int8", dtype=torch.bfloat16,
                                                                   device_map="cuda"),  # fmt: skip
        "ours bf16 + kernels": lambda: accel_patch.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda"),
    }
    if has("bitsandbytes"):
        from transformers import BitsAndBytesConfig

        loaders["bitsandbytes int8"] = lambda: AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, device_map="cuda", quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    if has("torchao"):
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        loaders["torchao int8wo"] = lambda: AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, device_map="cuda", quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    return loaders


def _decode_tokens_per_s(model, batch: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, 32), device="cuda")
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    return batch * NEW_TOKENS / (time.perf_counter() - start)


def _gpu_busy(model) -> float:
    """The fraction of a batch-1 decode during which the GPU runs anything (torch.profiler's CUDA activity over the
    span from its first to its last): the rest it waits for the host's launches."""
    ids = torch.randint(0, model.config.vocab_size, (1, 32), device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as trace:
        model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        torch.cuda.synchronize()
    span, gaps = device_gaps(trace)
    return 1 - sum(gap for gap, _, _ in gaps) / span


def main() -> None:
    config = AutoConfig.for_model(
        "llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, dtype=torch.bfloat16,
    )  # fmt: skip
    loaded, rows, notes = {}, [], []
    with tempfile.TemporaryDirectory() as path:
        with torch.device("cuda"):
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
        torch.cuda.empty_cache()
        for name, load in _loaders(path).items():  # all held at once (a few GB), so decode can be interleaved
            try:
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                model = load().eval()
                torch.cuda.synchronize()
                load_s = time.perf_counter() - start
                held = torch.cuda.memory_allocated() - base
                peak = torch.cuda.max_memory_allocated() - base
                loaded[name] = (model, [name, f"{held / 1e9:.2f}", f"{peak / 1e9:.2f}", f"{load_s:.1f}"])
            except Exception as error:  # a baseline whose API moved between releases: record it, measure the rest
                notes.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
    with torch.no_grad():
        for model, _ in loaded.values():  # warm-up (autotuning, allocator)
            for batch in (1, 16):
                _decode_tokens_per_s(model, batch)
        # rounds over all models in turn: the host's speed drifts within a run, and decode is host-bound
        rates = {name: [[], []] for name in loaded}
        for _ in range(ROUNDS):
            for name, (model, _) in loaded.items():
                for i, batch in enumerate((1, 16)):
                    rates[name][i].append(_decode_tokens_per_s(model, batch))
        for name, (model, row) in loaded.items():
            b1, b16 = (statistics.median(r) for r in rates[name])
            rows.append([*row, f"{b1:.1f}", f"{_gpu_busy(model):.0%}", f"{b16:.0f}"])
    notes.append(f"tokens/s: median of {ROUNDS} rounds, each running every model in turn")
    notes.append(f"greedy decode of {NEW_TOKENS} new tokens after a 32-token prompt, HF generate, dynamic cache")
    notes.append("GPU busy: the share of a batch-1 decode (16 tokens, under torch.profiler) in which the GPU runs "
                 "any kernel or copy; the rest of the time it waits for the host to launch the next one")  # fmt: skip
    write_table("int8-e2e", "INT8 end to end, LLaMA-3.2-1B config (random weights), bf16 activations",
                ["model", "weights GB", "load peak GB", "load s", "batch 1 tok/s", "b1 GPU busy", "batch 16 tok/s"],
                rows, notes)  # fmt: skip


if __name__ == "__main__":
    main()
