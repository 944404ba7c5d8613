"""The ``cuda`` backend (csrc/ via fastattn/_extension.py).

Without a GPU: every refusal has its reason, the extension's not-built / failed-build /
failed-load paths become reasons (logged once) instead of errors, the fake
implementation's shapes, the padding helper. On a GPU (``-m gpu``): the Triton kernel's
accuracy grid against an fp64 reference, plus decode (split-KV) and per-batch key lengths.
"""
import logging
from pathlib import Path

import pytest
import torch

from fastattn import _device, _extension, dispatch
from fastattn.backends.cuda import CudaBackend, padded_head_dim, prepare
from fastattn.inputs import Features, from_flash_args, from_sdpa_args, with_extras
from fastattn.ops.cuda_fwd import fwd_fake
from fastattn.testing import assert_close_by_rule, assert_lse_close, reference_attention

def _features(**change) -> Features:
    q, k = torch.empty(2, 10, 8, 128, dtype=torch.float16), torch.empty(2, 30, 2, 128, dtype=torch.float16)
    call = from_flash_args(q, k, k, causal=True, softcap=30.0, return_lse=True)
    return call.features._replace(device_type="cuda", device_index=0, **change)


GOOD = _features()


@pytest.fixture
def fresh_extension(monkeypatch, tmp_path):
    """A process that sees a GPU, has no extension loaded and an empty cache."""
    monkeypatch.setenv(_extension.ENV_CACHE, str(tmp_path))
    monkeypatch.delenv(_extension.ENV_ARCHS, raising=False)
    monkeypatch.delenv(_extension.ENV_JIT, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(_extension, "visible_archs", lambda: ("9.0",))
    monkeypatch.setattr(_extension, "_aot_library", lambda: None)
    monkeypatch.setattr(_extension, "_op_loaded", lambda: False)
    _extension.reset()
    dispatch._decide.cache_clear()
    yield
    _extension.reset()
    dispatch._decide.cache_clear()


@pytest.fixture
def loaded_extension(monkeypatch):
    """Pretend the extension is loaded with every head dim on an sm_90 GPU."""
    status = _extension.ExtensionStatus(True, None, "/fake/fastattn_cuda.so", _extension.ALL_HEAD_DIMS)
    monkeypatch.setattr(_extension, "load", lambda: status)
    monkeypatch.setattr(_device, "capability", lambda index: (9, 0))



# --------------------------------------------------------------------------- reasons (no GPU)


def test_supported_features_have_no_reasons(loaded_extension):
    assert CudaBackend().not_supported_reasons(GOOD) == []
    assert CudaBackend().not_supported_reasons(
        GOOD._replace(mask_dtype=torch.bool, mask_key_padding=True)) == []  # one row per sequence
    for head_dim in (1, 59, 64, 96, 111, 200, 256):
        assert CudaBackend().not_supported_reasons(GOOD._replace(head_dim=head_dim, head_dim_v=64)) == []


@pytest.mark.parametrize("change, expected", [
    (dict(device_type="cpu", device_index=None), "query is on cpu; the cuda backend needs tensors on a CUDA device"),
    (dict(dtype=torch.float32), "dtype torch.float32 is not supported (supported: float16, bfloat16)"),
    (dict(head_dim=320), "head_dim=320 is too large (supported: <= 256)"),
    (dict(head_dim_v=512), "head_dim=512 is too large (supported: <= 256)"),
    (dict(empty=True), "an empty sequence or head dim"),
    (dict(last_dim_contiguous=False), "the last dim of q, k and v must be contiguous (stride 1)"),
    (dict(mask_dtype=torch.bool), "an attn_mask (torch.bool) that varies over heads or query rows"),
    (dict(mask_dtype=torch.float16, mask_key_padding=True), "an attn_mask (torch.float16) that varies over heads"),
    (dict(has_alibi=True), "ALiBi slopes are not supported"),
    (dict(dropout=True), "dropout_p > 0 is not supported"),
    (dict(has_sinks=True), "attention sinks are not supported"),
    (dict(needs_grad=True), "forward-only"),
])
def test_each_refused_input_has_its_reason(loaded_extension, change, expected):
    reasons = CudaBackend().not_supported_reasons(GOOD._replace(**change))
    assert len(reasons) == 1 and expected in reasons[0], reasons


def test_old_gpu_is_refused(loaded_extension, monkeypatch):
    monkeypatch.setattr(_device, "capability", lambda index: (7, 5))
    assert CudaBackend().not_supported_reasons(GOOD) == [
        "GPU compute capability 7.5 is too old (the cuda backend needs 8.0 or newer)"]


def test_reasons_are_all_collected(loaded_extension):
    reasons = CudaBackend().not_supported_reasons(
        GOOD._replace(dtype=torch.float32, head_dim=512, has_alibi=True, dropout=True))
    assert len(reasons) == 4


def test_head_dims_limited_at_build_time(monkeypatch):
    status = _extension.ExtensionStatus(True, None, "/fake.so", (64, 128))
    monkeypatch.setattr(_extension, "load", lambda: status)
    monkeypatch.setattr(_device, "capability", lambda index: (8, 0))
    reasons = CudaBackend().not_supported_reasons(GOOD._replace(head_dim=200, head_dim_v=200))
    assert reasons == ["head_dim=200 is too large (supported: <= 128) (compiled: 64, 128)"]


def test_cpu_call_is_refused_without_touching_the_extension(monkeypatch):
    def fail():
        raise AssertionError("the extension must not be loaded for a CPU call")

    monkeypatch.setattr(_extension, "load", fail)
    q, k = torch.randn(1, 2, 3, 64, dtype=torch.float16), torch.randn(1, 2, 5, 64, dtype=torch.float16)
    call, _ = from_sdpa_args(q, k, k)
    assert CudaBackend().not_supported_reasons(call.features) == [
        "query is on cpu; the cuda backend needs tensors on a CUDA device"]


# --------------------------------------------------------------------------- the extension's failure paths


def test_no_gpu_in_this_process_is_a_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _extension.reset()
    try:
        status = _extension.load()
        assert not status.loaded
        assert "no CUDA device" in status.reason or "CPU-only build" in status.reason
    finally:
        _extension.reset()


def test_missing_nvcc_is_a_reason(fresh_extension, monkeypatch):
    monkeypatch.setattr(_extension, "find_cuda_home", lambda: (None, ["/usr/local/cuda", "/opt/nothing"]))
    status = _extension.load(build=True)
    assert not status.loaded
    assert status.reason.startswith("nvcc not found") and "/opt/nothing" in status.reason
    assert CudaBackend().availability() == [f"the CUDA extension is not available: {status.reason}"]


def test_missing_cutlass_headers_are_a_reason(fresh_extension, monkeypatch):
    monkeypatch.setattr(_extension, "find_cuda_home", lambda: ("/usr/local/cuda", []))
    monkeypatch.setattr(_extension, "_use_cuda_home", lambda root: None)
    monkeypatch.setattr(_extension, "find_cutlass_include", lambda: (None, ["/opt/cutlass/include"]))
    status = _extension.load(build=True)
    assert not status.loaded
    assert "CUTLASS/CuTe headers were not found (tried /opt/cutlass/include)" in status.reason
    assert "pip install nvidia-cutlass" in status.reason


def test_cutlass_headers_found_from_the_environment(monkeypatch, tmp_path):
    for sub in ("cute/tensor.hpp", "cutlass/numeric_types.h"):
        (tmp_path / "include" / sub).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "include" / sub).write_text("")
    monkeypatch.setenv("FASTATTN_CUTLASS_DIR", str(tmp_path))  # a checkout: include/ below it
    assert _extension.find_cutlass_include()[0] == str((tmp_path / "include").resolve())


