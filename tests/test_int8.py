"""W8A16 matmul, Int8Linear and quantize_model against float64 references and the float model."""

import copy
import gc
import json

import pytest
import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import accel_patch
from accel_patch import Int8Linear, force_backend, patch_model, quantize_model
from accel_patch.kernels import int8_linear, quantize_per_channel
from accel_patch.kernels._triton import next_power_of_2
from accel_patch.kernels.int8_matmul import DECODE_ROWS, DEQUANT_ROWS

from helpers import TOL, backends_for, loss_curve, rel_err

CASES = [("cpu", dt, be) for dt in (torch.float32, torch.float16) for be in backends_for("cpu")]
CASES += [pytest.param("cuda", torch.bfloat16, "triton", marks=pytest.mark.gpu)]
# (M, K, N): odd K and N; one row, a few rows (split-K), a tile's worth (split-K along a ragged K both ways), enough
# rows to dequantize first
SHAPES = {
    "cpu": [(1, 77, 45), (7, 64, 33), (DECODE_ROWS + 16, 301, 199), (DEQUANT_ROWS + 6, 40, 24)],
    "cuda": [(1, 4096, 14336), (16, 4096, 4096), (64, 4096, 1024), (128, 14336, 4096), (2048, 4096, 1024),
             (5, 4099, 333)],
}


@pytest.mark.parametrize("device,dtype,backend", CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_linear_matches_float64(device, dtype, backend, with_bias):
    for m, k, n in SHAPES[device]:
        w_int8, scale = quantize_per_channel(torch.randn(n, k, device=device))
        x = torch.randn(m, k, device=device).to(dtype).requires_grad_()
        bias = torch.randn(n, device=device).to(dtype).requires_grad_() if with_bias else None
        w64 = w_int8.double() * scale.double()[:, None]  # the exact dequantized weight
        x64 = x.detach().double().requires_grad_()
        b64 = bias.detach().double().requires_grad_() if with_bias else None
        y64 = x64 @ w64.t() + (b64 if with_bias else 0)
        with force_backend(backend):
            y = int8_linear(x, w_int8, scale, bias)
            assert y.dtype == dtype and y.shape == (m, n)
            assert rel_err(y, y64) < TOL[dtype], (m, k, n)
            dy = torch.randn_like(y64)
            (y.double() * dy).sum().backward()
        (y64 * dy).sum().backward()
        assert rel_err(x.grad, x64.grad) < TOL[dtype], (m, k, n)
        if with_bias:
            assert rel_err(bias.grad, b64.grad) < TOL[dtype]


@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_int8_linear_keeps_leading_dims(device, dtype, backend):
    # one row as a decode step passes it ([batch 1, 1 token, K]: the one-row kernel reads it in place) and several
    k, n = SHAPES[device][0][1:]
    w_int8, scale = quantize_per_channel(torch.randn(n, k, device=device))
    bias = torch.randn(n, device=device).to(dtype)
    w64 = w_int8.double() * scale.double()[:, None]
    for leading in ((1, 1), (2, 3), ()):
        x = torch.randn(*leading, k, device=device).to(dtype)
        with force_backend(backend):
            y = int8_linear(x, w_int8, scale, bias)
        assert y.shape == (*leading, n) and y.dtype == dtype
        assert rel_err(y, x.double() @ w64.t() + bias.double()) < TOL[dtype], leading


@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_one_row_reads_every_int8_value_exactly(device, dtype, backend):
    # Weight rows hold every int8 value, -128 included (a loaded checkpoint may have it), at shifting positions;
    # one-hot rows of x then read single weights back: with scale 1 the output must be the integer itself.
    # This pins the one-row kernel's int8 -> float conversion (bit tricks on CUDA) value by value.
    values = torch.arange(-128, 128, dtype=torch.int16)
    w_int8 = torch.stack([values.roll(shift) for shift in range(0, 256, 37)]).to(torch.int8).to(device)
    scale = torch.ones(w_int8.shape[0], device=device)
    with force_backend(backend):
        for col in (0, 1, 2, 3, 100, 255):
            x = torch.zeros(1, 256, device=device, dtype=dtype)
            x[0, col] = 1.0
            assert torch.equal(int8_linear(x, w_int8, scale)[0].float().cpu(), w_int8[:, col].float().cpu()), col


def test_quantize_round_trip_error_bound():
    w = torch.randn(40, 70) * torch.logspace(-3, 2, 40)[:, None]  # rows of very different magnitude
    w[3] = 0.0
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    error = (q.float() * scale[:, None] - w).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-6)).all()  # round to nearest: at most half a step
    assert (q[3] == 0).all() and torch.isfinite(scale).all()


