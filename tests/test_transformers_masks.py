"""The masks the "fastattn" mask function builds without materializing them: a padded causal
prefill mask is a CausalPaddingMask ((B, 1, L, S) to every reader, held as the (B, S) padding and
the diagonal). Its values against Transformers' sdpa_mask, what other readers see, and that the
fast path builds nothing of size L x S."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[test])")

import fastattn  # noqa: E402
from fastattn.integrations import transformers as hf  # noqa: E402
from fastattn.integrations.masks import CausalPaddingMask  # noqa: E402
from fastattn.testing import assert_close_by_rule, reference_attention  # noqa: E402
from transformers import masking_utils  # noqa: E402

from .conftest import DEVICE  # noqa: E402
from .test_transformers_attention import FakeAttention, qkv  # noqa: E402


def _padding(B, length, side):
    keep = torch.ones(B, length, dtype=torch.bool, device=DEVICE)
    if side == "left":
        keep[0, :3] = False
    elif side == "right":
        keep[0, length - 2:] = False
    if B > 1:
        keep[-1, :1] = False  # another row padded differently
    return keep


CASES = [  # (L, S, q_offset, kv_offset)
    (7, 7, 0, 0),    # prefill
    (3, 8, 5, 0),    # chunked prefill after 5 cached tokens
    (3, 10, 5, 0),   # static cache: keys past the queries are not filled yet
    (2, 6, 9, 4),    # a cache window that starts at position 4
    (4, 12, 4, 0),   # the 2-D mask shorter than the keys: sdpa_mask pads it with False
]


def _factory(window):
    if window is None:
        return dict(mask_function=masking_utils.causal_mask_function)
    return dict(mask_function=masking_utils.sliding_window_causal_mask_function(window), local_size=window)


@pytest.mark.parametrize("window", [None, 3, 6])  # sliding_window: a diagonal (q_offset - kv_offset) up to W - 1
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("L, S, q_offset, kv_offset", CASES)
def test_values_are_sdpa_masks(L, S, q_offset, kv_offset, B, side, window):
    pad = _padding(B, min(kv_offset + S, q_offset + L), side)
    for skip in (True, False):
        args = dict(batch_size=B, q_length=L, kv_length=S, q_offset=q_offset, kv_offset=kv_offset,
                    attention_mask=pad, allow_is_causal_skip=skip, device=DEVICE, **_factory(window))
        ours, ref = hf.mask_function(**args), masking_utils.sdpa_mask(**args)
        compact = window is None or q_offset - kv_offset <= window - 1
        assert type(ours) is (CausalPaddingMask if compact else torch.Tensor)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype == torch.bool and ours.device == ref.device
        assert torch.equal(ours, ref)
        # what other readers of the mask do with it
        assert torch.equal(ours[:, :, :, :S - 1], ref[:, :, :, :S - 1])
        assert torch.equal(ours[-1, 0, 1:], ref[-1, 0, 1:])
        assert torch.equal(ours.to(torch.float32), ref.to(torch.float32))
        assert torch.equal(~ours, ~ref) and torch.equal(ours.clone(), ref)
        assert ours.sum().item() == ref.sum().item()
        assert torch.equal(torch.where(ours, 0.0, -1e9), torch.where(ref, 0.0, -1e9))


def test_every_kind_of_reader_sees_the_values():
    mask = _mask(B=2, L=5, S=6, q_offset=1)
    ref = mask.dense().clone()
    mask = _mask(B=2, L=5, S=6, q_offset=1)  # nothing materialized yet
    readers = [lambda m: m.tolist(), lambda m: m.cpu().numpy().tolist(), lambda m: str(m), lambda m: m.stride(),
               lambda m: m.is_contiguous(), lambda m: m.view(2, -1).tolist(), lambda m: torch.cat([m, m]).tolist(),
               lambda m: m.expand(2, 3, 5, 6).tolist(), lambda m: m.nonzero().tolist(), lambda m: m[m].numel(),
               lambda m: m.half().tolist(), lambda m: bool(m.any()), lambda m: m.nbytes, lambda m: (m != m).any().item(),
               lambda m: m.float().masked_fill(~m, -1.0).tolist(), lambda m: m.untyped_storage().nbytes()]
    for read in readers:
        assert read(mask) == read(ref)
    assert mask.compact() is not None  # reading is not writing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("L, S, q_offset, kv_offset", [(11, 11, 0, 0), (5, 13, 8, 0), (4, 9, 7, 3)])
def test_attention_on_the_compact_form_gives_the_full_masks_result(L, S, q_offset, kv_offset, window, dtype):
    """The kernel (fp16) or the fallback (fp32) on padding + diagonal (+ window): the result of the
    same mask in full, every row (rows that see no key: zeros in both)."""
    if window is not None and q_offset - kv_offset > window - 1:
        window = q_offset - kv_offset + 1
    pad = _padding(2, kv_offset + S, "left")
    mask = hf.mask_function(batch_size=2, q_length=L, kv_length=S, q_offset=q_offset, kv_offset=kv_offset,
                            attention_mask=pad, device=DEVICE, **_factory(window))
    assert type(mask) is CausalPaddingMask
    full = mask.dense().clone()
    mask = hf.mask_function(batch_size=2, q_length=L, kv_length=S, q_offset=q_offset, kv_offset=kv_offset,
                            attention_mask=pad, device=DEVICE, **_factory(window))
    q, k, v = qkv(L=L, S=S, D=16, dtype=dtype)
    module = FakeAttention()
    call = hf._build_call(module, q, k, v, mask, 0.0, 0.3, {})
    assert call.mask.shape == (2, 1, 1, S)
    with fastattn.use_backend("auto" if dtype == torch.float32 else "triton"):
        out, _ = hf.attention_forward(module, q, k, v, mask, scaling=0.3)
    assert mask.compact() is not None  # it ran as padding + positions, nothing materialized
    ref, _ = reference_attention(q, k, v, scale=0.3, mask=full)
    lowp, _ = reference_attention(q, k, v, scale=0.3, mask=full, compute_dtype=None)
    assert_close_by_rule(out, ref.transpose(1, 2), lowp.transpose(1, 2))


def test_none_where_sdpa_mask_gives_none():
    """No padding in the keys the queries see: sdpa_mask skips the mask (is_causal), so do we."""
    pad = torch.ones(2, 7, dtype=torch.bool, device=DEVICE)
    args = dict(batch_size=2, q_length=7, kv_length=7, attention_mask=pad, device=DEVICE)
    assert masking_utils.sdpa_mask(**args) is None and hf.mask_function(**args) is None
    args = dict(batch_size=2, q_length=7, kv_length=7, attention_mask=pad, allow_is_causal_skip=False, device=DEVICE)
    assert torch.equal(hf.mask_function(**args), masking_utils.sdpa_mask(**args))


def _mask(B=2, L=7, S=7, q_offset=0):
    return hf.mask_function(batch_size=B, q_length=L, kv_length=S, q_offset=q_offset, attention_mask=_padding(B, S, "left"),
                            device=DEVICE)


def test_full_views_and_moves_stay_compact():
    mask = _mask()
    ref = mask.dense().clone()
    for view in (mask[:, :, :, :7], mask[:, :, :, :100], mask[:], mask.detach(), mask.to("meta")):
        assert type(view) is CausalPaddingMask and view.compact() is not None and view.shape == mask.shape
    assert torch.equal(mask[:, :, :, :7], ref)
    assert mask.to("meta").device.type == "meta"
    assert mask.to(DEVICE) is mask and mask.bool() is mask


def _values(mask):
    return mask.dense() if type(mask) is CausalPaddingMask else mask


def test_writes_are_seen_and_end_the_compact_form():
    """A write into the mask, into a view of it or into its dense tensor: later readers (fastattn's
    attention included) see the written values."""
    writes = [lambda m: m.logical_not_(), lambda m: m.__setitem__((0, 0, 5, 0), True),
              lambda m: m[:, :, :, :7][1, 0].fill_(True), lambda m: _values(m)[0, 0, 6].fill_(False)]
    module = FakeAttention()
    q, k, v = qkv(L=7, S=7)
    for write in writes:
        mask = _mask()
        expected = mask.dense().clone()
        write(expected)
        write(mask)
        assert torch.equal(mask, expected) and mask.compact() is None
        assert hf._build_call(module, q, k, v, mask, 0.0, 0.3, {}).mask.shape == (2, 1, 7, 7)
        out, _ = hf.attention_forward(module, q, k, v, mask, scaling=0.3)
        ref, _ = hf.attention_forward(module, q, k, v, expected, scaling=0.3)
        assert torch.equal(out, ref)


def test_inference_mode():
    """Inference tensors have no version counters: a view handed out or a write ends the compact
    form (reads do not), and what was written is what attention reads."""
    module = FakeAttention()
    q, k, v = qkv(L=7, S=7)
    with torch.inference_mode():
        mask = _mask()
        expected = mask.dense().clone()
        mask = _mask()
        assert type(mask[:, :, :, :7]) is CausalPaddingMask and torch.equal(mask, expected)
        assert mask.compact() is not None
        out, _ = hf.attention_forward(module, q, k, v, mask, scaling=0.3)
        assert torch.equal(out, hf.attention_forward(module, q, k, v, expected, scaling=0.3)[0])
        mask[:, :, 2].fill_(True)
        expected[:, :, 2] = True
        assert mask.compact() is None and torch.equal(mask, expected)
        out, _ = hf.attention_forward(module, q, k, v, mask, scaling=0.3)
        assert torch.equal(out, hf.attention_forward(module, q, k, v, expected, scaling=0.3)[0])


def test_copies_pickles_and_prints_as_its_values():
    mask = _mask(q_offset=0)
    ref = mask.dense().clone()
    for copied in (copy.deepcopy(mask), pickle.loads(pickle.dumps(mask))):
        assert type(copied) is CausalPaddingMask and copied.compact() is not None and torch.equal(copied, ref)
    buffer = io.BytesIO()
    torch.save(mask, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False), ref)
    assert repr(mask) == repr(ref)
    written = _mask()
    written[0, 0, 0, 0] = True
    assert torch.equal(copy.deepcopy(written), written) and type(copy.deepcopy(written)) is torch.Tensor


def test_torch_sdpa_reads_the_values():
    mask = _mask()
    q, k, v = qkv(L=7, S=7, Hkv=4)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense().clone())
    assert torch.equal(out, ref)


def test_compiled_region_reads_the_values():
    """A region compiled apart from the mask function (one decoder layer, say) gets the mask as
    an input: a traceable subclass, its ops traced through its __torch_dispatch__."""
    mask = _mask()
    x = torch.randn(2, 1, 7, 7, device=DEVICE)
    fn = torch.compile(lambda m, x: x.masked_fill(~m, 0.0), backend="aot_eager", fullgraph=True)
    assert torch.equal(fn(mask, x), x.masked_fill(~mask.dense(), 0.0))


def test_compiled_attention_reads_the_values():
    """fastattn's attention under torch.compile given the mask made outside: the same result."""
    mask = _mask()
    q, k, v = qkv(L=7, S=7)
    module = FakeAttention()
    fn = torch.compile(lambda q, k, v, m: hf.attention_forward(module, q, k, v, m, scaling=0.25)[0], backend="aot_eager")
    out = fn(q, k, v, mask)
    ref, _ = hf.attention_forward(module, q, k, v, mask.dense().clone(), scaling=0.25)
    keep = mask.dense().any(-1)[:, 0]
    assert (out[keep] - ref[keep]).abs().max().item() <= 1e-6


