"""patch_model on tiny configs carrying each family's quirks, compared with the stock HF model."""

import copy
import gc
import io
import weakref

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

import accel_patch
from accel_patch import SUPPORTED_MODEL_TYPES, force_backend, patch_model, quantize_model, unpatch_model
from accel_patch.model_adapters import modules
from accel_patch.model_adapters.modules import Attention, KernelModule, RMSNorm, SwiGLUMLP

from helpers import TRITON_ON_CPU, backends_for, loss_curve, rel_err

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
FAMILIES = {
    # head_dim != hidden/heads, llama3 rope scaling, tied embeddings
    "llama": dict(
        head_dim=24, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),  # fmt: skip
    "mistral": dict(sliding_window=8),  # sequences below are longer than the window
    "qwen2": dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),  # biases; layers 1+ slide
    "qwen3": dict(head_dim=24, use_sliding_window=True, sliding_window=6, max_window_layers=2),  # q/k norms
}


def tiny_config(family: str, **overrides):
    return AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **overrides})


def stock_and_patched(family: str, dtype=torch.float32, device="cpu", **patch_flags):
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="sdpa", dtype=dtype)
    stock = stock.to(device).eval()
    patched = patch_model(copy.deepcopy(stock), **patch_flags)
    return stock, patched


def assert_gradients_match(patched, stock, bound: float) -> None:
    """Every parameter's gradient in ``patched`` within ``bound`` relative error of the same-named one in ``stock``."""
    stock_params = dict(stock.named_parameters())
    for name, param in patched.named_parameters():
        assert rel_err(param.grad, stock_params[name].grad) < bound, name


def left_padded_batch(device="cpu", length=20):
    ids = torch.randint(3, VOCAB, (3, length), device=device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(params=backends_for("cpu"))
def backend(request):
    with force_backend(request.param):
        yield request.param


def test_supported_model_types():
    assert set(SUPPORTED_MODEL_TYPES) == set(FAMILIES)


def test_logits_and_gradients_match_stock(family, backend):
    stock, patched = stock_and_patched(family)
    assert sum(isinstance(m, Attention) for m in patched.modules()) == COMMON["num_hidden_layers"]
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    logits = patched(ids, attention_mask=mask).logits
    out_stock = stock(ids, attention_mask=mask, labels=labels)
    out_patched = patched(ids, attention_mask=mask, labels=labels)  # the fused linear cross-entropy
    assert rel_err(logits[mask.bool()], out_stock.logits[mask.bool()]) < 1e-4
    assert out_patched.logits is None  # never materialised when training with labels
    assert abs(out_patched.loss.item() - out_stock.loss.item()) <= 1e-4 * out_stock.loss.item()
    out_stock.loss.backward()
    out_patched.loss.backward()
    assert_gradients_match(patched, stock, 1e-4)


def test_explicit_position_ids_match(family, backend):
    stock, patched = stock_and_patched(family)
    ids = torch.randint(3, VOCAB, (2, 12))
    position_ids = torch.tensor([list(range(40, 52)), list(range(3, 15))])
    expected = stock(ids, position_ids=position_ids).logits
    assert rel_err(patched(ids, position_ids=position_ids).logits, expected) < 1e-4


def generation_with_scores(model, ids, **kwargs):
    """Greedy generation's tokens and the logits of every step (tokens alone can hide wrong logits)."""
    out = model.generate(ids, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                         **kwargs)  # fmt: skip
    return out.sequences, torch.stack(out.scores)


def test_generation_matches_stock(family, backend):
    stock, patched = stock_and_patched(family)
    ids, mask = left_padded_batch(length=7)
    kwargs = dict(attention_mask=mask, max_new_tokens=8)
    expected_tokens, expected_logits = generation_with_scores(stock, ids, **kwargs)
    tokens, logits = generation_with_scores(patched, ids, **kwargs)
    assert torch.equal(tokens, expected_tokens)
    assert rel_err(logits, expected_logits) < 1e-4


def test_beam_search_and_sampling_match_stock(backend):
    # One family: the families differ inside the decoder, which greedy decoding above checks for each; beams
    # (the cache reordered between steps) and sampling differ only in what generate does around it.
    stock, patched = stock_and_patched("llama")
    ids, mask = left_padded_batch(length=7)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=0)
    expected = stock.generate(ids, **kwargs, num_beams=2, do_sample=False)
    assert torch.equal(patched.generate(ids, **kwargs, num_beams=2, do_sample=False), expected)
    torch.manual_seed(5)
    expected = stock.generate(ids, **kwargs, do_sample=True, top_k=20)
    torch.manual_seed(5)
    assert torch.equal(patched.generate(ids, **kwargs, do_sample=True, top_k=20), expected)