def test_int8_linear_bad_inputs():
    q, scale = quantize_per_channel(torch.randn(8, 16))
    with pytest.raises(TypeError, match="int8"):
        int8_linear(torch.randn(2, 16), q.float(), scale)
    with pytest.raises(ValueError, match="features"):
        int8_linear(torch.randn(2, 15), q, scale)
    with pytest.raises(ValueError, match="scale must be float32"):
        int8_linear(torch.randn(2, 16), q, scale.half())


def tiny_llama():
    config = AutoConfig.for_model(
        "llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def _linear_bytes(model):
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
            total += module.weight.numel() * 2  # as bf16
        if isinstance(module, Int8Linear):
            total += module.weight.numel() + module.weight_scale.numel() * 4
    return total


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_quantize_model_keeps_logits_and_halves_linear_bytes(backend):
    model = tiny_llama()
    bf16_bytes = _linear_bytes(model)
    ids = torch.randint(0, 256, (2, 12))
    expected = model(ids).logits
    quantized = quantize_model(copy.deepcopy(model), "int8")
    assert type(quantized.lm_head) is torch.nn.Linear  # skipped by default
    assert sum(isinstance(m, Int8Linear) for m in quantized.modules()) == 2 * 7
    assert _linear_bytes(quantized) <= 0.6 * bf16_bytes
    assert {"model.layers.0.self_attn.q_proj.weight_scale"} <= set(quantized.state_dict())
    with force_backend(backend):
        assert rel_err(quantized(ids).logits, expected) < 0.03
        patched = patch_model(quantized)  # INT8 Linears and the Triton modules together
        assert rel_err(patched(ids).logits, expected) < 0.03


def test_quantize_model_bad_flag():
    with pytest.raises(ValueError, match="valid values: 'int8'"):
        quantize_model(tiny_llama(), "int4")


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("float_llama")
    tiny_llama().save_pretrained(path)
    return path


def _int8_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_from_pretrained_quantizes_while_loading(float_checkpoint, backend):
    stock = tiny_llama()
    ids = torch.randint(0, 256, (2, 12))
    expected = stock(ids).logits
    with force_backend(backend):
        model = accel_patch.from_pretrained(float_checkpoint, quantize="int8", dtype=torch.float32).eval()
        assert len(_int8_layers(model)) == 2 * 7 and type(model.lm_head) is torch.nn.Linear
        assert all(m.weight.dtype == torch.int8 and m.weight_scale.dtype == torch.float32
                   for m in _int8_layers(model).values())  # fmt: skip
        assert _linear_bytes(model) <= 0.6 * _linear_bytes(stock)
        assert type(model.model.layers[0].mlp).__module__.startswith("accel_patch")  # patched by default
        assert rel_err(model(ids).logits, expected) < 0.03
        # the same int8 weights as quantizing the float model in memory
        in_memory = quantize_model(tiny_llama(), "int8")
        for name, layer in _int8_layers(in_memory).items():
            assert torch.equal(_int8_layers(model)[name].weight, layer.weight), name
        plain = accel_patch.from_pretrained(float_checkpoint, patch=False)
        assert not _int8_layers(plain) and rel_err(plain(ids).logits, expected) < 1e-6


def test_from_pretrained_bad_flag(float_checkpoint):
    with pytest.raises(ValueError, match="valid values: None, 'int8'"):
        accel_patch.from_pretrained(float_checkpoint, quantize="int4")


def test_skip_modules_as_one_name_a_misspelt_pattern_and_a_bad_entry(float_checkpoint, caplog):
    # one name alone is one pattern, not its letters (which match nothing: lm_head would be quantized silently)
    for model in (quantize_model(tiny_llama(), "int8", skip_modules="lm_head"),
                  accel_patch.from_pretrained(float_checkpoint, quantize="int8", skip_modules="lm_head")):  # fmt: skip
        assert type(model.lm_head) is torch.nn.Linear and len(_int8_layers(model)) == 2 * 7
        assert model.config.quantization_config.skip_modules == ["lm_head"]
    with caplog.at_level("WARNING", logger="accel_patch"):
        model = quantize_model(tiny_llama(), "int8", skip_modules=("lm-head", "*.mlp.down_proj"))
    assert "skip_modules pattern 'lm-head' matches no Linear layer of LlamaForCausalLM" in caplog.text
    assert "down_proj" not in caplog.text  # the glob matched
    assert isinstance(model.lm_head, Int8Linear) and type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert len(_int8_layers(quantize_model(tiny_llama(), "int8", skip_modules=None))) == 2 * 7 + 1
    with pytest.raises(TypeError, match="skip_modules must hold module names or glob patterns"):
        quantize_model(tiny_llama(), "int8", skip_modules=["lm_head", torch.nn.Linear])


def test_int8_checkpoint_saves_and_reloads_identically(float_checkpoint, tmp_path):
    model = accel_patch.from_pretrained(float_checkpoint, quantize="int8", dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 12))
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert tensors["model.layers.1.mlp.down_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.1.mlp.down_proj.weight_scale"].dtype == torch.float32
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == (
        "accel_patch_int8"
    )
    reloaded = accel_patch.from_pretrained(tmp_path).eval()  # INT8 from the checkpoint, no flag needed
    assert torch.equal(reloaded(ids).logits, expected)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers, accel_patch imported
    assert len(_int8_layers(auto)) == 2 * 7
    assert torch.equal(patch_model(auto)(ids).logits, expected)
    # a model quantized in memory saves the same way
    quantize_model(tiny_llama(), "int8").save_pretrained(tmp_path / "in_memory")
    assert len(_int8_layers(accel_patch.from_pretrained(tmp_path / "in_memory", patch=False))) == 2 * 7


