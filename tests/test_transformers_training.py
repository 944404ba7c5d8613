"""Training through attn_implementation="fastattn": a few optimizer steps on tiny random
models, against Transformers' own attention on the same weights, data and seed.

fp32 runs fastattn's exact fallback (torch's SDPA / fp32 math, differentiated by torch):
the losses agree to float32 rounding. fp16/bf16 run the Triton kernel forward *and*
backward (the interpreter on CPU): the losses agree within the dtype's tolerance
(fastattn.testing.LOSS_RTOL), and record_backends shows the kernel's backward ran.
5 steps (not the issue's 20): each step runs every layer's kernel forward and backward
through the interpreter, and 5 SGD steps already move the loss well past its tolerance.
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[test])")

from fastattn.integrations import transformers as hf  # noqa: E402
from fastattn.testing import LOSS_RTOL  # noqa: E402

from .conftest import DEVICE  # noqa: E402
from .test_transformers import ENCODERS, make_config, make_model, padded_batch  # noqa: E402

STEPS = 5
LR = 0.2


def loss_of(arch, model, ids, mask, target):
    if arch.split("_")[0] in ENCODERS:  # BertModel has no head: a regression onto fixed random targets
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        keep = mask.bool()
        return torch.nn.functional.mse_loss(hidden[keep].float(), target[keep])
    # Only predictions made at real tokens count: a padded position's output is not defined alike
    # everywhere (a row that sees no key: zeros in fastattn, the mean of V in eager attention).
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss.float()


def train(arch, model, batch):
    """Losses of STEPS SGD steps; the seed is set before each step, so dropout draws alike."""
    ids, mask, target = batch
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        torch.manual_seed(1000 + step)
        loss = loss_of(arch, model, ids, mask, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


CASES = [
    ("llama", torch.float32), ("llama", torch.float16), ("llama", torch.bfloat16),
    ("gemma2", torch.float32), ("gemma2", torch.bfloat16),  # softcap (and windows)
    ("mistral", torch.float32), ("mistral", torch.float16),  # sliding window shorter than the batch
    ("gpt_oss", torch.float32), ("gpt_oss", torch.bfloat16),  # attention sinks, trained
    ("bert", torch.float32), ("bert", torch.float16),  # attention dropout, padding, bidirectional
    ("bert_no_dropout", torch.bfloat16),  # padding, bidirectional, on the kernel
]


def _model(arch, dtype):
    if arch != "bert_no_dropout":
        return make_model(arch, dtype)
    config = make_config("bert")
    config.attention_probs_dropout_prob = 0.0
    return transformers.AutoModel.from_config(config, attn_implementation="eager").to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("arch,dtype", CASES, ids=[f"{a}-{str(d)[6:]}" for a, d in CASES])
def test_training_matches_transformers_attention(arch, dtype):
    reference_model = _model(arch, dtype).train()
    reference = hf.reference_implementation(reference_model)  # sdpa where supported, else eager
    hf.set_attn_implementation(reference_model, reference)
    model = hf.set_attn_implementation(copy.deepcopy(reference_model), hf.NAME)
    ids, mask = padded_batch()
    target = torch.randn(*ids.shape, reference_model.config.hidden_size, device=DEVICE)
    batch = (ids, mask, target)

    want = train(arch, reference_model, batch)
    with hf.record_backends() as records:
        got = train(arch, model, batch)

    assert records and all(r.backward == r.backend for r in records), "every call needs grad in training"
    dropout = arch == "bert"
    if dtype == torch.float32:
        assert {r.backend for r in records} == {"sdpa"}
    else:  # dropout too: the kernel draws its own keep-mask (torch's SDPA another one)
        assert {r.backend for r in records} == {"triton"}, records
    assert want[0] != want[-1], "the steps should move the loss"
    # With dropout on the kernel the two draw different keep-masks (p = 0.1 here): the losses
    # still agree within the dtype's tolerance (measured <= 6e-4 relative in fp16, fixed seeds);
    # test_backward.py checks the kernel's dropout against the reference given its own mask.
    rtol = LOSS_RTOL[torch.float32 if dropout and dtype == torch.float32 else dtype]
    for step, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= rtol * abs(b), f"step {step}: loss {a:.6f} vs {reference}'s {b:.6f} (losses {got} vs {want})"


# --------------------------------------------------------------------------- QLoRA: a 4-bit model with adapters


def _qlora_model(path, attn):
    """A bitsandbytes 4-bit model prepared for k-bit training and given LoRA adapters on q/v by
    peft, as QLoRA does; the adapters start non-zero (``init_lora_weights=False``), so they get
    gradients through attention from the first step."""
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e .[test])")
    from .test_transformers_models import _quant_config

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=attn, quantization_config=_quant_config("nf4-bfloat16"), dtype=torch.bfloat16,
        device_map=DEVICE)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # norms to fp32
    torch.manual_seed(7)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                             init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    return model.train(), adapters


def test_qlora_adapters_train_alike(tmp_path):
    """QLoRA: a bitsandbytes 4-bit Llama with peft's LoRA adapters on q/v (norms upcast to fp32 by
    prepare_model_for_kbit_training): fp32 activations reach fastattn, which runs the kernel in the
    model's bf16 compute dtype, forward and backward. Losses over 3 steps and the adapters' first gradients match Transformers' sdpa
    (fp32 attention) within bf16's tolerance (measured: losses 6e-5 apart relative, the
    adapters' gradients 0.8% of their largest; allowed 3%)."""
    from .test_transformers_models import _bnb

    _bnb()
    config = make_config("llama")
    config.hidden_size, config.intermediate_size = 64, 128  # bitsandbytes' CPU blocks: 64 inputs
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    ids, mask = padded_batch()
    batch = (ids, mask, None)
    results = {}
    for attn in ("sdpa", hf.NAME):
        model, adapters = _qlora_model(tmp_path, attn)
        opt = torch.optim.SGD(adapters, lr=LR)
        losses, first_grads = [], None
        with hf.record_backends() as records:
            for step in range(3):
                loss = loss_of("llama", model, *batch)
                loss.backward()
                if first_grads is None:
                    first_grads = [a.grad.clone() for a in adapters]
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
        results[attn] = (losses, first_grads, records)
    (want, want_grads, _), (got, got_grads, records) = results["sdpa"], results[hf.NAME]
    assert records and {(r.backend, r.backward, r.dtype) for r in records} == {("triton", "triton", torch.bfloat16)}
    for step, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= LOSS_RTOL[torch.bfloat16] * abs(b), f"step {step}: loss {a} vs sdpa's {b}"
    for i, (g, ref) in enumerate(zip(got_grads, want_grads)):
        assert torch.isfinite(g).all()
        err = (g - ref).abs().max().item()
        assert err <= 3e-2 * ref.abs().max().item(), f"adapter {i}: gradient differs by {err:.3e} (max {ref.abs().max():.3e})"
