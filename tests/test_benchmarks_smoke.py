"""The benchmark harness runs and writes what it promises. A smoke test: no timing is judged here."""
import csv
import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.report import COLUMNS, table

REPO = Path(__file__).resolve().parent.parent


def test_cpu_mode_writes_its_csv(tmp_path):
    # A clean environment: the harness must pick fastattn's backend by itself (no interpreter, no forcing).
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTATTN_BACKEND", "FASTATTN_STRICT")}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.attention", "--cpu", "--quick", "--no-interpreter", "--no-plot",
         "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "attention.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert {r["provider"] for r in rows} == {"sdpa:auto", "fastattn:auto", "fastattn:sdpa"}
    assert len({r["case"] for r in rows}) == 2
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
        assert float(r["max_diff"]) < 1e-4  # fp32, same math as torch's SDPA
        assert r["timestamp"] and r["commit"] and r["torch"]
    assert "== cpu" in done.stdout  # the compact table is printed


def test_table_shows_why_a_provider_could_not_run():
    common = dict(timestamp="t", commit="c", device="GPU", torch="x", triton="y", cuda="z", grid="key", mode="fwd",
                  case="bf16 d128 h16 B8 L2k full", dtype="bf16", batch=8.0, heads_q=16.0, heads_kv=16.0,
                  seqlen_q=2048.0, seqlen_k=2048.0, head_dim=128.0, causal=0.0, padded=0.0, layout="bshd")
    nan = math.nan
    rows = [
        dict(common, provider="fastattn:triton", backend="triton", status="ok", reason="", p50_ms=1.0, tflops=300.0),
        dict(common, provider="fastattn:auto", backend="triton", status="ok", reason="", p50_ms=1.01, tflops=297.0),
        dict(common, provider="sdpa:flash", backend="sdpa:flash", status="ok", reason="", p50_ms=2.0, tflops=150.0),
        dict(common, provider="sdpa:math", backend="", status="skip", reason="needs a smaller head dim",
             p50_ms=nan, tflops=nan),
    ]
    text = table(rows)
    assert "300 2.00x" in text  # TFLOP/s and speed relative to the best torch SDPA backend
    assert "1.010" in text  # automatic dispatch over its best own backend
    assert "sdpa:math skip" in text and "needs a smaller head dim" in text


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_transformers_model_decode_repeats_one_step(tmp_path):
    # The GPU times one decode step hundreds of times on a StaticCache with one free slot: each
    # call must rewrite that slot (Transformers 5.x caches advance their own write position).
    pytest.importorskip("transformers")
    import torch

    from benchmarks.model import COLUMNS as MODEL_COLUMNS, TINY, main, transformers_measures

    torch.manual_seed(0)
    ids = torch.randint(0, TINY.vocab, (2, 32))
    step_ids = torch.randint(0, TINY.vocab, (2, 1))
    setup, measures_of = transformers_measures(TINY, torch.device("cpu"), torch.float32, ids, torch.tensor([16, 24]),
                                               step_ids, dctx=40)
    for impl in ("sdpa", "fastattn"):
        setup(impl)
        decode = measures_of(impl)["decode"][0]
        with torch.no_grad():
            logits = [decode().logits for _ in range(20)]
        assert all(torch.equal(x, logits[0]) for x in logits), impl

    # The command the GPU check runs, at a decode context longer than the prefill.
    csv_path = tmp_path / "model.csv"
    assert main(["--tiny", "--transformers", "--prefill", "2x32", "--decode", "2x48", "--csv", str(csv_path)]) == 0
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == MODEL_COLUMNS
        rows = list(reader)
    assert [(r["attention"], r["measure"]) for r in rows] == [  # each measure's attentions timed in turns
        (a, m) for m in ("prefill", "prefill padded", "decode") for a in ("sdpa", "fastattn")]
    assert all(float(r["speed_vs_sdpa"]) > 0 for r in rows)
    assert all(r["status"] == "ok" for r in rows), rows
    assert {r["context"] for r in rows if r["measure"] == "decode"} == {"48"}


def test_appending_new_columns_to_an_old_csv_keeps_rows_aligned(tmp_path):
    from benchmarks.report import append_rows

    path = tmp_path / "sweep.csv"
    append_rows(path, [dict(case="old", ms=1.5)], ["case", "ms"])
    append_rows(path, [dict(case="new", mask="rows", ms=2.5)], ["case", "mask", "ms"])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [dict(case="old", mask="", ms="1.5"), dict(case="new", mask="rows", ms="2.5")]


