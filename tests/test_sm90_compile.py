"""The attention kernels compile for Hopper (sm_90a) as real launches specialise them, TMA paths included: see
sm90_compile.py. Runs without a GPU (in a subprocess, out of interpreter mode)."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_attention_kernels_compile_for_hopper_in_every_tile_they_may_pick(tmp_path):
    results = tmp_path / "compiles.jsonl"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["ACCEL_PATCH_AUTOTUNE"] = "1"  # every tile an autotuner may pick, not only the first
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compiled here, not found from an earlier run
    script = Path(__file__).with_name("sm90_compile.py")
    done = subprocess.run([sys.executable, str(script), str(results)], env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    failed = [f"{r['launch']} {r['kernel']} {r['config']}:\n{r['error']}" for r in rows if r["error"]]
    assert not failed, "\n\n".join(failed)
    compiled = {(r["launch"], r["kernel"], r["tma"]) for r in rows}
    for launch in ("causal d64", "causal d128", "padded d128", "window d64", "cache d128 dense mask"):
        for kernel in ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"):
            assert (launch, kernel, True) in compiled, (launch, kernel)
    assert ("long d128", "_attn_fwd_kernel", True) in compiled
    assert ("decode backward d128", "_attn_bwd_dkdv_kernel", False) in compiled
    assert ("decode d128", "_attn_decode_kernel", None) in compiled
    assert {r["launch"] for r in rows} >= {"causal d80", "causal d256", "non-causal d128"}
