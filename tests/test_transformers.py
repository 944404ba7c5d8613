"""attn_implementation="fastattn" on tiny random models of real architectures,
compared with Transformers' own attention on every non-padded position.

fp32 runs fastattn's exact fallback; fp16/bf16 run the Triton kernel (on the GPU
when there is one, else through the Triton interpreter, set up by conftest).
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[test])")

import fastattn  # noqa: E402
from fastattn.integrations import transformers as hf  # noqa: E402
from fastattn.testing import MODEL_TOLERANCES  # noqa: E402

from .conftest import DEVICE  # noqa: E402

VOCAB = 100
SEQ = 10

TOL = MODEL_TOLERANCES  # (atol, rtol x max|reference|), as Transformers' own equivalence tests


def _decoder_cfg(cls, **extra):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0)
    base.update(extra)
    return cls(**base)


def make_config(arch: str):
    t = transformers
    if arch == "llama":
        return _decoder_cfg(t.LlamaConfig)
    if arch == "mistral":  # the window (4) is shorter than the batch: it binds
        return _decoder_cfg(t.MistralConfig, sliding_window=4)
    if arch == "qwen2":
        return _decoder_cfg(t.Qwen2Config, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                            layer_types=["full_attention", "sliding_attention"])
    if arch == "qwen3":
        return _decoder_cfg(t.Qwen3Config)
    if arch == "gemma2":
        return _decoder_cfg(t.Gemma2Config, sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
                            query_pre_attn_scalar=16)
    if arch == "gemma3":
        return _decoder_cfg(t.Gemma3TextConfig, sliding_window=4, query_pre_attn_scalar=16,
                            layer_types=["sliding_attention", "full_attention"])
    if arch == "gpt_oss":
        return _decoder_cfg(t.GptOssConfig, num_local_experts=2, num_experts_per_tok=1, sliding_window=4,
                            layer_types=["sliding_attention", "full_attention"])
    if arch == "opt":
        return t.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                           word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=0)
    if arch == "gpt2":
        return t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=0)
    if arch == "bert":
        return t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    if arch == "t5":
        return t.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                          relative_attention_num_buckets=8, pad_token_id=0, decoder_start_token_id=0)
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt_oss", "opt", "gpt2", "bert", "t5"]
ENCODERS = {"bert"}
SEQ2SEQ = {"t5"}


def make_model(arch: str, dtype: torch.dtype, attn: str = "eager"):
    config = make_config(arch)
    if arch in ENCODERS:
        auto = transformers.AutoModel
    elif arch in SEQ2SEQ:
        auto = transformers.AutoModelForSeq2SeqLM
    else:
        auto = transformers.AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation=attn)
    return model.to(device=DEVICE, dtype=dtype).eval()


def _routes_attention(model) -> bool:
    """Whether the model's attention looks up Transformers' attention interface
    (T5 did not before Transformers 5.2x)."""
    import inspect
    import sys

    return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(sys.modules[type(model).__module__])


def padded_batch(batch: int = 3, seq: int = SEQ):
    """Row 0 left-padded, row 1 right-padded, row 2 full."""
    ids = torch.randint(1, VOCAB, (batch, seq), device=DEVICE)
    mask = torch.ones(batch, seq, dtype=torch.long, device=DEVICE)
    mask[0, :3] = 0
    mask[1, seq - 4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def model_inputs(arch: str, ids, mask):
    inputs = dict(input_ids=ids, attention_mask=mask)
    if arch in SEQ2SEQ:
        inputs["decoder_input_ids"] = ids[:, :6].roll(1, dims=0)
        inputs["decoder_attention_mask"] = mask[:, :6].roll(1, dims=0)
    return inputs


def outputs(model, inputs):
    """{name: (tensor, keep mask)}: final hidden states and logits, with their non-padded positions."""
    with torch.no_grad():
        out = model(**inputs)
    keep = inputs["attention_mask"].bool()
    dec_keep = inputs.get("decoder_attention_mask", inputs["attention_mask"]).bool()
    got = {}
    if getattr(out, "encoder_last_hidden_state", None) is not None:
        got["encoder_last_hidden_state"] = (out.encoder_last_hidden_state, keep)
    if getattr(out, "last_hidden_state", None) is not None:
        got["last_hidden_state"] = (out.last_hidden_state, keep)
    if getattr(out, "logits", None) is not None:
        got["logits"] = (out.logits, dec_keep)
    return got


def assert_matches(got: dict, ref: dict, dtype: torch.dtype, what: str):
    atol, rtol = TOL[dtype]
    assert got.keys() == ref.keys()
    for name, (a, keep) in got.items():
        b = ref[name][0]
        a, b = a[keep].double(), b[keep].double()
        assert torch.isfinite(a).all(), f"{what}: {name} has non-finite values"
        diff = (a - b).abs().max().item()
        bound = atol + rtol * b.abs().max().item()
        assert diff <= bound, f"{what}: {name} differs by {diff:.3e} > {bound:.3e}"


def _cases():
    for arch in ARCHS:
        yield pytest.param(arch, torch.float32, id=f"{arch}-fp32")
    # Half precision runs the Triton kernel: through the interpreter on CPU, so fewer cases there.
    half = ARCHS if DEVICE == "cuda" else ["llama", "mistral", "gemma2", "gpt_oss", "bert", "t5", "opt"]
    for i, arch in enumerate(half):
        dtype = torch.float16 if i % 2 == 0 else torch.bfloat16
        yield pytest.param(arch, dtype, id=f"{arch}-{str(dtype)[6:]}")
    if DEVICE == "cuda":
        for i, arch in enumerate(half):
            dtype = torch.bfloat16 if i % 2 == 0 else torch.float16
            yield pytest.param(arch, dtype, id=f"{arch}-{str(dtype)[6:]}-2")


@pytest.mark.parametrize("arch,dtype", list(_cases()))
def test_padded_batch_matches_reference(arch, dtype):
    ids, mask = padded_batch()
    inputs = model_inputs(arch, ids, mask)
    model = make_model(arch, dtype, attn="eager")
    if not _routes_attention(model):
        pytest.skip(f"transformers {transformers.__version__}'s {type(model).__name__} computes attention itself "
                    "(no ALL_ATTENTION_FUNCTIONS lookup): there is no call to route through fastattn")
    # fp32: eager is the exact reference. Half: Transformers' sdpa in the same dtype where the
    # model supports it (Gemma2's softcap and GPT-OSS's sinks are eager-only).
    hf.set_attn_implementation(model, "sdpa" if dtype != torch.float32 and model._supports_sdpa else "eager")
    ref = outputs(model, inputs)
    hf.set_attn_implementation(model, "fastattn")
    assert model.config._attn_implementation == "fastattn"
    with hf.record_backends() as records:
        got = outputs(model, inputs)
    assert records, "no attention call went through fastattn"
    expected = "sdpa" if dtype == torch.float32 else "triton"
    backends = {r.backend for r in records}
    assert backends == {expected}, f"expected every call on {expected}, got {records}"
    assert_matches(got, ref, dtype, f"{arch} {dtype}")


def test_switch_reaches_config_copies(monkeypatch):
    """Transformers 5.17's set_attn_implementation left T5's encoder and decoder (deep copies
    of the config) on their old attention; fastattn's switch moves every config still on it."""
    model = make_model("t5", torch.float32)
    configs = {id(m.config): m.config for m in model.modules() if getattr(m, "config", None) is not None}
    assert len(configs) > 1, "T5 should keep copies of its config in its stacks"

    def top_level_only(name):  # what 5.17 did for sub-models of the model's own config class
        model.config._attn_implementation = name

    monkeypatch.setattr(model, "set_attn_implementation", top_level_only)
    hf.set_attn_implementation(model, "fastattn")
    assert {c._attn_implementation for c in configs.values()} == {"fastattn"}
    hf.set_attn_implementation(model, "eager")
    assert {c._attn_implementation for c in configs.values()} == {"eager"}
    next(c for c in configs.values() if c is not model.config)._attn_implementation = "sdpa"  # out of step
    hf.set_attn_implementation(model, "fastattn")
    assert {c._attn_implementation for c in configs.values()} == {"fastattn"}
