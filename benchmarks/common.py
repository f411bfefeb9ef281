"""Timing, hardware ceilings and result tables shared by the benchmark scripts."""

from __future__ import annotations

import datetime
import importlib.util
import math
import re
import statistics
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing

RESULTS = Path(__file__).parent / "results"


def median_ms(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def pass_step(run: Callable[[], tuple[torch.Tensor, ...]], backward: bool,
              inputs: Sequence[torch.Tensor] = ()) -> Callable[[], object]:  # fmt: skip
    """A callable running the forward pass, or forward and backward with fixed random output grads: into the
    leaves' ``.grad``, or with ``inputs`` returned as their gradients instead (so that several calls in one CUDA
    graph add no accumulation kernels)."""
    if not backward:

        def forward():
            with torch.no_grad():
                run()

        return forward
    grads = [torch.randn_like(t) for t in run()]
    if inputs:
        return lambda: torch.autograd.grad(run(), inputs, grads)
    return lambda: torch.autograd.backward(run(), grads)


def _captured(step: Callable[[], object], warmups: int, leaves: Sequence[torch.Tensor] = ()) -> torch.cuda.CUDAGraph:
    """``step`` run ``warmups`` times on a side stream (compiling and autotuning outside the capture), then captured
    in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for leaf in leaves:
        leaf.grad = None  # captured as a fresh write, so each replay overwrites rather than accumulates
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def graph_ms(step: Callable[[], None], leaves: list[torch.Tensor]) -> float:
    """Median time of CUDA-graph replays of ``step``: device work only, no host launch overhead."""
    return median_ms(_captured(step, 3, leaves).replay)


def stream_ms(calls: list[Callable[[], object]], replays: int = 50) -> float:
    """Median device time per call of a CUDA graph running ``calls`` back to back, as a decode step runs its
    layers: each call on its own weights, which the caller makes several times the L2 cache in all, so that every
    call reads them from memory. No L2 flush in between: ``median_ms`` zero-fills 256 MB before each run, so a
    single timed call also pays for writing back the dirty lines that leaves in L2, and for the graph's launch
    (H100: 32.6 µs for one 58.7 MB INT8 weight that streams at 23.0 µs per call)."""

    def run_all() -> None:
        for call in calls:
            call()

    graph = _captured(run_all, 1)
    for _ in range(3):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) / len(calls)


@triton.jit
def _read_kernel(X, Y, SUMS, n, HAS_Y: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    total = tl.load(X + offs, mask=offs < n, other=0)
    if HAS_Y:
        total += tl.load(Y + offs, mask=offs < n, other=0)
    tl.store(SUMS + tl.program_id(0), tl.sum(total, 0))


def read_ms(layers: list[tuple[torch.Tensor, ...]]) -> float:
    """The floor under a memory-bound call at its size: ``stream_ms`` of a kernel that only reads each layer's one
    or two equally sized tensors (and writes a few bytes), in one launch per layer. No kernel that must read those
    bytes can beat it: it pays the same launch, ramp-up and tail, and nothing else."""
    # any dtype, read as 32-bit words (summed with wrap-around)
    words = [[t.reshape(-1).view(torch.int32) for t in layer] for layer in layers]
    blocks = max(triton.cdiv(w.numel(), 2048) for layer in words for w in layer)
    sums = torch.empty(blocks, dtype=torch.int32, device=layers[0][0].device)

    def reader(x: torch.Tensor, y: torch.Tensor | None) -> Callable[[], None]:
        return lambda: _read_kernel[(triton.cdiv(x.numel(), 2048),)](x, x if y is None else y, sums, x.numel(),
                                                                      HAS_Y=y is not None, BLOCK=2048, num_warps=8)

    return stream_ms([reader(layer[0], layer[1] if len(layer) > 1 else None) for layer in words])


def copies_beyond_l2(nbytes: int, times_l2: int = 4) -> int:
    """How many copies of ``nbytes`` of weights make ``times_l2`` times the GPU's L2 cache (at least 2)."""
    l2_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, -(-times_l2 * l2_bytes // nbytes))


def device_gaps(trace: torch.profiler.profile) -> tuple[float, list[tuple[float, str, str]]]:
    """From a profiler trace: the µs from the first CUDA activity's start to the last one's end, and each stretch
    in between where the GPU ran nothing (it waited for the host) as ``(µs, activity before, activity after)``."""
    kernels = sorted((e for e in trace.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)  # fmt: skip
    busy_until, last_name, gaps = kernels[0].time_range.end, kernels[0].name, []
    for event in kernels[1:]:
        if event.time_range.start > busy_until:
            gaps.append((event.time_range.start - busy_until, last_name, event.name))
        if event.time_range.end > busy_until:
            busy_until, last_name = event.time_range.end, event.name
    return busy_until - kernels[0].time_range.start, gaps


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(512 * 2**20, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (median_ms(lambda: dst.copy_(src)) * 1e-3)


# Dense bf16 tensor-core peaks from the vendor's datasheets, in TFLOP/s: the ceiling for MFU. Matched in order
# against the device name ("H100 PCIe" before the SXM "H100").
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_bf16_tflops() -> float | None:
    name = gpu_name()
    return next((peak for gpu, peak in PEAK_BF16_TFLOPS.items() if gpu in name), None)


class ClockSampler:
    """The current GPU's SM clock (MHz) and board power (W), sampled by ``nvidia-smi`` every ``period_ms`` while the
    ``with`` block runs: a power-capped GPU lowers its clock under heavy tensor-core work, which moves a step's time
    as much as some kernel changes do. ``medians()`` gives (MHz, W); NaN where nvidia-smi is missing or failed."""

    def __init__(self, period_ms: int = 50) -> None:
        self.period_ms, self.samples, self.process = period_ms, [], None

    def __enter__(self) -> ClockSampler:
        if not torch.cuda.is_available():
            return self
        gpu = f"GPU-{torch.cuda.get_device_properties(torch.cuda.current_device()).uuid}"  # CUDA_VISIBLE_DEVICES-proof
        try:
            self.process = subprocess.Popen(
                ["nvidia-smi", f"--id={gpu}", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                 f"--loop-ms={self.period_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
        except OSError:
            self.process = None
        return self

    def __exit__(self, *_) -> None:
        if self.process is None:
            return
        self.process.terminate()
        output, _ = self.process.communicate()
        for line in output.splitlines():
            try:
                self.samples.append(tuple(float(field) for field in line.split(",")))
            except ValueError:  # "[N/A]" or a line cut short by the termination
                continue

    def medians(self) -> tuple[float, float]:
        if not self.samples:
            return math.nan, math.nan
        return statistics.median(s[0] for s in self.samples), statistics.median(s[-1] for s in self.samples)


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def gpu_name() -> str:
    return torch.cuda.get_device_name()


def slug(name: str) -> str:
    """``name`` as a file-name part: runs of anything but letters and digits become one dash."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def write_table(stem: str, title: str, header: list[str], rows: list[list[str]], notes: list[str]) -> Path:
    """Write a markdown table named after the benchmark and the GPU; also print it."""
    lines = [f"# {title}", "", f"GPU: {gpu_name()}; torch {torch.__version__}, triton {triton.__version__}; "
             f"{datetime.date.today().isoformat()}", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [""] + [f"- {note}" for note in notes]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{stem}-{slug(gpu_name())}.md"
    path.write_text(text)
    print(text)
    return path