@pytest.mark.parametrize("damage", ["nan_scale", "negative_scale", "wrong_shape", "missing_scale"])
def test_corrupt_int8_checkpoint_is_refused(float_checkpoint, tmp_path, damage, caplog):
    accel_patch.from_pretrained(float_checkpoint, quantize="int8").save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = safetensors.torch.load_file(file)
    key = "model.layers.0.self_attn.q_proj.weight_scale"
    if damage == "nan_scale":
        tensors[key][3] = float("nan")
    elif damage == "negative_scale":
        tensors[key][0] = -1.0
    elif damage == "wrong_shape":
        tensors[key] = tensors[key][:-1].clone()
    else:
        del tensors[key]
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    if damage == "wrong_shape":  # transformers >= 5.2x refuses it itself, naming the key in its load report
        with pytest.raises((RuntimeError, ValueError)) as refused:
            accel_patch.from_pretrained(tmp_path)
        assert key in str(refused.value) or key in caplog.text
    else:
        with pytest.raises(ValueError, match="corrupt INT8 checkpoint.*q_proj"):
            accel_patch.from_pretrained(tmp_path)


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_training_leaves_int8_weights_untouched(backend):
    model = quantize_model(tiny_llama(), "int8", skip_modules=("lm_head", "embed_tokens"))
    frozen = {name: buf.clone() for name, buf in model.named_buffers() if buf.dtype == torch.int8}
    assert all(p.dtype != torch.int8 for p in model.parameters())
    with force_backend(backend):
        losses = loss_curve(model, torch.randint(0, 256, (2, 10)), steps=5, lr=1e-2)
    assert losses[-1] < losses[0]
    for name, buf in model.named_buffers():
        if name in frozen:
            assert torch.equal(buf, frozen[name]), name


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_lora_trains_on_an_int8_base(backend, float_checkpoint):
    from peft import LoraConfig, get_peft_model

    from accel_patch import with_int8_lora

    with force_backend(backend):
        model = accel_patch.from_pretrained(float_checkpoint, quantize="int8", dtype=torch.float32)
    frozen = {name: buf.clone() for name, buf in model.named_buffers() if buf.dtype == torch.int8}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, with_int8_lora(LoraConfig(r=8, lora_alpha=16, target_modules=targets)))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert sum("lora_A" in name for name in trainable) == 2 * len(targets)
    with force_backend(backend):
        losses = loss_curve(peft_model, torch.randint(0, 256, (2, 8)), steps=8, lr=1e-2)
    assert losses[-1] < losses[0] - 0.1  # the adapters learn
    seen = 0
    for name, buf in peft_model.named_buffers():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if key in frozen:
            assert torch.equal(buf, frozen[key]), name  # int8 weights bit-identical after training
            seen += 1
    assert seen == len(frozen)


