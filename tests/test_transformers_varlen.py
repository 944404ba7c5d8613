"""Transformers' padding-free batches on fastattn's varlen path: packed position_ids that
restart, or cu_seq_lens_q/k keyword arguments, give each sequence's own result, run as one
varlen call per layer (no per-sequence mask), and train to the padded batch's loss."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[test])")

import fastattn  # noqa: E402
from fastattn.integrations import transformers as hf  # noqa: E402
from fastattn.testing import LOSS_RTOL  # noqa: E402

from .conftest import DEVICE  # noqa: E402
from .test_transformers import TOL, VOCAB, make_model  # noqa: E402

LENGTHS = [5, 9, 1, 3]


def packed_batch(lengths=LENGTHS):
    seqs = [torch.randint(1, VOCAB, (n,), device=DEVICE) for n in lengths]
    ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n, device=DEVICE) for n in lengths])[None]
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    return seqs, ids, position_ids, cu


def separately(model, seqs):
    """Each sequence on its own through Transformers' sdpa attention: the reference logits, packed."""
    hf.set_attn_implementation(model, "sdpa")
    with torch.no_grad():
        return torch.cat([model(input_ids=s[None]).logits[0] for s in seqs])


def count_varlen_calls(monkeypatch):
    calls = []
    original = hf._packed_call

    def spy(*args, **kwargs):
        call = original(*args, **kwargs)
        calls.append(call)
        return call

    monkeypatch.setattr(hf, "_packed_call", spy)
    return calls


def assert_close(got, ref, dtype):
    atol, rtol = TOL[dtype]
    diff = (got.double() - ref.double()).abs().max().item()
    assert diff <= atol + rtol * ref.abs().max().item(), f"differs by {diff:.3e}"


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("form", ["position_ids", "cu_seq_lens"])
def test_padding_free_fp32(arch, form, monkeypatch):
    model = make_model(arch, torch.float32)
    seqs, ids, position_ids, cu = packed_batch()
    ref = separately(model, seqs)
    calls = count_varlen_calls(monkeypatch)
    hf.set_attn_implementation(model, "fastattn")
    kwargs = dict(position_ids=position_ids, use_cache=False)  # Transformers detects packing only without a cache
    if form == "cu_seq_lens":
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    with torch.no_grad():
        got = model(input_ids=ids, **kwargs).logits[0]
    assert_close(got, ref, torch.float32)
    assert len(calls) == model.config.num_hidden_layers, "every layer runs as one varlen call"
    assert all(c.layout == "varlen" and c.mask is None for c in calls)
    assert calls[0].cu_seqlens_q.tolist() == cu.tolist()


def test_padding_free_half_runs_the_kernel():
    model = make_model("llama", torch.float16)
    seqs, ids, position_ids, _ = packed_batch()
    ref = separately(model, seqs)
    hf.set_attn_implementation(model, "fastattn")
    with torch.no_grad(), hf.record_backends() as records:
        got = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits[0]
    assert [r.backend for r in records] == ["triton"] * model.config.num_hidden_layers, records
    assert_close(got, ref, torch.float16)


def test_a_plain_row_keeps_its_dense_path(monkeypatch):
    """One sequence (position_ids 0..L-1): no packing, nothing changes."""
    model = make_model("llama", torch.float32)
    calls = count_varlen_calls(monkeypatch)
    hf.set_attn_implementation(model, "fastattn")
    ids = torch.randint(1, VOCAB, (1, 7), device=DEVICE)
    with torch.no_grad():
        model(input_ids=ids, position_ids=torch.arange(7, device=DEVICE)[None], use_cache=False)
    assert calls == []


