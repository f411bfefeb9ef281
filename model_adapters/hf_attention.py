"""The Triton attention kernel as an HF attention function, registered as ``attn_implementation="accel_triton"``.

HF passes each attention function the mask built for the model's attention implementation: a 4-D boolean
(SDPA style), a 4-D additive float (eager), a 2-D padding mask (flash style; over a static cache it covers only
the filled slots), or None where SDPA's own ``is_causal`` is exact. All four are accepted. The kernel aligns its
queries with the last keys; SDPA's ``is_causal`` aligns them with the first, which differs only for several queries
over more keys (see below).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import attention

ATTENTION_NAME = "accel_triton"  # no "flash"/"sdpa"/"flex" in it: those names take special paths in HF
# Implementations whose masks tell the kernel everything. Flex attention's are BlockMasks; flash attention's are
# 2-D padding masks or None, and leave out packed sequences' boundaries (HF's flash attention reads them from the
# position ids instead).
KERNEL_READS_MASKS_OF = ("sdpa", "eager", ATTENTION_NAME)


def accel_triton_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF attention-interface signature: q ``(B, Hq, Sq, D)``, k/v ``(B, Hkv, Sk, D)`` -> ``(B, Sq, Hq, D)``."""
    if dropout:
        raise ValueError(
            f"the accel_triton attention kernel has no dropout, but dropout={dropout} was requested while training; "
            "set config.attention_dropout=0.0, or patch_model(model, attention=False) to keep HF's attention"
        )
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if implementation is not None and implementation not in KERNEL_READS_MASKS_OF:
        # patch_model switches such models to our masks where the kernels run; this one moved there after patching
        raise ValueError(
            f"the masks HF builds for attn_implementation={implementation!r} do not tell the accel_triton kernel "
            "everything (flash: packed sequences' boundaries; flex: BlockMasks); the model was patched where the "
            "Triton kernels do not run: call accel_patch.patch_model(model) again now that it is on the GPU, "
            "or load it with attn_implementation='sdpa'"
        )
    dense = key_padding = None
    window = None
    causal = getattr(module, "is_causal", True)
    if attention_mask is None:
        window = sliding_window  # a 4-D mask already carries the window, with the cache's true positions
        if causal and 1 < query.shape[2] < key.shape[2]:
            # HF leaves the mask out here only for a prefill into an empty static cache (transformers 5.23 does),
            # counting on SDPA's upper-left alignment: the keys past the queries are empty slots no query sees.
            key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    elif attention_mask.dim() == 2:
        key_padding = attention_mask
        if key_padding.shape[1] < key.shape[2]:
            # HF's flash-style mask over a static cache covers only the slots filled so far; the rest are empty
            key, value = key[:, :, : key_padding.shape[1]], value[:, :, : key_padding.shape[1]]
    elif attention_mask.dtype == torch.bool:
        dense = attention_mask
    else:
        dense = attention_mask == 0  # additive mask: 0 where attending, a large negative elsewhere
    if dense is not None and dense.shape[1] != 1:
        raise ValueError(f"per-head attention masks {tuple(dense.shape)} are not supported by accel_triton")
    if dense is not None and dense.shape[-1] != key.shape[2]:
        dense = dense[..., : key.shape[2]]  # HF may build masks over a longer (static) cache
    output = attention(
        query, key, value, causal=causal, sliding_window=window,
        key_padding_mask=key_padding, attn_mask=dense, scale=scaling,
    )  # fmt: skip
    return output, None


def _is_plain_sliding_window(
    local_size: int | None = None, allow_is_causal_skip: bool = True, attention_mask: torch.Tensor | None = None,
    kv_length: int = 0, q_length: int | None = None, cache_position: torch.Tensor | None = None,
    mask_function=None, **_,
) -> bool:
    """True when the mask HF asks for is exactly "causal within ``local_size`` keys" over aligned queries and keys:
    no padding, no packing, no or/and mask functions (HF clears ``allow_is_causal_skip`` for those)."""
    if local_size is None or not allow_is_causal_skip or mask_function is None or torch.compiler.is_compiling():
        return False
    if q_length is None:  # older transformers pass the queries' positions instead of their count
        q_length = cache_position.shape[0] if cache_position is not None else -1
    if q_length not in (1, kv_length):  # the queries must be the last positions of the keys
        return False
    if attention_mask is not None and not bool(attention_mask.all()):
        return False
    # local_size also comes with chunked attention (Llama 4): check the mask function is the sliding window's
    q = 2 * local_size
    expected = {q: True, q - local_size + 1: True, q - local_size: False, q + 1: False}
    index = torch.tensor
    return all(bool(mask_function(index(0), index(0), index(q), index(k))) == want for k, want in expected.items())


def accel_triton_mask(*args, **kwargs) -> torch.Tensor | None:
    """HF's SDPA mask, except that a plain sliding-window causal mask is not built: the attention then gets no
    mask and applies the module's ``sliding_window`` itself, skipping the key blocks outside the window instead of
    reading a ``[seq, seq]`` mask in every block."""
    from transformers.masking_utils import sdpa_mask

    return None if not args and _is_plain_sliding_window(**kwargs) else sdpa_mask(*args, **kwargs)


def register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, accel_triton_attention)
    # Without a mask function under the same name, HF would hand this attention no mask at all.
    AttentionMaskInterface.register(ATTENTION_NAME, accel_triton_mask)
