"""Fused linear cross-entropy against a float64 cross_entropy of the full logits."""

import pytest
import torch
import torch.nn.functional as F

from accel_patch.kernels import force_backend, linear_cross_entropy
from accel_patch.kernels.linear_cross_entropy import add_embedding_rows

from helpers import CPU_DTYPES, TOL, backends_for, rel_err

CASES = [("cpu", dt, be) for dt in CPU_DTYPES for be in backends_for("cpu")]
CASES += [pytest.param("cuda", torch.bfloat16, "triton", marks=pytest.mark.gpu)]
SHAPES = {"cpu": [(37, 24, 301), (5, 16, 64)], "cuda": [(4096, 2048, 128256), (1000, 4096, 32000)]}


@pytest.mark.parametrize("device,dtype,backend", CASES)
@pytest.mark.parametrize("num_items,upstream", [(None, 2.5), (50, 2.5), (None, 1.0)])
def test_matches_float64_cross_entropy(device, dtype, backend, num_items, upstream):
    for tokens, hidden_size, vocab in SHAPES[device]:
        gen = torch.Generator().manual_seed(tokens)
        h64 = torch.randn(tokens, hidden_size, generator=gen, dtype=torch.float64)
        w64 = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) * hidden_size**-0.5
        labels = torch.randint(0, vocab, (tokens,), generator=gen)
        labels[::4] = -100
        hidden = h64.to(device, dtype).requires_grad_()
        weight = w64.to(device, dtype).requires_grad_()
        with force_backend(backend):
            loss = linear_cross_entropy(hidden, weight, labels.to(device), num_items=num_items)
            (loss * upstream).backward()  # the upstream gradient scales the stored gradients (1: left as they are)
        h64.requires_grad_()
        w64.requires_grad_()
        # the reference sees the same rounded inputs, and logits rounded to the input dtype like HF's lm_head
        logits = (hidden.detach().double() @ weight.detach().double().t()).to(dtype).double()
        logits = logits.requires_grad_()
        reduction = "mean" if num_items is None else "sum"
        expected = F.cross_entropy(logits, labels.to(device), ignore_index=-100, reduction=reduction)
        expected = expected / (num_items or 1)
        (expected * upstream).backward()
        grad_hidden = logits.grad @ weight.detach().double()
        grad_weight = logits.grad.t() @ hidden.detach().double()
        assert loss.dtype == torch.float32 and loss.dim() == 0
        assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item()), (tokens, vocab)
        assert rel_err(hidden.grad, grad_hidden) < TOL[dtype], (tokens, vocab)
        assert rel_err(weight.grad, grad_weight) < TOL[dtype], (tokens, vocab)


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_all_labels_ignored_gives_zero_loss_and_gradients(backend):
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    with force_backend(backend):
        loss = linear_cross_entropy(hidden, weight, torch.full((6,), -100))
        loss.backward()
    assert loss.item() == 0.0 and not hidden.grad.any() and not weight.grad.any()


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_no_tokens_gives_zero_loss_and_gradients(backend):
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    with force_backend(backend):
        loss = linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long))
        loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == (0, 8) and not weight.grad.any()


def test_frozen_weight_gets_no_gradient():
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(20, 8)  # frozen, as the LM head under LoRA
    linear_cross_entropy(hidden, weight, torch.randint(0, 20, (2, 3))).backward()
    assert weight.grad is None and hidden.grad.shape == (2, 3, 8)


def test_bad_inputs():
    hidden, weight = torch.randn(4, 8), torch.randn(20, 8)
    with pytest.raises(ValueError, match="outside \\[0, 20\\)"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 20, -100]))
    with pytest.raises(ValueError, match="labels must be integer of shape"):
        linear_cross_entropy(hidden, weight, torch.zeros(4))
    with pytest.raises(ValueError, match="must be \\[vocab, 8\\]"):
        linear_cross_entropy(hidden, torch.randn(20, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="share a dtype"):
        linear_cross_entropy(hidden, weight.half(), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_compiles_without_graph_breaks(backend):
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (9,))
    torch._dynamo.reset()
    with force_backend(backend):
        expected = linear_cross_entropy(hidden, weight, labels)
        expected_grads = torch.autograd.grad(expected, [hidden, weight])
        compiled = torch.compile(linear_cross_entropy, fullgraph=True, backend="aot_eager")
        got = compiled(hidden, weight, labels)
        got_grads = torch.autograd.grad(got, [hidden, weight])
    torch.testing.assert_close(got, expected)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_autocast_casts_like_lm_head_and_second_backward_is_refused(backend):
    hidden = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)  # float32 master weight under bf16 autocast
    labels = torch.randint(0, 50, (10,))
    with force_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    logits = (hidden.detach().bfloat16() @ weight.detach().bfloat16().t()).double().requires_grad_()
    expected = F.cross_entropy(logits, labels)
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    assert rel_err(weight.grad, logits.grad.t() @ hidden.detach().bfloat16().double()) < 2e-2
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # the gradients were scaled in place
        loss.backward()


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_loss_only_and_weight_only_gradients(backend):
    """No gradient wanted (eval) gives the same loss; a hidden state that needs none still yields the weight's."""
    hidden = torch.randn(30, 8)  # 30 tokens: four chunks of 8
    weight = torch.randn(50, 8, requires_grad=True)
    labels = torch.randint(0, 50, (30,))
    labels[3] = -100
    logits = (hidden.double() @ weight.detach().double().t()).requires_grad_()
    expected = F.cross_entropy(logits, labels)
    expected.backward()
    with force_backend(backend):
        with torch.no_grad():
            assert abs(linear_cross_entropy(hidden, weight, labels).item() - expected.item()) < 1e-5 * expected.item()
        linear_cross_entropy(hidden, weight, labels).backward()
    assert rel_err(weight.grad, logits.grad.t() @ hidden.double()) < 1e-5


ROWS_SHAPES = {"cpu": (70, 24, 50), "cuda": (8192, 2048, 128256)}  # (tokens, hidden, vocab)


@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_add_embedding_rows_adds_the_lookups_gradient_in_place(device, dtype, backend):
    tokens, hidden_size, vocab = ROWS_SHAPES[device]
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (tokens,), generator=gen)
    ids[5:45] = 9  # a run longer than the kernel's block of tokens
    ids[::7] = 3  # the padding id: no gradient
    rows64 = torch.randn(tokens, hidden_size, generator=gen, dtype=torch.float64)
    grad64 = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64)
    grad, rows = grad64.to(device, dtype), rows64.to(device, dtype)
    before = grad.clone()
    with force_backend(backend):
        add_embedding_rows(grad, ids.to(device), rows, padding_idx=3)
    expected = before.double().cpu().index_add(0, ids, rows.double().cpu().masked_fill((ids == 3)[:, None], 0.0))
    touched = torch.zeros(vocab, dtype=torch.bool).index_fill_(0, ids[ids != 3], True).to(device)
    assert rel_err(grad[touched], expected.to(device)[touched]) < TOL[dtype]
    assert torch.equal(grad[~touched], before[~touched])  # other rows, the padding row among them, untouched