class _Shapes(TorchDispatchMode):
    """The shape of every plain tensor an op returns, and the bytes of memory behind it (a
    broadcast view of a small tensor has an (L, S) shape but only that tensor's bytes)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if type(t) is torch.Tensor:
                self.shapes.append((str(func), tuple(t.shape), t.untyped_storage().nbytes()))
        return out


@pytest.mark.parametrize("L, S, q_offset", [(23, 23, 0), (11, 29, 18)])
def test_the_fast_path_builds_nothing_of_size_l_by_s(L, S, q_offset):
    """mask function + attention on the kernel (fp16): no memory of L x S elements is allocated
    (views of the padding broadcast to (B, H, L, S), as the kernel's launcher makes, are free)."""
    pad = _padding(2, S, "left")
    q, k, v = qkv(L=L, S=S, D=16, dtype=torch.float16)
    with _Shapes() as seen, fastattn.use_backend("triton"), hf.record_backends() as records:
        mask = hf.mask_function(batch_size=2, q_length=L, kv_length=S, q_offset=q_offset, attention_mask=pad,
                                device=DEVICE)
        out, _ = hf.attention_forward(FakeAttention(), q, k, v, mask, scaling=0.25)
    assert type(mask) is CausalPaddingMask and [r.backend for r in records] == ["triton"]
    big = [(op, shape) for op, shape, nbytes in seen.shapes if shape[-2:] == (L, S) and nbytes >= L * S]
    assert any(shape[-2:] == (L, S) for _, shape, _ in seen.shapes)  # the launcher's broadcast views were seen
    assert not big, f"built an L x S tensor: {big}"
    ref, _ = hf.attention_forward(FakeAttention(), q, k, v, mask.dense().clone(), scaling=0.25)
    keep = mask.dense().any(-1)[:, 0]
    assert (out[keep].double() - ref[keep].double()).abs().max().item() <= 2e-3


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_tiny_llama_left_padding_same_logits_as_sdpa(arch):
    """fp32 CPU: the same logits with fastattn as with sdpa, and every layer gets the compact mask
    (Mistral: its sliding window, 4, shorter than the batch)."""
    extra = dict(sliding_window=4) if arch == "mistral" else {}
    config = getattr(transformers, "LlamaConfig" if arch == "llama" else "MistralConfig")(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(DEVICE).eval()
    ids = torch.randint(1, 100, (3, 9), device=DEVICE)
    keep = torch.ones(3, 9, dtype=torch.long, device=DEVICE)
    keep[0, :4] = 0
    keep[1, :1] = 0
    ids = ids.masked_fill(keep == 0, 0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=keep).logits
    hf.set_attn_implementation(model, "fastattn")
    mapping = transformers.modeling_utils.AttentionInterface._global_mapping
    seen = []

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        seen.append(type(attention_mask))
        return hf.attention_forward(module, query, key, value, attention_mask, *args, **kwargs)

    mapping["fastattn"] = spy
    try:
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=keep).logits
    finally:
        mapping["fastattn"] = hf.attention_forward
    assert seen == [CausalPaddingMask] * 2
    rows = keep.bool()
    assert (got[rows] - ref[rows]).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------- padded encoder batches, unpadded


def _key_padding(B, S, kind):
    keep = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    lengths = [S - 1 - (b * 7) % S for b in range(B)]  # every row padded, one by more than half
    lengths[0] = S // 3
    for b, n in enumerate(lengths):
        if kind == "right":  # as tokenizers pad: the valid keys are a prefix
            keep[b, n:] = False
        elif kind == "left":
            keep[b, :S - n] = False
        else:  # holes: the valid keys gathered
            keep[b, torch.randperm(S, device=DEVICE)[:S - n]] = False
    if B > 2:
        keep[2] = True  # an unpadded row
    return keep


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["right", "left", "holes"])
@pytest.mark.parametrize("B, L, S, Hq, Hkv, D", [(3, 37, 37, 2, 2, 32), (2, 19, 70, 4, 2, 16)])
def test_padded_encoder_batch_runs_unpadded(B, L, S, Hq, Hkv, D, kind, dtype):
    """A bidirectional key-padding mask runs as varlen, every query row (padded ones too: they
    attend to their batch's keys, as in the masked computation) by flash-attn's rule against an
    fp64 reference of the masked computation, and equal to the masked kernel's result."""
    keep = _key_padding(B, S, kind)
    mask = hf.mask_function(batch_size=B, q_length=L, kv_length=S, mask_function=masking_utils.bidirectional_mask_function,
                            attention_mask=keep, device=DEVICE)
    q, k, v = qkv(B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, D=D, dtype=dtype)
    module = FakeAttention(hq=Hq, hkv=Hkv, is_causal=False)
    with fastattn.use_backend("triton"), hf.record_backends() as records:
        out, _ = hf.attention_forward(module, q, k, v, mask, scaling=0.3)
    valid = int(keep.sum())
    assert [(r.backend, r.shape) for r in records] == [("triton", (1, Hq, B * L, B * S if kind == "right" else valid))]
    dense = mask.contiguous()  # the same values, not the mask function's object: the masked kernel
    with fastattn.use_backend("triton"), hf.record_backends() as masked_records:
        masked, _ = hf.attention_forward(module, q, k, v, dense, scaling=0.3)
    assert [r.shape for r in masked_records] == [(B, Hq, L, S)]
    ref, _ = reference_attention(q, k, v, scale=0.3, mask=dense)
    lowp, _ = reference_attention(q, k, v, scale=0.3, mask=dense, compute_dtype=None)
    assert out.shape == masked.shape == (B, L, Hq, D)
    assert_close_by_rule(out, ref.transpose(1, 2), lowp.transpose(1, 2))
    assert_close_by_rule(masked, ref.transpose(1, 2), lowp.transpose(1, 2))


