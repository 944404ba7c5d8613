"""The main-job command runs in seconds on a CPU-only machine and says who serves what."""
import subprocess
import sys

import pytest
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


def _without_transformers(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``import transformers`` fails as if it were not installed."""
    return subprocess.run([sys.executable, "-c", "import sys; sys.modules['transformers'] = None\n" + code],
                          capture_output=True, text=True)


def test_demo_without_transformers_says_what_to_install():
    run = _without_transformers("from fastattn.__main__ import main; sys.exit(main(['demo']))")
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and 'pip install "fastattn[transformers]"' in run.stderr


@pytest.mark.parametrize("code", ["import fastattn; fastattn.patch()", "import fastattn; fastattn.check(None, {})",
                                  "import fastattn.auto"])
def test_transformers_entry_points_without_transformers_say_what_to_install(code):
    run = _without_transformers(code)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError") and 'pip install "fastattn[transformers]"' in last, run.stderr


def test_import_and_report_work_without_transformers():
    run = _without_transformers("from fastattn.__main__ import main; sys.exit(main([]))")
    assert run.returncode == 0, run.stderr
    assert "transformers not available" in run.stdout