def assert_packed_sequences_run_as_separate_ones(stock, patched, device="cpu") -> None:
    """Padding-free training: sequences concatenated in one row, position_ids restarting at each start (HF derives a
    block-diagonal mask from the restarts when no cache is in play)."""
    first, second = torch.randint(3, VOCAB, (1, 9), device=device), torch.randint(3, VOCAB, (1, 6), device=device)
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(9), torch.arange(6)])[None].to(device)
    separate = torch.cat([stock(first).logits, stock(second).logits], dim=1)
    assert rel_err(patched(packed, position_ids=position_ids, use_cache=False).logits, separate) < 1e-4


def test_packed_sequences_match_separate_runs(backend):
    assert_packed_sequences_run_as_separate_ones(*stock_and_patched("qwen3"))


def test_static_cache_generation_matches_stock(family, backend):
    # Unpadded, the prefill into the empty static cache reaches the attention with no mask: HF then relies on SDPA's
    # is_causal, which aligns the queries with the first keys of the cache, not its last ones.
    stock, patched = stock_and_patched(family)
    ids = torch.randint(3, VOCAB, (2, 6))
    kwargs = dict(max_new_tokens=6, cache_implementation="static")
    expected_tokens, expected_logits = generation_with_scores(stock, ids, **kwargs)
    tokens, logits = generation_with_scores(patched, ids, **kwargs)
    assert torch.equal(tokens, expected_tokens)
    assert rel_err(logits, expected_logits) < 1e-4


def test_training_follows_stock_loss_curve(family, backend):
    stock, patched = stock_and_patched(family)
    ids = torch.randint(3, VOCAB, (4, 16))
    # 8 AdamW steps: the loss already falls by 1.4-1.8 (20 steps cost the interpreter ~2.5 min per family)
    curves = [loss_curve(stock, ids, steps=8), loss_curve(patched, ids, steps=8)]
    assert curves[0][-1] < curves[0][0] - 0.5  # the run really trains
    assert rel_err(curves[1], curves[0]) < 1e-4


def test_gradient_checkpointing_matches(backend):
    stock, patched = stock_and_patched("qwen3")
    for model in (stock, patched):
        model.train()
        model.gradient_checkpointing_enable()
    ids = torch.randint(3, VOCAB, (2, 10))
    stock(ids, labels=ids).loss.backward()
    patched(ids, labels=ids).loss.backward()
    assert_gradients_match(patched, stock, 1e-4)


def test_residual_add_is_fused_into_the_post_attention_norm(monkeypatch, backend):
    """Each layer's residual add after attention runs inside the post-attention RMSNorm (one ``rms_norm`` call with
    a residual per layer), matching stock in loss and gradients; under autocast, where the float32 residual stream
    meets bfloat16 attention output, the layer adds as HF does and still matches."""
    stock, patched = stock_and_patched("qwen2")  # biases, and sliding windows on layers 1+
    fused_calls = []

    def counting_rms_norm(*args, **kwargs):
        fused_calls.append(kwargs.get("residual") is not None)
        return real_rms_norm(*args, **kwargs)

    real_rms_norm = modules.rms_norm
    monkeypatch.setattr(modules, "rms_norm", counting_rms_norm)
    ids = torch.randint(3, VOCAB, (2, 12))
    for model in (stock, patched):
        model(ids, labels=ids).loss.backward()
    assert sum(fused_calls) == len(patched.model.layers)
    assert_gradients_match(patched, stock, 1e-4)
    fused_calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [model(ids, labels=ids).loss for model in (stock, patched)]
    assert sum(fused_calls) == 0 and len(fused_calls) > 0
    assert rel_err(losses[1], losses[0]) < 1e-2


