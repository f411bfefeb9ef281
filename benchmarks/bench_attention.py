"""Causal attention, bf16: our Triton kernel vs scaled_dot_product_attention with each backend, one run.

Training shapes report TFLOP/s (causal forward = 2·B·H·N²·D, forward+backward 3.5x that), timed as CUDA-graph
replays so that small shapes measure the kernels rather than the host's launches; the same with the masks HF
passes (a dense ``[batch, 1, N, N]`` causal mask under torch.compile, with padding for a padded batch; a 2-D
padding mask) in µs beside each implementation's unmasked time; decode
(one query per sequence) reports GB/s of K and V read against the measured copy bandwidth, timed over a stream of
layers each with its own KV cache, as a decode step runs them.
Run on a CUDA GPU: ``python benchmarks/bench_attention.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from accel_patch.kernels import attention

from common import copies_beyond_l2, copy_bandwidth, graph_ms, pass_step, read_ms, stream_ms, write_table

DT = torch.bfloat16
TRAIN_SHAPES = [(4, 32, 32, 2048), (1, 32, 32, 8192), (8, 32, 8, 1024)]  # batch, q heads, kv heads, seq
MASK_SHAPES = [(4, 32, 8, 2048, 64), (4, 32, 8, 2048, 128)]  # ..., head dim: LLaMA-3.2-1B's and -8B's training step
REPEATS = 5  # training shapes: calls per CUDA graph, back to back as a model's layers run them
READ_ROW = "read of K+V alone (floor)"
SDPA_BACKENDS = {"SDPA flash": SDPBackend.FLASH_ATTENTION, "SDPA cuDNN": SDPBackend.CUDNN_ATTENTION,
                 "SDPA efficient": SDPBackend.EFFICIENT_ATTENTION}  # fmt: skip


def _impls(q, k, v, dense=None, key_padding=None):
    """Each implementation as a callable. ``dense``/``key_padding``: the masks ours gets with ``causal=True``, as HF
    hands them to it; SDPA gets ``dense`` alone (it already holds causality), and has no 2-D padding mask."""
    group = q.shape[1] // k.shape[1]
    gqa = group > 1
    impls = {"ours": lambda: (attention(q, k, v, attn_mask=dense, key_padding_mask=key_padding),)}
    if key_padding is not None:
        return impls
    for name, backend in SDPA_BACKENDS.items():

        def run(backend=backend):
            keys, values, shared = k, v, gqa
            if gqa and backend == SDPBackend.EFFICIENT_ATTENTION:  # no GQA in it: K and V repeated, as HF does
                keys, values, shared = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), False
            with sdpa_kernel(backend):
                causal = dense is None and q.shape[2] > 1
                return (F.scaled_dot_product_attention(q, keys, values, attn_mask=dense, is_causal=causal,
                                                       enable_gqa=shared),)  # fmt: skip

        impls[name] = run
    return impls


def _train_ms(impls: dict, leaves: list[torch.Tensor], label: str, notes: list[str]) -> dict[str, tuple[float, float]]:
    """``{implementation: (fwd ms, fwd+bwd ms)}`` per call; a backend that refuses the inputs gets a note instead."""
    times = {}
    for name, run in impls.items():
        try:
            times[name] = (stream_ms([pass_step(run, False)] * REPEATS),
                           stream_ms([pass_step(run, True, leaves)] * REPEATS))  # fmt: skip
        except RuntimeError as error:
            notes.append(f"{name} on {label}: {str(error).splitlines()[0]}")
    return times


def _train_inputs(batch: int, n_q: int, n_kv: int, seq: int, head_dim: int) -> list[torch.Tensor]:
    return [torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=DT, requires_grad=True)
            for heads in (n_q, n_kv, n_kv)]  # fmt: skip


def _mask_rows(notes: list[str]) -> list[list[str]]:
    """The masked training step against each implementation's unmasked one. Half the batch is padded at the end
    by a quarter of its length."""
    rows = []
    for batch, n_q, n_kv, seq, head_dim in MASK_SHAPES:
        q, k, v = _train_inputs(batch, n_q, n_kv, seq, head_dim)
        label = f"({batch}, {n_q}/{n_kv}, {seq}, {head_dim})"
        causal = torch.ones(seq, seq, dtype=torch.bool, device="cuda").tril()
        lengths = torch.tensor([seq - (seq // 4) * (b % 2) for b in range(batch)], device="cuda")
        real = torch.arange(seq, device="cuda")[None, :] < lengths[:, None]  # [batch, seq]
        masks = {"none (causal flag)": {},
                 "dense causal": {"dense": causal.expand(batch, 1, seq, seq).contiguous()},
                 "dense causal + padding": {"dense": causal & real[:, None, None, :]},
                 "2-D padding mask": {"key_padding": real}}  # fmt: skip
        unmasked = {}
        for mask_name, mask in masks.items():
            times = _train_ms(_impls(q, k, v, **mask), [q, k, v], f"{label} with {mask_name}", notes)
            unmasked = unmasked or times
            for name, (fwd, fwd_bwd) in times.items():
                ours = times["ours"]
                rows.append([label, mask_name, name, f"{fwd * 1e3:.1f}", f"{fwd_bwd * 1e3:.1f}",
                             f"{fwd / unmasked[name][0]:.2f}x", f"{fwd_bwd / unmasked[name][1]:.2f}x",
                             f"{fwd / ours[0]:.2f}x", f"{fwd_bwd / ours[1]:.2f}x"])  # fmt: skip
        del q, k, v, masks
    return rows


def main() -> None:
    copy_bw = copy_bandwidth()
    rows, decode_rows, notes, mask_notes = [], [], [], []
    for head_dim in (128, 64):
        for batch, n_q, n_kv, seq in TRAIN_SHAPES:
            q, k, v = _train_inputs(batch, n_q, n_kv, seq, head_dim)
            flops = 2 * batch * n_q * seq * seq * head_dim
            times = _train_ms(_impls(q, k, v), [q, k, v], f"({batch}, {n_q}/{n_kv}, {seq}, {head_dim})", notes)
            results = {name: (flops / fwd / 1e9, 3.5 * flops / fwd_bwd / 1e9) for name, (fwd, fwd_bwd) in times.items()}
            for name, (fwd_tf, bwd_tf) in results.items():
                rows.append([f"({batch}, {n_q}/{n_kv}, {seq}, {head_dim})", name, f"{fwd_tf:.0f}", f"{bwd_tf:.0f}",
                             f"{results['ours'][0] / fwd_tf:.2f}x", f"{results['ours'][1] / bwd_tf:.2f}x"])
            del q, k, v
    for batch in (1, 16, 64):
        for kv_len in (4096, 32768):
            if batch * kv_len > 64 * 8192:
                continue
            kv_bytes = 2 * batch * 8 * kv_len * 128 * 2
            # one (q, k, v) per layer, as a decode step runs its layers, their caches 4x the L2 cache in all
            layers = [(torch.randn(batch, 32, 1, 128, device="cuda", dtype=DT),
                       *(torch.randn(batch, 8, kv_len, 128, device="cuda", dtype=DT) for _ in range(2)))
                      for _ in range(copies_beyond_l2(kv_bytes))]  # fmt: skip
            impls_per_layer = [_impls(*layer) for layer in layers]
            timings = {}
            for name, first in impls_per_layer[0].items():
                try:
                    timings[name] = (stream_ms([impls[name] for impls in impls_per_layer]),
                                     graph_ms(pass_step(first, False), []))  # fmt: skip
                except RuntimeError as error:
                    notes.append(f"decode {name} b{batch} kv{kv_len}: {str(error).splitlines()[0]}")
            timings[READ_ROW] = floor = (read_ms([layer[1:] for layer in layers]), None)
            for name, (ms, single_ms) in timings.items():
                rate = kv_bytes / (ms * 1e-3)
                single = "-" if single_ms is None else f"{single_ms * 1e3:.1f}"
                decode_rows.append([f"b{batch} kv{kv_len}", name, f"{ms * 1e3:.1f}", single,
                                    f"{rate / 1e9:.0f}", f"{rate / copy_bw:.0%}", f"{floor[0] / ms:.0%}"])  # fmt: skip
            del layers, impls_per_layer
    header = ["shape (B, Hq/Hkv, N, D) causal", "implementation", "fwd TFLOP/s", "fwd+bwd TFLOP/s",
              "ours / this (fwd)", "ours / this (fwd+bwd)"]
    notes.insert(0, f"times: the median per call of CUDA-graph replays running {REPEATS} calls back to back on the "
                    "same tensors (common.stream_ms; compute-bound, so L2 reuse between calls matters little): "
                    "device time, no host launch overhead and no L2 flush between calls")
    write_table("attention", "Causal attention, bf16", header, rows, notes)
    mask_rows = _mask_rows(mask_notes)
    mask_notes.insert(0, f"times as in the unmasked table: per call, {REPEATS} calls back to back in a CUDA graph. The "
                         "capture turns off the per-mask memo of our span pass (see kernels/attention.py), so each "
                         "of our calls here also pays for its pass over the mask; eager training runs it once per "
                         "step for all layers")
    write_table("attention-masks", "Causal attention with HF's masks, bf16: µs per call",
                ["shape (B, Hq/Hkv, N, D)", "mask", "implementation", "fwd µs", "fwd+bwd µs",
                 "fwd vs its unmasked", "fwd+bwd vs its unmasked", "this / ours (fwd)", "this / ours (fwd+bwd)"],
                mask_rows, mask_notes)  # fmt: skip
    write_table("attention-decode", "Decode attention (1 query; 32 query / 8 KV heads x 128), bf16",
                ["batch, KV length", "implementation", "µs (layer stream)", "µs (one call after L2 flush)",
                 "GB/s of K+V", "of copy BW", "of the read floor"], decode_rows,
                [f"copy bandwidth measured in this run: {copy_bw / 1e9:.0f} GB/s",
                 "layer stream: one CUDA graph running the call over distinct (q, k, v) per layer, their K and V 4x "
                 "the L2 cache in all (common.stream_ms); GB/s comes from it",
                 f"{READ_ROW}: a kernel that only reads the same K and V bytes in the same stream, one launch per "
                 "layer (common.read_ms): no attention kernel can beat it at that size"])  # fmt: skip


if __name__ == "__main__":
    main()
