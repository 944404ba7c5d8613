"""Under device_map, layers live on different GPUs: the backward's launches (the delta
preprocess, the dK/dV and the dQ kernels) must run with the tensors' device current, as the
forward's do (tests/test_dispatch.py checks the forward and device_guard itself). The backward
launcher imports device_guard by name, so it is checked in flash_bwd's own namespace."""
import contextlib

import torch

from fastattn.kernels.triton import flash_bwd


def test_backward_launches_happen_under_the_inputs_device(monkeypatch):
    active, launches = [], []
    real_guard = flash_bwd.device_guard

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

    monkeypatch.setattr(flash_bwd, "device_guard", recording_guard)
    for name in ("_bwd_preprocess_kernel", "_flash_bwd_dkdv_kernel", "_flash_bwd_dq_kernel"):
        monkeypatch.setattr(flash_bwd, name, RecordingKernel(name))
    q, k, v = (torch.randn(1, 2, 16, 16, dtype=torch.float16) for _ in range(3))
    out, do = torch.randn_like(q), torch.randn_like(q)
    lse = torch.randn(1, 2, 16)
    flash_bwd.flash_attn_backward(do, q, k, v, out, lse, scale=0.25)
    assert launches == [("_bwd_preprocess_kernel", [q.device]), ("_flash_bwd_dkdv_kernel", [q.device]),
                        ("_flash_bwd_dq_kernel", [q.device])]
