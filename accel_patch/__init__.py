"""accel-patch: Triton kernels swapped into HuggingFace Transformers LLMs."""

from .kernels import apply_rope, force_backend, rms_norm, swiglu
from .loading import Int8QuantizationConfig, from_pretrained
from .patching import SUPPORTED_MODEL_TYPES, patch_model, unpatch_model
from .quantization import Int8Linear, quantize_model, with_int8_lora

__version__ = "0.1.0"

__all__ = [
    "Int8Linear",
    "Int8QuantizationConfig",
    "SUPPORTED_MODEL_TYPES",
    "__version__",
    "apply_rope",
    "force_backend",
    "from_pretrained",
    "patch_model",
    "quantize_model",
    "rms_norm",
    "swiglu",
    "unpatch_model",
    "with_int8_lora",
]