@pytest.mark.gpu
def test_loading_int8_peaks_below_1_25x_the_int8_model(tmp_path):
    # ~750M parameters: 1.5 GB in bf16 on disk
    config = AutoConfig.for_model(
        "llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
        num_attention_heads=16, num_key_value_heads=16, dtype=torch.bfloat16,
    )  # fmt: skip
    with torch.device("cuda"):
        float_model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    assert sum(p.numel() * p.element_size() for p in float_model.parameters()) > 1.4e9
    float_model.save_pretrained(tmp_path)
    ids = torch.randint(0, 32000, (2, 16), device="cuda")
    with torch.no_grad():
        expected = float_model(ids).logits.float()
        # the same weights quantized and patched in memory: the loader must produce this very model
        expected_int8 = accel_patch.patch_model(accel_patch.quantize_model(float_model, "int8"))(ids).logits.float()
    del float_model
    gc.collect()  # garbage left by earlier tests in this process must not be freed mid-measurement
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = accel_patch.from_pretrained(tmp_path, quantize="int8", dtype=torch.bfloat16, device_map="cuda").eval()
    held = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    print(f"INT8 model holds {held / 1e9:.3f} GB; loading peaked at {peak / 1e9:.3f} GB ({peak / held:.2f}x)")
    assert held > 0.8e9 and peak <= 1.25 * held
    assert len(_int8_layers(model)) == 12 * 7 and all(m.weight.is_cuda for m in _int8_layers(model).values())
    with torch.no_grad():
        logits = model(ids).logits
        assert rel_err(logits, expected_int8) < 1e-3
        # against the bf16 model: 5% measured on the H100 (random-init weights through 84 quantized layers);
        # the 3% accuracy bound is the CPU test's, on a small float32 model
        assert rel_err(logits, expected) < 0.1
        tokens = model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False)
    assert tokens.shape == (1, 16)


def test_load_warmup_counts_int8_bytes():
    # transformers reserves GPU memory for the whole model before loading, sized from the quantizer's byte
    # count of the meta model, where a weight to be quantized is still declared in float.
    from transformers.modeling_utils import get_total_byte_count

    from accel_patch.loading import Int8Quantizer

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_llama().config, dtype=torch.bfloat16)
    quantizer = Int8Quantizer(accel_patch.Int8QuantizationConfig(), pre_quantized=False)
    quantizer.preprocess_model(model)
    int8 = _int8_layers(model)
    assert len(int8) == 2 * 7 and all(m.weight.dtype == torch.bfloat16 for m in int8.values())  # declared float
    names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    counted = get_total_byte_count(model, dict.fromkeys(names, 0), quantizer)[0]
    expected = sum(t.numel() * (1 if name.rpartition(".")[0] in int8 and name.endswith(".weight") else
                                t.element_size()) for name, t in [*model.named_parameters(), *model.named_buffers()])
    assert counted == expected