def test_state_dict_is_the_stock_one_and_parameters_are_shared(family):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    before = model.state_dict()
    params_before = {name: p for name, p in model.named_parameters()}
    patch_model(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for name, tensor in after.items():
        assert tensor.data_ptr() == before[name].data_ptr() and torch.equal(tensor, before[name]), name
    for name, param in model.named_parameters():
        assert param is params_before[name], name  # the same Parameter objects, not copies


def test_save_pretrained_writes_a_stock_checkpoint(tmp_path, backend):
    stock, patched = stock_and_patched("qwen2")
    patched.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert not any(isinstance(m, KernelModule) for m in reloaded.modules())
    ids = torch.randint(3, VOCAB, (2, 9))
    assert rel_err(reloaded(ids).logits, stock(ids).logits) < 1e-6


def test_per_instance_isolation_and_idempotence(backend):
    stock, patched = stock_and_patched("llama")
    assert not any(isinstance(m, KernelModule) for m in stock.modules())
    assert type(stock.model.layers[0].self_attn) is not type(patched.model.layers[0].self_attn)
    modules_before = list(patched.modules())
    patch_model(patched)
    assert list(patched.modules()) == modules_before
    assert all(a is b for a, b in zip(patched.modules(), modules_before, strict=True))
    # the fused decoder-layer forward is an attribute of the patched instances, not of their class
    assert all("forward" in vars(layer) for layer in patched.model.layers)
    assert not any("forward" in vars(layer) for layer in stock.model.layers)


def test_a_patched_model_is_freed_with_its_last_reference_and_copies_stand_alone(backend):
    stock, patched = stock_and_patched("llama")
    ids = torch.randint(3, VOCAB, (2, 9))
    patched(ids, labels=ids).loss.backward()
    duplicate = copy.deepcopy(patched)
    gc.disable()  # freed by reference counting (no cycles), as a stock model is: GPU memory returns on `del`
    try:
        alive = weakref.ref(patched)
        del patched
        assert alive() is None
    finally:
        gc.enable()
    assert rel_err(duplicate(ids).logits, stock(ids).logits) < 1e-5
    assert all(layer.forward.module() is layer for layer in duplicate.model.layers)
    buffer = io.BytesIO()
    torch.save(duplicate, buffer)  # a whole-model pickle keeps each per-instance forward on its own module
    reloaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert all(layer.forward.module() is layer for layer in reloaded.model.layers)
    assert rel_err(reloaded(ids).logits, stock(ids).logits) < 1e-5


def test_unpatch_restores_stock_modules_with_current_weights(backend):
    stock, patched = stock_and_patched("qwen3")
    with torch.no_grad():
        patched.model.norm.weight.mul_(1.5)  # trained after patching
    unpatch_model(patched)
    assert not any(isinstance(m, KernelModule) for m in patched.modules())
    assert not any("forward" in vars(m) for m in patched.modules())  # the decoder layers' and the LM's own forward
    assert [type(m) for m in patched.modules()] == [type(m) for m in stock.modules()]
    assert list(patched.state_dict()) == list(stock.state_dict())
    with torch.no_grad():
        stock.model.norm.weight.mul_(1.5)
    ids = torch.randint(3, VOCAB, (2, 9))
    assert rel_err(patched(ids).logits, stock(ids).logits) < 1e-6


def test_to_dtype_after_patching(backend):
    stock, patched = stock_and_patched("qwen3")
    stock.half()
    patched.half()
    assert all(p.dtype == torch.float16 for p in patched.parameters())
    assert all(t.dtype == torch.float16 for t in patched.state_dict().values())
    ids = torch.randint(3, VOCAB, (2, 9))
    assert rel_err(patched(ids).logits, stock(ids).logits) < 1e-2
    unpatch_model(patched)  # the restored stock modules hold the converted parameters
    assert all(p.dtype == torch.float16 for p in patched.parameters())
    assert rel_err(patched(ids).logits, stock(ids).logits) < 1e-6


def test_output_attentions_warns_once_that_a_patched_model_returns_no_weights(caplog):
    """HF's eager attention returns its weights; a patched model cannot (HF records them from its own attention
    classes), so it says so once instead of silently returning none. Hidden states still come back as stock's."""
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager").eval()
    patched = patch_model(copy.deepcopy(stock))
    ids = torch.randint(3, VOCAB, (2, 9))
    modules._warn_no_attention_weights.cache_clear()
    with caplog.at_level("WARNING", logger="accel_patch"):
        patched(ids)
        assert not [r for r in caplog.records if r.name == "accel_patch"]
        expected, got = stock(ids, output_attentions=True), patched(ids, output_attentions=True)
        patched(ids, output_attentions=True)
    assert len(expected.attentions) == COMMON["num_hidden_layers"] and not got.attentions
    messages = [r.getMessage() for r in caplog.records if r.name == "accel_patch"]
    assert len(messages) == 1 and "output_attentions=True" in messages[0], messages
    assert "attn_implementation='eager'" in messages[0]
    got = patched(ids, output_hidden_states=True).hidden_states
    expected = stock(ids, output_hidden_states=True).hidden_states
    assert all(rel_err(g, e) < 1e-5 for g, e in zip(got, expected, strict=True))


def test_unpatching_after_a_patched_forward_that_asked_for_outputs_gives_attention_weights_again():
    """HF installs its output recorders once, at the first forward asking for outputs: here on the patched model,
    so the stock attention modules that unpatch_model puts back had none, and their weights never came back."""
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager").eval()
    patched = patch_model(copy.deepcopy(stock))
    ids = torch.randint(3, VOCAB, (2, 9))
    assert not patched(ids, output_attentions=True, output_hidden_states=True).attentions
    restored = unpatch_model(patched)(ids, output_attentions=True, output_hidden_states=True)
    expected = stock(ids, output_attentions=True, output_hidden_states=True)
    assert len(restored.attentions) == len(expected.attentions) == COMMON["num_hidden_layers"]
    assert all(rel_err(r, e) < 1e-6 for r, e in zip(restored.attentions, expected.attentions, strict=True))
    # one recorder per module: hidden states are not collected twice
    assert len(restored.hidden_states) == len(expected.hidden_states) == COMMON["num_hidden_layers"] + 1


def test_hooks_on_replaced_modules_are_named_and_kept_by_the_flags_that_keep_those_modules(caplog):
    """Hooks belong to a module instance, so those on a stock MLP or norm that patch_model replaces stop running:
    patch_model says which (and not for HF's own output recorders, on every attention after a first forward).
    With those modules kept stock, the hooks run and see stock's values; unpatch_model brings them back."""
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager").eval()
    ids = torch.randint(3, VOCAB, (2, 9))
    stock(ids, output_attentions=True)  # HF installs its output recorders on the attention modules here
    seen = []
    layers = stock.model.layers
    layers[0].mlp.register_forward_hook(lambda module, args, output: seen.append(("mlp", output)))
    layers[1].post_attention_layernorm.register_forward_pre_hook(lambda module, args: seen.append(("norm", args[0])))
    stock(ids)
    expected, seen[:] = list(seen), []
    with caplog.at_level("WARNING", logger="accel_patch"):
        patched = patch_model(copy.deepcopy(stock))
    messages = [r.getMessage() for r in caplog.records if r.name == "accel_patch"]
    assert len(messages) == 1 and "2 replaced modules" in messages[0] and "'model.layers.0.mlp'" in messages[0]
    assert "swiglu=False" in messages[0] and "rmsnorm=False" in messages[0], messages
    patched(ids)
    assert seen == []
    caplog.clear()
    with caplog.at_level("WARNING", logger="accel_patch"):
        kept = patch_model(copy.deepcopy(stock), rmsnorm=False, swiglu=False)
    assert not [r for r in caplog.records if r.name == "accel_patch"]
    kept(ids)
    assert [name for name, _ in seen] == ["mlp", "norm"]
    assert all(rel_err(got, want) < 1e-5 for (_, got), (_, want) in zip(seen, expected, strict=True))
    seen[:] = []
    unpatch_model(patched)(ids)
    assert [name for name, _ in seen] == ["mlp", "norm"]


def test_selective_flags():
    _, patched = stock_and_patched("llama", attention=False, rope=False, swiglu=False)
    kinds = {type(m) for m in patched.modules() if isinstance(m, KernelModule)}
    assert kinds == {RMSNorm}
    _, patched = stock_and_patched("llama", rmsnorm=False, attention=False, rope=False)
    assert {type(m) for m in patched.modules() if isinstance(m, KernelModule)} == {SwiGLUMLP}


def test_rope_flag_off_keeps_stock_rotation(backend):
    stock, patched = stock_and_patched("mistral", rope=False)
    assert patched.model.layers[0].self_attn.rotate is not None
    ids = torch.randint(3, VOCAB, (2, 12))
    assert rel_err(patched(ids).logits, stock(ids).logits) < 1e-4


def test_sequence_classification_and_peft_wrapped(backend):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_config(tiny_config("qwen2", num_labels=3)).eval()
    ids = torch.randint(3, VOCAB, (2, 9))
    expected = classifier(ids).logits
    assert rel_err(patch_model(copy.deepcopy(classifier))(ids).logits, expected) < 1e-4

    stock, _ = stock_and_patched("llama")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(stock), lora)
    expected = peft_model(ids).logits
    patch_model(peft_model)
    assert sum(isinstance(m, Attention) for m in peft_model.modules()) == COMMON["num_hidden_layers"]
    assert rel_err(peft_model(ids).logits, expected) < 1e-4