def test_overhead_mode_runs_side_by_side_and_writes_its_csv(tmp_path):
    """python -m benchmarks.overhead: each fastattn call beside its torch / Transformers counterpart,
    a table and a CSV row per case (figures not judged)."""
    from benchmarks.overhead import COLUMNS as OVERHEAD_COLUMNS

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTATTN_BACKEND", "FASTATTN_STRICT")}
    csv_path = tmp_path / "overhead.csv"
    done = subprocess.run([sys.executable, "-m", "benchmarks.overhead", "--quick", "--csv", str(csv_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == OVERHEAD_COLUMNS
        rows = list(reader)
    counterparts = {r["counterpart"] for r in rows}
    assert {"F.scaled_dot_product_attention", "F.sdpa on (B, H, S, D) views"} <= counterparts
    if importlib.util.find_spec("transformers") is not None:
        assert {"sdpa_attention_forward", "masking_utils.sdpa_mask"} <= counterparts
    for r in rows:
        if r["counterpart"].startswith("(none"):  # fastattn's host work alone: nothing to compare
            assert r["theirs_min_us"] == r["ratio"] == "" and float(r["extra_us"]) == float(r["fastattn_min_us"])
        else:
            assert 0 < float(r["theirs_min_us"]) <= float(r["theirs_p50_us"])
        assert 0 < float(r["fastattn_min_us"]) <= float(r["fastattn_p50_us"])
        assert r["threads"] == "1"
    alone = {r["case"] for r in rows if r["counterpart"].startswith("(none")}
    assert "varlen: decode, 8 seqs (checks + choice)" in alone
    if importlib.util.find_spec("triton") is not None:
        assert "flash_attn_func -> triton, kernel stubbed" in alone
    assert "extra" in done.stdout and "sdpa: decode" in done.stdout


def test_model_generate_mode_writes_a_ratio_per_model_and_padding(tmp_path):
    """python -m benchmarks.model --generate, at its smallest: one model, one timed step."""
    pytest.importorskip("transformers")
    from benchmarks.model import COLUMNS as MODEL_COLUMNS, main

    csv_path = tmp_path / "model.csv"
    assert main(["--generate", "--generate-models", "tiny-llama-8L", "--generate-steps", "2", "--repeats", "1",
                 "--csv", str(csv_path)]) == 0
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == MODEL_COLUMNS
        rows = list(reader)
    assert [(r["attention"], r["measure"]) for r in rows] == [
        (a, f"generate step, {p} padding") for p in ("none", "left") for a in ("sdpa", "fastattn")]
    assert all(r["status"] == "ok" and r["reason"] == "" and float(r["speed_vs_sdpa"]) > 0 for r in rows), rows


def test_unpadded_stage_checks_and_times_every_case_and_says_where_unpadding_wins():
    """benchmarks.unpadded on the CPU (the kernel through the interpreter, a stand-in timer)."""
    pytest.importorskip("transformers")
    import torch

    from benchmarks.unpadded import rows, verdict

    timings = iter(range(1, 1000))
    got = list(rows([20], 2, [0.0, 0.5], torch.float16, "cpu", timer=lambda fn: (fn(), float(next(timings)))[1]))
    assert [(r["provider"], r["side"]) for r in got] == [(p, s) for s in ("right", "right", "left")
                                                          for p in ("unpadded", "masked", "torch_sdpa")]
    assert [r["ran_varlen"] for r in got if r["provider"] == "unpadded"] == [True, True, True]
    fake = [dict(provider="unpadded", side="right", padding=p, speedup=x) for p, x in
            [(0.25, 0.9), (0.5, 1.2), (0.25, 1.1), (0.5, 1.3)]]
    assert "from 0.50" in verdict(fake)
    assert "lost" in verdict([dict(fake[0], padding=0.5)])


def test_continuous_batching_row_compares_equal_work():
    """The overhead benchmark's GPU-only continuous-batching row: fastattn's packed call and
    Transformers' sdpa path with the block mask give the same output."""
    pytest.importorskip("transformers")
    import torch
    from transformers import LlamaConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import LlamaAttention

    from benchmarks.overhead import continuous_batching_inputs
    from fastattn.integrations import transformers as hf

    config = LlamaConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                         intermediate_size=128, num_hidden_layers=1, vocab_size=100)
    module = LlamaAttention(config, layer_idx=0).eval()
    q, k, v, block, kwargs = continuous_batching_inputs(module, lengths=(5, 1, 17))
    with torch.no_grad():
        theirs, _ = sdpa_attention_forward(module, q, k, v, block, dropout=0.0, scaling=module.scaling)
        ours, _ = hf.attention_forward(module, q, k, v, None, dropout=0.0, scaling=module.scaling, **kwargs)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
