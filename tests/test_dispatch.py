"""Backend choice: reasons, explain, forcing, strictness, torch's sdpa_kernel, and
the device every launch happens on."""
import contextlib
import threading

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastattn
from fastattn import _device, dispatch
from fastattn.inputs import from_sdpa_args
from fastattn.testing import reference_attention

from .conftest import DEVICE


def plain_auto() -> str:
    """Auto dispatch's choice for half_inputs(): triton, except on Hopper GPUs, where
    plain calls go to torch's faster fused SDPA (measured; see dispatch.priority)."""
    if DEVICE == "cuda" and torch.cuda.get_device_capability() >= (9, 0):
        return "sdpa"
    return "triton"


def half_inputs(E=32, dtype=torch.float16):
    q = torch.randn(1, 2, 8, E, device=DEVICE, dtype=dtype)
    return q, torch.randn_like(q), torch.randn_like(q)


def test_explain_lists_every_backend_and_the_choice():
    q, k, v = (t.float() for t in half_inputs())
    report = fastattn.explain(q, k, v)
    text = str(report)
    for name in fastattn.registered_backends():
        assert name in text
    assert report.chosen == "sdpa"
    assert any("float32" in r for r in report.reasons("triton"))
    assert "chosen: sdpa" in text


@pytest.mark.parametrize("make,fragment", [
    (lambda: half_inputs(E=320), "head_dim=320"),
    (lambda: tuple(t.float() for t in half_inputs()), "float32"),
])
def test_reasons_name_the_offending_value(make, fragment):
    reasons = fastattn.explain(*make()).reasons("triton")
    assert any(fragment in r for r in reasons), reasons


def test_cpu_without_interpreter_is_refused_with_a_hint(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (t.cpu() for t in half_inputs())
    reasons = fastattn.explain(q, k, v).reasons("triton")
    assert any("TRITON_INTERPRET=1" in r for r in reasons), reasons


def test_dropout_runs_on_triton_and_is_a_reason_for_cuda():
    q, k, v = half_inputs()
    report = fastattn.explain(q, k, v, dropout_p=0.1)
    assert not any("dropout" in r for r in report.reasons("triton")), report
    assert "dropout_p > 0 is not supported" in report.reasons("cuda")


def test_grad_needs_a_backend_with_a_backward():
    """A call that needs grad runs forward and backward on one backend: the forward-only
    cuda kernel says so in its backward reasons, the triton kernel runs both."""
    q, k, v = half_inputs()
    q.requires_grad_(True)
    report = fastattn.explain(q, k, v)
    assert report.needs_grad and report.chosen == plain_auto()
    assert report.backward_reasons("triton") == () and report.backward_reasons("sdpa") == ()
    assert report.backward_reasons("cuda") == (
        "inputs require grad and the cuda kernel is forward-only (no backward)",)
    text = str(report)
    assert "backward: inputs require grad" in text and "(forward and backward)" in text
    with torch.no_grad():
        report = fastattn.explain(q, k, v)
    assert not report.needs_grad and report.backward_reasons("cuda") == ()
    with fastattn.use_backend("cuda"):
        with pytest.raises(fastattn.UnsupportedError, match="forward-only"):
            fastattn.scaled_dot_product_attention(q, k, v)


def test_backward_reasons_come_from_the_declarations():
    """The generic sentences are worded once (backends/base.py) from what a backend declares."""
    from fastattn.backends.base import Support

    call, _ = from_sdpa_args(*(t.float() for t in half_inputs(E=320)), dropout_p=0.5)
    f = call.features
    assert Support(dtypes=(torch.float16, torch.bfloat16), max_head_dim=256, features=frozenset()).reasons(f) == [
        "dtype torch.float32 is not supported (supported: float16, bfloat16)",
        "head_dim=320 is too large (supported: <= 256)",
        "dropout_p > 0 is not supported",
    ]
    assert Support().reasons(f) == []


def test_gradients_the_kernel_does_not_compute_go_to_the_fallback():
    """ALiBi slopes and an additive mask that require grad (T5's trainable position bias):
    the triton backward gives them no gradient, so the fallback runs, and says why."""
    q = torch.randn(1, 8, 2, 16, device=DEVICE, dtype=torch.float16, requires_grad=True)
    bias = torch.randn(1, 2, 8, 8, device=DEVICE, dtype=torch.float16, requires_grad=True)
    report = fastattn.explain(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), attn_mask=bias)
    assert report.chosen == "sdpa"
    assert any("attn_mask that requires grad" in r for r in report.backward_reasons("triton"))
    frozen = fastattn.explain(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), attn_mask=bias.detach())
    assert frozen.chosen == "triton"  # a call with a mask goes to triton on every GPU (dispatch.priority)


