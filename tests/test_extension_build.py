"""What `python -m fastattn build` tells its user while it compiles (without compiling)."""
import subprocess
import sys

import pytest
import torch

from fastattn import _extension


def test_progress_counts_objects_and_says_when_it_links(tmp_path, capsys):
    progress = _extension._Progress(tmp_path, total=3, interval=0.01, quiet_for=3600)
    (tmp_path / "a.o").write_text("")
    assert "1/3 objects compiled, compiling" in progress.line()
    for name in ("b.cuda.o", "c.cuda.o"):
        (tmp_path / name).write_text("")
    assert "3/3 objects compiled, linking" in progress.line()
    with progress:
        progress._stop.wait(0.2)  # the thread prints the count it finds
    assert "3/3 objects compiled, linking" in capsys.readouterr().err


def test_estimate_grows_with_work_and_shrinks_with_jobs():
    one = _extension.estimate_seconds(("9.0",), (64,), jobs=1)
    assert _extension.estimate_seconds(("8.0", "9.0"), (64,), jobs=1) > one
    assert _extension.estimate_seconds(("9.0",), (64, 128), jobs=1) > one
    if (__import__("os").cpu_count() or 1) > 1:
        assert _extension.estimate_seconds(("9.0",), (64, 128), jobs=2) < _extension.estimate_seconds(("9.0",), (64, 128), jobs=1)


def test_torch_builder_is_imported_without_its_no_cuda_runtime_warning():
    code = "from fastattn import _extension; _extension._cpp_extension()"
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "No CUDA runtime" not in err, err


def test_first_line_gives_the_duration(tmp_path, monkeypatch, capfd):
    def fake_compile(directory, *args, **kwargs):
        _extension._library_path(directory).write_text("")

    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(_extension, "find_cuda_home", lambda: ("/usr/local/cuda", []))
    monkeypatch.setattr(_extension, "_use_cuda_home", lambda root: None)
    monkeypatch.setattr(_extension, "cutlass_include_or_raise", lambda: str(tmp_path))
    monkeypatch.setattr(_extension, "_has_ninja", lambda: True)
    monkeypatch.setattr(_extension, "_compile", fake_compile)
    monkeypatch.setattr(_extension, "_check_cxx_runtime", lambda lib: None)
    _extension.build(("8.0", "9.0"), (64,), directory=tmp_path / "build", load_library=False)
    err = capfd.readouterr().err.strip().splitlines()
    assert err[0].startswith("fastattn: compiling the CUDA extension: expect about "), err
    assert "--verbose" in err[0]
    assert err[-1].startswith("fastattn: built ")


@pytest.mark.parametrize("command", [["build", "--help"], ["demo", "--help"], ["report", "--help"]])
def test_subcommands_have_their_own_help(command, capsys):
    from fastattn.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(command)
    assert exit_.value.code == 0
    assert f"usage: python -m fastattn {command[0]}" in capsys.readouterr().out