def test_unsupported_models_and_configs_raise():
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(ValueError, match=r"'gpt2'.*llama, mistral, qwen2, qwen3"):
        patch_model(gpt2)
    with pytest.raises(ValueError, match="no decoder found"):
        patch_model(torch.nn.Linear(3, 3))
    gelu = AutoModelForCausalLM.from_config(tiny_config("llama", hidden_act="gelu"))
    with pytest.raises(ValueError, match="hidden_act='gelu'.*swiglu=False"):
        patch_model(gelu)
    patch_model(gelu, swiglu=False)  # the rest still patches
    double = AutoModelForCausalLM.from_config(tiny_config("llama")).double()
    with pytest.raises(TypeError, match=r"float64 parameters.*model\.float\(\)"):
        patch_model(double)
    assert not any(isinstance(m, Attention) for m in double.modules())  # refused before any swap


def test_a_model_with_offloaded_weights_is_refused_before_any_swap(tmp_path):
    """accelerate loads offloaded weights only around the stock module's own forward: a swapped-in module would
    find them on the meta device. patch_model says so up front and leaves the model as it was."""
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    stock.save_pretrained(tmp_path / "model")
    layers = {f"model.layers.{i}": "disk" if i == 1 else "cpu" for i in range(COMMON["num_hidden_layers"])}
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **layers}  # fmt: skip
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                     offload_folder=tmp_path / "offload").eval()  # fmt: skip
    with pytest.raises(ValueError, match=r"'model\.layers\.1\..*offloaded by accelerate.*every layer on a GPU"):
        patch_model(offloaded)
    assert not any(isinstance(m, KernelModule) for m in offloaded.modules())
    ids = torch.randint(3, VOCAB, (2, 9))
    assert rel_err(offloaded(ids).logits, stock(ids).logits) < 1e-6


