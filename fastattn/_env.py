"""Environment switches read in more than one place."""
import os


def interpreting() -> bool:
    """True when Triton kernels run through the Triton interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
