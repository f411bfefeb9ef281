"""Mistral: LLaMA's layout with one sliding window on every layer."""

from .base import FamilyAdapter, register, window_on_every_layer

ADAPTER = register(FamilyAdapter(model_type="mistral", sliding_window=window_on_every_layer))
