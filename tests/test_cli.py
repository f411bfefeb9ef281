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
    for op in ("rms_norm", "apply_rope", "swiglu", "attention", "int8_linear"):
        assert f"{op:<13} {backend}: {reason}" in out


def test_demo_runs_and_matches_stock(capsys):
    with force_backend("reference"):
        main(["demo", "--steps", "2"])
    out = capsys.readouterr().out
    rel = float(re.search(r"logits relative error ([0-9.e+-]+)", out).group(1))
    assert rel < 1e-4
    assert "identical tokens" in out
    losses = re.findall(r"^\s+\d+\s+([0-9.]+)\s+([0-9.]+)$", out, flags=re.M)
    assert len(losses) == 2 and all(abs(float(a) - float(b)) < 1e-3 for a, b in losses)


def test_example_patches_and_generates(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "patch_and_generate.py"
    spec = importlib.util.spec_from_file_location("patch_and_generate", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(1)
    with force_backend("reference"):
        tokens = example.main(["--new-tokens", "5"])
    stock = example.load(None, torch.device("cpu")).eval()  # the same seeded weights, unpatched
    expected = stock.generate(tokens[:, :8], max_new_tokens=5, do_sample=False)
    assert torch.equal(tokens, expected)
    assert f"generated token ids: {tokens[0, 8:].tolist()}" in capsys.readouterr().out