def test_half_inputs_choose_plain_auto():
    assert fastattn.explain(*half_inputs()).chosen == plain_auto()


@pytest.mark.parametrize("capability,extra,first", [
    ((9, 0), {}, "sdpa"),
    ((8, 0), {}, "triton"),
    ((9, 0), {"mask_dtype": torch.bool}, "triton"),
    ((9, 0), {"window": (16, 0)}, "triton"),
    ((9, 0), {"has_softcap": True}, "triton"),
    ((9, 0), {"causal": True, "window": (-1, 0), "lower_right": True, "equal_lengths": False}, "triton"),
    ((9, 0), {"causal": True, "window": (-1, 0), "lower_right": True, "equal_lengths": True}, "sdpa"),
    ((9, 0), {"window": (-1, 0), "lower_right": True, "equal_lengths": False}, "triton"),  # flash-attn window, L != S
    ((9, 0), {"mask_dtype": torch.bool, "mask_key_padding": True, "short_queries": True}, "sdpa"),  # padded decode
    ((9, 0), {"mask_dtype": torch.bool, "mask_key_padding": True, "short_queries": False}, "triton"),  # prefill
    ((9, 0), {"mask_dtype": torch.float16, "mask_key_padding": True, "short_queries": True}, "triton"),
    ((9, 0), {"head_dim": 256, "head_dim_v": 256, "has_softcap": True}, "cuda"),  # measured faster there
    ((9, 0), {"head_dim": 256, "head_dim_v": 256}, "sdpa"),
    ((8, 0), {"head_dim": 256, "head_dim_v": 256, "has_softcap": True}, "triton"),  # not measured
])
def test_priority_rule_on_gpus(monkeypatch, capability, extra, first):
    """Plain calls go to torch's fused SDPA on Hopper (measured faster there), the rest to triton,
    or above head dim 128 on Hopper to the CUDA kernel."""

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_device, "capability", lambda index: capability)
    call, _ = from_sdpa_args(*half_inputs())
    features = call.features._replace(device_type="cuda", device_index=0, **extra)
    order = dispatch.priority(features)
    assert order[0] == first and order[-1 if first != "sdpa" else 0] == "sdpa"


def test_use_backend_forces_and_restores():
    q, k, v = half_inputs()
    with fastattn.use_backend("sdpa"):
        assert fastattn.explain(q, k, v).chosen == "sdpa"
        with fastattn.use_backend("auto"):
            assert fastattn.explain(q, k, v).chosen == plain_auto()
        assert fastattn.explain(q, k, v).chosen == "sdpa"
    assert fastattn.explain(q, k, v).chosen == plain_auto()


def test_use_backend_restores_after_an_exception():
    with pytest.raises(KeyError):
        with fastattn.use_backend("sdpa"):
            raise KeyError("boom")
    assert dispatch.forced_backend() is None


def test_forcing_is_per_thread():
    seen = {}
    inside = threading.Event()
    done = threading.Event()

    def other_thread():
        inside.wait()
        seen["other"] = dispatch.forced_backend()
        done.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with fastattn.use_backend("sdpa"):
        inside.set()
        done.wait()
    t.join()
    assert seen["other"] is None


def test_forced_backend_that_cannot_run_lists_every_reason():
    q, k, v = (t.float() for t in half_inputs(E=320))
    with fastattn.use_backend("triton"):
        with pytest.raises(fastattn.UnsupportedError) as info:
            fastattn.scaled_dot_product_attention(q, k, v)
    message = str(info.value)
    assert "'triton' was forced" in message and "float32" in message and "head_dim=320" in message
    for name in fastattn.registered_backends():
        assert name in message
    assert isinstance(info.value, RuntimeError)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        with fastattn.use_backend("cudnn-turbo"):
            pass


