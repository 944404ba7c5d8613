"""Transformers' tensor parallelism (``tp_plan="auto"``) with attn_implementation="fastattn":
a tiny Llama (4 query heads, 2 K/V heads) on 2 gloo ranks on CPU, launched as torchrun would;
each rank's attention sees its local heads (2 query, 1 K/V: one K/V head per rank), and the
logits equal the single-process model's: float32 (fastattn's fp32 path) to float32 rounding,
bfloat16 (the Triton kernel, through the interpreter) within twice the single-process bf16
model's own error against the float32 model."""
from pathlib import Path

import pytest
import torch

from ._ranks import run_ranks

transformers = pytest.importorskip("transformers")

WORLD = 2

pytestmark = pytest.mark.slow  # spawns gloo ranks: the slow tier (--full)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tp")
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path)
    torch.save(torch.randint(0, 128, (2, 23)), path / "ids.pt")
    return path


def _launch(path: Path, dtype: str):
    run_ranks(WORLD, "_tp_worker.py", [str(path), dtype], timeout=600, LOCAL_WORLD_SIZE=str(WORLD))
    return [torch.load(path / f"{dtype}-rank{r}.pt") for r in range(WORLD)]


def _single_process(path: Path, dtype):
    from transformers import AutoModelForCausalLM

    import fastattn  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastattn", dtype=dtype)
    with torch.no_grad():
        return model(torch.load(path / "ids.pt")).logits


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tensor_parallel_llama_equals_one_process(tiny_llama, dtype):
    ranks = _launch(tiny_llama, dtype)
    b, l = torch.load(tiny_llama / "ids.pt").shape
    for r, res in enumerate(ranks):
        # 2 layers, each on this rank's heads: 4 / 2 query heads, 2 / 2 K/V heads.
        assert [s[:2] for s in res["shapes"]] == [((b, 2, l, 16), (b, 1, l, 16))] * 2, (r, res["shapes"])
        # bf16 runs the Triton kernel; float32 runs fastattn's fp32 path (torch's SDPA math).
        assert res["backends"] == (["triton"] if dtype == "bfloat16" else ["sdpa"]), res["backends"]
    ref = _single_process(tiny_llama, torch.float32).double()
    if dtype == "float32":
        for res in ranks:
            torch.testing.assert_close(res["logits"].double(), ref, atol=2e-5, rtol=1e-5)
        return
    one = _single_process(tiny_llama, torch.bfloat16).double()
    bound = 2 * (one - ref).abs().max().item() + 1e-5
    for r, res in enumerate(ranks):
        err = (res["logits"].double() - ref).abs().max().item()
        assert res["logits"].dtype == torch.bfloat16
        assert err <= bound, f"rank {r}: tensor-parallel bf16 logits off by {err:.3e} (one process: {bound:.3e} bound)"
