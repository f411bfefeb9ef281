"""accel-patch: Triton kernels swapped into HuggingFace Transformers LLMs."""

from .kernels import apply_rope, force_backend, rms_norm, swiglu

__version__ = "0.1.0"

__all__ = ["__version__", "apply_rope", "force_backend", "rms_norm", "swiglu"]
