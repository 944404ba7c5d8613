"""Environment switches read in more than one place."""
import os


def interpreting() -> bool:
    """True when Triton kernels run through the Triton interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def constant_while_tracing(fn):
    """Mark ``fn`` as ``torch.compiler.assume_constant_result`` does: torch.compile calls it
    once while tracing and bakes its result into the graph. That function imports
    ``torch._dynamo`` (about a second, more than ``import torch`` itself) only to set this
    attribute, which is all Dynamo reads (torch 2.5 to 2.14); ``import fastattn`` must not
    pay for a compiler it may never use. tests/test_import.py checks the two still agree."""
    fn._dynamo_marked_constant = True
    return fn