def test_compile_error_is_a_reason_logged_once_and_cached(fresh_extension, monkeypatch, tmp_path, caplog):
    calls = []

    def broken_compile(directory, archs, head_dims, cutlass_include, **kwargs):
        calls.append(archs)
        raise RuntimeError("Error building extension 'fastattn_cuda'\nflash_api.cpp:1: error: boom")

    monkeypatch.setattr(_extension, "find_cuda_home", lambda: ("/usr/local/cuda", []))
    monkeypatch.setattr(_extension, "_use_cuda_home", lambda root: None)
    monkeypatch.setattr(_extension, "_has_ninja", lambda: True)
    monkeypatch.setattr(_extension, "_compile", broken_compile)
    with caplog.at_level(logging.INFO, logger="fastattn"):
        first = _extension.load(build=True)
        again = _extension.load(build=True)
    assert not first.loaded and first is again and calls == [("9.0",)]
    assert "building the CUDA extension failed" in first.reason and "error: boom" in first.reason
    assert sum("error: boom" in r.getMessage() for r in caplog.records) == 1
    # Another process finds the recorded failure and does not compile again.
    _extension.reset()
    cached = _extension.load(build=True)
    assert calls == [("9.0",)] and "(cached; `python -m fastattn build` retries)" in cached.reason


