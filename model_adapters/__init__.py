"""Per-family declarations mapping HF decoder modules to kernel-backed ones (one file per family)."""

from . import hf_attention, llama, mistral, qwen2, qwen3  # noqa: F401  (each family registers its adapter)
from .base import ADAPTERS, FamilyAdapter, find_decoders, patch_decoder, unpatch_tree

hf_attention.register()

__all__ = ["ADAPTERS", "FamilyAdapter", "find_decoders", "patch_decoder", "unpatch_tree"]