def test_from_pretrained_int8_with_device_map_auto_generates(float_checkpoint):
    ids = torch.randint(3, 256, (1, 6))
    with force_backend("reference"):
        placed = accel_patch.from_pretrained(float_checkpoint, quantize="int8", device_map="auto").eval()
        plain = accel_patch.from_pretrained(float_checkpoint, quantize="int8").eval()
        assert len(_int8_layers(placed)) == 2 * 7
        expected = plain.generate(ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(placed.generate(ids, max_new_tokens=5, do_sample=False), expected)


@pytest.mark.parametrize("device,dtype,backend", CASES)
def test_split_k_launches_repeat_exactly_and_reset_their_counters(device, dtype, backend):
    # Split-K launches (decode-sized and tile-sized row counts) add their partial sums in the last program per
    # tile, counted in a buffer that each launch must leave at zero: a leftover count would make the next launch
    # skip a tile's store (stale output) or store it early (a partial sum).
    from accel_patch.kernels import _triton, int8_matmul

    m_small, m_tiled, k, n = SHAPES[device][1][0], DECODE_ROWS + 16, 1031, 77
    dev = torch.device(device)
    assert int8_matmul._decode_launch(m_small, n, k, dev)[0][2] > 1  # the decode row count splits K here
    if device == "cpu":  # and so does the tiled one, in the interpreter's one shape (the GPU's tiled splits run
        assert int8_matmul._tiled_shapes()[0][5] > 1  # in test_every_tiled_configuration_matches_float64)
    w_int8, scale = quantize_per_channel(torch.randn(n, k, device=device))
    bias = torch.randn(n, device=device).to(dtype)
    w64 = w_int8.double() * scale.double()[:, None]
    with force_backend(backend):
        for m in (m_small, m_tiled, m_small):
            x = torch.randn(m, k, device=device).to(dtype)
            first, second = int8_linear(x, w_int8, scale, bias), int8_linear(x, w_int8, scale, bias)
            assert torch.equal(first, second), m  # the partial sums are added in a fixed order
            assert rel_err(first, x.double() @ w64.t() + bias.double()) < TOL[dtype], m
    counters = [c for (where, _), c in _triton._split_counters.items() if where.type == dev.type]
    assert backend == "reference" or counters, "no split-K launch ran"
    assert all(int(c.abs().sum()) == 0 for c in counters)


@pytest.mark.gpu
@pytest.mark.parametrize("scale_out", [True, False], ids=["forward", "grad_input"])
def test_every_tiled_configuration_matches_float64(scale_out):
    # The autotuner runs one shape per size, and only times the others (the tests tune nothing: they run the first):
    # run each one on its own, at a size where all of them may split K, so that a wrong tile, split or partial-sum
    # store cannot hide behind the winner.
    from accel_patch.kernels import _triton, int8_matmul

    launcher = int8_matmul._w8a16_tiled_kernel  # the cached direct launch
    tuner = launcher.kernel  # the autotuner inside it
    tried = tuner.configs
    # the matmul's reduction (K) 4096 and output (N) 512 both ways: the weight is [N, K] forward, [K, N] backward
    m, reduction, out = DECODE_ROWS + 16, 4096, 512
    shapes = int8_matmul._tiled_shapes(every=True)
    dev = torch.device("cuda")
    assert int8_matmul._tiled_max_splits(next_power_of_2(m), out, reduction, dev) == max(s[5] for s in shapes) > 1
    w_int8, scale = quantize_per_channel(torch.randn(*((out, reduction) if scale_out else (reduction, out)),
                                                     device="cuda"))  # fmt: skip
    w64 = w_int8.double() * scale.double()[:, None]
    x = torch.randn(m, reduction, device="cuda").to(torch.bfloat16)
    expected = x.double() @ (w64.t() if scale_out else w64)
    strides = (w_int8.stride(1), w_int8.stride(0)) if scale_out else (w_int8.stride(0), w_int8.stride(1))
    try:
        for shape in shapes:
            tuner.configs, tuner.cache = [int8_matmul._tiled_config(*shape)], {}
            launcher.launches.clear()
            got = int8_matmul._matmul_triton(x, w_int8, scale, None, scale_out, expected.shape[1], strides)
            assert tuner.best_config.kwargs["SPLITS"] == shape[5]
            assert rel_err(got, expected) < TOL[torch.bfloat16], shape
            assert torch.equal(got, int8_matmul._matmul_triton(x, w_int8, scale, None, scale_out, expected.shape[1],
                                                               strides)), shape  # fmt: skip
    finally:
        tuner.configs, tuner.cache = tried, {}
        launcher.launches.clear()
    counters = [c for (where, _), c in _triton._split_counters.items() if where.type == "cuda"]
    assert counters and all(int(c.abs().sum()) == 0 for c in counters)