def test_jit_build_can_be_switched_off(fresh_extension, monkeypatch):
    monkeypatch.setenv(_extension.ENV_JIT, "0")
    status = _extension.load()
    assert not status.loaded and "python -m fastattn build" in status.reason


def test_load_error_is_a_reason(tmp_path):
    bogus = tmp_path / "fastattn_cuda.so"
    bogus.write_text("not a shared library")
    with pytest.raises(_extension.BuildError, match="was built but does not load"):
        _extension._load_library(bogus)


def test_explain_shows_the_cuda_reason(fresh_extension, monkeypatch):
    monkeypatch.setattr(_extension, "find_cuda_home", lambda: (None, ["/nowhere"]))
    monkeypatch.setattr(_device, "capability", lambda index: (9, 0))
    explanation = dispatch._decide(GOOD, None, False, (), False, dispatch.availability())
    assert explanation.chosen != "cuda"
    assert any("not built yet" in r and "python -m fastattn build" in r for r in explanation.reasons("cuda"))
    assert "cuda: cannot run" in str(explanation)


def test_choosing_a_backend_never_builds(fresh_extension, monkeypatch):
    """A build takes minutes: dispatch only loads what exists; forcing the backend builds."""
    builds = []
    monkeypatch.setattr(_extension, "build", lambda *a, **k: builds.append(a) or (_ for _ in ()).throw(
        _extension.BuildError("nvcc not found (test)")))
    monkeypatch.setattr(_extension, "_aot_library", lambda: None)
    monkeypatch.setattr(_extension, "_op_loaded", lambda: False)
    monkeypatch.setattr(_extension, "build_dir", lambda archs, dims: Path("/nonexistent/fastattn-test"))
    monkeypatch.setattr(_extension, "visible_archs", lambda: ("9.0",))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert not _extension.load().loaded and not builds
    assert not CudaBackend().prepare() and len(builds) == 1  # forcing builds (here: fails, a reason)
    assert "nvcc not found (test)" in _extension.load().reason and len(builds) == 1


def test_build_settings_are_validated():
    assert _extension.parse_head_dims("128, 64") == (64, 128)
    assert _extension.parse_archs("8.0;9.0+PTX") == ("8.0", "9.0+PTX")
    assert _extension.arch_flags(("9.0+PTX",)) == ["-gencode=arch=compute_90,code=sm_90",
                                                   "-gencode=arch=compute_90,code=compute_90"]
    with pytest.raises(_extension.BuildError, match="not a head dim"):
        _extension.parse_head_dims("65")
    with pytest.raises(_extension.BuildError, match="older than sm_80"):
        _extension.parse_archs("7.5")
    assert _extension.build_main(["--head-dims", "65"]) == 1


def test_cuda_home_is_the_real_toolkit_root():
    root, tried = _extension.find_cuda_home()
    if root is None:
        pytest.skip(f"no CUDA toolkit here (tried {tried})")
    assert (Path(root) / "bin" / "nvcc").is_file()
    assert _extension._looks_like_cuda_root(root) and root != "/usr/local"


# --------------------------------------------------------------------------- fake implementation, padding


@pytest.mark.parametrize("transposed", [False, True])
def test_fake_shapes_follow_q_layout(transposed):
    if transposed:  # a flash-attn (B, L, H, D) buffer seen as (B, H, L, D)
        q = torch.empty(2, 7, 8, 64, dtype=torch.bfloat16, device="meta").transpose(1, 2)
    else:
        q = torch.empty(2, 8, 7, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2, 2, 33, 64, dtype=torch.bfloat16, device="meta")
    out, lse = fwd_fake(q, k, k, 0.125)
    assert out.shape == (2, 8, 7, 64) and out.dtype == torch.bfloat16
    assert (out.stride(1) < out.stride(2)) == transposed
    assert lse.shape == (2, 8, 7) and lse.dtype == torch.float32


def test_padding_to_a_compiled_head_dim():
    assert [padded_head_dim(d, (64, 96, 128, 256)) for d in (1, 59, 64, 65, 111, 129, 256, 257)] == \
        [64, 64, 64, 96, 128, 256, 256, None]
    t = torch.randn(2, 3, 5, 59)
    padded = prepare(t, 64)
    assert padded.shape == (2, 3, 5, 64) and torch.equal(padded[..., :59], t)
    assert torch.count_nonzero(padded[..., 59:]) == 0
    aligned = torch.randn(2, 5, 3, 64).transpose(1, 2)
    assert prepare(aligned, 64) is aligned  # transposed views are read in place
    odd = torch.randn(2, 3, 5, 72)[..., :64]  # row stride 72 is fine (multiple of 8)
    assert prepare(odd, 64) is odd
    misaligned = torch.randn(2 * 3 * 5 * 64 + 1)[1:].view(2, 3, 5, 64)
    assert prepare(misaligned, 64).data_ptr() % 16 == 0


