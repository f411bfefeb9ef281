"""``*ForCausalLM.forward`` with the fused linear cross-entropy: no ``[tokens, vocab]`` logits when training.

Installed per instance (an instance attribute shadowing the class's ``forward``; under an accelerate device
hook, the hook's saved forward), so other models in the process keep the stock forward. It computes the loss
exactly as HF's ``ForCausalLMLoss`` (labels shifted left, ``-100`` ignored, ``num_items_in_batch`` honoured)
and falls back to the stock forward wherever logits are wanted or the head is not a plain, unhooked ``nn.Linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..kernels.linear_cross_entropy import check_labels, embedding_for_tied_head, linear_cross_entropy
from .modules import install_forward, plain_embedding, plain_linear, remove_forward

IGNORE_INDEX = -100  # HF's ForCausalLMLoss default


def _fused_forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *args,
                   labels: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                   **kwargs) -> CausalLMOutputWithPast | tuple:  # fmt: skip
    head = self.lm_head
    fusable = (
        labels is not None
        and torch.is_grad_enabled()  # the fused op computes gradients in its forward: pointless without them
        and not args  # past the first two arguments HF passes everything by keyword; else the stock path
        and isinstance(logits_to_keep, int) and logits_to_keep == 0
        and plain_linear(head) and head.bias is None
        and getattr(self.config, "final_logit_softcapping", None) is None
    )  # fmt: skip
    if not fusable:
        return type(self).forward(self, input_ids, attention_mask, *args, labels=labels,
                                  logits_to_keep=logits_to_keep, **kwargs)
    return_dict = kwargs.pop("return_dict", None)
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    # Checked before the forward is queued, beside HF's own sync in its mask preamble; after it, the check would
    # hold the host until the GPU had run the whole forward, and the loss's first kernels would wait for the host.
    check_labels(shift_labels, head.weight.shape[0], IGNORE_INDEX)
    embed, tied_head = self.get_input_embeddings(), None
    if input_ids is not None and kwargs.get("inputs_embeds") is None and embed.weight is head.weight \
            and plain_embedding(embed):  # the tied weight's two gradients summed without a [vocab, hidden] pass
        kwargs["inputs_embeds"], tied_head = embedding_for_tied_head(input_ids, embed.weight, embed.padding_idx)
        input_ids = None
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = outputs.last_hidden_state
    loss = linear_cross_entropy(hidden, head.weight, shift_labels.to(hidden.device), ignore_index=IGNORE_INDEX,
                                num_items=kwargs.get("num_items_in_batch"), labels_checked=True,
                                tied_head=tied_head)  # fmt: skip
    output = CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                    hidden_states=outputs.hidden_states, attentions=outputs.attentions)  # fmt: skip
    return output.to_tuple() if return_dict is False else output


def is_causal_lm(module: nn.Module, decoders: list[nn.Module]) -> bool:
    return type(module).__name__.endswith("ForCausalLM") and any(module.model is d for d in decoders)


def install_fused_cross_entropy(model: nn.Module) -> bool:
    """Give ``model`` (a ``*ForCausalLM``) the fused-loss forward; False if it already has it."""
    return install_forward(model, _fused_forward)


def remove_fused_cross_entropy(model: nn.Module) -> bool:
    """Restore the class's forward; False if ``model`` did not have the fused one."""
    return remove_forward(model, _fused_forward)