def assert_compiled_training_step_matches_stock(family: str, device: str, compile_backend: str) -> None:
    """``torch.compile`` of a patched model: its loss and every parameter's gradient are the stock model's."""
    stock, patched = stock_and_patched(family, device=device)
    ids = torch.randint(3, VOCAB, (2, 24), device=device)  # longer than the sliding windows
    torch._dynamo.reset()
    expected = stock.train()(ids, labels=ids).loss
    got = torch.compile(patched.train(), backend=compile_backend)(ids, labels=ids).loss
    assert abs(got.item() - expected.item()) <= 1e-4 * expected.item()
    expected.backward()
    got.backward()
    assert_gradients_match(patched, stock, 1e-4)


@pytest.mark.parametrize("family_name", ["llama", "qwen3"])  # a tied head; q/k norms and sliding windows
def test_compiled_training_step_matches_stock(family_name, backend):
    assert_compiled_training_step_matches_stock(family_name, "cpu", "aot_eager")


def test_compiled_static_cache_generation_matches_stock(backend):
    stock, patched = stock_and_patched("qwen3")
    torch._dynamo.reset()
    patched.forward = torch.compile(patched.forward, backend="aot_eager")
    ids, mask = left_padded_batch(length=7)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, cache_implementation="static")
    expected_tokens, expected_logits = generation_with_scores(stock, ids, **kwargs)
    tokens, logits = generation_with_scores(patched, ids, **kwargs)
    assert torch.equal(tokens, expected_tokens)
    assert rel_err(logits, expected_logits) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("family_name", ["llama", "qwen3"])
