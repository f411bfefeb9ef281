"""Fine-tune a patched causal LM with accelerate: full fine-tuning, or LoRA on an INT8 base.

    accelerate launch examples/finetune.py --model PATH --data train.txt --mode full
    accelerate launch --mixed_precision bf16 examples/finetune.py --model PATH --mode lora --grad-accum 4
    accelerate launch --cpu examples/finetune.py --tiny --max-steps 5        # anywhere, in about a minute

Precision, devices and distribution (DDP, FSDP) come from ``accelerate config`` / ``accelerate launch`` flags.
The saved checkpoint reloads with plain transformers (full) or PEFT (lora: the adapter alone).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import accel_patch
from accel_patch.cli import positive

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a local checkpoint (or hub name) of a LLaMA / Mistral / Qwen2 / Qwen3 model")
    source.add_argument("--tiny", action="store_true", help="a small random LLaMA config, for smoke runs")
    parser.add_argument("--mode", choices=["full", "lora"], default="full", help="lora: adapters on an INT8 base")
    parser.add_argument("--data", type=Path, help="a text file; without it, a synthetic token stream")
    parser.add_argument("--seq-len", type=positive(int), default=128)
    parser.add_argument("--batch-size", type=positive(int), default=4, help="sequences per device per micro-step")
    parser.add_argument("--grad-accum", type=positive(int), default=1, help="micro-steps per optimizer step")
    parser.add_argument("--max-steps", type=positive(int), default=100, help="optimizer steps")
    parser.add_argument("--lr", type=positive(float), default=None, help="default: 1e-4 full, 1e-3 lora")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-patch", action="store_true", help="train the stock HF model, for comparison")
    parser.add_argument("--output-dir", type=Path, help="where to save the trained model (or the adapter)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-json", type=Path, help="write every step's loss and seconds, and peak GPU memory")
    return parser.parse_args(argv)


def tiny_config():
    # tied embeddings, as LLaMA-3.2-1B and Qwen3 have them
    return AutoConfig.for_model("llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                tie_word_embeddings=True)  # fmt: skip


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    patch = not args.no_patch
    if args.tiny:
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.float32)
        if args.mode == "lora":
            accel_patch.quantize_model(model, "int8")
        if patch:
            accel_patch.patch_model(model)
    else:
        quantize = "int8" if args.mode == "lora" else None
        model = accel_patch.from_pretrained(args.model, quantize=quantize, patch=patch, dtype=torch.float32)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, accel_patch.with_int8_lora(LoraConfig(r=16, lora_alpha=32,
                                                                            target_modules=LORA_TARGETS)))  # fmt: skip
    return model


def token_stream(args: argparse.Namespace, vocab_size: int, world: int) -> torch.Tensor:
    """All training tokens, 1-D: the text file tokenized (bytes for --tiny), or a learnable synthetic pattern
    of four global batches (so runs with the same global batch see the same data, whatever the process count)."""
    if args.data is None:
        generator = torch.Generator().manual_seed(args.seed)
        motif = torch.randint(0, vocab_size, (97,), generator=generator)  # a repeating motif: the loss can fall
        return motif.repeat(args.seq_len * args.batch_size * world * 4 // 97 + 2)
    text = args.data.read_text()
    if args.tiny:
        return torch.tensor(list(text.encode()), dtype=torch.long)
    return torch.tensor(AutoTokenizer.from_pretrained(args.model)(text)["input_ids"], dtype=torch.long)


def batches(tokens: torch.Tensor, args: argparse.Namespace, rank: int, world: int):
    """Endless micro-batches of ``batch_size`` windows; each process takes its own windows."""
    windows = tokens[: len(tokens) // args.seq_len * args.seq_len].view(-1, args.seq_len)
    if len(windows) < args.batch_size * world:
        raise ValueError(f"{len(tokens)} tokens make {len(windows)} windows of {args.seq_len}; need at least "
                         f"{args.batch_size * world}: pass more data or a smaller --seq-len/--batch-size")  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    while True:
        order = torch.randperm(len(windows), generator=generator)
        usable = len(order) // (args.batch_size * world) * args.batch_size * world
        for start in range(0, usable, args.batch_size * world):
            yield windows[order[start + rank * args.batch_size : start + (rank + 1) * args.batch_size]]


def train(args: argparse.Namespace) -> tuple[list[float], torch.nn.Module]:
    """Run the fine-tuning; returns the loss of every optimizer step (averaged over processes) and the model."""
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum)
    model = load_model(args)
    lr = args.lr or (1e-3 if args.mode == "lora" else 1e-4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    world = accelerator.num_processes
    data = batches(token_stream(args, model.config.vocab_size, world), args, accelerator.process_index, world)
    model, optimizer = accelerator.prepare(model, optimizer)  # under DDP/FSDP, a wrapper without .config
    losses: list[float] = []
    step_seconds: list[float] = []
    progress = tqdm(range(args.max_steps), disable=not accelerator.is_main_process)
    model.train()
    start, tokens_seen = time.perf_counter(), 0
    for _ in progress:
        step_start = time.perf_counter()
        step_loss = torch.zeros((), device=accelerator.device)
        for _ in range(args.grad_accum):
            ids = next(data).to(accelerator.device)
            with accelerator.accumulate(model), accelerator.autocast():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # no KV cache in training
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            step_loss += loss.detach() / args.grad_accum
            tokens_seen += ids.numel() * accelerator.num_processes
        losses.append(accelerator.reduce(step_loss, "mean").item())  # .item() waits for the step to finish
        step_seconds.append(time.perf_counter() - step_start)
        rate = tokens_seen / (time.perf_counter() - start)
        progress.set_postfix(loss=f"{losses[-1]:.4f}", tokens_per_s=f"{rate:.0f}")
    if args.log_json is not None:
        write_log(args, accelerator, losses, step_seconds)
    if args.output_dir is not None:
        accelerator.wait_for_everyone()
        # full: a plain transformers checkpoint (patching never changes the state_dict); lora: the adapter
        accelerator.unwrap_model(model).save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                                                        save_function=accelerator.save,
                                                        state_dict=accelerator.get_state_dict(model))  # fmt: skip
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group: left to interpreter exit, gloo can abort there
    return losses, accelerator.unwrap_model(model)


def write_log(args: argparse.Namespace, accelerator: Accelerator, losses: list[float], seconds: list[float]) -> None:
    """The run's record for benchmarks: losses, step times, tokens per step, and the largest per-process peak."""
    peak = torch.cuda.max_memory_allocated(accelerator.device) if accelerator.device.type == "cuda" else 0
    peak = accelerator.gather(torch.tensor([peak], device=accelerator.device)).max().item()
    if accelerator.is_main_process:
        record = {"losses": losses, "step_seconds": seconds, "processes": accelerator.num_processes,
                  "distributed_type": str(accelerator.distributed_type.value),
                  "tokens_per_step": args.seq_len * args.batch_size * args.grad_accum * accelerator.num_processes,
                  "peak_gpu_bytes_per_process": peak}  # fmt: skip
        args.log_json.write_text(json.dumps(record))


def main(argv: list[str] | None = None) -> list[float]:
    return train(parse_args(argv))[0]


if __name__ == "__main__":
    main()
