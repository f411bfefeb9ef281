"""LLaMA (1-3.x): the reference layout; rope scaling (llama3, yarn, ...) arrives in cos/sin."""

from .base import FamilyAdapter, register

ADAPTER = register(FamilyAdapter(model_type="llama"))
