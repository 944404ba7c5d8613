"""fastattn: flash attention for PyTorch and Hugging Face Transformers.

    import fastattn
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)   # SDPA drop-in
    print(fastattn.explain(q, k, v, is_causal=True))                        # which kernel, and why
    out = fastattn.flash_attn_func(q, k, v, causal=True)                    # flash-attn API
"""
from .dispatch import UnsupportedError, backends, use_backend
from .functional import explain, explain_flash, flash_attn_func, scaled_dot_product_attention
from .inputs import InvalidInputError

__version__ = "0.1.0"

__all__ = [
    "scaled_dot_product_attention",
    "flash_attn_func",
    "explain",
    "explain_flash",
    "use_backend",
    "backends",
    "UnsupportedError",
    "InvalidInputError",
    "__version__",
]
