"""What ``import fastattn`` costs: nothing beyond torch's own import."""
import subprocess
import sys

import torch

from fastattn._env import constant_while_tracing


def test_import_loads_no_compiler_triton_or_transformers():
    # A fresh interpreter: this one has imported everything already.
    heavy = ("torch._dynamo", "torch._inductor", "triton", "transformers")
    code = f"import sys, fastattn; print([m for m in {heavy!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"import fastattn imported {loaded}"


def test_constant_marker_is_what_dynamo_sets():
    def ours():
        return 1

    def theirs():
        return 1

    constant_while_tracing(ours)
    torch.compiler.assume_constant_result(theirs)
    assert ours.__dict__ == theirs.__dict__ and ours.__dict__, (ours.__dict__, theirs.__dict__)
