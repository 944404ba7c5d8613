"""The host's fast path (issue #12): a repeated call reuses the checks and the decision of the
first one, and changes nothing else -- the same results, the same errors for bad inputs, a
new decision whenever anything a decision reads changes, and no device-to-host transfer.
Timings are benchmarks/overhead.py's business; nothing here is timed."""
from __future__ import annotations

import ast
import itertools
import os
import random
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
from fastattn import _extension, dispatch
from fastattn.backends.triton import TritonBackend
from fastattn.inputs import flash_signature, from_flash_args, from_sdpa_args, sdpa_signature
from fastattn.testing import reference_attention

from .conftest import DEVICE

REPO = Path(__file__).resolve().parent.parent


def _outcome(fn):
    """What a check says about a call: its features and layout, or the error it raises."""
    try:
        result = fn()
    except (TypeError, ValueError, RuntimeError) as exc:
        return ("error", type(exc), str(exc))
    call = result[0] if isinstance(result, tuple) else result
    lead = result[1] if isinstance(result, tuple) else None
    return ("ok", call.features, lead, call.scale, tuple(call.q.shape), tuple(call.k.shape),
            None if call.mask is None else tuple(call.mask.shape))


# --------------------------------------------------------------------------- signatures vs the checks


def _maybe(rng: random.Random, good, *bad):
    """``good`` most of the time, else one of ``bad``: calls near the edges of the checks."""
    return good if rng.random() < 0.85 else rng.choice(bad)


def _random_sdpa_args(rng: random.Random):
    """Arguments near the edges of what the checks accept: shapes that almost agree, masks
    of every dtype and rank, scalars of the wrong types."""
    # A small space, so that signatures repeat: the property is about calls that share one.
    B, H, L, S, E = 2, 4, rng.choice([1, 3]), 5, 8
    Hk = rng.choice([2, H])
    dtype = _maybe(rng, torch.float32, torch.float16)
    q = torch.randn(*_maybe(rng, (B, H, L, E), (H, L, E)), dtype=dtype)
    q = _maybe(rng, q, torch.randn(B, H, L, E + 1, dtype=dtype), q.requires_grad_(True))
    k = _maybe(rng, torch.randn(B, Hk, S, E, dtype=dtype), torch.randn(B, Hk, S, E, dtype=torch.float64),
               torch.randn(B, Hk, E, S, dtype=dtype).transpose(-1, -2))  # last dim not contiguous
    v = _maybe(rng, torch.randn(B, Hk, S, E, dtype=dtype), torch.randn(B, Hk, S + 1, E, dtype=dtype),
               torch.randn(B, Hk, S, 4, dtype=dtype))
    mask = _maybe(rng, rng.choice([None, torch.ones(B, 1, 1, S, dtype=torch.bool)]),
                  torch.ones(B, 1, L, S, dtype=rng.choice([torch.bool, dtype, torch.float32])),
                  torch.ones(1, S, dtype=torch.bool).expand(L, S), torch.ones(L, S + 1, dtype=torch.bool),
                  torch.ones(L, S, dtype=torch.int64))
    return (q, k, v, mask, _maybe(rng, 0.0, 0, 1.5, False, 0.5), _maybe(rng, False, True, 1),
            _maybe(rng, None, 0.5, 2, True, float("inf")), _maybe(rng, Hk != H, not Hk != H, 1))


def _random_flash_args(rng: random.Random):
    B, L, S, H, E = 2, rng.choice([1, 4]), 6, 4, 8
    Hk = _maybe(rng, 2, 1, 3)
    dtype = _maybe(rng, torch.float16, torch.float32)
    q = _maybe(rng, torch.randn(B, L, H, E, dtype=dtype), torch.randn(B, L, H, E + 1, dtype=dtype),
               torch.randn(B, L, H, E, dtype=dtype).requires_grad_(True))
    k = torch.randn(B, S, Hk, E, dtype=dtype)
    v = _maybe(rng, torch.randn(B, S, Hk, E, dtype=dtype), torch.randn(B + 1, S, Hk, E, dtype=dtype),
               torch.randn(B, S, Hk, E, dtype=torch.bfloat16))
    slopes = _maybe(rng, None, torch.rand(H), torch.rand(B, H), torch.rand(H + 1), torch.rand(H).double())
    return (q, k, v, _maybe(rng, 0.0, 0, 2.0, 0.5), _maybe(rng, None, 0.3, 1, True), _maybe(rng, True, False, 1),
            _maybe(rng, (-1, -1), (2, 0), (3, 1), (-2, 0), [1, 1], (True, -1)),
            _maybe(rng, 0.0, 5.0, -1.0, 0, True), slopes, _maybe(rng, False, True, 1))


