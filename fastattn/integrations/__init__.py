"""Integrations with other libraries. Each lives in its own module and is imported
only when used, so that ``import fastattn`` never pays for (or breaks on) them.

Transformers: ``import fastattn`` must register ``attn_implementation="fastattn"``,
but importing ``transformers.modeling_utils`` takes seconds. So registration is
lazy: done at once if Transformers' modules are already imported, else right
after they are (a post-import hook on ``sys.meta_path``). A failure there becomes
a warning, never an error in the user's import.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

INSTALL_HINT = 'pip install "fastattn[transformers]"'


def require_transformers(what: str) -> None:
    """Raise an ImportError naming what to install, before ``what`` reaches for Transformers."""
    try:
        found = importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ImportError(f"{what} needs Transformers, which is not installed here: {INSTALL_HINT}")


# module name -> name of the registration function in .transformers that takes the module
_TRANSFORMERS_HOOKS = {
    "transformers.modeling_utils": "register_attention",
    "transformers.masking_utils": "register_mask",
    "transformers.generation.continuous_batching.continuous_api": "register_continuous_batching",
}


def _run_hook(name: str, module) -> None:
    try:
        from . import transformers as integration

        getattr(integration, _TRANSFORMERS_HOOKS[name])(module)
    except Exception as exc:  # a broken or incompatible Transformers must not break its own import
        warnings.warn(f"fastattn could not register attn_implementation='fastattn' with {name}: "
                      f"{type(exc).__name__}: {exc}", stacklevel=2)


class _RegisteringLoader(importlib.abc.Loader):
    """Wraps a module's real loader; registers fastattn once the module has run."""

    def __init__(self, inner, name: str):
        self._inner = inner
        self._name = name

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _run_hook(self._name, module)

    def __getattr__(self, attr):  # get_source, get_filename, ... for inspect and friends
        return getattr(self._inner, attr)


class _TransformersFinder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.pending = set(_TRANSFORMERS_HOOKS)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, fullname)
                return spec
        return None


def install_transformers_registration() -> None:
    """Register with Transformers now if its modules are loaded, else as soon as they are."""
    waiting = []
    for name in _TRANSFORMERS_HOOKS:
        module = sys.modules.get(name)
        if module is not None:
            _run_hook(name, module)
        else:
            waiting.append(name)
    if not waiting or any(isinstance(f, _TransformersFinder) for f in sys.meta_path):
        return
    try:
        if importlib.util.find_spec("transformers") is None:
            return  # not installed: nothing to register with
    except (ImportError, ValueError):
        return
    finder = _TransformersFinder()
    finder.pending = set(waiting)
    sys.meta_path.insert(0, finder)
