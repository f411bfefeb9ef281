"""``triton`` and ``triton.language`` where Triton is installed; inert stand-ins where it is not.

Triton ships for Linux only. Elsewhere the kernel modules must still import, so that every op falls
back to its PyTorch reference (``_backend.choose`` never picks Triton then, so no kernel launches).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

try:
    import triton
    import triton.language as tl

    TRITON_INSTALLED = True
except ImportError:
    TRITON_INSTALLED = False

    def _jit(fn=None, **_options):
        # Keep the Python function: it is never launched, but the module that defines it imports.
        return fn if fn is not None else (lambda f: f)

    triton = SimpleNamespace(
        jit=_jit,
        autotune=lambda **_options: _jit,
        Config=lambda *args, **kwargs: None,
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=lambda n: 1 << max(0, math.ceil(math.log2(n))),
    )
    tl = SimpleNamespace(constexpr=None)

__all__ = ["TRITON_INSTALLED", "tl", "triton"]