@pytest.mark.parametrize("front", ["sdpa", "flash"])
def test_equal_signatures_pass_the_same_checks_with_the_same_features(front):
    """Whatever two calls with one signature are, the checks treat them alike: both fail with the
    same error or both pass with equal features and layout. (The fast path relies on this.)"""
    rng = random.Random(12)
    make, signature, check = ((_random_sdpa_args, sdpa_signature, from_sdpa_args) if front == "sdpa"
                              else (_random_flash_args, flash_signature, from_flash_args))
    groups: dict = {}
    cached_outcomes = 0
    for _ in range(400):
        args = make(rng)
        sig = signature(*args)
        outcome = _outcome(lambda: check(*args))
        if sig is None:
            continue
        cached_outcomes += outcome[0] == "ok"
        groups.setdefault(sig, []).append(outcome)
        with torch.no_grad():  # a call that requires grad has another signature outside grad mode
            groups.setdefault(signature(*args), []).append(_outcome(lambda: check(*args)))
    assert cached_outcomes > 20  # the generator reaches calls the fast path takes
    assert sum(len(g) > 2 for g in groups.values()) > 5  # and repeats signatures
    for sig, outcomes in groups.items():
        assert all(o == outcomes[0] for o in outcomes), (sig, outcomes)


def test_no_signature_for_what_the_checks_read_differently():
    q = k = v = torch.randn(1, 2, 3, 8)
    assert sdpa_signature(q, k, v, None, 0.0, False, None, False) is not None
    assert sdpa_signature(q, k, v, None, 0, False, None, False) is None  # int dropout: the full path
    assert sdpa_signature(q, k, v, None, 0.0, 1, None, False) is None  # is_causal=1 raises there
    assert sdpa_signature(q, k, v, None, 0.0, False, True, False) is None  # scale=True raises there
    assert sdpa_signature(q, k.double(), v, None, 0.0, False, None, False) is None
    assert sdpa_signature(torch.nn.Parameter(q), k, v, None, 0.0, False, None, False) is None
    b = q.transpose(1, 2)
    assert flash_signature(b, b, b, 0.0, None, False, (True, -1), 0.0, None, False) is None
    assert flash_signature(b, b, b, 0.0, None, False, [-1, -1], 0.0, None, False) is None
    assert flash_signature(b, b, b, 0.0, None, False, (-1, -1), 0, None, False) is None


# --------------------------------------------------------------------------- the fast path's errors

GOOD = dict(B=2, Hq=4, Hkv=2, L=3, S=7, E=16)


def _sdpa_good():
    q = torch.randn(2, 4, 3, 16, device=DEVICE)
    k, v = torch.randn(2, 2, 7, 16, device=DEVICE), torch.randn(2, 2, 7, 16, device=DEVICE)
    return q, k, v


SDPA_BAD = {
    "key dtype": lambda q, k, v: ((q, k.double(), v), {}),
    "head dims differ": lambda q, k, v: ((q, k[..., :8], v), {}),
    "value length": lambda q, k, v: ((q, k, v[:, :, :5]), {}),
    "heads without enable_gqa": lambda q, k, v: ((q, k, v), {"enable_gqa": False}),
    "heads not a multiple": lambda q, k, v: ((q[:, :3], k, v), {}),
    "mask dtype": lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(2, 1, 3, 7, dtype=torch.int64, device=DEVICE)}),
    "mask shape": lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(2, 1, 3, 8, dtype=torch.bool, device=DEVICE)}),
    "mask with is_causal": lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(3, 7, dtype=torch.bool, device=DEVICE),
                                                         "is_causal": True}),
    "dropout above 1": lambda q, k, v: ((q, k, v), {"dropout_p": 1.5}),
    "dropout a bool": lambda q, k, v: ((q, k, v), {"dropout_p": False}),
    "is_causal an int": lambda q, k, v: ((q, k, v), {"is_causal": 1}),
    "scale a bool": lambda q, k, v: ((q, k, v), {"scale": True}),
    "scale infinite": lambda q, k, v: ((q, k, v), {"scale": float("inf")}),
    "integer query": lambda q, k, v: ((q.long(), k.long(), v.long()), {}),
}


