"""Compile the attention kernels for Hopper (sm_90a) on a machine without a GPU, as real launches specialise them.

CI has no GPU and its interpreter compiles nothing, so the paths only Hopper takes (the copy engine's tensor
descriptors, TMA) would otherwise first meet the compiler on the device machine, where Triton 3.6's ptxas once
crashed on one of them. Here the launchers run on CPU tensors with TMA forced on; each kernel launch is recorded
instead of run, then lowered by Triton and assembled by ptxas (both ship with Triton) for sm_90a, in every autotuned
tile the launch could pick. Triton's own launch path (binding, specialising, compiling) is driven step by step, which
uses its internal interface as of Triton 3.6 (``create_function_from_signature``, ``JITFunction._pack_args``).

Run as a script, with Triton not in interpreter mode: ``python sm90_compile.py RESULTS`` writes one JSON line per
compile to RESULTS, ``{"launch", "kernel", "tma", "config", "error"}`` (``error`` null when a cubin came out).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from accel_patch.kernels import _triton

# the module: ``accel_patch.kernels.attention`` as an attribute is the function the package re-exports
attention = importlib.import_module("accel_patch.kernels.attention")
HOPPER = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(HOPPER)
DT = torch.bfloat16


class _Recorder:
    """Stands in for a launcher: ``kernel[grid](*args, **constexprs)`` records the launch."""

    def __init__(self, name: str, launches: list) -> None:
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **constexprs: self.launches.append((self.name, args, constexprs))


def _configs(kernel, constexprs: dict) -> list[dict]:
    """The compile options of every tile an autotuned kernel may pick for these constexprs (the launch's own
    options for a plain kernel)."""
    if not isinstance(kernel, triton.runtime.Autotuner):
        return [{}]
    configs = kernel.configs
    if kernel.early_config_prune:
        configs = kernel.early_config_prune(configs, None, **constexprs)
    return [{**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages} for config in configs]


def _compile(kernel, args: tuple, options: dict) -> None:
    """Lower and assemble ``kernel`` for sm_90a as a launch with ``args`` and ``options`` would."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    bind = create_function_from_signature(fn.signature, fn.params, BACKEND)
    bound_args, specialization, _ = bind(*args, **options)
    parsed, signature, constexprs, attrs = fn._pack_args(BACKEND, options, bound_args, specialization, None)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=HOPPER, options=parsed.__dict__)
    if not compiled.asm.get("cubin"):
        raise RuntimeError("no cubin came out")


def _tensors(batch: int, n_q: int, n_kv: int, seq_q: int, seq_k: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    q = torch.randn(batch, n_q, seq_q, head_dim, dtype=DT)
    k, v = (torch.randn(batch, n_kv, seq_k, head_dim, dtype=DT) for _ in range(2))
    return q, k, v


def _forward_and_backward(q, k, v, attn_mask=None, key_padding_mask=None, causal=True, window=0, backward=True):
    scale = q.shape[-1] ** -0.5
    out, lse = attention._attn_fwd_triton(q, k, v, attn_mask, key_padding_mask, causal, window, scale)
    if backward:
        attention._attn_bwd_triton(torch.randn_like(out), q, k, v, out, lse, attn_mask, key_padding_mask, causal,
                                   window, scale)  # fmt: skip


def _launches() -> dict[str, Callable[[], None]]:
    """What real models call: LLaMA-style head dims 64 and 128 with whole tiles, a padded batch with ragged tiles,
    a sliding window, a long prompt (the forward's long-sequence tile), a prefill after a cache, no causality,
    decode, and the head dims that take no TMA (80, 256)."""
    padding = torch.ones(2, 150, dtype=torch.bool)
    padding[0, :20] = False
    dense = torch.ones(1, 1, 96, 320, dtype=torch.bool).tril(320 - 96)
    return {
        "causal d64": lambda: _forward_and_backward(*_tensors(2, 4, 2, 256, 256, 64)),
        "causal d128": lambda: _forward_and_backward(*_tensors(2, 4, 2, 256, 256, 128)),
        "padded d128": lambda: _forward_and_backward(*_tensors(2, 4, 4, 150, 150, 128), key_padding_mask=padding),
        "window d64": lambda: _forward_and_backward(*_tensors(1, 4, 1, 200, 200, 64), window=64),
        "long d128": lambda: _forward_and_backward(*_tensors(1, 2, 2, 4096, 4096, 128), backward=False),
        "cache d128 dense mask": lambda: _forward_and_backward(*_tensors(1, 4, 2, 96, 320, 128), attn_mask=dense),
        "non-causal d128": lambda: _forward_and_backward(*_tensors(1, 4, 2, 130, 130, 128), causal=False),
        "decode d128": lambda: _forward_and_backward(*_tensors(2, 4, 2, 1, 300, 128), backward=False),
        # a one-token step's backward without grouped heads: where ptxas crashed on the TMA dK/dV kernel
        "decode backward d128": lambda: _forward_and_backward(*_tensors(1, 2, 2, 1, 150, 128)),
        "causal d80": lambda: _forward_and_backward(*_tensors(1, 2, 2, 130, 130, 80)),
        "causal d256": lambda: _forward_and_backward(*_tensors(1, 2, 2, 130, 130, 256)),
    }


def main(results_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "the interpreter compiles nothing: unset TRITON_INTERPRET"
    launches: list = []
    kernels = {name: value for name, value in vars(attention).items() if isinstance(value, _triton._CachedLaunch)}
    for name in kernels:
        setattr(attention, name, _Recorder(name, launches))
    attention._on_tma_device = lambda tensor: True  # CPU tensors stand for an H100's
    with open(results_path, "w") as results:
        for launch, run in _launches().items():
            launches.clear()
            run()
            for name, args, constexprs in launches:
                kernel = kernels[name].kernel
                for config in _configs(kernel, constexprs):
                    try:
                        _compile(kernel, args, {**constexprs, **config})
                        error = None
                    except Exception:  # noqa: BLE001  (every failure is reported, the compiler's crashes included)
                        error = traceback.format_exc()[-3000:]
                    row = {"launch": launch, "kernel": name, "tma": constexprs.get("TMA"), "config": config,
                           "error": error}  # fmt: skip
                    results.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