def test_gpu_compiled_training_step_matches_stock(family_name):
    """On CUDA the autograd engine runs the backward on its own thread, where AOTAutograd's tracing of our ops'
    backward once reached the Triton launches with fake tensors (inductor failed to compile)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    assert_compiled_training_step_matches_stock(family_name, "cuda", "inductor")


@pytest.mark.gpu
@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_gpu_bf16_matches_stock(family_name):
    stock, patched = stock_and_patched(family_name, dtype=torch.bfloat16, device="cuda")
    assert sum(isinstance(m, Attention) for m in patched.modules()) == COMMON["num_hidden_layers"]
    ids, mask = left_padded_batch(device="cuda", length=64)
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask).logits[mask.bool()]
        assert rel_err(patched(ids, attention_mask=mask).logits[mask.bool()], expected) < 2e-2
    # Gradients on an unpadded batch: stock SDPA on CUDA gives NaN gradients for fully padded rows.
    ids = torch.randint(3, VOCAB, (4, 64), device="cuda")
    stock(ids, labels=ids).loss.backward()
    patched(ids, labels=ids).loss.backward()
    assert_gradients_match(patched, stock, 5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("family_name", sorted(FAMILIES))
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_gpu_fp32_generation_matches_stock(family_name, cache):
    torch.backends.cuda.matmul.allow_tf32 = False
    stock, patched = stock_and_patched(family_name, device="cuda")
    padded, mask = left_padded_batch(device="cuda", length=7)
    unpadded = torch.randint(3, VOCAB, (2, 7), device="cuda")  # no mask: see test_static_cache_generation_matches_stock
    for ids, kwargs in ((padded, dict(attention_mask=mask)), (unpadded, {})):
        kwargs.update(max_new_tokens=12, cache_implementation=cache)
        expected_tokens, expected_logits = generation_with_scores(stock, ids, **kwargs)
        tokens, logits = generation_with_scores(patched, ids, **kwargs)
        assert torch.equal(tokens, expected_tokens)
        assert rel_err(logits, expected_logits) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_gpu_bf16_training_follows_stock(family_name):
    stock, patched = stock_and_patched(family_name, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(3, VOCAB, (8, 64), device="cuda")
    curves = [loss_curve(stock, ids), loss_curve(patched, ids)]
    assert curves[0][-1] < curves[0][0] - 0.5
    assert rel_err(curves[1], curves[0]) < 2e-2


def test_attn_implementation_accel_triton_on_a_stock_model(backend):
    torch.manual_seed(0)
    config = tiny_config("qwen2")
    sdpa = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ours = AutoModelForCausalLM.from_config(config, attn_implementation="accel_triton").eval()
    ours.load_state_dict(sdpa.state_dict())
    ids, mask = left_padded_batch()
    expected = sdpa(ids, attention_mask=mask).logits[mask.bool()]
    assert rel_err(ours(ids, attention_mask=mask).logits[mask.bool()], expected) < 1e-4


def test_attention_dropout_while_training(backend):
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(tiny_config("llama", attention_dropout=0.5), attn_implementation="sdpa")
    patched = patch_model(stock).train()
    ids = torch.randint(3, VOCAB, (1, 8))
    if backend == "triton":  # the kernel cannot drop attention weights: it says so instead of ignoring it
        with pytest.raises(ValueError, match="no dropout"):
            patched(ids)
    else:  # HF's attention runs and honours the dropout: two calls differ
        assert not torch.equal(patched(ids).logits, patched(ids).logits)
    patched.eval()  # no dropout at inference: both paths run and agree with themselves
    assert torch.equal(patched(ids).logits, patched(ids).logits)


@pytest.mark.gpu
def test_gpu_profile_shows_triton_attention_and_no_sdpa():
    stock, patched = stock_and_patched("llama", dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(3, VOCAB, (2, 64), device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        patched(ids, labels=ids).loss.backward()
    names = {event.name for event in prof.events()}
    assert {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"} <= names, sorted(names)
    assert not [n for n in names if "scaled_dot_product" in n or "flash" in n.lower() or "fmha" in n.lower()]


def test_fused_cross_entropy_follows_hf_loss_conventions(backend):
    stock, patched = stock_and_patched("llama")  # tied embeddings: the head's gradient lands on embed_tokens
    ids = torch.randint(3, VOCAB, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(7)}, {"shift_labels": torch.roll(labels, -1, 1)}):
        expected = stock(ids, labels=labels, **kwargs).loss
        got = patched(input_ids=ids, labels=labels, **kwargs).loss
        assert abs(got.item() - expected.item()) <= 1e-4 * expected.item(), kwargs
    assert isinstance(patched(ids, labels=labels, return_dict=False), tuple)
    # a label past the vocabulary is refused before the decoder runs (its check's host sync stays out of the step)
    decoder_calls = []
    hook = patched.model.register_forward_pre_hook(lambda *_: decoder_calls.append(1))
    with pytest.raises(ValueError, match=f"outside \\[0, {VOCAB}\\)"):
        patched(ids, labels=labels.masked_fill(labels == ids[0, 5], VOCAB))
    hook.remove()
    assert decoder_calls == []
    with torch.no_grad():  # evaluation keeps the logits
        out, expected = patched(ids, labels=labels), stock(ids, labels=labels)
        assert out.logits is not None and abs(out.loss.item() - expected.loss.item()) <= 1e-4 * expected.loss.item()
    unfused = patch_model(copy.deepcopy(stock), fused_cross_entropy=False)
    assert unfused(ids, labels=labels).logits is not None
    assert "forward" in vars(patched)
    unpatch_model(patched)
    assert "forward" not in vars(patched) and patched(ids, labels=labels).logits is not None


def test_tied_head_gradient_is_summed_by_the_embedding_lookup(monkeypatch, backend):
    """The fused loss hands its gradient of the tied weight to the embedding lookup, which adds its rows: the sum
    matches stock however the backward runs, and the loss keeps its gradient where the lookup's backward won't run."""
    from accel_patch.kernels.linear_cross_entropy import TiedHeadGradient

    stock, patched = stock_and_patched("llama")  # tied embeddings, pad_token_id 0: a padding row
    ids = torch.randint(3, VOCAB, (3, 20))
    ids[1, :5] = 0
    ids[2, 8:] = 7  # a long run of one id
    handed = []
    hand_over = TiedHeadGradient.hand_over
    monkeypatch.setattr(TiedHeadGradient, "hand_over", lambda self, g: handed.append(hand_over(self, g)) or handed[-1])

    def weight_grad(model, how):
        model.zero_grad(set_to_none=True)
        if how == "decoder cut":  # hidden states no longer depend on the lookup: only the head's gradient
            hook = model.model.layers[0].register_forward_hook(lambda m, i, out: out.detach().requires_grad_())
        loss = model(input_ids=ids, labels=ids).loss
        weight = model.model.embed_tokens.weight
        if how == "decoder cut":
            hook.remove()
        if how == "autograd.grad":
            return torch.autograd.grad(loss, [weight])[0]
        (loss + 1e-3 * weight.square().sum() if how == "another term" else loss).backward()
        return weight.grad

    for how, hands_over in (("backward", True), ("autograd.grad", True), ("another term", True),
                            ("decoder cut", False)):  # fmt: skip
        handed.clear()
        expected, got = weight_grad(stock, how), weight_grad(patched, how)
        assert handed == [hands_over], how
        assert got.layout == torch.strided and rel_err(got, expected) < 1e-5, how


def test_plain_sliding_window_builds_no_mask_and_others_do():
    """The window goes to the kernel as a number; padding and chunked attention still get HF's dense mask."""
    from transformers.masking_utils import chunked_causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

    from accel_patch.model_adapters.hf_attention import accel_triton_mask

    window = dict(batch_size=1, q_length=10, kv_length=10, local_size=4,
                  mask_function=sliding_window_causal_mask_function(4))  # fmt: skip
    assert accel_triton_mask(**window) is None
    padded = dict(window, attention_mask=torch.tensor([[0] + [1] * 9]))
    assert torch.equal(accel_triton_mask(**padded), sdpa_mask(**padded))
    chunked = dict(window, mask_function=chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)))
    assert torch.equal(accel_triton_mask(**chunked), sdpa_mask(**chunked))
    no_skip = dict(window, allow_is_causal_skip=False)  # packed sequences, or/and mask functions
    assert torch.equal(accel_triton_mask(**no_skip), sdpa_mask(**no_skip))