@pytest.mark.parametrize("bad", sorted(SDPA_BAD))
def test_sdpa_fast_path_raises_what_the_checks_raise(bad):
    q, k, v = _sdpa_good()
    for _ in range(3):  # cached now
        fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert dispatch.cached_plan(sdpa_signature(q, k, v, None, 0.0, False, None, True)) is not None
    args, kwargs = SDPA_BAD[bad](q, k, v)
    kwargs = {"enable_gqa": True, **kwargs}
    with pytest.raises((TypeError, ValueError, RuntimeError)) as expected:
        from_sdpa_args(*args, **kwargs)
    for _ in range(2):
        with pytest.raises(expected.type) as got:
            fastattn.scaled_dot_product_attention(*args, **kwargs)
        assert str(got.value) == str(expected.value)


FLASH_BAD = {
    "key dtype": lambda q, k, v: ((q, k.double(), v), {}),
    "batch differs": lambda q, k, v: ((q, k[:1], v[:1]), {}),
    "3-d": lambda q, k, v: ((q[0], k[0], v[0]), {}),
    "window below -1": lambda q, k, v: ((q, k, v), {"window_size": (-2, 0)}),
    "window of bools": lambda q, k, v: ((q, k, v), {"window_size": (True, 0)}),
    "softcap negative": lambda q, k, v: ((q, k, v), {"softcap": -1.0}),
    "alibi shape": lambda q, k, v: ((q, k, v), {"alibi_slopes": torch.rand(5, device=DEVICE)}),
    "alibi dtype": lambda q, k, v: ((q, k, v), {"alibi_slopes": torch.rand(4, device=DEVICE).double()}),
    "dropout above 1": lambda q, k, v: ((q, k, v), {"dropout_p": 1.5}),
}


@pytest.mark.parametrize("bad", sorted(FLASH_BAD))
def test_flash_fast_path_raises_what_the_checks_raise(bad):
    q, k, v = (t.transpose(1, 2) for t in _sdpa_good())
    for _ in range(3):
        fastattn.flash_attn_func(q, k, v, causal=True)
    args, kwargs = FLASH_BAD[bad](q, k, v)
    kwargs = {"causal": True, **kwargs}
    with pytest.raises((TypeError, ValueError, RuntimeError)) as expected:
        from_flash_args(*args, **kwargs)
    for _ in range(2):
        with pytest.raises(expected.type) as got:
            fastattn.flash_attn_func(*args, **kwargs)
        assert str(got.value) == str(expected.value)


# --------------------------------------------------------------------------- the fast path's results


def _sdpa_variants():
    """(name, args, kwargs): plain calls torch runs as they are, and calls the sdpa backend or a
    kernel reshapes, masks or computes exactly."""
    q, k, v = _sdpa_good()
    pad = torch.rand(2, 1, 1, 7, device=DEVICE) > 0.3
    return [
        ("plain GQA", (q, k, v), {"enable_gqa": True}),
        ("causal", (q, k, v), {"is_causal": True, "enable_gqa": True}),
        ("key padding", (q, k, v), {"attn_mask": pad, "enable_gqa": True}),
        ("float32 mask", (q, k, v), {"attn_mask": torch.randn(3, 7, device=DEVICE), "enable_gqa": True}),
        ("3-d, no batch", (q[0], k[0].repeat_interleave(2, 0), v[0].repeat_interleave(2, 0)), {"scale": 0.3}),
        ("broadcast batch", (q, k[:1], v[:1]), {"enable_gqa": True}),
        ("5-d", (q[None], k[None], v[None]), {"enable_gqa": True}),
        ("fp16 causal (a kernel)", (q.half(), k.half(), v.half()), {"is_causal": True, "enable_gqa": True}),
    ]


