"""Triton kernels with their autograd functions and plain PyTorch references (no transformers here)."""

# Only as accel_patch.kernels. Imported under another name, this source directory stays empty: a checkout's root on
# sys.path, where transformers probes for the unrelated hub package "kernels" by importing it. A second copy of these
# modules would register our custom ops again, in place of the installed package's.
if __name__ == "accel_patch.kernels":
    from ._backend import choose as choose_backend
    from ._backend import force_backend
    from .attention import attention, attention_ref
    from .int8_matmul import int8_linear, int8_linear_ref, quantize_per_channel
    from .linear_cross_entropy import linear_cross_entropy
    from .rms_norm import rms_norm, rms_norm_keeping_input, rms_norm_ref
    from .rope import apply_rope, rope_ref
    from .shared_input_linear import shared_input_linears, shared_input_linears_ref
    from .swiglu import swiglu, swiglu_linear, swiglu_ref

    __all__ = [
        "apply_rope",
        "attention",
        "attention_ref",
        "choose_backend",
        "force_backend",
        "int8_linear",
        "int8_linear_ref",
        "linear_cross_entropy",
        "quantize_per_channel",
        "rms_norm",
        "rms_norm_keeping_input",
        "rms_norm_ref",
        "rope_ref",
        "shared_input_linears",
        "shared_input_linears_ref",
        "swiglu",
        "swiglu_linear",
        "swiglu_ref",
    ]
