"""Ring attention (fastattn.distributed) over gloo, several processes on CPU with the
Triton kernels through the interpreter: each rank's out and gradients, put back in
sequence order, against one process's fp64 reference over the whole sequence."""
import os
import zlib
from pathlib import Path

import pytest
import torch

from fastattn.distributed import ring_blocks, ring_flash_attn_func, sequence_slices, shard_sequence, unshard_sequence
from fastattn.testing import GRADIENT_FACTOR, assert_close_by_rule, reference_attention, reference_gradients

from ._ranks import run_ranks


# name: (world, dtype, causal, layout, total length, query heads, K/V heads, head dim)
CASES = {
    "fp16-causal-zigzag-gqa": (2, torch.float16, True, "zigzag", 32, 4, 2, 16),
    "bf16-causal-zigzag-uneven": (2, torch.bfloat16, True, "zigzag", 29, 2, 2, 16),
    "bf16-full-contiguous-gqa": (2, torch.bfloat16, False, "contiguous", 24, 2, 1, 32),
    "fp16-full-zigzag-uneven": (2, torch.float16, False, "zigzag", 27, 2, 2, 16),
    "fp16-causal-contiguous-uneven": (2, torch.float16, True, "contiguous", 27, 2, 1, 16),
    "bf16-causal-zigzag-gqa-4ranks": (4, torch.bfloat16, True, "zigzag", 37, 4, 2, 16),
    "fp16-full-zigzag-4ranks": (4, torch.float16, False, "zigzag", 26, 2, 1, 16),
}


def _inputs(dtype, total, hq, hkv, dim):
    q = torch.randn(1, total, hq, dim, dtype=dtype)
    k = torch.randn(1, total, hkv, dim, dtype=dtype)
    v = torch.randn(1, total, hkv, dim, dtype=dtype)
    do = torch.randn(1, total, hq, dim, dtype=dtype)
    return dict(q=q, k=k, v=v, do=do)


def _launch(world, cases, tmp: Path):
    """Run tests/_distributed_worker.py on ``world`` ranks as torchrun would; returns each rank's results."""
    torch.save(cases, tmp / "cases.pt")
    run_ranks(world, "_distributed_worker.py", [str(tmp / "cases.pt"), str(tmp)])
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def ring_results(tmp_path_factory):
    """``results(name)`` -> (inputs, per-rank results): one launch per world size for all of
    its cases, on first use (each interpreter process is slow to start)."""
    torch.manual_seed(zlib.crc32(f"{__name__}:{os.environ.get('RING_TEST_DRAW', '')}".encode()))  # reproducible
    # Every other case leaves total_seqlen to be gathered from the ranks' slices.
    inputs = {name: dict(_inputs(dtype, total, hq, hkv, dim), causal=causal, layout=layout, pass_total=i % 2 == 0)
              for i, (name, (world, dtype, causal, layout, total, hq, hkv, dim)) in enumerate(CASES.items())}
    done = {}

    def results(name):
        world = CASES[name][0]
        if world not in done:
            mine = {n: c for n, c in inputs.items() if CASES[n][0] == world}
            done[world] = _launch(world, mine, tmp_path_factory.mktemp(f"ring{world}"))
        return inputs[name], [done[world][r][name] for r in range(world)]

    return results


@pytest.mark.slow  # spawns gloo ranks running the interpreter: the slow tier (--full)
@pytest.mark.parametrize("name", list(CASES))
def test_ring_attention_equals_one_process(ring_results, name):
    case, per_rank = ring_results(name)
    layout, causal = case["layout"], case["causal"]
    t = {n: case[n].transpose(1, 2) for n in ("q", "k", "v", "do")}  # the reference's (B, H, L, E)
    ref, ref_lse = reference_attention(t["q"], t["k"], t["v"], causal=causal)
    ref_lowp, _ = reference_attention(t["q"], t["k"], t["v"], causal=causal, compute_dtype=None)
    got = {n: unshard_sequence([r[n] for r in per_rank], layout=layout, dim=1) for n in ("out", "dq", "dk", "dv")}
    got["lse"] = unshard_sequence([r["lse"] for r in per_rank], layout=layout, dim=2)
    assert got["out"].dtype == case["q"].dtype
    assert_close_by_rule(got["out"].transpose(1, 2), ref, ref_lowp, what="out")
    torch.testing.assert_close(got["lse"].double(), ref_lse, atol=1e-4, rtol=1e-4)
    grads = reference_gradients(t["q"], t["k"], t["v"], t["do"], causal=causal)
    grads_lowp = reference_gradients(t["q"], t["k"], t["v"], t["do"], causal=causal, compute_dtype=None)
    for n, r, r_lowp in zip(("dq", "dk", "dv"), grads, grads_lowp):
        like = case[n[1]]
        assert got[n].shape == like.shape and got[n].dtype == like.dtype, f"{n}: {got[n].shape} {got[n].dtype}"
        assert_close_by_rule(got[n].transpose(1, 2), r, r_lowp, factor=GRADIENT_FACTOR, what=n)