@pytest.mark.parametrize("variant", range(8))
def test_repeated_sdpa_calls_give_the_first_calls_result(variant):
    name, args, kwargs = _sdpa_variants()[variant]
    first = fastattn.scaled_dot_product_attention(*args, **kwargs)
    ref = fastattn.backends.sdpa.torch_sdpa(*(t.float() for t in args), **{
        k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()})
    for _ in range(2):
        again = fastattn.scaled_dot_product_attention(*args, **kwargs)
        assert torch.equal(again, first), name
    assert again.shape == ref.shape and again.dtype == args[0].dtype
    torch.testing.assert_close(again.float(), ref, atol=2e-3 if args[0].dtype == torch.float16 else 1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [
    dict(causal=True),  # decode-like: causal bounds nothing, torch's SDPA as it is
    dict(causal=False),
    dict(causal=True, window_size=(2, 0)),
    dict(softcap=3.0),
    dict(causal=True, return_attn_probs=True),
], ids=["causal", "full", "window", "softcap", "lse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_repeated_flash_calls_give_the_first_calls_result(kwargs, dtype):
    q, k, v = (t.transpose(1, 2).to(dtype) for t in _sdpa_good())
    first = fastattn.flash_attn_func(q, k, v, **kwargs)
    for _ in range(2):
        again = fastattn.flash_attn_func(q, k, v, **kwargs)
        for a, b in zip(again if isinstance(again, tuple) else (again,), first if isinstance(first, tuple) else (first,)):
            assert (a is None and b is None) or torch.equal(a, b)


# --------------------------------------------------------------------------- a new decision when the state changes


def test_plans_follow_forcing_the_environment_and_torchs_switches(monkeypatch):
    q, k, v = (t.half() for t in _sdpa_good())
    fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    auto = fastattn.explain(q, k, v, enable_gqa=True).chosen
    sig = sdpa_signature(q, k, v, None, 0.0, False, None, True)

    def chosen():
        fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return dispatch.cached_plan(sig).backend.name

    assert chosen() == auto
    with fastattn.use_backend("sdpa"):
        assert chosen() == "sdpa"
    assert chosen() == auto
    monkeypatch.setenv("FASTATTN_BACKEND", "sdpa")
    assert chosen() == "sdpa"
    monkeypatch.setenv("FASTATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTATTN_BACKEND"):
        fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    monkeypatch.delenv("FASTATTN_BACKEND")
    with sdpa_kernel([SDPBackend.MATH]):
        assert chosen() == "sdpa"
    assert chosen() == auto


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's choice of triton on the CPU")
def test_uncached_decisions_read_the_environment_as_it_is_now(monkeypatch):
    """Calls with no plan (varlen: a new packing every step) parse the environment once per
    value of its variables: each change still shows in the next decision."""
    q, k, v = (torch.randn(n, h, 16, dtype=torch.float16) for n, h in ((5, 4), (9, 2), (9, 2)))
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)

    def chosen():
        return fastattn.explain_varlen(q, k, v, cu_q, cu_k, 3, 5, causal=True).chosen

    assert chosen() == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert chosen() == "sdpa"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert chosen() == "triton"
    monkeypatch.setenv("FASTATTN_BACKEND", "sdpa")
    assert chosen() == "sdpa"
    monkeypatch.setenv("FASTATTN_BACKEND", "nonsense")
    for _ in range(2):  # an unknown name is refused every time, not once
        with pytest.raises(ValueError, match="FASTATTN_BACKEND"):
            chosen()
    monkeypatch.setenv("FASTATTN_BACKEND", "auto")
    monkeypatch.setenv("FASTATTN_STRICT", "1")
    assert chosen() == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fastattn.UnsupportedError, match="FASTATTN_STRICT"):
        fastattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 5, causal=True)
    monkeypatch.setenv("FASTATTN_STRICT", "0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTATTN_BACKEND", "nonsense")
    with fastattn.use_backend("sdpa"):  # a name forced in code wins, whatever the variable says
        assert chosen() == "sdpa"
    with fastattn.use_backend("auto"):
        assert chosen() == "triton"
    monkeypatch.delenv("FASTATTN_BACKEND")
    with monkeypatch.context() as swapped:  # os.environ replaced by a stand-in: that one counts
        swapped.setattr("os.environ", dict(os.environ, FASTATTN_BACKEND="sdpa"))
        assert chosen() == "sdpa"
    assert chosen() == "triton"