@pytest.mark.parametrize("q_len", [1, 3, 8])
@pytest.mark.parametrize("is_causal", [True, False])
def test_no_mask_means_what_sdpa_is_causal_means(q_len, is_causal, backend):
    """HF passes no mask where SDPA's own ``is_causal`` gives the right answer: several queries aligned with the first
    keys (a prefill into an empty static cache, whose later slots are empty), or one query that sees every key; a
    module that is not causal (cross-attention) sees every key."""
    from accel_patch.model_adapters.hf_attention import accel_triton_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, q_len, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    module = torch.nn.Module()
    module.is_causal = is_causal
    got, _ = accel_triton_attention(module, q, k, v, None, scaling=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=is_causal and q_len > 1, scale=0.25, enable_gqa=True
    ).transpose(1, 2)
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("q_len", [1, 3])
def test_flash_style_mask_over_a_static_cache(q_len, backend):
    """A 2-D (flash-style) mask shorter than the keys covers a static cache's filled slots only (HF's
    ``flash_attention_mask``): the queries are the last of those slots, and the empty ones after them are unseen."""
    from accel_patch.model_adapters.hf_attention import accel_triton_attention

    torch.manual_seed(0)
    filled, slots = 6, 10
    q, k, v = torch.randn(2, 4, q_len, 16), torch.randn(2, 2, slots, 16), torch.randn(2, 2, slots, 16)
    padding = torch.ones(2, filled, dtype=torch.bool)
    padding[1, :2] = False  # left padding in the second row
    module = torch.nn.Module()
    module.is_causal = True
    got, _ = accel_triton_attention(module, q, k, v, padding, scaling=0.25)
    causal = torch.ones(q_len, filled, dtype=torch.bool).tril(filled - q_len)
    visible = causal[None, None] & padding[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, :filled], v[:, :, :filled], attn_mask=visible, scale=0.25, enable_gqa=True
    ).transpose(1, 2)
    assert rel_err(got, expected) < 1e-5


def sdpa_model_and_copy_loaded_for(implementation: str, device: str = "cpu"):
    """A stock SDPA LLaMA and a copy whose configs name ``implementation``: HF builds masks by that name alone, so
    flash-attn is not needed to see what a flash model's attention receives."""
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa").to(device).eval()
    other = copy.deepcopy(stock)
    for module in other.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = implementation
    return stock, other


def assert_patched_model_matches_stock_under(implementation: str, device: str, padded: bool) -> None:
    """A model loaded for another attention implementation, once patched, generates as stock (SDPA) does with dynamic
    and static caches, and runs packed sequences as separate ones, where our kernels run. HF would build flex
    attention BlockMasks, and flash attention 2-D masks that leave out packed sequences' boundaries, so patching has
    HF build SDPA-style masks while patched."""
    stock, other = sdpa_model_and_copy_loaded_for(implementation, device)
    patched = patch_model(other)
    assert patched.config._attn_implementation == "accel_triton"
    ids, mask = left_padded_batch(device=device, length=7)
    kwargs = dict(attention_mask=mask if padded else torch.ones_like(mask), max_new_tokens=6)
    for cache in ("dynamic", "static"):
        expected_tokens, expected_logits = generation_with_scores(stock, ids, cache_implementation=cache, **kwargs)
        tokens, logits = generation_with_scores(patched, ids, cache_implementation=cache, **kwargs)
        assert torch.equal(tokens, expected_tokens)
        assert rel_err(logits, expected_logits) < 1e-4
    assert_packed_sequences_run_as_separate_ones(stock, patched, device)
    unpatch_model(patched)
    assert patched.config._attn_implementation == implementation


@pytest.mark.skipif(not TRITON_ON_CPU, reason="runs our kernels on the CPU: set TRITON_INTERPRET=1")
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("implementation", ["flash_attention_2", "flex_attention"])
def test_flash_and_flex_models_match_stock(implementation, padded):
    with force_backend("triton"):
        assert_patched_model_matches_stock_under(implementation, "cpu", padded)


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("implementation", ["flash_attention_2", "flex_attention"])
def test_gpu_flash_and_flex_models_match_stock(implementation, padded):
    torch.backends.cuda.matmul.allow_tf32 = False
    assert_patched_model_matches_stock_under(implementation, "cuda", padded)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="runs our kernels on the CPU: set TRITON_INTERPRET=1")
