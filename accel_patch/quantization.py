"""INT8 weight-only quantization of a model in memory: ``quantize_model(model, "int8")``."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable

import torch
from torch import nn

from .kernels.int8_matmul import dequantize, int8_linear, quantize_per_channel

logger = logging.getLogger("accel_patch")

QUANTIZE_MODES = ("int8",)


class Int8Linear(nn.Module):
    """A Linear whose weight is stored as per-output-channel INT8 plus a float32 scale per row.

    ``state_dict`` holds ``weight`` (int8), ``weight_scale`` (float32) and ``bias`` (high precision, trainable).
    The int8 weight is a buffer: it gets no gradient and optimizers never see it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 weight_dtype: torch.dtype = torch.int8) -> None:  # fmt: skip
        # weight_dtype: HF's loader sizes and casts each incoming tensor by the declared buffer, so a model
        # quantized while loading declares its weight in the float dtype the checkpoint streams in.
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=weight_dtype, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)  # fmt: skip
        weight, scale = quantize_per_channel(linear.weight)
        module.weight.copy_(weight)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias = linear.bias  # the same Parameter: kept in high precision
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def _snr_db(original: torch.Tensor, module: Int8Linear) -> float:
    error = original.float() - dequantize(module.weight, module.weight_scale)
    return 10 * torch.log10(original.float().pow(2).sum() / error.pow(2).sum().clamp_min(1e-30)).item()


def check_quantize(quantize: str | None, allow_none: bool = False) -> None:
    valid = (None, *QUANTIZE_MODES) if allow_none else QUANTIZE_MODES
    if quantize not in valid:
        raise ValueError(f"quantize={quantize!r} is not supported; valid values: {', '.join(map(repr, valid))}")


def skip_patterns(skip_modules: str | Iterable[str] | None) -> list[str]:
    """``skip_modules`` as a list of patterns: one name or glob alone counts as one pattern, not as its letters;
    None as none."""
    if skip_modules is None:
        return []
    patterns = [skip_modules] if isinstance(skip_modules, str) else list(skip_modules)
    strange = [p for p in patterns if not isinstance(p, str)]
    if strange:
        raise TypeError(f"skip_modules must hold module names or glob patterns (str), got {strange[0]!r}")
    return patterns


def linears_to_convert(model: nn.Module, skip_modules: list[str]) -> list[tuple[nn.Module, str, str]]:
    """``(parent, child name, full name)`` of every plain ``nn.Linear`` whose name matches no ``skip_modules``
    pattern (a glob over the full name, or the last name component). A pattern that matches no Linear is logged
    as a warning: a misspelt one would otherwise quantize the layer it meant to keep."""
    convert, matched = [], set()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full_name = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear:
                continue
            hits = {p for p in skip_modules if fnmatch.fnmatch(full_name, p) or child_name == p}
            matched |= hits
            if not hits:
                convert.append((module, child_name, full_name))
    for pattern in skip_modules:
        if pattern not in matched:
            logger.warning("accel_patch: skip_modules pattern %r matches no Linear layer of %s", pattern,
                           type(model).__name__)  # fmt: skip
    return convert


def quantize_model(model: nn.Module, quantize: str = "int8",
                   skip_modules: str | Iterable[str] | None = ("lm_head",)) -> nn.Module:  # fmt: skip
    """Replace every ``nn.Linear`` (except names matching ``skip_modules``, glob patterns allowed) with
    :class:`Int8Linear`, in place; returns ``model``. Per-layer SNR of the weights goes to the debug log.
    ``save_pretrained`` then writes an INT8 checkpoint that :func:`accel_patch.from_pretrained` reloads."""
    check_quantize(quantize)
    skip_modules = skip_patterns(skip_modules)
    converted = 0
    for parent, child_name, full_name in linears_to_convert(model, skip_modules):
        child = getattr(parent, child_name)
        quantized = Int8Linear.from_linear(child)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("accel_patch: %s int8 weight SNR %.1f dB", full_name, _snr_db(child.weight, quantized))
        setattr(parent, child_name, quantized)
        converted += 1
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):  # a transformers model: saves as INT8
        from .loading import Int8QuantizationConfig

        config.quantization_config = Int8QuantizationConfig(skip_modules=skip_modules)
    logger.info("accel_patch: quantized %d Linear layers of %s to int8", converted, type(model).__name__)
    return model


def with_int8_lora(lora_config):
    """Register accel-patch's LoRA layer for :class:`Int8Linear` on a PEFT ``LoraConfig`` and return it.

    ``get_peft_model(model, with_int8_lora(LoraConfig(target_modules=[...])))`` then trains adapters on an
    INT8 base: the int8 weights stay frozen and bit-identical, gradients reach the adapters through the
    W8A16 kernel's input-gradient path.
    """
    lora_config._register_custom_module({Int8Linear: _int8_lora_layer_class()})
    return lora_config


def _int8_lora_layer_class():
    from peft.tuners.lora.layer import LoraLayer

    class Int8LoraLinear(nn.Module, LoraLayer):
        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                     **kwargs) -> None:  # fmt: skip
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha, config, **kwargs)

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_a, lora_b = self.lora_A[name], self.lora_B[name]
                update = lora_b(lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype))))
                result = result + (update * self.scaling[name]).to(result.dtype)
            return result

    return Int8LoraLinear
