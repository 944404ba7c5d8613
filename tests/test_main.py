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


def test_report_never_builds_the_cuda_extension(monkeypatch, capsys):
    """On a GPU machine without a built extension the self-check says how to build it instead of
    forcing the cuda backend (forcing compiles it: minutes inside a command meant to report)."""
    import fastattn.__main__ as main_module
    from fastattn import _extension
    from fastattn.backends.cuda import CudaBackend

    def no_build(*args, **kwargs):
        raise AssertionError("python -m fastattn must not build the CUDA extension")

    monkeypatch.setattr(_extension, "build", no_build)
    monkeypatch.setattr(CudaBackend, "prepare", no_build)
    monkeypatch.setattr(_extension, "_status", _extension.ExtensionStatus(
        False, "the CUDA extension is not built yet: `python -m fastattn build` builds it", buildable=True))
    where = main_module._self_check_device
    monkeypatch.setattr(main_module, "_self_check_device",
                        lambda name: ("cuda", torch.float16) if name == "cuda" else where(name))
    result = main_module._self_check("cuda")
    assert result.startswith("not built") and "python -m fastattn build" in result
    assert main([]) == 0
    assert "self-check: not built" in capsys.readouterr().out


def test_build_cache_key_is_what_changes_the_binary(monkeypatch, tmp_path):
    """Editing _extension.py (a comment, the loader) keeps the cached build; the sources and the
    compile or link flags change the key."""
    import shutil

    from fastattn import _extension

    archs, dims = ("9.0",), (64, 128)
    key = _extension._source_hash(archs, dims)
    edited = tmp_path / "_extension.py"
    edited.write_text(open(_extension.__file__).read() + "\n# a comment\n")
    monkeypatch.setattr(_extension, "__file__", str(edited))
    assert _extension._source_hash(archs, dims) == key
    assert _extension._source_hash(("8.0",), dims) != key  # the -gencode flags
    monkeypatch.setattr(_extension, "LINK_FLAGS", ["-lstdc++", "-static-libgcc"])
    assert _extension._source_hash(archs, dims) != key
    monkeypatch.undo()
    csrc = tmp_path / "csrc"
    shutil.copytree(_extension.CSRC, csrc)
    monkeypatch.setattr(_extension, "CSRC", csrc)
    assert _extension._source_hash(archs, dims) == key
    (csrc / "flash_api.cpp").write_text((csrc / "flash_api.cpp").read_text() + "\n// changed\n")
    assert _extension._source_hash(archs, dims) != key
