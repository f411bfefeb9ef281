"""The shared patching logic; a family file only declares how it differs from LLaMA."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..kernels._backend import use_triton
from .hf_attention import ATTENTION_NAME, KERNEL_READS_MASKS_OF
from .modules import (
    PRE_NORM_LAYER_CHILDREN,
    Attention,
    KernelModule,
    RMSNorm,
    SwiGLUMLP,
    install_forward,
    pre_norm_layer_forward,
    remove_forward,
)

SWIGLU_ACTIVATIONS = ("silu", "swish")


def no_sliding_window(config, layer_idx: int) -> int | None:
    return None


def window_on_every_layer(config, layer_idx: int) -> int | None:
    """Mistral: one window, ``config.sliding_window``, on every layer (None disables it)."""
    return getattr(config, "sliding_window", None)


def window_from_layer_types(config, layer_idx: int) -> int | None:
    """Qwen2/Qwen3: the window applies only on layers typed "sliding_attention"."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] == "sliding_attention":
        return config.sliding_window
    return None


@dataclass(frozen=True)
class FamilyAdapter:
    model_type: str
    sliding_window: Callable[[object, int], int | None] = no_sliding_window
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)


ADAPTERS: dict[str, FamilyAdapter] = {}


def register(adapter: FamilyAdapter) -> FamilyAdapter:
    ADAPTERS[adapter.model_type] = adapter
    return adapter


def find_decoders(model: nn.Module) -> list[nn.Module]:
    """Every bare decoder (``*Model`` with ``layers`` and a final ``norm``) inside ``model``'s tree."""
    return [
        module
        for module in model.modules()
        if isinstance(getattr(module, "layers", None), nn.ModuleList)
        and isinstance(getattr(module, "norm", None), nn.Module)
        and hasattr(getattr(module, "config", None), "model_type")
    ]


def check_config(adapter: FamilyAdapter, config, *, swiglu: bool, rope: bool) -> None:
    """Refuse configs whose numbers the kernels would change, naming the flag that avoids it."""
    if swiglu and getattr(config, "hidden_act", "silu") not in SWIGLU_ACTIVATIONS:
        raise ValueError(
            f"{adapter.model_type} config has hidden_act={config.hidden_act!r}, not SwiGLU's silu; "
            "pass swiglu=False to patch_model"
        )
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    partial = rope_parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if rope and partial != 1.0:
        raise ValueError(
            f"{adapter.model_type} config rotates only part of each head (partial_rotary_factor={partial}); "
            "the RoPE kernel rotates whole heads: pass rope=False to patch_model"
        )


def patch_decoder(
    decoder: nn.Module, adapter: FamilyAdapter, *, attention: bool, rope: bool, rmsnorm: bool, swiglu: bool
) -> Counter:
    """Swap kernel-backed modules into one decoder in place; returns what was swapped, by kind."""
    config = decoder.config
    check_config(adapter, config, swiglu=swiglu, rope=rope)
    swapped: Counter = Counter()
    if rmsnorm:
        norm = decoder.norm
        norm_type = type(norm.__dict__["_stock"] if isinstance(norm, KernelModule) else norm)
        for parent in list(decoder.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is norm_type:  # stock norms only: a second call finds none
                    setattr(parent, name, RMSNorm(child))
                    swapped["rmsnorm"] += 1
    for layer_idx, layer in enumerate(decoder.layers):
        if rmsnorm and {name for name, _ in layer.named_children()} == PRE_NORM_LAYER_CHILDREN:
            swapped["fused_residual"] += int(install_forward(layer, pre_norm_layer_forward))
        if swiglu and not isinstance(layer.mlp, KernelModule):
            layer.mlp = SwiGLUMLP(layer.mlp)
            swapped["swiglu"] += 1
        if (attention or rope) and not isinstance(layer.self_attn, KernelModule):
            if adapter.qk_norm and getattr(layer.self_attn, "q_norm", None) is None:
                raise ValueError(f"{adapter.model_type} attention is declared with q/k norms but has none")
            window = adapter.sliding_window(config, layer_idx)
            layer.self_attn = Attention(
                layer.self_attn, sliding_window=window, use_rope_kernel=rope, use_attention_kernel=attention
            )
            swapped["attention"] += int(attention)
            swapped["rope"] += int(rope)
    windows = any(adapter.sliding_window(config, i) for i in range(len(decoder.layers)))
    if attention and (windows or config._attn_implementation not in KERNEL_READS_MASKS_OF):
        _build_masks_for_the_kernel(decoder)
    return swapped


# where patch_decoder keeps the implementation name it replaced, for unpatch_tree
_STOCK_IMPLEMENTATION = "_accel_patch_stock_attn_implementation"


def _build_masks_for_the_kernel(decoder: nn.Module) -> None:
    """Have HF build this decoder's masks with the ``accel_triton`` mask function. Under ``sdpa`` HF writes a
    sliding window into a dense ``[seq, seq]`` mask, which the kernel must then read in every block; ours leaves
    a plain window out, and the kernel applies the layer's window itself, skipping the blocks outside it. Also for
    an implementation whose masks do not tell the kernel everything (``KERNEL_READS_MASKS_OF``). Only where the
    kernels run: elsewhere the stock attention path, and its own masks, stay as loaded. (The patched
    attention's fallback then is ``accel_triton``'s, which takes the reference path off CUDA.)"""
    first = next(decoder.parameters(), None)
    config = decoder.config
    if first is None or not use_triton(first) or config._attn_implementation == ATTENTION_NAME:
        return
    decoder.__dict__[_STOCK_IMPLEMENTATION] = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME


def unpatch_tree(model: nn.Module) -> int:
    """Put every stock module back (with the current parameters); returns how many were restored."""
    restored = 0
    for module in model.modules():
        if _STOCK_IMPLEMENTATION in module.__dict__:
            module.config._attn_implementation = module.__dict__.pop(_STOCK_IMPLEMENTATION)
        restored += int(remove_forward(module, pre_norm_layer_forward))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, KernelModule):
                setattr(parent, name, child.to_stock())
                restored += 1
    return restored