# --------------------------------------------------------------------------- on a GPU

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _require_extension():
    status = _extension.load(build=True)
    if not status.loaded:
        pytest.fail(f"the CUDA extension did not load on a GPU machine: {status.reason}")


def _check(q, k, v, out, lse, **features):
    """Hold out and lse to an fp64 reference built from the test's own description of the
    call, (B, H, L, E) layout (never from the AttentionCall under test)."""
    ref, ref_lse = reference_attention(q, k, v, **features)
    ref_lowp, _ = reference_attention(q, k, v, compute_dtype=None, **features)
    assert_close_by_rule(out, ref.to(out.dtype), ref_lowp)
    assert_lse_close(lse, ref_lse)


# (L, S) x head dim, each with a dtype, a causal alignment and a GQA shape drawn in turn.
SIZES = [(1, 239), (113, 203), (203, 113), (128, 128)]
HEAD_DIMS = [59, 64, 96, 111, 128, 256]
MODES = ["none", "causal_top_left", "causal_bottom_right"]
GRID = [(L, S, E, (torch.float16, torch.bfloat16)[i % 2], MODES[i % 3], ((4, 4), (8, 2), (6, 1))[i % 3])
        for i, ((L, S), E) in enumerate((s, e) for s in SIZES for e in HEAD_DIMS)]


@pytest.mark.parametrize("L, S, E, dtype, mode, heads", GRID)
@pytest.mark.parametrize("mark", [pytest.param(None, marks=gpu)])
def test_accuracy_grid(L, S, E, dtype, mode, heads, mark):
    _require_extension()
    hq, hkv = heads
    q = torch.randn(2, hq, L, E, device="cuda", dtype=dtype)
    k = torch.randn(2, hkv, S, E, device="cuda", dtype=dtype)
    v = torch.randn(2, hkv, S, E, device="cuda", dtype=dtype)
    if mode == "causal_bottom_right":
        call = from_flash_args(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, return_lse=True)
    else:
        call, _ = from_sdpa_args(q, k, v, is_causal=mode == "causal_top_left", enable_gqa=True)
    assert not CudaBackend().not_supported_reasons(call.features)
    out, lse = CudaBackend().run(call)
    _check(q, k, v, out, lse, causal=mode != "none", lower_right=mode == "causal_bottom_right")


FEATURES = [
    dict(window_size=(32, 8)),
    dict(window_size=(16, -1)),
    dict(window_size=(-1, 40)),
    dict(causal=True, window_size=(64, 0), softcap=30.0),
    dict(softcap=5.0),
]


@pytest.mark.parametrize("kw", FEATURES)
@pytest.mark.parametrize("mark", [pytest.param(None, marks=gpu)])
def test_window_and_softcap(kw, mark):
    _require_extension()
    q = torch.randn(2, 150, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 300, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 300, 2, 64, device="cuda", dtype=torch.bfloat16)
    call = from_flash_args(q, k, v, return_lse=True, **kw)
    out, lse = CudaBackend().run(call)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    _check(t(q), t(k), t(v), out, lse, causal=kw.get("causal", False), lower_right=True,
           window=kw.get("window_size", (-1, -1)), softcap=kw.get("softcap", 0.0))


@pytest.mark.parametrize("mark", [pytest.param(None, marks=gpu)])
def test_value_head_dim_differs(mark):
    _require_extension()
    q = torch.randn(1, 4, 77, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 4, 90, 64, device="cuda", dtype=torch.float16)
    v = torch.randn(1, 4, 90, 40, device="cuda", dtype=torch.float16)
    call, _ = from_sdpa_args(q, k, v, is_causal=True)
    out, lse = CudaBackend().run(call)
    assert out.shape == (1, 4, 77, 40)
    _check(q, k, v, out, lse, causal=True)


