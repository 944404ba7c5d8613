"""The main-job command runs in seconds on a CPU-only machine and says who serves what."""
import torch

from fastattn.__main__ import main


def test_report_runs_and_explains(capsys):
    assert main([]) == 0
    text = capsys.readouterr().out
    assert "backends (priority order)" in text
    assert "sdpa: available" in text and "self-check: ok" in text
    assert "who serves typical calls" in text
    assert "head dim 512: sdpa" in text and "head_dim=512 is too large" in text
    if not torch.cuda.is_available():
        # Under the test suite's interpreter the triton kernel is exercised too.
        assert "triton: available" in text
