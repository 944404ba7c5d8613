"""Continuous batching (``model.generate_batch``) on ``attn_implementation="fastattn"``: each
packed batch of prompts, prompt chunks and decode steps runs as one fastattn varlen call
(recorded from Transformers' generation thread). fp32: the greedy tokens of Transformers' own
attention in ``model.generate``, and each token's log-probability as one forward of the whole
sequence gives it; fp16/bf16: the Triton kernel runs every call, log-probabilities within the
dtype's tolerance."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[test])")
pytest.importorskip("transformers.generation.continuous_batching",
                    reason="this Transformers has no continuous batching")

from fastattn.integrations import transformers as hf  # noqa: E402

from .conftest import DEVICE  # noqa: E402
from .test_transformers import TOL, VOCAB, make_model  # noqa: E402

PROMPT_LENGTHS = (5, 2, 11)  # one batch: prompts of different lengths, then their decode steps side by side


def prompts(lengths=PROMPT_LENGTHS) -> list[list[int]]:
    return [torch.randint(1, VOCAB, (n,)).tolist() for n in lengths]


def generate_batch(model, batch, new_tokens, **cb_options):
    """{prompt index: (tokens, logprobs)} from continuous batching, and every fastattn call it made."""
    config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                           pad_token_id=0)
    # A small cache: sized from free memory by default, it takes tens of GB on a large machine,
    # and "sdpa" builds masks as wide as it.
    cb_options = {"num_blocks": 16, "max_batch_tokens": 64, **cb_options}
    cb_config = transformers.ContinuousBatchingConfig(return_logprobs=True, **cb_options)
    with torch.no_grad(), hf.record_backends(all_threads=True) as records:
        out = model.generate_batch(batch, generation_config=config, continuous_batching_config=cb_config)
    results = {int(request_id.removeprefix("req_")): result for request_id, result in out.items()}
    assert sorted(results) == list(range(len(batch)))
    return {i: (r.generated_tokens, torch.tensor(r.logprobs)) for i, r in results.items()}, records


def generate_each(model, impl, batch, new_tokens):
    """The same prompts one by one through ``model.generate`` with Transformers' ``impl``:
    {prompt index: (tokens, log-probabilities of those tokens, logits)}."""
    hf.set_attn_implementation(model, impl)
    results = {}
    for i, prompt in enumerate(batch):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt], device=DEVICE), max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[0, len(prompt):]
        logits = torch.cat(out.logits).float()  # (new_tokens, vocab)
        logprobs = logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
        results[i] = (tokens.tolist(), logprobs.cpu(), logits.cpu())
    return results


def check_records(model, records, new_tokens, backend):
    layers = model.config.num_hidden_layers
    assert records, "fastattn saw no attention call from continuous batching"
    assert len(records) % layers == 0 and len(records) >= layers * new_tokens, len(records)
    assert {r.layout for r in records} == {"varlen"}, {r.layout for r in records}
    assert {r.backend for r in records} == {backend}, [(r.backend, r.why_not_triton) for r in records[:2]]
    assert records[0].shape[2] == sum(PROMPT_LENGTHS)  # the first batch: every prompt, packed


def peaked(model, factor: float = 8.0):
    """The model with its query and key projections scaled up: a randomly initialized model's
    attention is close to uniform, so that its outputs barely depend on which keys each query
    sees. Scaled, the scores spread over several units and a wrong key set changes the tokens."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(factor)
    return model


def reference_impl(arch: str) -> str:
    # Transformers' SDPA path drops Gemma2's softcap (5.17 still offers it) and has no sinks
    return "eager" if arch in ("gemma2", "gpt_oss") else "sdpa"


def teacher_forced_logprobs(model, impl, prompt, tokens):
    """The log-probabilities of ``tokens`` after ``prompt``, from one forward of the whole
    sequence with Transformers' ``impl`` (every step compared, even after a token differs)."""
    hf.set_attn_implementation(model, impl)
    ids = torch.tensor([prompt + tokens[:-1]], device=DEVICE)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(tokens, device=DEVICE)[:, None])[:, 0].cpu(), logits


def assert_transformers_tokens(model, arch, batch, new_tokens, got):
    """fp32: ``got`` (from fastattn's continuous batching) holds the tokens of ``model.generate``
    and of Transformers' own continuous batching on the reference attention, and the
    log-probabilities one forward of each whole sequence gives."""
    impl = reference_impl(arch)
    ref = generate_each(model, impl, batch, new_tokens)
    hf.set_attn_implementation(model, impl)
    ref_batched, _ = generate_batch(model, batch, new_tokens)  # Transformers' own continuous batching
    for i, prompt in enumerate(batch):
        tokens, logprobs = got[i]
        assert tokens == ref[i][0], f"{arch} prompt {i}: {tokens} vs {impl} {ref[i][0]}"
        assert tokens == ref_batched[i][0], f"{arch} prompt {i}: {tokens} vs {impl} batched {ref_batched[i][0]}"
        forced, _ = teacher_forced_logprobs(model, impl, prompt, tokens)
        assert (logprobs - forced).abs().max().item() <= 1e-4, (logprobs, forced)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2", "gpt_oss"])
