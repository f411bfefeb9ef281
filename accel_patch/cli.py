"""The ``accel-patch`` console command: ``env`` and ``demo``."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
from collections.abc import Callable

import torch

from .kernels import choose_backend


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type (the examples' flags use it too): a number of ``kind`` above zero, else refused with the
    value named."""

    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # what argparse calls the type in its "invalid ... value" message
    return parse


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
    for op in ("rms_norm", "apply_rope", "swiglu", "attention", "int8_linear", "linear_cross_entropy"):
        print(f"{op:<13} {backend}: {reason}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.model, steps=args.steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="accel-patch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions, device, and which backend each op uses").set_defaults(func=cmd_env)
    demo = sub.add_parser("demo", help="patch a model, check parity, train, generate and time it")
    demo.add_argument("--model", help="local checkpoint directory (default: a small LLaMA built from a config)")
    demo.add_argument("--steps", type=positive(int), default=5, help="training steps to run and to time")
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
