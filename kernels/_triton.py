"""``triton`` and ``triton.language`` where Triton is installed; inert stand-ins where it is not; and
:func:`cached_launch`, which launches each kernel on its tensors' GPU, directly once it has run before.

Triton ships for Linux only. Elsewhere the kernel modules must still import, so that every op falls
back to its PyTorch reference (``_backend.choose`` never picks Triton then, so no kernel launches).
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    TRITON_INSTALLED = True
except ImportError:
    TRITON_INSTALLED = False

    def _jit(fn=None, **_options):
        # Keep the Python function: it is never launched, but the module that defines it imports.
        return fn if fn is not None else (lambda f: f)

    triton = SimpleNamespace(jit=_jit, autotune=lambda **_options: _jit, Config=lambda *args, **kwargs: None)
    tl = SimpleNamespace(constexpr=lambda value=None: value)  # wraps module-level constants kernels read
try:  # host-side TMA descriptors (Triton 3.3 and later)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids and tile counts on the host. ``triton.cdiv`` gives the same, but it is a
    constexpr function whose every Python call wraps and unwraps its arguments: ~2 us against ~0.03 us, dozens of
    times per decoder layer."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for 0), as ``triton.next_power_of_2`` but a plain function (see
    :func:`cdiv`)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


# The launch below calls Triton's compiled-kernel launcher directly, an internal interface: only on the
# Triton releases it was checked against (on the H100: the cached-launch tests in tests/test_kernels.py), elsewhere
# Triton's own path.
_CHECKED_TRITON = ("3.6",)


def _launch_key(args: tuple) -> tuple:
    """What Triton specialises a kernel on, per argument (a superset: equal keys mean the same compiled kernel): a
    tensor's dtype and 16-byte alignment; a tensor descriptor's dtype, block shape and padding; an integer's being
    1, being a multiple of 16 and its width; a float's type only. One comprehension rather than a call per
    argument: it is on every launch's path."""
    return tuple([(a.dtype, not a.data_ptr() & 15) if isinstance(a, torch.Tensor)
                  else (a == 1, not a & 15, -(2**31) <= a < 2**31, a >= 2**63) if type(a) is int
                  else float if type(a) is float
                  else (a.base.dtype, *a.block_shape, a.padding) if type(a) is TensorDescriptor
                  else (type(a), a) for a in args])  # fmt: skip


def _hooked(hook) -> bool:
    """A launch hook is set: a callable, or Triton's ``HookChain`` holding any."""
    return hook is not None and bool(getattr(hook, "calls", True))


class _CachedLaunch:
    """A ``@triton.jit`` kernel (or a ``@triton.autotune`` of one) launched as ``kernel[grid](*args, **constexprs)``.

    Every launch runs on the GPU that holds its first argument (a tensor, or a tensor descriptor's tensor). Triton
    launches on the *current* device, which under ``device_map="auto"`` across GPUs is not where a layer's tensors
    live (Triton then refuses the pointers, or with peer access reads them from the wrong GPU's stream).

    With ``direct``, the first launch per specialisation goes through Triton (compiling, autotuning); it is
    remembered under :func:`_launch_key` of its arguments (plus the autotuning key's values), and later launches
    with the same key call the compiled kernel directly. That skips Triton's per-launch argument binding, cache-key
    hashing and the autotuner's bookkeeping: 30-100 us of host time per launch on the H100's host, more than a
    small kernel runs. Launch hooks (profilers such as proton) and arguments that cannot be keyed take Triton's
    path always.
    """

    def __init__(self, kernel, direct: bool) -> None:
        self.kernel = kernel
        self.direct = direct
        self.autotuner = kernel if isinstance(kernel, triton.runtime.Autotuner) else None
        jit_function = kernel.fn if self.autotuner else kernel
        self.arg_names = jit_function.arg_names
        tuned_on = self.autotuner.keys if self.autotuner else ()
        self.tuned_positions = tuple(i for i, name in enumerate(self.arg_names) if name in tuned_on)
        self.launches: dict[tuple, tuple] = {}

    def __getitem__(self, grid):
        return functools.partial(self.launch, grid)

    def __getattr__(self, name: str):  # Triton's own attributes (configs_timings, cache, ...) stay reachable
        return getattr(self.__dict__.get("kernel"), name)

    def launch(self, grid, *args, **constexprs):
        driver = triton.runtime.driver.active
        device = driver.get_current_device()
        first = args[0].base if type(args[0]) is TensorDescriptor else args[0]
        home = first.get_device() if isinstance(first, torch.Tensor) else -1  # -1: a CPU tensor
        if home >= 0 and home != device:
            with torch.cuda.device(home):
                return self.launch(grid, *args, **constexprs)
        hooks = triton.knobs.runtime
        if not self.direct or _hooked(hooks.launch_enter_hook) or _hooked(hooks.launch_exit_hook):
            return self.kernel[grid](*args, **constexprs)
        key = (device, _launch_key(args), *(args[i] for i in self.tuned_positions if i < len(args)),
               *constexprs.items())  # fmt: skip
        remembered = self.launches.get(key)
        if remembered is None:
            return self._launch_through_triton(key, grid, args, constexprs)
        launch, function, head, trailing, meta = remembered
        dims = grid(meta) if callable(grid) else grid
        stream = driver.get_current_stream(device)
        launch(dims[0], dims[1] if len(dims) > 1 else 1, dims[2] if len(dims) > 2 else 1, stream, function, *head,
               *args, *trailing)  # fmt: skip

    def _launch_through_triton(self, key, grid, args, constexprs):
        compiled = self.kernel[grid](*args, **constexprs)
        meta = {**constexprs, **(self.autotuner.best_config.all_kwargs() if self.autotuner else {})}
        trailing_names = self.arg_names[len(args) :]
        keyable = all(not isinstance(v, torch.Tensor) for v in constexprs.values())
        if keyable and all(name in meta for name in trailing_names) and hasattr(compiled, "packed_metadata"):
            trailing = tuple(meta[name] for name in trailing_names)  # constexprs travel as launcher arguments too
            self.launches[key] = (*_launcher(compiled), trailing, meta)
        return compiled


