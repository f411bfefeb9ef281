"""Kernel-backed drop-ins for HF decoder modules.

Each one holds the *same* Parameter and Linear objects as the stock module it replaces, under the same
attribute names, so ``state_dict()`` keys and values and optimizers see exactly what they saw before.
The stock module is kept outside the module tree (not registered) so that it can be restored.
"""

from __future__ import annotations

import copy
import functools
import logging
import sys
import types
import weakref
from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..kernels import apply_rope, rms_norm, rms_norm_keeping_input, shared_input_linears, swiglu, swiglu_linear
from ..kernels._backend import use_triton
from .hf_attention import accel_triton_attention

logger = logging.getLogger("accel_patch")


class KernelModule(nn.Module):
    """Base of every swapped-in module: remembers the stock module it stands for."""

    def __init__(self, stock: nn.Module) -> None:
        super().__init__()
        self.__dict__["_stock"] = stock  # not a submodule: state_dict and .to() never see it twice
        self.train(stock.training)

    def to_stock(self) -> nn.Module:
        """The stock module, pointed at this module's current parameters, buffers and children."""
        stock = self.__dict__["_stock"]
        for name, param in self._parameters.items():
            stock._parameters[name] = param
        for name, buffer in self._buffers.items():
            stock._buffers[name] = buffer
        for name, child in self._modules.items():
            stock._modules[name] = child.to_stock() if isinstance(child, KernelModule) else child
        stock.train(self.training)
        return stock


class RMSNorm(KernelModule):
    def __init__(self, stock: nn.Module) -> None:
        super().__init__(stock)
        self.weight = stock.weight
        self.variance_epsilon = stock.variance_epsilon

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, kernel=accel_patch.rms_norm"


class SwiGLUMLP(KernelModule):
    def __init__(self, stock: nn.Module) -> None:
        super().__init__(stock)
        self.gate_proj, self.up_proj, self.down_proj = stock.gate_proj, stock.up_proj, stock.down_proj

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP's output; with ``residual``, ``residual + output`` (added inside the down projection's matmul
        where it can be: see ``swiglu_linear``)."""
        gate, up = project(x, self.gate_proj, self.up_proj)
        if plain_linear(self.down_proj):  # the gate's output is recomputed in backward rather than stored
            return swiglu_linear(gate, up, self.down_proj.weight, self.down_proj.bias, residual=residual)
        output = self.down_proj(swiglu(gate, up))
        return output if residual is None else residual + output


def project(x: torch.Tensor, *linears: nn.Module) -> list[torch.Tensor]:
    """Each of ``linears`` applied to ``x``; where all are plain, their backward sums ``x``'s gradient inside the
    GEMMs (see kernels/shared_input_linear.py)."""
    if all(map(plain_linear, linears)):
        return shared_input_linears(x, [linear.weight for linear in linears], [linear.bias for linear in linears])
    return [linear(x) for linear in linears]


def norm_keeping_input(norm: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x), x)``; where ``norm`` is ours, the gradient reaching ``x`` through the second output (the residual
    stream) is added by the norm's backward kernel instead of a separate pass."""
    if isinstance(norm, RMSNorm):
        return rms_norm_keeping_input(x, norm.weight, norm.variance_epsilon)
    return norm(x), x


def add_and_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(residual + x), residual + x)``: one kernel reads both summands and writes the sum and its norm where
    ``norm`` is ours and the summands match (under autocast a float32 residual meets a bfloat16 ``x``: plain add)."""
    if isinstance(norm, RMSNorm) and x.dtype == residual.dtype and tuple(x.shape) == tuple(residual.shape):
        return rms_norm(x, norm.weight, norm.variance_epsilon, residual=residual)
    hidden = residual + x
    return norm(hidden), hidden


PRE_NORM_LAYER_CHILDREN = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}


def pre_norm_layer_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """HF's pre-norm decoder layer (LLaMA, Mistral, Qwen2, Qwen3 alike), with the residual add after attention fused
    into the post-attention RMSNorm and the one after the MLP into its down projection. In the backward, each
    norm's kernel also adds the residual stream's gradient to its input's."""
    if args:  # HF passes everything after hidden_states by keyword; anything else takes the stock forward
        return type(self).forward(self, hidden_states, *args, **kwargs)
    normed, residual = norm_keeping_input(self.input_layernorm, hidden_states)
    attention_output, _ = self.self_attn(hidden_states=normed, **kwargs)
    normed, hidden_states = add_and_norm(self.post_attention_layernorm, attention_output, residual)
    if isinstance(self.mlp, SwiGLUMLP):
        return self.mlp(normed, residual=hidden_states)
    return hidden_states + self.mlp(normed)


def _forward_slot(module: nn.Module) -> str:
    """Where a module's own forward lives: accelerate's device hooks keep it in ``_old_forward`` and call it from a
    wrapper they put in ``forward``."""
    return "_old_forward" if hasattr(module, "_hf_hook") else "forward"