@pytest.mark.parametrize("L, S, heads, causal, splits", [
    (1, 4096, (8, 1), False, 0),
    (1, 8192, (32, 8), True, 0),
    (4, 4100, (8, 2), True, 0),
    (16, 5000, (4, 4), True, 0),
    (7, 4096, (8, 2), False, 7),
    (3, 300, (2, 1), True, 64),  # more splits than key tiles: empty splits must weigh nothing
])
@pytest.mark.parametrize("mark", [pytest.param(None, marks=gpu)])
def test_decode_split_kv(L, S, heads, causal, splits, mark):
    _require_extension()
    hq, hkv = heads
    q = torch.randn(2, L, hq, 128, device="cuda", dtype=torch.float16)
    k = torch.randn(2, S, hkv, 128, device="cuda", dtype=torch.float16)
    v = torch.randn(2, S, hkv, 128, device="cuda", dtype=torch.float16)
    call = from_flash_args(q, k, v, causal=causal, return_lse=True)
    out, lse = CudaBackend().run(call, num_splits=splits)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    _check(t(q), t(k), t(v), out, lse, causal=causal, lower_right=True)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mark", [pytest.param(None, marks=gpu)])
def test_key_padding_mask(is_causal, mark):
    """A bool (B, 1, 1, S) mask, as Transformers sends for padded batches."""
    _require_extension()
    q, k, v = (torch.randn(3, heads, 70, 64, device="cuda", dtype=torch.float16) for heads in (4, 2, 2))
    keep = torch.rand(3, 70, device="cuda") > 0.3
    keep[1, :30] = False
    keep[2] = False  # no key at all: out 0, lse +inf
    mask = keep[:, None, None, :].expand(3, 1, 70, 70)
    call, _ = from_sdpa_args(q, k, v, attn_mask=mask, enable_gqa=True)
    call = with_extras(call, causal=is_causal)  # causal beside a mask, as Transformers' integration makes it
    assert CudaBackend().not_supported_reasons(call.features) == []
    out, lse = CudaBackend().run(call)
    kw = dict(scale=call.scale, mask=keep[:, None, None, :], causal=is_causal)
    ref, ref_lse = reference_attention(q, k, v, **kw)
    ref_lowp, _ = reference_attention(q, k, v, compute_dtype=None, **kw)
    assert_close_by_rule(out, ref.to(out.dtype), ref_lowp)
    assert_lse_close(lse, ref_lse)


@pytest.mark.parametrize("lower_right", [False, True])
@pytest.mark.parametrize("mark", [pytest.param(None, marks=gpu)])
def test_per_batch_key_lengths(lower_right, mark):
    _require_extension()
    used = [300, 17, 0]
    q = torch.randn(3, 4, 20, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(3, 2, 300, 64, device="cuda", dtype=torch.float16)
    v = torch.randn(3, 2, 300, 64, device="cuda", dtype=torch.float16)
    k[1, :, 17:] = float("nan")  # padding keys must never be read
    v[1, :, 17:] = float("nan")
    seqused = torch.tensor(used, dtype=torch.int32, device="cuda")
    out, lse = torch.ops.fastattn.fwd(q, k, v, 0.125, -1, 0, lower_right, 0.0, seqused, 0)
    for b, n in enumerate(used):
        if n == 0:
            assert torch.count_nonzero(out[b]) == 0 and torch.isinf(lse[b]).all()
            continue
        ref, ref_lse = reference_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], scale=0.125,
                                           causal=True, lower_right=lower_right)
        ref_lowp, _ = reference_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], scale=0.125,
                                          causal=True, lower_right=lower_right, compute_dtype=None)
        assert_close_by_rule(out[b:b + 1], ref.to(out.dtype), ref_lowp)
        assert_lse_close(lse[b:b + 1], ref_lse)


# Bad inputs for the raw op, each with the message its TORCH_CHECK must give. Run in a
# child process: on the H100 image the messages that format a number crashed the process
# (a library built with a static libstdc++; see _extension.LINK_FLAGS), and a crash must
# fail this test with a native backtrace rather than take the test worker down.
_CPP_CHECK_CHILD = r"""
import json, torch
from fastattn import _extension
status = _extension.load()
assert status.loaded, status.reason
cases = {
    "dtype": lambda: (torch.randn(1, 2, 8, 64, device="cuda"),) * 3,
    "last_dim": lambda: (torch.randn(1, 2, 8, 128, device="cuda", dtype=torch.float16)[..., ::2],) * 3,
    "heads": lambda: (torch.randn(1, 3, 8, 64, device="cuda", dtype=torch.float16),
                      *(torch.randn(1, 2, 8, 64, device="cuda", dtype=torch.float16),) * 2),
}
for name, make in cases.items():
    print("calling", name, flush=True)
    try:
        torch.ops.fastattn.fwd(*make(), 0.125)
        print(json.dumps([name, None]), flush=True)
    except RuntimeError as exc:
        print(json.dumps([name, str(exc).splitlines()[0]]), flush=True)
"""