def test_environment_variable_forces(monkeypatch):
    q, k, v = half_inputs()
    monkeypatch.setenv("FASTATTN_BACKEND", "sdpa")
    assert fastattn.explain(q, k, v).chosen == "sdpa"
    with fastattn.use_backend("auto"):  # the context manager wins over the environment
        assert fastattn.explain(q, k, v).chosen == plain_auto()
    monkeypatch.setenv("FASTATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTATTN_BACKEND"):
        fastattn.explain(q, k, v)


def test_strict_raises_instead_of_falling_back(monkeypatch):
    q, k, v = (t.float() for t in half_inputs())
    monkeypatch.setenv("FASTATTN_STRICT", "1")
    with pytest.raises(fastattn.UnsupportedError, match="FASTATTN_STRICT"):
        fastattn.scaled_dot_product_attention(q, k, v)
    fastattn.scaled_dot_product_attention(*half_inputs())  # a kernel can run: fine


def test_torch_sdpa_kernel_context_is_respected():
    q, k, v = half_inputs()
    with sdpa_kernel([SDPBackend.MATH]):
        report = fastattn.explain(q, k, v)
        assert report.chosen == "sdpa"
        assert any("sdpa_kernel" in r for r in report.reasons("triton"))
    assert fastattn.explain(q, k, v).chosen == plain_auto()


def test_decisions_are_cached():
    q, k, v = half_inputs()
    first = fastattn.explain(q, k, v)
    q2, k2, v2 = half_inputs()
    assert fastattn.explain(q2, k2, v2) is first


# --------------------------------------------------------------------------- device guard


def _record_launches(monkeypatch, module, kernels):
    """Replace ``module``'s device_guard with one that records the device it was given (and
    passes it on to the real guard), and its ``kernels`` with launches that record which
    devices were current. Returns the list of (kernel, devices) launches."""
    active, launches = [], []
    real_guard = module.device_guard

    @contextlib.contextmanager
    def recording_guard(device):
        with real_guard(device):
            active.append(device)
            try:
                yield
            finally:
                active.pop()

    class RecordingKernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.name, list(active)))
            return launch

    monkeypatch.setattr(module, "device_guard", recording_guard)  # imported by name: each launcher's own
    for name in kernels:
        monkeypatch.setattr(module, name, RecordingKernel(name))
    return launches


def test_launch_happens_under_the_inputs_device(monkeypatch):
    """Under device_map, layers live on different GPUs: the launch must run with the
    tensors' device current, never the process's current device. Two links, each checked
    with its real code: device_guard(cuda:1) makes cuda:1 current (a fake torch.cuda.device
    records it), and the launcher launches inside device_guard(q.device) (the guard, wrapped
    to record the device it was given, passes it on to the real one)."""
    from fastattn.kernels.triton import flash_fwd

    active = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        active.append(torch.device(device))
        try:
            yield
        finally:
            active.pop()

    monkeypatch.setattr(flash_fwd.torch.cuda, "device", fake_cuda_device)
    with flash_fwd.device_guard(torch.device("cuda", 1)):
        assert active == [torch.device("cuda", 1)]
    assert active == []

    launches = _record_launches(monkeypatch, flash_fwd, ["_flash_fwd_kernel"])
    q, k, v = (t.cpu() for t in half_inputs())
    flash_fwd.flash_attn_forward(q, k, v, scale=0.1)
    assert launches == [("_flash_fwd_kernel", [q.device])]


def test_backward_launches_happen_under_the_inputs_device(monkeypatch):
    """The backward's three launches (delta preprocess, dK/dV, dQ) as well."""
    from fastattn.kernels.triton import flash_bwd

    kernels = ["_bwd_preprocess_kernel", "_flash_bwd_dkdv_kernel", "_flash_bwd_dq_kernel"]
    launches = _record_launches(monkeypatch, flash_bwd, kernels)
    q, k, v = (torch.randn(1, 2, 16, 16, dtype=torch.float16) for _ in range(3))
    out, do = torch.randn_like(q), torch.randn_like(q)
    flash_bwd.flash_attn_backward(do, q, k, v, out, torch.randn(1, 2, 16), scale=0.25)
    assert launches == [(name, [q.device]) for name in kernels]


def test_device_guard_is_a_no_op_on_cpu(monkeypatch):
    """On the CPU (the interpreter) the guard switches no CUDA device: it never calls
    torch.cuda.device, which would fail or initialise CUDA."""
    from fastattn.kernels.triton import flash_fwd

    def no_cuda(device):
        raise AssertionError(f"device_guard switched the CUDA device to {device} for a CPU tensor")

    monkeypatch.setattr(flash_fwd.torch.cuda, "device", no_cuda)
    guard = flash_fwd.device_guard(torch.device("cpu"))
    assert isinstance(guard, contextlib.nullcontext)
    with guard as entered:
        assert entered is None


