"""The ``accel-patch`` console command: ``env`` and ``demo``."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

import torch

from .kernels import apply_rope, choose_backend, force_backend, rms_norm, swiglu


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cmd_env(_: argparse.Namespace) -> None:
    device = _device()
    print(f"python        {platform.python_version()}")
    for package in ("accel-patch", "torch", "triton", "transformers", "accelerate", "peft"):
        print(f"{package:<13} {_version(package)}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device        {device} ({name})")
    backend, reason = choose_backend(device)
    for op in ("rms_norm", "apply_rope", "swiglu"):
        print(f"{op:<13} {backend}: {reason}")


def _kernel_parity(device: torch.device) -> list[tuple[str, float]]:
    """Max abs difference of each op between the active backend and the PyTorch reference."""
    torch.manual_seed(0)
    x, w = torch.randn(64, 256, device=device), torch.rand(256, device=device) + 0.5
    q, k = torch.randn(2, 8, 16, 64, device=device), torch.randn(2, 2, 16, 64, device=device)
    angles = torch.randn(2, 16, 32, device=device)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    g, u = torch.randn(64, 512, device=device), torch.randn(64, 512, device=device)
    cases = {
        "rms_norm": lambda: rms_norm(x, w),
        "apply_rope": lambda: torch.cat([t.flatten() for t in apply_rope(q, k, cos, sin)]),
        "swiglu": lambda: swiglu(g, u),
    }
    rows = []
    for name, run in cases.items():
        active = run()
        with force_backend("reference"):
            reference = run()
        rows.append((name, (active - reference).abs().max().item()))
    return rows


def cmd_demo(_: argparse.Namespace) -> None:
    device = _device()
    backend, reason = choose_backend(device)
    print(f"accel-patch demo on {device}: kernels run on the {backend} backend ({reason})")
    print(f"{'op':<12} {'max |active - reference|':>26}")
    for name, diff in _kernel_parity(device):
        print(f"{name:<12} {diff:>26.3e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="accel-patch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions, device, and which backend each op uses").set_defaults(func=cmd_env)
    sub.add_parser("demo", help="check the kernels against their references").set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