def padded_loss_on_sdpa(model, seqs):
    """The loss of ``seqs`` as one right-padded batch on Transformers' sdpa (the reference)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)], mask[row, :len(s)] = s, 1
    labels = ids.masked_fill(mask == 0, -100)
    hf.set_attn_implementation(model, "sdpa")
    return model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), labels=labels.to(DEVICE)).loss


def test_flattened_training_loss_matches_the_padded_batch():
    """DataCollatorWithFlattening (packed, no padding) gives the padded batch's loss and gradients."""
    model = make_model("llama", torch.float32)
    model.train()
    seqs = [torch.randint(1, VOCAB, (n,)) for n in LENGTHS if n > 1]
    flat = transformers.DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in seqs])
    hf.set_attn_implementation(model, "fastattn")
    loss_packed = model(**{k: v.to(DEVICE) for k, v in flat.items()}).loss
    loss_packed.backward()
    grads_packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    loss_padded = padded_loss_on_sdpa(model, seqs)
    loss_padded.backward()
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=1e-5)
    for a, p in zip(grads_packed, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_flattened_training_runs_the_kernel_backward(dtype, monkeypatch):
    """Half precision: the packed batch (DataCollatorWithFlattening) runs every layer's attention
    on the Triton kernel forward *and* backward, as one varlen call each, and its loss and
    gradients match the padded batch on Transformers' sdpa (measured: losses equal, gradients
    1.1e-3 (fp16) and 8.6e-3 (bf16) of each parameter's largest apart)."""
    from fastattn.kernels.triton import flash_bwd

    launches = []
    original = flash_bwd.flash_attn_backward

    def spy(*args, **kwargs):
        launches.append(kwargs.get("seqs"))
        return original(*args, **kwargs)

    monkeypatch.setattr(flash_bwd, "flash_attn_backward", spy)
    model = make_model("llama", dtype)
    model.train()
    seqs = [torch.randint(1, VOCAB, (n,)) for n in LENGTHS if n > 1]
    flat = transformers.DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in seqs])
    hf.set_attn_implementation(model, "fastattn")
    with hf.record_backends() as records:
        loss_packed = model(**{k: v.to(DEVICE) for k, v in flat.items()}).loss
        loss_packed.backward()
    layers = model.config.num_hidden_layers
    assert [(r.backend, r.backward) for r in records] == [("triton", "triton")] * layers, records
    assert len(launches) == layers and all(s is not None and s.cu_seqlens_q is not None for s in launches)
    grads_packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    loss_padded = padded_loss_on_sdpa(model, seqs)
    loss_padded.backward()
    assert abs(loss_packed.item() - loss_padded.item()) <= LOSS_RTOL[dtype] * abs(loss_padded.item())
    atol, rtol = TOL[dtype]
    for (name, p), a in zip(model.named_parameters(), grads_packed):
        err = (a.double() - p.grad.double()).abs().max().item()
        assert err <= atol + rtol * p.grad.abs().max().item(), f"{name}: gradient differs by {err:.3e}"


def test_both_forms_of_the_packed_mask_function_are_recognized():
    """Transformers 5.17 builds packed position_ids' mask function as and_masks(<causal>, packed),
    5.2x as and_masks(remap_positions_for_packed_sequence(<causal>, position_ids), packed): both
    give the sequence ids and the window, whichever version is installed; a user's extra mask
    function keeps the dense mask."""
    mu = hf._masking_utils()
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    position_ids = torch.tensor([[0, 1, 0, 1, 2, 0]])
    packed = mu.packed_sequence_mask_function(ids)
    forms = [lambda f: f]  # 5.17
    if hasattr(mu, "remap_positions_for_packed_sequence"):
        forms.append(lambda f: mu.remap_positions_for_packed_sequence(f, position_ids))
    for form in forms:
        for positional, window in [(mu.causal_mask_function, (-1, 0)),
                                   (mu.sliding_window_causal_mask_function(3), (2, 0))]:
            found = hf._packed_sequence_ids(mu.and_masks(form(positional), packed), mu)
            assert found is not None and found[0] is ids and found[1] == window
        custom = mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: kv != 1)
        assert hf._packed_sequence_ids(mu.and_masks(form(custom), packed), mu) is None
    assert hf._packed_sequence_ids(mu.and_masks(mu.causal_mask_function, mu.causal_mask_function), mu) is None
