"""``accel-patch demo``: patch a LLaMA-architecture model and show it computes the same, faster."""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from .kernels import choose_backend
from .patching import patch_model


def _tiny_llama(device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    big = device.type == "cuda"
    config = LlamaConfig(
        vocab_size=32000 if big else 2048,
        hidden_size=1024 if big else 256,
        intermediate_size=2816 if big else 688,
        num_hidden_layers=8 if big else 4,
        num_attention_heads=16 if big else 8,
        num_key_value_heads=4 if big else 2,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).to(device)


def _load(path: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=dtype).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_step_ms(model: nn.Module, ids: torch.Tensor, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    for _ in range(steps + 2):  # two warm-up steps
        _sync(ids.device)
        start = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(ids.device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[2:])


def run_demo(model_path: str | None = None, steps: int = 5) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend, reason = choose_backend(device)
    stock = _load(model_path, device, dtype) if model_path else _tiny_llama(device, dtype)
    patched = patch_model(copy.deepcopy(stock))
    n_params = sum(p.numel() for p in stock.parameters())
    print(f"model: {type(stock).__name__} ({n_params / 1e6:.1f}M parameters, {dtype}) on {device}")
    print(f"kernels: {backend} backend ({reason})")

    batch, seq = (8, 1024) if device.type == "cuda" else (2, 64)
    vocab = stock.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    with torch.no_grad():
        expected, got = stock(ids).logits.float(), patched(ids).logits.float()
    rel = ((got - expected).norm() / expected.norm()).item()
    same_argmax = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(f"parity: logits relative error {rel:.2e}, same next-token argmax at {same_argmax:.1%} of positions")

    print("training (AdamW, same data): step  stock loss  patched loss")
    for model in (stock, patched):
        model.train()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (stock, patched)]
    for step in range(steps):
        losses = []
        for model, optimizer in zip((stock, patched), optimizers, strict=True):
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        print(f"{'':31}{step:>4}  {losses[0]:>10.4f}  {losses[1]:>12.4f}")

    prompt = ids[:1, :8]
    with torch.no_grad():
        outputs = [m.eval().generate(prompt, max_new_tokens=16, do_sample=False) for m in (stock, patched)]
    print(f"greedy generation of 16 tokens: {'identical' if torch.equal(*outputs) else 'different'} tokens")
    print(f"  patched: {outputs[1][0, 8:].tolist()}")

    timed = [_median_step_ms(m.train(), ids, steps) for m in (stock, patched)]
    print(f"time per training step (batch {batch} x {seq}, median of {steps}):")
    print(f"  stock HF (sdpa)   {timed[0]:8.1f} ms")
    print(f"  accel-patch       {timed[1]:8.1f} ms   ({timed[0] / timed[1]:.2f}x)")