def test_padded_encoder_batch_keeps_the_masked_kernel_where_unpadding_does_not_pay():
    """Little padding, a gradient to compute (the varlen backward is not merged), dropout or fp32:
    the masked call, as before."""
    B, L, H, D = 2, 20, 2, 16
    keep = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    keep[0, -2:] = False  # 5% padding
    args = dict(batch_size=B, q_length=L, kv_length=L, mask_function=masking_utils.bidirectional_mask_function,
                device=DEVICE)
    little = hf.mask_function(attention_mask=keep, **args)
    keep = keep.clone()
    keep[:, L // 2:] = False
    much = hf.mask_function(attention_mask=keep, **args)
    module = FakeAttention(hq=H, hkv=H, is_causal=False)
    q, k, v = qkv(B=B, Hq=H, Hkv=H, L=L, S=L, D=D, dtype=torch.float16)
    cases = [(little, (q, k, v), {}), (much, (q.detach().requires_grad_(), k, v), {}), (much, (q, k, v), dict(dropout=0.1))]
    for mask, (q_, k_, v_), extra in cases:
        with hf.record_backends() as records:
            hf.attention_forward(module, q_, k_, v_, mask, scaling=0.3, **extra)
        assert records[0].shape == (B, H, L, L), records
    # one query a sequence (cross-attention while generating): the masked call's cached plan
    one = hf.mask_function(attention_mask=keep, **dict(args, q_length=1))
    with hf.record_backends() as records:
        hf.attention_forward(module, q[:, :, :1], k, v, one, scaling=0.3)
    assert records[0].shape == (B, H, 1, L), records
    with hf.record_backends() as records:
        hf.attention_forward(module, q.float(), k.float(), v.float(), much, scaling=0.3)
    assert records[0].shape == (B, H, L, L) and records[0].backend == "sdpa"


def test_a_write_into_the_padding_mask_is_seen_by_the_unpadded_path():
    B, L, H, D = 2, 24, 2, 16
    keep = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    keep[:, L // 2:] = False
    mask = hf.mask_function(batch_size=B, q_length=L, kv_length=L, device=DEVICE, attention_mask=keep,
                            mask_function=masking_utils.bidirectional_mask_function)
    module = FakeAttention(hq=H, hkv=H, is_causal=False)
    q, k, v = qkv(B=B, Hq=H, Hkv=H, L=L, S=L, D=D, dtype=torch.float16)
    hf.attention_forward(module, q, k, v, mask, scaling=0.3)
    mask[1, 0, 0, L - 1] = True  # a stride-0 view: key L - 1 of row 1 becomes visible to every query
    with hf.record_backends() as records:
        out, _ = hf.attention_forward(module, q, k, v, mask, scaling=0.3)
    assert records[0].shape[0] == 1  # still unpadded (gathered now: the valid keys are no prefix)
    ref, _ = reference_attention(q, k, v, scale=0.3, mask=mask.contiguous())
    lowp, _ = reference_attention(q, k, v, scale=0.3, mask=mask.contiguous(), compute_dtype=None)
    assert_close_by_rule(out, ref.transpose(1, 2), lowp.transpose(1, 2))


def test_tiny_bert_runs_unpadded_with_the_masked_result():
    """A tiny BERT in fp16, right-padded as tokenizers pad: every layer runs unpadded, and every
    position's output (padded ones too) is the masked path's."""
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    model = transformers.AutoModel.from_config(config, attn_implementation="fastattn").to(DEVICE, torch.float16).eval()
    ids = torch.randint(1, 100, (3, 19), device=DEVICE)
    keep = torch.ones(3, 19, dtype=torch.long, device=DEVICE)
    keep[0, 6:] = 0
    keep[1, 12:] = 0
    ids = ids.masked_fill(keep == 0, 0)
    with torch.no_grad(), hf.record_backends() as records:
        got = model(input_ids=ids, attention_mask=keep).last_hidden_state
    assert [(r.backend != "sdpa", r.shape[0]) for r in records] == [(True, 1)] * 2  # varlen: one row of sequences
    with torch.no_grad(), hf.record_backends() as records, _masked_only():
        masked = model(input_ids=ids, attention_mask=keep).last_hidden_state
    assert [(r.backend != "sdpa", r.shape[0]) for r in records] == [(True, 3)] * 2
    assert torch.isfinite(got).all()
    assert (got.double() - masked.double()).abs().max().item() <= 1e-2 * masked.abs().max().item()


class _masked_only:
    def __enter__(self):
        self.saved, hf.UNPADDED_MIN_PADDING = hf.UNPADDED_MIN_PADDING, 2.0

    def __exit__(self, *exc):
        hf.UNPADDED_MIN_PADDING = self.saved


def test_minilm_fp16_runs_unpadded_with_the_masked_embeddings():
    """The packaged all-MiniLM-L6-v2 on a padded batch: every layer unpadded, the same sentence
    embeddings (and hidden states at every position) as the masked kernel's."""
    from .test_transformers_models import _minilm_path

    path = _minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    sentences = ["A much longer sentence than the other one, so that the batch is padded by more than half of "
                 "its tokens, and long enough to run unpadded.", "Hi there"]
    batch = tok(sentences, padding=True, return_tensors="pt").to(DEVICE)
    assert batch["input_ids"].shape[1] > hf.UNPADDED_MIN_QUERIES
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="fastattn", dtype=torch.float16)
    model = model.to(DEVICE).eval()
    with torch.no_grad(), hf.record_backends() as records:
        got = model(**batch).last_hidden_state
    assert [(r.backend != "sdpa", r.shape[0]) for r in records] == [(True, 1)] * model.config.num_hidden_layers
    with torch.no_grad(), _masked_only():
        masked = model(**batch).last_hidden_state
    assert (got.double() - masked.double()).abs().max().item() <= 1e-2 * masked.abs().max().item()


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_same_loss_and_gradients_as_sdpa(reentrant):
    """Training with activation checkpointing passes the mask through torch.utils.checkpoint
    (detach, saved inputs): the same loss and gradients as sdpa, fp32 CPU."""
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=64, pad_token_id=0)
    ids = torch.randint(1, 100, (3, 9), device=DEVICE)
    keep = torch.ones(3, 9, dtype=torch.long, device=DEVICE)
    keep[0, :4] = 0
    ids = ids.masked_fill(keep == 0, 0)
    got = {}
    for attn in ("sdpa", "fastattn"):
        torch.manual_seed(1)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).to(DEVICE).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=reentrant))
        loss = model(input_ids=ids, attention_mask=keep, labels=ids.masked_fill(keep == 0, -100)).loss
        loss.backward()
        got[attn] = (loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad)
    assert (got["sdpa"][0] - got["fastattn"][0]).abs().item() <= 1e-5
    assert (got["sdpa"][1] - got["fastattn"][1]).abs().max().item() <= 1e-5