def test_device_facts_are_cached_per_index(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: calls.append(i) or (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 4)
    _device._capability.cache_clear()
    try:
        assert _device.capability(3) == (9, 0)
        assert _device.capability(3) == (9, 0)
        assert _device.capability(None) == (9, 0)  # the current device, by its index
        assert calls == [3, 4]
    finally:
        _device._capability.cache_clear()


def test_call_features_are_hashable_and_describe_the_call():
    q, k, v = half_inputs()
    call, lead = from_sdpa_args(q, k, v, is_causal=True)
    hash(call.features)
    assert call.features.causal and lead == (1, 2)


def test_grad_through_alibi_slopes_is_a_reason():
    """A forward-only kernel must not silently cut gradients flowing to ALiBi slopes."""
    q = torch.randn(1, 8, 2, 16, device=DEVICE, dtype=torch.float16)
    slopes = torch.rand(2, device=DEVICE, requires_grad=True)
    report = fastattn.explain_flash(q, q, q, alibi_slopes=slopes)
    assert report.chosen == "sdpa" and any("grad" in r for r in report.reasons("triton"))
    out = fastattn.flash_attn_func(q, q, q, alibi_slopes=slopes)
    weights = torch.randn(out.shape, device=DEVICE, dtype=torch.float64)
    (out.double() * weights).sum().backward()
    ref_slopes = slopes.detach().double().requires_grad_()  # float64 reference, (B, H, L, D) layout
    x = q.transpose(1, 2)
    ref, _ = reference_attention(x, x, x, alibi_slopes=ref_slopes, lower_right=True)
    (ref.transpose(1, 2) * weights).sum().backward()
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(slopes.grad.double(), ref_slopes.grad, atol=2e-3, rtol=2e-3)


def test_float32_bias_beside_float64_inputs_stays_float64():
    """ALiBi's float32 bias must not pull float64 inputs down to float32 (nor half inputs' bias
    down to half): compare with a float64 reference at float64 precision."""
    q = torch.randn(1, 6, 2, 16, device=DEVICE, dtype=torch.float64)
    slopes = torch.tensor([0.5, 0.25], device=DEVICE)
    out = fastattn.flash_attn_func(q, q, q, alibi_slopes=slopes)
    x = q.transpose(1, 2)
    ref, _ = reference_attention(x, x, x, alibi_slopes=slopes, lower_right=True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-12, rtol=1e-12)


def test_bounds_that_rule_out_no_key_are_dropped():
    """Causal in a bottom-right decode step, or a window wider than the keys, bounds nothing:
    the call then looks like a plain one (the same cached decision at every step)."""
    q = torch.randn(1, 1, 2, 16, device=DEVICE, dtype=torch.float16)  # flash layout (B, L, H, D)
    k = torch.randn(1, 50, 2, 16, device=DEVICE, dtype=torch.float16)
    assert fastattn.explain_flash(q, k, k, causal=True).features.window == (-1, -1)
    assert fastattn.explain_flash(q, k, k, window_size=(49, 0)).features.window == (-1, -1)
    assert fastattn.explain_flash(q, k, k, window_size=(48, 0)).features.window == (48, -1)
    prefill = torch.randn(1, 50, 2, 16, device=DEVICE, dtype=torch.float16)
    assert fastattn.explain_flash(prefill, k, k, causal=True).features.window == (-1, 0)
    one_key = k[:, :1]
    assert fastattn.explain(prefill.transpose(1, 2), one_key.transpose(1, 2), one_key.transpose(1, 2),
                            is_causal=True).features.window == (-1, -1)


def test_explain_summary_names_every_feature_of_the_call():
    q = torch.randn(1, 5, 4, 16, dtype=torch.float16, requires_grad=True)
    text = str(fastattn.explain_flash(q, q, q, dropout_p=0.1, softcap=5.0, alibi_slopes=torch.ones(4),
                                      return_attn_probs=True))
    first = text.splitlines()[0]
    for feature in ("softcap", "ALiBi", "dropout", "needs grad", "log-sum-exp"):
        assert feature in first, first
