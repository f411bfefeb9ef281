"""Per-family declarations mapping HF decoder modules to kernel-backed ones (one file per family)."""

from . import llama, mistral, qwen2, qwen3  # noqa: F401  (each registers its adapter)
from .base import ADAPTERS, FamilyAdapter, find_decoders, patch_decoder, unpatch_tree

__all__ = ["ADAPTERS", "FamilyAdapter", "find_decoders", "patch_decoder", "unpatch_tree"]
