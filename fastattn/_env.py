"""Environment switches read in more than one place."""
from __future__ import annotations

import os
from typing import Optional

# The variables a backend choice reads (dispatch.py): FASTATTN_BACKEND, FASTATTN_STRICT, and
# TRITON_INTERPRET (interpreting()).
DECISION_VARIABLES = ("FASTATTN_BACKEND", "FASTATTN_STRICT", "TRITON_INTERPRET")


def _raw_reader(names: tuple[str, ...]):
    """A function returning the raw values of ``names`` in ``os.environ``, as a tuple to key a
    cache on. ``os.environ.get`` costs about 0.7 us a variable (it encodes the name each time);
    CPython's ``os.environ`` keeps its items in ``_data`` under encoded names, which every
    ``os.environ[...] = ...`` / ``del`` / ``putenv`` through os.environ updates, so reading that
    dict with the names encoded once sees the same changes for a twentieth of the cost."""
    environ = os.environ

    def public():
        return tuple(os.environ.get(name) for name in names)

    data = getattr(environ, "_data", None)
    encode = getattr(environ, "encodekey", None)
    if not isinstance(data, dict) or encode is None:  # not CPython's os._Environ: the public way
        return public
    keys = tuple(encode(name) for name in names)
    get = data.get
    if len(keys) == 3:  # the common case, spelled out: no generator per call
        a, b, c = keys

        def raw():  # os.environ swapped for a stand-in (mock.patch): that one, the public way
            return (get(a), get(b), get(c)) if os.environ is environ else public()
        return raw
    return lambda: tuple(get(key) for key in keys) if os.environ is environ else public()


decision_environment = _raw_reader(DECISION_VARIABLES)
decision_environment.__doc__ = "The raw values of DECISION_VARIABLES (None where unset), cheaply."
_INTERPRET = DECISION_VARIABLES.index("TRITON_INTERPRET")


def interpreting() -> bool:
    """True when Triton kernels run through the Triton interpreter (TRITON_INTERPRET=1). Read
    raw (each launch asks): "1" as os.environ gives it, or as bytes where it keeps them so."""
    return decision_environment()[_INTERPRET] in ("1", b"1")


def decoded(raw) -> Optional[str]:
    """A raw value of :func:`decision_environment` as os.environ would give it."""
    return os.fsdecode(raw) if isinstance(raw, bytes) else raw


def constant_while_tracing(fn):
    """Mark ``fn`` as ``torch.compiler.assume_constant_result`` does: torch.compile calls it
    once while tracing and bakes its result into the graph. That function imports
    ``torch._dynamo`` (about a second, more than ``import torch`` itself) only to set this
    attribute, which is all Dynamo reads (torch 2.5 to 2.14); ``import fastattn`` must not
    pay for a compiler it may never use. tests/test_import.py checks the two still agree."""
    fn._dynamo_marked_constant = True
    return fn