def test_a_flash_model_patched_before_the_kernels_could_run_is_refused_then_repatched():
    """Patched where the kernels do not run, a flash-style model keeps HF's masks; once the kernels run (moved to the
    GPU; here, the interpreter switched on), its masks would hide packed sequences' boundaries from the kernel:
    refused, naming the way out, which then works."""
    stock, model = sdpa_model_and_copy_loaded_for("flash_attention_2")
    with force_backend("reference"):
        patch_model(model)
    assert model.config._attn_implementation == "flash_attention_2"
    ids = torch.randint(3, VOCAB, (1, 9))
    with force_backend("triton"):
        with pytest.raises(ValueError, match="flash_attention_2.*packed sequences.*patch_model\\(model\\) again"):
            model(ids)
        patch_model(model)
        assert model.config._attn_implementation == "accel_triton"
        assert rel_err(model(ids).logits, stock(ids).logits) < 1e-4


def assert_continuous_batching_generates_like_stock(implementation: str, device: str) -> None:
    """``generate_batch`` hands the attention HF's paged cache to update and read: the patched model leaves that to
    HF's attention function, and its greedy tokens match stock's one-request-at-a-time ``generate``."""
    from transformers import GenerationConfig

    torch.manual_seed(0)
    config = tiny_config("llama", initializer_range=0.5)  # larger weights: tokens that vary from step to step
    stock = AutoModelForCausalLM.from_config(config, attn_implementation=implementation).to(device).eval()
    prompts = [torch.randint(3, VOCAB, (length,)).tolist() for length in (5, 9)]
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = [stock.generate(torch.tensor([p], device=device), **greedy)[0, len(p) :].tolist() for p in prompts]
    patched = patch_model(copy.deepcopy(stock))
    generation_config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    results = patched.generate_batch(prompts, generation_config=generation_config, progress_bar=False)
    assert [result.generated_tokens for result in results.values()] == expected


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_continuous_batching_generates_like_stock(implementation, backend):
    assert_continuous_batching_generates_like_stock(implementation, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_gpu_continuous_batching_generates_like_stock(implementation):
    torch.backends.cuda.matmul.allow_tf32 = False
    assert_continuous_batching_generates_like_stock(implementation, "cuda")


@pytest.mark.parametrize("family_name", ["mistral", "qwen2"])
def test_sliding_window_reaches_the_kernel_as_a_number(family_name, backend):
    """Where the kernels run, HF builds no dense mask for a plain sliding window: the kernel applies it. Logits
    still match stock, padding still brings the dense mask, and unpatching restores the implementation."""
    stock, patched = stock_and_patched(family_name)
    seen = []
    for module in patched.modules():
        if isinstance(module, Attention) and module.sliding_window:
            module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["attention_mask"]),
                                             with_kwargs=True)  # fmt: skip
    ids = torch.randint(3, VOCAB, (2, 20))  # longer than the window, no padding
    assert rel_err(patched(ids).logits, stock(ids).logits) < 1e-4
    kernel_runs = backend == "triton"
    assert patched.config._attn_implementation == ("accel_triton" if kernel_runs else "sdpa")
    assert seen and all((mask is None) == kernel_runs for mask in seen)
    seen.clear()
    ids, mask = left_padded_batch()
    assert rel_err(patched(ids, attention_mask=mask).logits[mask.bool()], stock(ids, attention_mask=mask).logits[
        mask.bool()]) < 1e-4  # fmt: skip
    assert seen and all(mask is not None for mask in seen)
    unpatch_model(patched)
    assert patched.config._attn_implementation == "sdpa"


@pytest.mark.gpu
@pytest.mark.two_gpus
def test_a_model_split_across_two_gpus_matches_stock_float_and_int8(tmp_path):
    """``from_pretrained(device_map=...)`` with layers on both GPUs: every kernel runs beside its layer's weights."""
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(tiny_config("mistral"), attn_implementation="sdpa").eval()
    stock.save_pretrained(tmp_path)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                  "model.layers.2": 1, "model.norm": 1, "lm_head": 1}  # fmt: skip
    ids = torch.randint(3, VOCAB, (2, 12), device="cuda:0")
    with torch.no_grad():
        expected = stock.to("cuda:0")(ids).logits
        expected_int8 = patch_model(quantize_model(copy.deepcopy(stock), "int8"))(ids).logits
        split = accel_patch.from_pretrained(tmp_path, device_map=device_map, dtype=torch.float32)
        assert split.model.layers[2].self_attn.q_proj.weight.device == torch.device("cuda:1")
        assert rel_err(split(ids).logits.to("cuda:0"), expected) < 1e-4
        split_int8 = accel_patch.from_pretrained(tmp_path, quantize="int8", device_map=device_map, dtype=torch.float32)
        assert rel_err(split_int8(ids).logits.to("cuda:0"), expected_int8) < 1e-4