def _launcher(compiled) -> tuple:
    """``(launch, function, head)``: ``launch(grid x, y, z, stream, function, *head, *args)`` starts ``compiled``.
    The compiled launcher's C entry point where the kernel needs no scratch memory (Triton's Python wrapper around
    it only allocates that scratch: 9.2 -> 7.7 us per launch on the H100's host), else the wrapper. No launch hooks: the
    caller checked."""
    run = compiled.run  # packed metadata, launch metadata, enter hook, exit hook: then the kernel's arguments
    tail = (compiled.packed_metadata, None, None, None)
    c_launch = getattr(run, "launch", None)
    scratch = (getattr(run, "global_scratch_size", 1), getattr(run, "profile_scratch_size", 1))
    if c_launch is None or scratch != (0, 0):
        return run, compiled.function, tail
    return c_launch, compiled.function, (run.launch_cooperative_grid, run.launch_pdl, None, None, *tail)


def cached_launch(kernel):
    """Decorator (outermost, over ``@triton.jit`` or ``@triton.autotune``) for kernels launched from Python: see
    :class:`_CachedLaunch`. A no-op where Triton is missing or interpreted on the CPU; direct launches are off on
    unchecked Triton releases and under ``ACCEL_PATCH_CACHED_LAUNCH=0``."""
    if not TRITON_INSTALLED or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return kernel
    direct = (
        os.environ.get("ACCEL_PATCH_CACHED_LAUNCH", "1") != "0"
        and triton.__version__.rsplit(".", 1)[0] in _CHECKED_TRITON
    )  # fmt: skip
    return _CachedLaunch(kernel, direct)


_split_counters: dict[tuple, torch.Tensor] = {}


def split_counters(device: torch.device, count: int) -> torch.Tensor:
    """``count`` (or more) int32 counters, zero between launches, for kernels whose programs split one output's work
    and whose last program to finish (counted by an atomic add) merges the parts and sets its counter back to 0. One
    buffer per device and stream, shared by every such kernel: launches on one stream run one after another, and
    launches running at once (other streams) never share one."""
    stream = triton.runtime.driver.active.get_current_stream(device.index) if device.type == "cuda" else 0
    key = (device, stream)
    counters = _split_counters.get(key)
    if counters is None or counters.numel() < count:
        counters = _split_counters[key] = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
    return counters


@triton.jit
def last_to_finish(COUNTERS, slot, n_parts):
    """True in the last of the ``n_parts`` programs that call this for counter ``slot`` (of :func:`split_counters`),
    once each has stored its part: that program merges the parts, then sets the counter back to 0. The barrier makes
    every thread's stores precede the count (release); the count's acquire makes the others' stores visible."""
    tl.debug_barrier()
    return tl.atomic_add(COUNTERS + slot, 1, sem="acq_rel", scope="gpu") == n_parts - 1


__all__ = ["TRITON_INSTALLED", "TensorDescriptor", "cached_launch", "cdiv", "last_to_finish", "next_power_of_2",
           "split_counters", "tl", "triton"]
