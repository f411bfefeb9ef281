"""examples/finetune.py: patched training follows stock training, LoRA on INT8 learns, checkpoints reload."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from accel_patch import force_backend

_spec = importlib.util.spec_from_file_location("finetune", Path(__file__).parent.parent / "examples" / "finetune.py")
finetune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(finetune)

SMALL = ["--tiny", "--seq-len", "32", "--batch-size", "2"]


def test_patched_loss_curve_matches_stock_over_30_steps():
    # the reference backend: the Triton kernels are checked against it elsewhere; this checks the training path
    with force_backend("reference"):
        stock = finetune.main([*SMALL, "--max-steps", "30", "--no-patch"])
        patched = finetune.main([*SMALL, "--max-steps", "30"])
    assert len(stock) == len(patched) == 30
    assert stock[-1] < stock[0]
    for step, (a, b) in enumerate(zip(stock, patched, strict=True)):
        assert abs(a - b) <= 1e-3 * abs(a), (step, a, b)


@pytest.mark.parametrize("flag,value,message", [
    ("--max-steps", "0", "argument --max-steps: must be above 0, got 0"),
    ("--seq-len", "-3", "argument --seq-len: must be above 0, got -3"),
    ("--batch-size", "two", "argument --batch-size: invalid int value: 'two'"),
    ("--grad-accum", "0", "argument --grad-accum: must be above 0, got 0"),
    ("--lr", "nan", "argument --lr: must be above 0, got nan"),
])  # fmt: skip
def test_bad_numeric_flags_are_refused_by_name(flag, value, message, capsys):
    # a zero or negative size otherwise surfaced as a ZeroDivisionError or a negative tensor dimension mid-run
    with pytest.raises(SystemExit) as exit_info:
        finetune.parse_args([*SMALL, flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_full_finetune_checkpoint_reloads_with_plain_transformers(tmp_path):
    losses, model = finetune.train(finetune.parse_args([*SMALL, "--max-steps", "3", "--grad-accum", "2",
                                                        "--gradient-checkpointing", "--output-dir", str(tmp_path)]))
    assert len(losses) == 3
    ids = torch.randint(0, 256, (2, 16))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model.eval()(ids).logits, rtol=1e-4, atol=1e-5)


def test_lora_on_int8_lowers_the_loss_and_saves_the_adapter(tmp_path):
    from peft import LoraConfig, PeftModel

    import accel_patch

    with force_backend("reference"):
        losses, model = finetune.train(finetune.parse_args([*SMALL, "--mode", "lora", "--max-steps", "30",
                                                            "--output-dir", str(tmp_path)]))
    assert losses[-1] < losses[0] - 0.2  # 5.53 -> 5.23 measured
    assert (tmp_path / "adapter_model.safetensors").exists() and not (tmp_path / "model.safetensors").exists()
    torch.manual_seed(0)  # the same random base as --tiny
    base = accel_patch.quantize_model(AutoModelForCausalLM.from_config(finetune.tiny_config()), "int8")
    # the adapter config as saved, with accel-patch's LoRA layer for Int8Linear registered on it
    config = accel_patch.with_int8_lora(LoraConfig.from_pretrained(tmp_path))
    reloaded = PeftModel.from_pretrained(base, tmp_path, config=config).eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad(), force_backend("reference"):
        assert torch.allclose(reloaded(ids).logits, model.eval()(ids).logits, rtol=1e-4, atol=1e-5)


DDP_WORKER = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import finetune
losses = finetune.main(sys.argv[3:])
if os.environ["RANK"] == "0":
    json.dump(losses, open(sys.argv[2], "w"))
"""


def test_ddp_on_two_processes_matches_one_process_with_the_same_global_batch(tmp_path):
    # accelerate's DDP engine on CPU (gloo): 2 processes x 2 sequences against 1 process x 4, patched model
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    env = os.environ | {"ACCELERATE_USE_CPU": "true", "ACCEL_PATCH_BACKEND": "reference", "OMP_NUM_THREADS": "1"}
    examples = Path(finetune.__file__).parent
    args = ["--tiny", "--seq-len", "32", "--max-steps", "6"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(worker), str(examples), str(tmp_path / "losses.json"), *args, "--batch-size", "2"],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    two_processes = json.loads((tmp_path / "losses.json").read_text())
    with force_backend("reference"):
        one_process = finetune.main([*args, "--batch-size", "4"])
    assert len(two_processes) == 6 and one_process[-1] < one_process[0]
    for step, (a, b) in enumerate(zip(one_process, two_processes, strict=True)):
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)


@pytest.mark.gpu
def test_bf16_training_on_the_gpu_follows_stock(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    args = [*SMALL, "--seq-len", "256", "--batch-size", "8", "--max-steps", "300", "--lr", "1e-3"]
    stock = torch.tensor(finetune.main([*args, "--no-patch"]))
    patched = torch.tensor(finetune.main(args))
    assert stock[-30:].mean() < stock[:30].mean() - 1.0  # it really trains
    # bf16 rounding differs step by step; the curves, averaged over 30-step windows, agree within 2%
    stock_windows, patched_windows = stock.view(10, 30).mean(1), patched.view(10, 30).mean(1)
    assert ((patched_windows - stock_windows).abs() <= 0.02 * stock_windows).all(), (stock_windows, patched_windows)


FSDP2_FLAGS = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
               "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--fsdp_state_dict_type", "FULL_STATE_DICT"]


@pytest.mark.gpu
@pytest.mark.two_gpus
@pytest.mark.parametrize("engine", ["DDP", "FSDP2"])
def test_two_gpus_match_one_gpu_with_the_same_global_batch(engine, tmp_path):
    # accelerate's own engines on two GPUs, float32, patched model: every step's loss and the saved weights
    # agree with one GPU training on the same global batch (4 sequences a step)
    flags = ["--multi_gpu"] if engine == "DDP" else FSDP2_FLAGS
    script = Path(finetune.__file__)
    runs = {}
    for name, processes, batch, extra in [("one", 1, 4, []), ("two", 2, 2, flags)]:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes",
                   str(processes), "--mixed_precision", "no", "--dynamo_backend", "no", *extra, str(script),
                   "--tiny", "--seq-len", "64", "--batch-size", str(batch), "--max-steps", "8",
                   "--log-json", str(tmp_path / f"{name}.json"), "--output-dir", str(tmp_path / name)]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert runs["two"]["processes"] == 2 and runs["two"]["distributed_type"] == ("MULTI_GPU" if engine == "DDP"
                                                                                  else "FSDP")  # fmt: skip
    one, two = runs["one"]["losses"], runs["two"]["losses"]
    assert one[-1] < one[0]
    for step, (a, b) in enumerate(zip(one, two, strict=True)):
        assert abs(a - b) <= 1e-4 * abs(a), (step, a, b)
    # the checkpoints are plain transformers checkpoints (FSDP2 gathers the full state dict) with the same weights
    saved_one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    saved_two = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    assert saved_one.keys() == saved_two.keys()
    for key, weight in saved_one.items():
        assert torch.allclose(saved_two[key], weight, rtol=1e-3, atol=1e-5), key
