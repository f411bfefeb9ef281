"""Qwen2: biased q/k/v projections (kept by reusing HF's Linears), per-layer sliding windows."""

from .base import FamilyAdapter, register, window_from_layer_types

ADAPTER = register(FamilyAdapter(model_type="qwen2", sliding_window=window_from_layer_types))
