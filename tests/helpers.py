"""Shared test helpers (tolerances, error metric, devices)."""

import os

import pytest
import torch

TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"

# Relative-error bounds against a float64 reference, per input dtype.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

CPU_DTYPES = [torch.float32, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64; NaN anywhere fails every bound."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def backends_for(device: str) -> list[str]:
    """The backends that really run on `device` in this process."""
    if device == "cuda" or TRITON_ON_CPU:
        return ["triton", "reference"]
    return ["reference"]


def loss_curve(model, ids, steps=20, lr=3e-3):
    """Losses of ``steps`` AdamW steps on fixed data (parameters without gradients are left alone)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return torch.tensor(losses)
