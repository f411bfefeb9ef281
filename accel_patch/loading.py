"""``from_pretrained(path, quantize="int8")``: INT8 while loading, through transformers' quantizer plugin API.

The quantizer swaps every ``nn.Linear`` for :class:`Int8Linear` on the meta device before any weight is read;
the loader then hands it one float tensor at a time, which it quantizes on the tensor's target device, so the
high-precision model is never held whole. Saved INT8 models carry ``quantization_config`` with
``quant_method = "accel_patch_int8"`` in ``config.json``; once ``accel_patch`` is imported, plain
``AutoModelForCausalLM.from_pretrained`` loads them too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .kernels import quantize_per_channel
from .patching import patch_model
from .quantization import Int8Linear, check_quantize, linears_to_convert, skip_patterns

QUANT_METHOD = "accel_patch_int8"


@register_quantization_config(QUANT_METHOD)
class Int8QuantizationConfig(QuantizationConfigMixin):
    """What ``config.json`` records of an accel-patch INT8 model: the method and the Linears left in float."""

    def __init__(self, skip_modules: str | Iterable[str] | None = ("lm_head",), **_ignored: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.skip_modules = skip_patterns(skip_modules)


class _QuantizeInt8(ConversionOps):
    """Loader op: one float ``...weight`` in, its int8 weight and float32 ``...weight_scale`` out."""

    def __init__(self, quantizer: HfQuantizer) -> None:
        self.hf_quantizer = quantizer

    def convert(self, input_dict: dict, full_layer_name: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        (tensors,) = input_dict.values()
        weight = tensors[0] if isinstance(tensors, list) else tensors
        int8, scale = quantize_per_channel(weight)
        return {full_layer_name: int8, f"{full_layer_name}_scale": scale}


@register_quantizer(QUANT_METHOD)
class Int8Quantizer(HfQuantizer):
    requires_calibration = False

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs) -> bool:
        module_name, _, tensor_name = param_name.rpartition(".")
        return (
            not self.pre_quantized
            and tensor_name == "weight"
            and isinstance(model.get_submodule(module_name), Int8Linear)
        )

    def param_element_size(self, model: PreTrainedModel, param_name: str, param: torch.Tensor) -> float:
        # transformers pre-allocates the loaded model's bytes on each GPU (caching_allocator_warmup) from this
        # size: a weight declared in float but stored as int8 must count one byte, or the warm-up alone peaks
        # at the float model's size.
        if self.param_needs_quantization(model, param_name):
            return 1
        return super().param_element_size(model, param_name, param)

    def get_new_dtype(self, converter, param, dtype):
        # transformers >= 5.23 casts every float tensor of a pre-quantized checkpoint to the load dtype;
        # the scales must stay float32.
        if any(str(target).endswith("weight_scale") for target in getattr(converter, "target_patterns", ())):
            return torch.float32
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs) -> None:
        for parent, child_name, _ in linears_to_convert(model, self.quantization_config.skip_modules):
            linear = getattr(parent, child_name)
            # Not pre-quantized: the weight streams in as float and _QuantizeInt8 turns it into int8 + scale.
            weight_dtype = torch.int8 if self.pre_quantized else linear.weight.dtype
            with torch.device("meta"):
                int8 = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                                  dtype=linear.weight.dtype, weight_dtype=weight_dtype)  # fmt: skip
            setattr(parent, child_name, int8)

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs) -> PreTrainedModel:
        for name, module in model.named_modules():
            if isinstance(module, Int8Linear):
                check_int8_linear(name, module)
        return model

    def get_quantize_ops(self) -> ConversionOps:
        return _QuantizeInt8(self)

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:  # adapters (LoRA) train on top; the int8 weights stay frozen
        return True


def check_int8_linear(name: str, module: Int8Linear) -> None:
    """Refuse a loaded INT8 layer whose weight or scale is not what :func:`quantize_per_channel` writes."""
    weight, scale = module.weight, module.weight_scale
    problem = None
    if weight.dtype != torch.int8 or tuple(weight.shape) != (module.out_features, module.in_features):
        problem = f"weight is {weight.dtype} {tuple(weight.shape)}, expected int8 ({module.out_features}, " \
                  f"{module.in_features})"  # fmt: skip
    elif scale.dtype != torch.float32 or tuple(scale.shape) != (module.out_features,):
        problem = f"weight_scale is {scale.dtype} {tuple(scale.shape)}, expected float32 ({module.out_features},)"
    elif not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        problem = "weight_scale holds non-finite or non-positive values"
    if problem:
        raise ValueError(
            f"corrupt INT8 checkpoint: {name}.{problem}. Re-create it with "
            f"accel_patch.from_pretrained(<the float checkpoint>, quantize='int8').save_pretrained(...)"
        )


def from_pretrained(
    name_or_path: str,
    *,
    quantize: str | None = None,
    patch: bool = True,
    skip_modules: str | Iterable[str] | None = ("lm_head",),
    **hf_kwargs: Any,
) -> nn.Module:
    """Load a causal LM like ``AutoModelForCausalLM.from_pretrained`` (every keyword of it passes through:
    ``dtype``, ``device_map``, ``revision``, ...), optionally converting every ``nn.Linear`` outside
    ``skip_modules`` to INT8 while the weights stream in, then apply :func:`patch_model` unless ``patch=False``.

    A checkpoint saved from an INT8 model loads as INT8 whatever ``quantize`` says.
    """
    check_quantize(quantize, allow_none=True)
    if quantize is not None:
        if "quantization_config" in hf_kwargs:
            raise ValueError("pass either quantize='int8' or quantization_config=..., not both")
        hf_kwargs["quantization_config"] = Int8QuantizationConfig(skip_modules=skip_modules)
    model, info = AutoModelForCausalLM.from_pretrained(name_or_path, output_loading_info=True, **hf_kwargs)
    int8_names = {name for name, module in model.named_modules() if isinstance(module, Int8Linear)}
    missing = sorted(key for key in info["missing_keys"] if key.rpartition(".")[0] in int8_names)
    if missing:
        raise ValueError(f"corrupt INT8 checkpoint {name_or_path}: missing {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''}")  # fmt: skip
    if info.get("mismatched_keys"):  # transformers < 5.2x only warns about these
        mismatched = sorted(map(str, info["mismatched_keys"]))
        raise ValueError(f"checkpoint {name_or_path} has tensors of the wrong shape: {', '.join(mismatched[:4])}")
    return patch_model(model) if patch else model
