"""The console command runs and tells the truth about parity and backends."""

import re

import torch

from accel_patch.cli import main
from accel_patch.kernels import choose_backend, force_backend


def test_env_reports_versions_and_backends(capsys):
    main(["env"])
    out = capsys.readouterr().out
    assert f"torch         {torch.__version__.split('+')[0]}" in out
    backend, reason = choose_backend(torch.device("cpu"))
    assert f"rms_norm      {backend}: {reason}" in out


def test_demo_runs_and_matches_stock(capsys):
    with force_backend("reference"):
        main(["demo", "--steps", "2"])
    out = capsys.readouterr().out
    rel = float(re.search(r"logits relative error ([0-9.e+-]+)", out).group(1))
    assert rel < 1e-4
    assert "identical tokens" in out
    losses = re.findall(r"^\s+\d+\s+([0-9.]+)\s+([0-9.]+)$", out, flags=re.M)
    assert len(losses) == 2 and all(abs(float(a) - float(b)) < 1e-3 for a, b in losses)