class _InstanceForward:
    """``function`` bound to one module through a weak reference. A bound method stored on its own instance would
    be a reference cycle: the model would outlive ``del model``, GPU memory included, until the garbage collector
    happened to run."""

    __slots__ = ("function", "module")

    def __init__(self, function: Callable, module: nn.Module) -> None:
        self.function, self.module = function, weakref.ref(module)

    def __call__(self, *args, **kwargs):
        return self.function(self.module(), *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> _InstanceForward:  # a copied model's forward runs the copy
        return _InstanceForward(self.function, copy.deepcopy(self.module(), memo))

    def __reduce__(self):  # pickling (torch.save of a whole model) keeps the binding too
        return _InstanceForward, (self.function, self.module())


def has_forward(module: nn.Module, function: Callable) -> bool:
    installed = getattr(module, _forward_slot(module))
    return isinstance(installed, _InstanceForward) and installed.function is function


def install_forward(module: nn.Module, function: Callable) -> bool:
    """Make ``function`` this instance's forward (other instances of the class keep theirs); False if it already
    was."""
    if has_forward(module, function):
        return False
    setattr(module, _forward_slot(module), _InstanceForward(function, module))
    return True


def remove_forward(module: nn.Module, function: Callable) -> bool:
    """Give the instance back its class's forward; False if ``function`` was not installed on it."""
    if not has_forward(module, function):
        return False
    if _forward_slot(module) == "forward":
        del module.forward
    else:
        module._old_forward = types.MethodType(type(module).forward, module)
    return True


def _unhooked(module: nn.Module, cls: type) -> bool:
    """Exactly a ``cls``: not a subclass or a PEFT wrapper, no hooks and no per-instance forward (accelerate's device
    and offload hooks replace it). Only then may a fused op read its parameters directly instead of calling it."""
    return (
        type(module) is cls and not module._forward_hooks and not module._forward_pre_hooks
        and "forward" not in vars(module)
    )  # fmt: skip


def plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose call is exactly ``F.linear`` (not INT8 either): see ``_unhooked``."""
    return _unhooked(module, nn.Linear)


def plain_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` whose call is exactly ``F.embedding(ids, weight, padding_idx)``: see ``_unhooked``."""
    return (
        _unhooked(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq
        and not module.sparse
    )  # fmt: skip


def _stock_function(stock: nn.Module, name: str) -> Callable:
    """A function (apply_rotary_pos_emb, eager_attention_forward) from the stock module's own file."""
    return getattr(sys.modules[type(stock).__module__], name)


@functools.cache  # once a process, as HF warns for its SDPA attention
def _warn_no_attention_weights() -> None:
    """HF collects ``output_attentions`` through hooks on its own attention classes; a patched layer holds ours, so
    a patched model returns no attention weights (the Triton kernel never forms them), which would otherwise pass
    unnoticed: HF's eager attention returns them."""
    logger.warning(
        "accel_patch: a patched model returns no attention weights, so output_attentions=True gives none (as with "
        "HF's sdpa attention); for them, run a model that patch_model has not touched, with "
        "attn_implementation='eager'"
    )


class Attention(KernelModule):
    """Projections, optional q/k RMSNorm (Qwen3), RoPE, KV-cache update, attention, output projection.

    Where the Triton kernels run (CUDA, or the CPU interpreter), the attention itself is the Triton
    flash-attention kernel, fed the mask HF built for the model; elsewhere (or with ``attention=False``)
    it is HF's attention function for ``config._attn_implementation``.
    """

    def __init__(
        self, stock: nn.Module, *, sliding_window: int | None, use_rope_kernel: bool, use_attention_kernel: bool
    ) -> None:
        super().__init__(stock)
        for name in ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling", "attention_dropout",
                     "is_causal"):  # fmt: skip
            setattr(self, name, getattr(stock, name))
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = stock.q_proj, stock.k_proj, stock.v_proj, stock.o_proj
        self.q_norm = getattr(stock, "q_norm", None)
        self.k_norm = getattr(stock, "k_norm", None)
        self.sliding_window = sliding_window
        self.use_attention_kernel = use_attention_kernel
        self.rotate = apply_rope if use_rope_kernel else _stock_function(stock, "apply_rotary_pos_emb")
        self.eager_attention = _stock_function(stock, "eager_attention_forward")

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        projections = project(hidden_states, self.q_proj, self.k_proj, self.v_proj)
        query, key, value = (p.view(hidden_shape) for p in projections)
        if self.q_norm is not None:  # Qwen3 normalises each head before RoPE
            query, key = self.q_norm(query), self.k_norm(key)
        value = value.transpose(1, 2)
        cos, sin = position_embeddings
        query, key = self.rotate(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        # Continuous batching (generate_batch) hands HF's attention function a paged cache to update and read, in a
        # way that changes between transformers versions: that function keeps it.
        if self.use_attention_kernel and use_triton(query) and kwargs.get("cache") is None:
            attention = accel_triton_attention
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.eager_attention)
        output, weights = attention(
            self, query, key, value, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling, sliding_window=self.sliding_window, **kwargs,
        )  # fmt: skip
        if kwargs.get("output_attentions"):
            _warn_no_attention_weights()
        output = output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(output), weights
