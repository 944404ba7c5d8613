"""The non-editable route: a wheel built from this tree, installed into a fresh venv, carries
the CUDA sources that `python -m fastattn build` compiles just in time."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fastattn import _extension

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, text=True)
    (found,) = out.glob("fastattn-*.whl")
    return found


def test_wheel_ships_every_cuda_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in _extension.sources(_extension.ALL_HEAD_DIMS):
        name = f"fastattn/csrc/{source.relative_to(_extension.CSRC).as_posix()}"
        assert name in names, f"{wheel.name} lacks {name}"
    headers = [p for p in _extension.CSRC.rglob("*") if p.suffix in (".h", ".cuh")]
    assert headers and all(f"fastattn/csrc/{h.relative_to(_extension.CSRC).as_posix()}" in names for h in headers)


def test_installed_wheel_finds_its_sources(wheel, tmp_path):
    # torch and the rest come from this interpreter's site-packages; fastattn from the wheel.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, text=True)
    code = ("import fastattn, fastattn._extension as e; "
            "missing = [str(p) for p in e.sources(e.ALL_HEAD_DIMS) if not p.is_file()]; "
            "print(fastattn.__file__); print(e.CSRC); print(missing)")
    lines = subprocess.run([python, "-c", code], cwd=tmp_path, check=True, capture_output=True,
                           text=True).stdout.splitlines()
    package, csrc, missing = lines[-3:]
    assert package.startswith(str(venv)), f"imported {package}, not the installed wheel"
    assert csrc.startswith(str(venv)) and missing == "[]", (csrc, missing)