def test_launch_arithmetic_is_tritons():
    """The launchers' own cdiv / next_power_of_2 (Triton's are constexpr functions, slow to call
    from host code) give Triton's values."""
    triton = pytest.importorskip("triton")
    from fastattn.kernels.triton.flash_fwd import cdiv, next_power_of_2

    for n in range(0, 1100):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 2, 3, 16, 17, 64, 128, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's choice of triton on the CPU")
def test_plans_follow_a_backends_availability_without_clearing_anything(monkeypatch):
    q, k, v = (t.half() for t in _sdpa_good())
    assert fastattn.explain(q, k, v, enable_gqa=True).chosen == "triton"
    fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    sig = sdpa_signature(q, k, v, None, 0.0, False, None, True)

    def chosen():
        fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return dispatch.cached_plan(sig).backend.name

    assert chosen() == "triton"
    monkeypatch.setattr(TritonBackend, "availability", lambda self: ["triton went away"])
    assert dispatch.cached_plan(sig) is None  # the chosen backend is gone: the plan is not used
    assert fastattn.explain(q, k, v, enable_gqa=True).chosen == "sdpa"
    assert chosen() == "sdpa"
    with fastattn.use_backend("triton"), pytest.raises(fastattn.UnsupportedError, match="triton went away"):
        fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    monkeypatch.undo()  # back: only its availability kept it out of the sdpa plan, so that plan goes too
    assert chosen() == "triton"


def test_an_extension_status_change_reaches_dispatch_without_being_told(monkeypatch):
    """_extension.reset() / a build change the loader's status; the decisions cached under the old
    one are not reused (the availability is in their key), with nothing cleared."""

    from fastattn import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_device, "capability", lambda index: (9, 0))
    call, _ = from_sdpa_args(*(t.half() for t in _sdpa_good()), enable_gqa=True)
    features = call.features._replace(device_type="cuda", device_index=0)

    def cuda_reasons():
        return dispatch._decide(features, None, False, (), False, dispatch.availability()).reasons("cuda")

    monkeypatch.setattr(_extension, "_status", _extension.ExtensionStatus(False, "first reason"))
    assert any("first reason" in r for r in cuda_reasons())
    monkeypatch.setattr(_extension, "_status", _extension.ExtensionStatus(False, "second reason"))
    assert any("second reason" in r for r in cuda_reasons())
    assert not any("first reason" in r for r in cuda_reasons())