def test_generate_batch_fp32_same_tokens(arch):
    """llama: GQA (4 query heads, 2 KV heads); mistral: a sliding window (4) shorter than the
    prompts; gemma2: sliding and full layers with softcap; gpt_oss: sinks and sliding layers."""
    new_tokens = 6
    model = peaked(make_model(arch, torch.float32, attn="fastattn"))
    batch = prompts()
    got, records = generate_batch(model, batch, new_tokens)
    assert model.config._attn_implementation == hf.NAME  # put back after the run
    check_records(model, records, new_tokens, backend="sdpa")  # fp32: fastattn's exact fallback runs varlen
    assert_transformers_tokens(model, arch, batch, new_tokens, got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_generate_batch_half_runs_the_kernel(dtype):
    """Half precision: the Triton kernel runs every packed batch (varlen), and the log-probability
    of each generated token is the one Transformers' SDPA gives the same sequence in the same
    dtype, within the model tolerance for the dtype."""
    new_tokens = 4
    model = peaked(make_model("llama", dtype, attn="fastattn"))
    batch = prompts()
    got, records = generate_batch(model, batch, new_tokens)
    check_records(model, records, new_tokens, backend="triton")
    atol, rtol = TOL[dtype]
    for i, prompt in enumerate(batch):
        tokens, logprobs = got[i]
        ref, logits = teacher_forced_logprobs(model, "sdpa", prompt, tokens)
        bound = 2 * (atol + rtol * logits.abs().max().item())  # a log-probability moves by <= 2x the logits' error
        diff = (logprobs - ref).abs().max().item()
        assert diff <= bound, f"prompt {i}: log-probabilities {logprobs} vs sdpa {ref} (allowed {bound:.3e})"


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_generate_batch_chunked_prefill(arch):
    """A batch budget of 8 tokens splits the prompts into chunks: a chunk after the first is one
    sequence with more keys (its cached tokens) than queries, whose diagonal is bottom-right."""
    new_tokens = 3
    model = peaked(make_model(arch, torch.float32, attn="fastattn"))
    batch = prompts((13, 3))
    got, records = generate_batch(model, batch, new_tokens, max_batch_tokens=8)
    assert any(1 < r.shape[2] < r.shape[3] for r in records), [r.shape for r in records]  # a chunk with a past
    # one sequence's first chunk alone (as many keys as queries) is a plain causal call
    assert all(r.layout == "varlen" or r.shape[2] == r.shape[3] for r in records), [(r.layout, r.shape)
                                                                                for r in records]
    assert_transformers_tokens(model, arch, batch, new_tokens, got)


def test_patched_sdpa_runs_through_fastattn():
    """``fastattn.patch()`` and a model on "sdpa": Transformers' continuous batching runs it on
    "sdpa" (5.24, with its masks: dense masked calls) or "paged|sdpa" (5.17: patched too, as
    paged|fastattn, varlen), and those calls run through fastattn on the generation thread."""
    new_tokens = 3
    model = peaked(make_model("llama", torch.float32, attn="sdpa"))
    batch = prompts()
    ref, _ = generate_batch(model, batch, new_tokens)
    hf.patch()
    try:
        got, records = generate_batch(model, batch, new_tokens)
    finally:
        hf.unpatch()
    assert len(records) >= model.config.num_hidden_layers * new_tokens
    assert not hf.is_patched()
    assert [got[i][0] for i in range(len(batch))] == [ref[i][0] for i in range(len(batch))]


def test_record_backends_all_threads_only_while_open():
    """Calls on another thread reach a recorder opened with all_threads=True, and only while it is open."""
    import threading

    model = make_model("llama", torch.float32, attn="fastattn")
    ids = torch.randint(1, VOCAB, (1, 6), device=DEVICE)

    def forward():
        with torch.no_grad():
            model(input_ids=ids)

    def on_thread():
        thread = threading.Thread(target=forward)
        thread.start()
        thread.join()

    with hf.record_backends() as this_thread, hf.record_backends(all_threads=True) as every_thread:
        on_thread()
    assert this_thread == [] and len(every_thread) == model.config.num_hidden_layers
    on_thread()
    assert len(every_thread) == model.config.num_hidden_layers


@pytest.mark.parametrize("impl", ["eager", "sdpa", "fastattn"])
def test_only_fastattn_models_skip_transformers_choice(impl):
    """Transformers' own switch_to_cb_friendly_attn decides for every other name (and may move
    sdpa/eager models to flash attention); a "fastattn" model stays on fastattn, under the name
    this Transformers' continuous batching runs it by."""
    from transformers.generation.continuous_batching import continuous_api

    installed = continuous_api.ContinuousBatchingManager.switch_to_cb_friendly_attn
    assert hasattr(installed, hf._OURS), "register() did not wrap switch_to_cb_friendly_attn"
    transformers_choice = []
    switch = hf._cb_friendly(lambda self, model, *args, **kwargs: transformers_choice.append("flash_attention_2"))
    model = make_model("llama", torch.float32, attn=impl)
    manager = object.__new__(continuous_api.ContinuousBatchingManager)
    manager._original_attn_impl = None
    switch(manager, model, True)
    if impl != hf.NAME:
        assert transformers_choice == ["flash_attention_2"]
        return
    assert transformers_choice == []
    expected = hf.PAGED_NAME if hf._attention_updates_cache() else hf.NAME
    assert model.config._attn_implementation == expected
    assert manager._original_attn_impl == (hf.NAME if expected != hf.NAME else None)


def test_paged_name_needs_the_paged_cache():
    model = make_model("llama", torch.float32)
    attention = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16, device=DEVICE)
    k = torch.randn(1, 2, 3, 16, device=DEVICE)
    with pytest.raises(ValueError, match="paged cache"):
        hf.paged_attention_forward(attention, q, k, k, None)
