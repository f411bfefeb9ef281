"""Qwen3: per-head RMSNorm on q and k before RoPE, per-layer sliding windows."""

from .base import FamilyAdapter, register, window_from_layer_types

ADAPTER = register(FamilyAdapter(model_type="qwen3", sliding_window=window_from_layer_types, qk_norm=True))