@pytest.mark.slow
def test_transformers_llama_context_parallel_equals_one_process(tmp_path):
    """A tiny Llama with attn_implementation="fastattn_ring" on 2 ranks, each holding its zigzag
    slice of one 30-token sequence (and of its position ids), in bf16 on the Triton kernel: the
    logits and the embedding gradient of the summed logits equal one process's (within 2x / 3x
    the single-process bf16 model's error against the fp32 model)."""
    transformers = pytest.importorskip("transformers")
    import fastattn  # noqa: F401  (registers "fastattn")

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    ids = torch.randint(0, 96, (1, 30))
    torch.save(ids, tmp_path / "ids.pt")
    run_ranks(2, "_cp_worker.py", [str(tmp_path)])
    ranks = [torch.load(tmp_path / f"cp-rank{r}.pt") for r in range(2)]

    def one_process(dtype):
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fastattn",
                                                                  dtype=dtype)
        logits = model(input_ids=ids, use_cache=False).logits
        logits.float().sum().backward()
        return logits.detach().double(), model.get_input_embeddings().weight.grad.double()

    ref_logits, ref_grad = one_process(torch.float32)
    lowp_logits, lowp_grad = one_process(torch.bfloat16)
    logits = unshard_sequence([r["logits"] for r in ranks], dim=1)
    assert logits.dtype == torch.bfloat16 and logits.shape == ref_logits.shape
    assert_close_by_rule(logits, ref_logits, lowp_logits, what="logits")
    for r in ranks:
        assert_close_by_rule(r["grad"], ref_grad, lowp_grad, factor=GRADIENT_FACTOR, what="embedding grad")


def test_transformers_ring_refuses_outside_context_parallel():
    from fastattn.distributed import transformers_attention

    q = torch.randn(1, 2, 8, 16, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="context_parallel"):
        transformers_attention(torch.nn.Module(), q, q, q, None)


# --------------------------------------------------------------------------- layouts, in one process


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world,total", [(2, 32), (2, 29), (3, 17), (4, 37), (4, 5)])
def test_slices_cover_the_sequence_once(layout, world, total):
    x = torch.arange(total).view(1, total)
    shards = [shard_sequence(x, r, world, layout=layout) for r in range(world)]
    assert torch.equal(unshard_sequence(shards, layout=layout), x)
    assert sorted(torch.cat(shards, dim=1).tolist()[0]) == list(range(total))


def test_zigzag_balances_causal_work():
    world, total = 4, 64
    work = []
    for r in range(world):
        q = sequence_slices(total, world, r)
        work.append(sum(sum(min(qs + i + 1, ks + kn) - ks for i in range(qn) if qs + i >= ks)
                        for qs, qn in q for src in range(world) for ks, kn in sequence_slices(total, world, src)))
    assert len(set(work)) == 1, work


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world,total", [(2, 32), (2, 29), (3, 20), (4, 37)])
@pytest.mark.parametrize("causal", [True, False])
def test_ring_blocks_cover_the_mask_once(layout, world, total, causal):
    """The kernel calls of all ring steps, with their causal arguments, mark every (query,
    key) pair the global mask allows exactly once and nothing else."""
    seen = torch.zeros(total, total, dtype=torch.int64)
    for r in range(world):
        q_pos = torch.cat([torch.arange(s, s + n) for s, n in sequence_slices(total, world, r, layout)])
        for src in range(world):
            k_pos = torch.cat([torch.arange(s, s + n) for s, n in sequence_slices(total, world, src, layout)])
            for q_lo, q_hi, k_lo, k_hi, (left, right), diag in ring_blocks(
                    sequence_slices(total, world, r, layout), sequence_slices(total, world, src, layout), causal):
                assert left == -1 and right in (-1, 0)
                i = torch.arange(q_hi - q_lo).view(-1, 1)
                j = torch.arange(k_hi - k_lo).view(1, -1)
                keep = (j <= i + diag) if right == 0 else torch.ones(q_hi - q_lo, k_hi - k_lo, dtype=torch.bool)
                qi, kj = q_pos[q_lo:q_hi].view(-1, 1).expand_as(keep), k_pos[k_lo:k_hi].view(1, -1).expand_as(keep)
                seen.index_put_((qi[keep], kj[keep]), torch.ones(int(keep.sum()), dtype=torch.int64), accumulate=True)
    want = torch.ones(total, total, dtype=torch.int64)
    if causal:
        want = torch.tril(want)
    assert torch.equal(seen, want)


def test_refusals_name_what_is_supported():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        ring_flash_attn_func(q, q, q)
    h = q.half()
    with pytest.raises(ValueError, match="multiple of K/V heads"):
        ring_flash_attn_func(torch.randn(1, 8, 3, 16).half(), h, h)
    with pytest.raises(ValueError, match="layout='striped'"):
        ring_flash_attn_func(h, h, h, layout="striped")
