"""``patch_model`` / ``unpatch_model``: per-instance module swaps, no class-level monkey-patching."""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from .kernels import choose_backend
from .model_adapters import ADAPTERS, find_decoders, patch_decoder, unpatch_tree
from .model_adapters.causal_lm import install_fused_cross_entropy, is_causal_lm, remove_fused_cross_entropy
from .model_adapters.modules import Attention, KernelModule, RMSNorm, SwiGLUMLP

logger = logging.getLogger("accel_patch")

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(ADAPTERS))


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def _offloaded_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose weights accelerate keeps off the device between calls (device_map offload)."""
    names = []
    for name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if any(getattr(h, "offload", False) for h in getattr(hook, "hooks", (hook,))):  # one hook or a SequentialHook
            names.append(name)
    return names


# HF's output recorders (output_attentions, output_hidden_states): forward hooks from this module, installed once per
# model, at its first forward that asks for outputs, on the modules of HF's classes then in it; this mark says so.
_HF_RECORDERS = "transformers.utils.output_capturing"
_HF_RECORDERS_INSTALLED = "_output_capturing_hooks_installed"
# The flags that keep each kind of stock module (and the hooks on it) in place.
_FLAGS_KEEPING = {RMSNorm: "rmsnorm=False", SwiGLUMLP: "swiglu=False", Attention: "attention=False, rope=False"}


def _is_hf_recorder(hook) -> bool:
    return getattr(hook, "__module__", None) == _HF_RECORDERS


def _user_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has hooks besides the output recorders HF puts on its own classes at the first forward."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values(), *module._backward_hooks.values(),
             *module._backward_pre_hooks.values()]  # fmt: skip
    return not all(map(_is_hf_recorder, hooks))


def _warn_dropped_hooks(model: nn.Module) -> None:
    """Hooks live on a module instance: those on a stock module that a kernel module replaced no longer run (the
    stock module gets them back with ``unpatch_model``). Say which, rather than let them go quiet."""
    hooked = [(name, type(m)) for name, m in model.named_modules()
              if isinstance(m, KernelModule) and _user_hooks(m.__dict__["_stock"])]  # fmt: skip
    if hooked:
        flags = " / ".join(dict.fromkeys(_FLAGS_KEEPING[kind] for _, kind in hooked))
        logger.warning(
            "accel_patch: %d replaced modules (the first: %r) had hooks registered on them, which will not run while "
            "the model is patched; to keep them, patch with %s",
            len(hooked), hooked[0][0], flags,
        )  # fmt: skip


def patch_model(
    model: nn.Module, *, attention: bool = True, rope: bool = True, rmsnorm: bool = True, swiglu: bool = True,
    fused_cross_entropy: bool = True,
) -> nn.Module:
    """Swap Triton-backed attention, RoPE, RMSNorm and SwiGLU modules into ``model`` in place.

    Works on any module whose tree holds a supported decoder (``*ForCausalLM``, the bare ``*Model``,
    ``*ForSequenceClassification``, a PEFT wrapper). Parameters are shared, not copied, so
    ``state_dict()`` is unchanged. Calling it twice changes nothing the second time. With
    ``fused_cross_entropy``, a ``*ForCausalLM`` called with ``labels`` while gradients are on computes its
    loss with the fused linear cross-entropy and returns no logits.
    """
    decoders = find_decoders(model)
    if not decoders:
        raise ValueError(
            f"no decoder found in {type(model).__name__} (model_type {_model_type(model)!r}); "
            f"patch_model supports model types {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    unsupported = sorted({d.config.model_type for d in decoders if d.config.model_type not in ADAPTERS})
    if unsupported:
        raise ValueError(
            f"model_type {', '.join(map(repr, unsupported))} is not supported; "
            f"patch_model supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if any(p.dtype == torch.float64 for p in model.parameters()):
        raise TypeError(
            "the model holds float64 parameters and the kernels take float16, bfloat16 or float32; cast it before "
            "patching (model.float(), or dtype= when loading it), or leave it unpatched"
        )
    offloaded = _offloaded_modules(model)
    if offloaded:
        raise ValueError(
            f"{len(offloaded)} modules of {type(model).__name__} (the first: {offloaded[0]!r}) have their weights "
            "offloaded by accelerate (device_map entries on 'disk', or on 'cpu' beside a GPU): its hook loads them "
            "only around the stock module's own forward, which a swapped-in module does not run. Load the model "
            "with every layer on a GPU, or leave it unpatched"
        )
    swapped: Counter = Counter()
    for decoder in decoders:
        swapped += patch_decoder(
            decoder, ADAPTERS[decoder.config.model_type],
            attention=attention, rope=rope, rmsnorm=rmsnorm, swiglu=swiglu,
        )  # fmt: skip
    if fused_cross_entropy:
        for module in model.modules():
            if is_causal_lm(module, decoders):
                swapped["fused_cross_entropy"] += int(install_fused_cross_entropy(module))
    _warn_dropped_hooks(model)
    device = next(model.parameters()).device
    backend, reason = choose_backend(device)
    kinds = ("attention", "rope", "rmsnorm", "fused_residual", "swiglu", "fused_cross_entropy")
    counts = ", ".join(f"{swapped[kind]} {kind}" for kind in kinds)
    logger.info("accel_patch: patched %s: %s; kernels on %s (%s)", type(model).__name__, counts, backend, reason)
    return model


def _reinstall_output_recorders(model: nn.Module) -> None:
    """After a patched forward that asked for outputs, HF's recorders sit on the modules then in the model, so the
    stock attention modules put back have none, and HF, seeing its mark, would never add them: their weights would
    quietly not come back. Under every marked model in the tree (the one whose forward records), drop the recorders
    and the mark, for HF to install them afresh at the next such forward."""
    for marked in [m for m in model.modules() if m.__dict__.pop(_HF_RECORDERS_INSTALLED, False)]:
        for module in marked.modules():
            for key, hook in list(module._forward_hooks.items()):
                if _is_hf_recorder(hook):
                    del module._forward_hooks[key]


def unpatch_model(model: nn.Module) -> nn.Module:
    """Put the stock HF modules back in place, holding the model's current parameters."""
    restored = unpatch_tree(model) + sum(remove_fused_cross_entropy(m) for m in list(model.modules()))
    _reinstall_output_recorders(model)
    logger.info("accel_patch: restored %d stock modules in %s", restored, type(model).__name__)
    return model