def test_extension_module_does_not_import_dispatch():
    """The loader knows nothing of dispatch (no import cycle, no clearing of its caches)."""
    tree = ast.parse((REPO / "fastattn" / "_extension.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported |= {node.module or ""} | {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    assert not any("dispatch" in name or "backends" in name for name in imported), imported


# --------------------------------------------------------------------------- no device-to-host transfer


class SyncRecorder(TorchDispatchMode):
    """Records the ops that make the host wait for a device: reading a value (.item(), bool(),
    int() -- aten._local_scalar_dense), copies to the CPU from another device, and the ops whose
    output size depends on values (nonzero)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "equal", "is_nonzero", "item"}

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in self.SYNCING:
            self.syncs.append(str(func))
        if name in ("_to_copy", "copy_", "to"):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else kwargs.get("device")
            if isinstance(src, torch.Tensor) and dst is not None and torch.device(dst).type == "cpu" \
                    and src.device.type != "cpu":
                self.syncs.append(f"{func} from {src.device} to the CPU")
        return func(*args, **(kwargs or {}))


def _hot_calls():
    q, k, v = _sdpa_good()
    pad = torch.rand(2, 1, 1, 7, device=DEVICE) > 0.3
    qd, kd, vd = q[:, :, :1], k, v
    return {
        "sdpa": lambda: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "sdpa decode, key padding": lambda: fastattn.scaled_dot_product_attention(qd, kd, vd, attn_mask=pad,
                                                                                  enable_gqa=True),
        "sdpa backend, fp16 window": lambda: _forced_sdpa(lambda: fastattn.flash_attn_func(
            q.transpose(1, 2).half(), k.transpose(1, 2).half(), v.transpose(1, 2).half(), causal=True,
            window_size=(2, 0))),
        "flash decode": lambda: fastattn.flash_attn_func(qd.transpose(1, 2), kd.transpose(1, 2), vd.transpose(1, 2),
                                                         causal=True),
    }


def _forced_sdpa(fn):
    with fastattn.use_backend("sdpa"):
        return fn()


@pytest.mark.parametrize("name", list(_hot_calls()))
def test_hot_path_reads_nothing_back_from_the_device(name):
    """The first call and repeated ones: no .item(), no copy to the host, no value-dependent
    shapes (each would stall a GPU stream and break a CUDA graph capture). The float32 / sdpa
    paths: the Triton interpreter itself runs on the host and copies by design."""
    fn = _hot_calls()[name]
    with SyncRecorder() as recorder:
        for _ in range(3):
            fn()
    assert recorder.syncs == []


class _NoKernel:
    """A Triton kernel's stand-in that launches nothing and counts its launches."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1

        return launch


def _triton_route_calls():
    """Decode steps that run the Triton kernel on a GPU: a sliding window (dense), a packed
    continuous-batching step (varlen), a KV-cache append and a paged cache."""
    q, k, v = (t.transpose(1, 2).half() for t in _sdpa_good())  # (B, L, H, E)
    qd = q[:, -1:]
    B, S, Hkv, E = k.shape
    cu_q = torch.arange(B + 1, dtype=torch.int32, device=DEVICE)
    cu_k = torch.arange(B + 1, dtype=torch.int32, device=DEVICE) * S
    packed_q, packed_k, packed_v = qd.reshape(B, *qd.shape[2:]), k.reshape(B * S, Hkv, E), v.reshape(B * S, Hkv, E)
    k_cache, v_cache = (torch.zeros(B, 32, Hkv, E, dtype=torch.float16, device=DEVICE) for _ in range(2))
    k_pages, v_pages = (torch.zeros(2 * B, 16, Hkv, E, dtype=torch.float16, device=DEVICE) for _ in range(2))
    table = torch.arange(2 * B, dtype=torch.int32, device=DEVICE).view(B, 2)
    lengths = torch.full((B,), S, dtype=torch.int32, device=DEVICE)
    return {
        "flash window": lambda: fastattn.flash_attn_func(qd, k, v, causal=True, window_size=(3, 0)),
        "varlen decode": lambda: fastattn.flash_attn_varlen_func(packed_q, packed_k, packed_v, cu_q, cu_k, 1, S,
                                                                 causal=True),
        "kvcache append": lambda: fastattn.flash_attn_with_kvcache(qd, k_cache, v_cache, k[:, :1], v[:, :1],
                                                                   cache_seqlens=lengths, causal=True),
        "paged decode": lambda: fastattn.flash_attn_with_kvcache(qd, k_pages, v_pages, cache_seqlens=lengths,
                                                                 block_table=table, causal=True),
    }


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's choice of triton on the CPU")
@pytest.mark.parametrize("name", list(_triton_route_calls()))
def test_triton_route_reads_nothing_back_as_on_a_gpu(name, monkeypatch):
    """On the way to the Triton kernel (dispatch, the call, the launcher) nothing is read back
    either, where index values are not read (a GPU's tensors; here a CPU's with the reading
    switched off). The kernel is stubbed: the interpreter would copy by design."""
    from fastattn import inputs
    from fastattn.kernels.triton import flash_fwd

    monkeypatch.setattr(inputs, "values_checked", lambda t: False)
    kernel = _NoKernel()
    monkeypatch.setattr(flash_fwd, "_flash_fwd_kernel", kernel)
    monkeypatch.setattr(flash_fwd, "_combine_splits_kernel", _NoKernel())
    fn = _triton_route_calls()[name]
    with SyncRecorder() as recorder:
        for _ in range(3):
            fn()
    assert recorder.syncs == []
    assert kernel.launches == 3  # the Triton route, once a call


def test_the_recorder_sees_a_sync():
    x = torch.ones(3, device=DEVICE)
    with SyncRecorder() as recorder:
        bool(x.sum() > 0)
        x.nonzero()
    assert len(recorder.syncs) == 2


def test_transformers_hot_path_reads_nothing_back():
    pytest.importorskip("transformers")
    from fastattn.integrations import transformers as hf

    from .test_transformers import make_model

    module = make_model("llama", torch.float32).model.layers[0].self_attn
    heads, kv_heads, dim = module.config.num_attention_heads, module.config.num_key_value_heads, module.head_dim
    padding = torch.ones(3, 9, dtype=torch.bool, device=DEVICE)
    padding[0, :3] = False
    decode = hf.mask_function(batch_size=3, q_length=1, kv_length=9, q_offset=8, attention_mask=padding,
                              device=DEVICE)
    prefill = hf.mask_function(batch_size=3, q_length=9, kv_length=9, attention_mask=padding, device=DEVICE)
    q1, q9 = torch.randn(3, heads, 1, dim, device=DEVICE), torch.randn(3, heads, 9, dim, device=DEVICE)
    k, v = (torch.randn(3, kv_heads, 9, dim, device=DEVICE) for _ in range(2))
    with SyncRecorder() as recorder, torch.no_grad():
        for _ in range(3):
            hf.attention_forward(module, q1, k, v, decode, dropout=0.0, scaling=dim ** -0.5)
            hf.attention_forward(module, q9, k, v, prefill, dropout=0.0, scaling=dim ** -0.5)
            hf.attention_forward(module, q9, k, v, None, dropout=0.0, scaling=dim ** -0.5)
    assert recorder.syncs == []


# --------------------------------------------------------------------------- Transformers


def test_transformers_fast_path_same_results_and_errors():
    pytest.importorskip("transformers")
    from fastattn.integrations import transformers as hf

    from .test_transformers import make_model

    module = make_model("llama", torch.float32).model.layers[0].self_attn
    heads, kv_heads, dim = module.config.num_attention_heads, module.config.num_key_value_heads, module.head_dim
    padding = torch.rand(2, 6, device=DEVICE) > 0.3
    padding[:, -1] = True
    q, k, v = torch.randn(2, heads, 6, dim, device=DEVICE), *(torch.randn(2, kv_heads, 6, dim, device=DEVICE)
                                                              for _ in range(2))
    for mask in (None, hf.mask_function(batch_size=2, q_length=6, kv_length=6, attention_mask=padding, device=DEVICE)):
        for kwargs in ({}, {"sliding_window": 3}, {"softcap": 20.0}, {"is_causal": False}):
            outs = [hf.attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.2, **kwargs)[0]
                    for _ in range(3)]
            full = hf._attention_forward(module, q, k, v, mask, 0.0, 0.2, kwargs, None, None)[0]
            assert all(torch.equal(o, full) for o in outs), kwargs
    for bad in ({"softcap": -1.0}, {"softcap": float("nan")}, {"s_aux": torch.zeros(heads + 1)}):
        with pytest.raises((TypeError, ValueError)) as expected:
            hf._build_call(module, q, k, v, None, 0.0, 0.2, bad)
        for _ in range(2):
            with pytest.raises(expected.type, match=str(expected.value)[:30].replace("(", r"\(").replace(")", r"\)")):
                hf.attention_forward(module, q, k, v, None, dropout=0.0, scaling=0.2, **bad)


@pytest.mark.parametrize("padded,skip,batch", list(itertools.product([True, False], [True, False], [1, 3])))
def test_decode_mask_is_sdpa_masks(padded, skip, batch):
    """The decode step's mask (one query that sees every key causally) is the padding row, with
    exactly sdpa_mask's values (or None where sdpa_mask returns None)."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    from fastattn.integrations import transformers as hf

    padding = torch.ones(batch, 12, dtype=torch.bool, device=DEVICE)
    if padded:
        padding[0, :4] = False
    for kv_length, q_offset, kv_offset in ((12, 11, 0), (10, 11, 2), (13, 12, 0), (8, 20, 4)):
        args = dict(batch_size=batch, q_length=1, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                    attention_mask=padding, allow_is_causal_skip=skip, device=DEVICE)
        ours, ref = hf.mask_function(**args), masking_utils.sdpa_mask(**args)
        assert (ours is None) == (ref is None), args
        if ref is not None:
            assert ours.shape == ref.shape and torch.equal(ours, ref), args


@pytest.mark.parametrize("mask_shape", [(2, 1, 1), (1, 1, 1), (2, 4, 1)], ids=["per-batch", "shared", "per-head"])
@pytest.mark.parametrize("heads, keys, packs", [
    ((4, 2), fastattn.backends.sdpa.PACK_MIN_KEYS + 3, True),
    ((8, 2), 19, True),  # a group of 4 packs with few keys too
    ((4, 2), 19, False),
], ids=["many-keys", "group-of-4", "group-of-2"])
def test_packed_gqa_decode_with_a_mask_gives_the_reference(mask_shape, heads, keys, packs):
    """A GQA decode step with a key-padding mask runs as packed query rows per key/value head
    (as Transformers does) where that measured faster; a mask that differs per head is not
    packed. Each way gives the reference."""
    (Hq, Hkv), S = heads, keys
    q = torch.randn(2, Hq, 1, 16, device=DEVICE)
    k, v = torch.randn(2, Hkv, S, 16, device=DEVICE), torch.randn(2, Hkv, S, 16, device=DEVICE)
    mask = torch.rand(mask_shape[:1] + (Hq if mask_shape[1] > 1 else 1,) + mask_shape[2:] + (S,), device=DEVICE) > 0.4
    mask[..., -1] = True
    call, _ = from_sdpa_args(q, k, v, mask, enable_gqa=True)
    runner = fastattn.backends.sdpa.SDPABackend().as_is_runner(call)
    assert runner is not None and (runner.__name__ == "run_packed") == (packs and mask_shape[1] == 1)
    with fastattn.use_backend("sdpa"):
        outs = [fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True) for _ in range(2)]
    ref, _ = reference_attention(q, k, v, mask=mask)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[1].double(), ref, atol=1e-5, rtol=0)


class OpRecorder(TorchDispatchMode):
    """The names of the ops dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's choice of triton on the CPU")
def test_inference_launches_the_kernel_without_the_custom_op():
    """Eager calls that need no gradient launch the Triton kernel directly: the custom op's
    dispatch costs more host time than a decode step's launch (benchmarks/results/README.md).
    Calls that need one take the op, whose autograd formula runs the backward kernel."""
    q, k, v = (t.half() for t in _sdpa_good())
    assert fastattn.explain(q, k, v, enable_gqa=True).chosen == "triton"
    with OpRecorder() as recorder:
        out = fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert not any("fastattn.triton_fwd" in op for op in recorder.ops)
    q.requires_grad_(True)
    with OpRecorder() as recorder:
        trained = fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert any("fastattn.triton_fwd" in op for op in recorder.ops)
    assert torch.equal(out, trained.detach())  # one kernel, one launch: the same bits


def test_the_fallback_keeps_a_window_mask_for_the_next_call_of_its_sizes():
    """Each layer of a decode step asks the fallback for the same window mask: built once, the
    same values as building it anew, and a new one for other sizes or bounds."""
    from fastattn.backends.sdpa import _position_mask, positional_bias

    q, k, v = (t.transpose(1, 2) for t in _sdpa_good())
    first = from_flash_args(q, k, v, 0.0, None, True, (2, 0), 0.0, None)
    again = from_flash_args(q.clone(), k.clone(), v.clone(), 0.0, None, True, (2, 0), 0.0, None)
    other = from_flash_args(q, k, v, 0.0, None, True, (3, 0), 0.0, None)
    mask = positional_bias(first)
    assert positional_bias(again) is mask
    assert torch.equal(mask, _position_mask(3, 7, 2, 0, first.diag_offset, q.device))
    assert positional_bias(other) is not mask and not torch.equal(positional_bias(other), mask)