@pytest.mark.parametrize("mark", [pytest.param(None, marks=gpu)])
def test_cpp_checks_repeat_the_reasons(mark):
    import json
    import os
    import shutil
    import subprocess
    import sys

    _require_extension()
    command = [sys.executable, "-X", "faulthandler", "-c", _CPP_CHECK_CHILD]
    debugger = shutil.which("gdb") or shutil.which("cuda-gdb")  # a native backtrace if it crashes
    if debugger:
        command = [debugger, "-q", "-batch", "-return-child-result", "-ex", "run", "-ex", "bt", "--args", *command]
    env = dict(os.environ, TORCH_SHOW_CPP_STACKTRACES="1", FASTATTN_CUDA_JIT="0")
    child = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    messages = dict(json.loads(line) for line in child.stdout.splitlines() if line.startswith("["))
    assert child.returncode == 0 and len(messages) == 3, (
        f"the op crashed (exit {child.returncode}):\n{child.stdout[-3000:]}\n{child.stderr[-6000:]}")
    assert "is not supported (supported: float16, bfloat16)" in (messages["dtype"] or "")
    assert "the last dim of q, k and v must be contiguous" in (messages["last_dim"] or "")
    assert "must be a multiple of the number of key/value heads" in (messages["heads"] or "")


@pytest.mark.parametrize("mark", [pytest.param(None, marks=gpu)])
def test_opcheck_and_compile_on_gpu(mark):
    _require_extension()
    q = torch.randn(2, 4, 33, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 2, 70, 64, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.fastattn.fwd.default, (q, k, k, 0.125, -1, 0, True, 0.0, None, 0))
    compiled = torch.compile(lambda q, k, v: torch.ops.fastattn.fwd(q, k, v, 0.125)[0] * 2, backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(q, k, k), torch.ops.fastattn.fwd(q, k, k, 0.125)[0] * 2)


def _link_tiny_library(path, static: bool) -> None:
    """A shared library that formats a number through iostreams, linked with or without its
    own copy of libstdc++ (what a compiler forcing -static-libstdc++ does)."""
    import shutil
    import subprocess

    if shutil.which("g++") is None or shutil.which("readelf") is None:
        pytest.skip("needs g++ and readelf")
    source = path.with_suffix(".cpp")
    source.write_text('#include <sstream>\nstd::string f(long x) { std::ostringstream s; s << x; return s.str(); }\n')
    subprocess.run(["g++", "-shared", "-fPIC", str(source), "-o", str(path)] + (["-static-libstdc++"] if static else []),
                   check=True, capture_output=True)


@pytest.mark.parametrize("static", [False, True])
def test_a_library_with_its_own_libstdcxx_is_refused(tmp_path, static):
    lib = tmp_path / "f.so"
    _link_tiny_library(lib, static)
    assert _extension.carries_own_cxx_runtime(lib) is static
    if static:
        with pytest.raises(_extension.BuildError, match="libstdc\\+\\+ linked in statically"):
            _extension._load_library(lib)
    else:
        _extension._check_cxx_runtime(lib)


def test_a_refused_build_stays_refused_in_its_process(tmp_path, monkeypatch):
    """torch's builder loads what it links; a library refused after that must not be used."""
    if torch.version.cuda is None or _extension.find_cuda_home()[0] is None:
        pytest.skip("build() needs a CUDA build of torch and a CUDA toolkit before it compiles")

    def fake_compile(directory, *args, **kwargs):
        _link_tiny_library(_extension._library_path(directory), static=True)

    monkeypatch.setattr(_extension, "_compile", fake_compile)
    monkeypatch.setattr(_extension, "cutlass_include_or_raise", lambda: str(tmp_path))
    monkeypatch.setattr(_extension, "_has_ninja", lambda: True)
    monkeypatch.setattr(_extension, "_refused", None)
    with pytest.raises(_extension.BuildError, match="libstdc\\+\\+ linked in statically"):
        _extension.build(("8.0",), (64,), directory=tmp_path / "build", load_library=False)
    assert not _extension._library_path(tmp_path / "build").exists()
    assert "linked in statically" in (tmp_path / "build" / "build_failed.txt").read_text()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    status = _extension._try_load(build_if_missing=False)
    assert not status.loaded and "linked in statically" in status.reason
