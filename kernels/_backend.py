"""Which implementation runs an op: the Triton kernel or the plain PyTorch reference.

Triton runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` (how CI exercises the
real kernels). Everything else takes the reference. ``ACCEL_PATCH_BACKEND=reference`` (or
:func:`force_backend`) forces the reference everywhere, for debugging and parity checks.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence

import torch

from ._triton import TRITON_INSTALLED

_BACKENDS = ("auto", "triton", "reference")
_forced: str | None = None


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tile_choices(shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The launch shapes an autotuner tries: all of them, or under ``ACCEL_PATCH_AUTOTUNE=0`` only the first (each
    list puts its best measured shape first): one compile per key, no tuning."""
    return list(shapes[:1] if os.environ.get("ACCEL_PATCH_AUTOTUNE", "1") == "0" else shapes)


def _requested() -> str:
    backend = _forced or os.environ.get("ACCEL_PATCH_BACKEND", "auto")
    if backend not in _BACKENDS:
        raise ValueError(f"ACCEL_PATCH_BACKEND={backend!r} is not one of {_BACKENDS}")
    return backend


def choose(device: torch.device) -> tuple[str, str]:
    """Return ``(backend, reason)`` for tensors on ``device``."""
    requested = _requested()
    if requested == "reference":
        return "reference", "forced by ACCEL_PATCH_BACKEND/force_backend"
    if not TRITON_INSTALLED:
        reason = "triton is not installed"
    elif device.type == "cuda":
        return "triton", "CUDA tensor and triton installed"
    elif device.type == "cpu" and interpreting():
        return "triton", "TRITON_INTERPRET=1 runs the Triton kernels on the CPU"
    else:
        reason = f"{device.type} tensors have no Triton backend (set TRITON_INTERPRET=1 to interpret on CPU)"
    if requested == "triton":
        raise RuntimeError(f"the Triton backend was forced but cannot run: {reason}")
    return "reference", reason


@functools.cache  # on launch paths (grid sizes)
def sm_count(device_index: int | None) -> int:
    """The number of streaming multiprocessors of CUDA device ``device_index`` (None: the current one)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def use_triton(x: torch.Tensor) -> bool:
    """Hot-path form of :func:`choose` (called on every op; avoids building the reason string)."""
    if x.is_cuda and TRITON_INSTALLED and _requested() != "reference":
        return True
    return choose(x.device)[0] == "triton"


@contextlib.contextmanager
def force_backend(backend: str) -> Iterator[None]:
    """Run every op inside the block with ``backend`` ("auto", "triton" or "reference")."""
    global _forced
    if backend not in _BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {_BACKENDS}")
    previous, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = previous


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous (what the kernels index), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """View as ``[rows, last dim]`` with a unit stride along the last dim (copies only when it must)."""
    return unit_last_stride(t.reshape(-1, t.shape[-1]))


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of float16, bfloat16, float32: cast it first")


def check_same_device(**tensors: torch.Tensor) -> None:
    first, *rest = tensors.values()
    if all(t.device == first.device for t in rest):
        return
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"tensors must share one device, got {listing}; move them with .to(device)")


def autocast_cast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors in ``torch.autocast``'s dtype where autocast is on for their device (what ``F.linear``
    would compute in), else unchanged. Ops that run matmuls inside one autograd node cast their inputs
    up front, so forward and backward (which autocast does not cover) see one dtype, and the gradients
    flow back to float32 master weights through the casts."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


# Custom-op dispatch, and autograd.Function's separate-setup_context form (it binds arguments through
# inspect.signature on every call), cost more host time per call than the kernels take at LLaMA-8B
# sizes (profiled on the H100 host, torch 2.11). So eager calls go straight to the implementation
# through a classic autograd.Function, and only torch.compile sees the registered op, which keeps its
# graph whole.


_REAL_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def tracing(*args: object) -> bool:
    """True while torch.compile traces. ``torch.compiler.is_compiling()`` alone misses one case: AOTAutograd
    traces a custom op's backward through the autograd engine, which runs CUDA backwards on its own device thread,
    where that flag reads False; the tensors there are fake (and functional) subclasses, whose data Triton cannot
    reach. So any tensor subclass also counts (Parameters aside): the registered op is right for every tensor, only
    slower on the host."""
    if torch.compiler.is_compiling():
        return True
    return any(type(a) not in _REAL_TENSOR_TYPES for a in args if isinstance(a, torch.Tensor))


def eager_or_compiled(op: Callable, impl: Callable) -> Callable:
    """Call ``impl`` in eager mode and the registered custom ``op`` while torch.compile traces (:func:`tracing`)."""

    def call(*args):
        return op(*args) if tracing(*args) else impl(*args)

    return call


OP_NAMESPACE = "accel_patch"


@functools.cache  # once per process
def declare_inductor_fallbacks() -> None:
    """Tell inductor to run every ``accel_patch`` op as a fallback kernel, as it would decide by itself on
    meeting each one (same layout constraint), but before it lowers a graph. Deciding by itself, it first logs the
    op's arguments, and formatting them prints their IR recursively, shared inputs once per path: for an op first
    met deep in a graph (the loss, after the last decoder layer) the whole graph as a tree, exponential in its
    depth. Torch before 2.13 formats that line even with the log off: compiling the patched 16-layer LLaMA-3.2-1B
    config on an H100 had not finished after 9 minutes (torch 2.11); later versions pay it with inductor's info
    logs on. Our ops' fake implementations call this (see :func:`register_fake`), before inductor runs."""
    try:  # inductor's internals: on a torch without these, inductor decides by itself as before
        from torch._inductor import lowering
        from torch._library.utils import get_layout_constraint_tag

        to_constraint = lowering.tag_to_layout_constraint
    except (ImportError, AttributeError):
        return
    for name in torch._C._dispatch_get_all_op_names():
        namespace, _, op_name = name.partition("::")
        if namespace != OP_NAMESPACE:
            continue
        op = getattr(getattr(torch.ops, OP_NAMESPACE), op_name).default
        if op not in lowering.lowerings:
            constraint = to_constraint(get_layout_constraint_tag(op, with_default=True))
            lowering.make_fallback(op, layout_constraint=constraint, warn=False)


def register_fake(op) -> Callable[[Callable], Callable]:
    """Decorator: ``op.register_fake(fake)``, the fake implementation (which runs while torch.compile traces, before
    inductor lowers the graph) first calling :func:`declare_inductor_fallbacks`."""

    def decorate(fake: Callable) -> Callable:
        @functools.wraps(fake)
        def fake_after_declaring(*args, **kwargs):
            declare_inductor_fallbacks()
            return fake(*args, **kwargs)

        op.register_fake(fake_after_declaring)
        return fake

    return decorate


def differentiable(op, impl: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """Register ``backward`` on the custom ``op`` and return a caller that uses the same autograd
    formula through an ``autograd.Function`` in eager mode (and the bare ``impl`` when nothing needs a
    gradient)."""
    op.register_autograd(backward, setup_context=setup_context)

    def forward(ctx, *args):
        output = impl(*args)
        setup_context(ctx, args, output)
        return output

    function = type(  # named after the op's file and impl ("swiglu_forward"), which is what profilers show
        impl.__module__.rsplit(".", 1)[-1] + impl.__name__,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )

    def eager(*args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return function.apply(*args)
        return impl(*args)  # inference (generate, no_grad): no autograd node to build, less host time per call

    return eager_or_compiled(op, eager)
