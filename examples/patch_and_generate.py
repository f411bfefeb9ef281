"""Patch a causal LM with accel-patch and generate: ``python examples/patch_and_generate.py [--model PATH]``.

Without ``--model`` it builds a small random Qwen3 from a config, so it runs anywhere (CPU included).
"""

from __future__ import annotations

import argparse
import logging

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import accel_patch


def load(model_path: str | None, device: torch.device) -> torch.nn.Module:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if model_path:
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    config = AutoConfig.for_model(
        "qwen3", vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)


def main(argv: list[str] | None = None) -> torch.Tensor:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="local checkpoint directory")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # shows patch_model's one-line summary
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = accel_patch.patch_model(load(args.model, device).eval())
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), device=device)
    tokens = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
    print("generated token ids:", tokens[0, prompt.shape[1] :].tolist())
    return tokens


if __name__ == "__main__":
    main()
