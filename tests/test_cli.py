"""The console command runs and tells the truth about parity and backends."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from accel_patch.cli import main
from accel_patch.kernels import choose_backend, force_backend


def test_env_reports_versions_and_backends(capsys):
    main(["env"])
    out = capsys.readouterr().out
    assert f"torch         {torch.__version__.split('+')[0]}" in out
    backend, reason = choose_backend(torch.device("cpu"))
    for op in ("rms_norm", "apply_rope", "swiglu", "attention", "int8_linear", "linear_cross_entropy"):
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


def test_demo_refuses_a_step_count_below_one(capsys):
    # zero steps had ended in a StatisticsError (no median of no times)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--steps", "0"])
    assert exit_info.value.code == 2
    assert "argument --steps: must be above 0, got 0" in capsys.readouterr().err


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


def test_imports_and_patches_without_triton():
    # Triton ships for Linux only; elsewhere every op must fall back to its reference, not fail to import.
    script = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch, transformers
import accel_patch
from accel_patch.kernels import choose_backend
print(choose_backend(torch.device("cpu")))
config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config).eval()
ids = torch.randint(0, 64, (2, 9))
stock = model(ids).logits
accel_patch.patch_model(model)
err = ((model(ids).logits - stock).norm() / stock.norm()).item()
print("triton" in sys.modules and sys.modules["triton"] is None, err)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True).stdout
    backend_line, result_line = out.strip().splitlines()
    assert backend_line == "('reference', 'triton is not installed')"
    hidden, err = result_line.split()
    assert hidden == "True" and float(err) < 1e-5


def test_checkout_root_on_sys_path_keeps_one_copy_of_the_kernels():
    """From a checkout's root (on sys.path), transformers imports this repo's kernels/ as "kernels" while probing
    for its hub package of that name. That copy must stay empty: its modules would register our custom ops again,
    in place of accel_patch's."""
    script = """
import sys
import transformers.modeling_utils  # probes for the hub package "kernels"
import accel_patch
print("kernels" in sys.modules, sorted(name for name in sys.modules if name.startswith("kernels.")))
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True []"  # probed (as transformers 5.x does), and nothing under it imported
