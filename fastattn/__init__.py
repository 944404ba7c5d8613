"""fastattn: flash attention for PyTorch and Hugging Face Transformers.

    import fastattn
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)   # SDPA drop-in
    print(fastattn.explain(q, k, v, is_causal=True))                        # which kernel, and why
    out = fastattn.flash_attn_func(q, k, v, causal=True)                    # flash-attn API

Transformers: ``from_pretrained(..., attn_implementation="fastattn")`` (registered by
``import fastattn``), or ``fastattn.patch()`` / ``import fastattn.auto`` for every model
using "sdpa"; ``fastattn.check(model, inputs)`` compares against Transformers' attention.
"""
from .dispatch import UnsupportedError, registered_backends, use_backend
from .functional import (explain, explain_flash, explain_varlen, flash_attn_func, flash_attn_kvpacked_func,
                         flash_attn_qkvpacked_func, flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                         flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache, scaled_dot_product_attention)
from .kvcache import merge_attention_states
from .inputs import InvalidInputError

__version__ = "0.1.0"


def patch(model=None, *, torch_sdpa: bool = False):
    """Run Transformers' "sdpa" attention through fastattn (every model, loaded ones
    included); ``patch(model)`` switches one model to "fastattn" and returns it.
    ``torch_sdpa=True`` also routes ``torch.nn.functional.scaled_dot_product_attention``.
    Idempotent; :func:`unpatch` undoes it exactly."""
    from .integrations import require_transformers

    require_transformers("fastattn.patch()")
    from .integrations import transformers as _hf

    return _hf.patch(model, torch_sdpa=torch_sdpa)


def unpatch(model=None):
    """Undo :func:`patch` (for every model, or for ``model``)."""
    from .integrations import transformers as _hf

    return _hf.unpatch(model)


def check(model, inputs, reference: str = "eager"):
    """Run a Transformers model with fastattn and with its ``reference`` attention and
    report the largest differences per layer output on non-padded positions."""
    from .integrations import require_transformers

    require_transformers("fastattn.check()")
    from .integrations import transformers as _hf

    return _hf.check(model, inputs, reference=reference)


def _register_with_transformers() -> None:
    # Lazy and guarded: importing Transformers takes seconds, and a broken install
    # must not break `import fastattn`.
    try:
        from .integrations import install_transformers_registration

        install_transformers_registration()
    except Exception as exc:  # pragma: no cover - defensive
        import warnings

        warnings.warn(f"fastattn: could not set up the Transformers integration ({type(exc).__name__}: {exc})")


_register_with_transformers()

# "fastattn" in torch's flash-attention impl registry, where this torch has one (never activated
# here: torch.nn.attention.activate_flash_attention_impl("fastattn") does that).
from . import torch_sdpa as _torch_sdpa  # noqa: E402,F401

__all__ = [
    "scaled_dot_product_attention",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "merge_attention_states",
    "explain",
    "explain_varlen",
    "explain_flash",
    "use_backend",
    "registered_backends",
    "UnsupportedError",
    "InvalidInputError",
    "patch",
    "unpatch",
    "check",
    "__version__",
]
