"""Attention masks held as what they are made of, for the masks Transformers builds.

:class:`CausalPaddingMask` is Transformers' ``sdpa_mask`` for a causal batch with key padding:
a ``(B, 1, L, S)`` bool tensor to every reader, but stored as its ``(B, S)`` padding and its
diagonal (and a sliding window's width). fastattn's attention reads those (causal and the
window in the kernel, one padding row per batch), so a padded prefill builds nothing of size
L x S; any other reader (a slice, an
index, ``.to``, a comparison, torch's SDPA) gets ``sdpa_mask``'s exact values, built once on
first use and kept.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils._pytree import tree_map

__all__ = ["CausalPaddingMask"]


class _Values:
    """What a mask and its full-range views (slices, detach) share: the parts, the dense mask once built."""

    __slots__ = ("padding", "diag", "left", "dense", "dense_version", "written")

    def __init__(self, padding: torch.Tensor, diag: int, left: int = -1, dense: Optional[torch.Tensor] = None,
                 written: bool = False):
        self.padding, self.diag, self.left, self.dense, self.written = padding, diag, left, dense, written
        self.dense_version = None if dense is None else _version_of(dense)


def _version_of(t: torch.Tensor) -> Optional[int]:
    """``t``'s version counter; None for an inference tensor (torch.inference_mode), which has none."""
    return None if t.is_inference() else t._version


_aliasing: dict = {}  # op -> whether it may return a view of, or write into, a tensor argument


def _aliases(func) -> bool:
    found = _aliasing.get(func)
    if found is None:
        schema = func._schema
        found = _aliasing[func] = (any(r.alias_info is not None for r in schema.returns)
                                   or any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments))
    return found


_aten = torch.ops.aten


class CausalPaddingMask(torch.Tensor):
    """``(B, 1, L, S)`` bool: key ``j`` of batch ``b`` is visible to query ``i`` when
    ``padding[b, j]`` and ``j <= i + diag`` (Transformers' causal rule in its own offsets:
    ``diag = q_offset - kv_offset``), and with ``left >= 0`` also ``j >= i + diag - left``
    (a sliding window of ``left + 1`` keys, Transformers' ``sliding_window``).

    A wrapper tensor (no storage of its own). Every op other than fastattn's attention reads the
    materialized mask (:meth:`dense`), built on first use and kept, so writes into the mask or into
    a view of it are seen by later readers. A full-range slice (``mask[:, :, :, :S]``), ``detach``
    and a move to another device stay masks of this type. :meth:`compact` gives fastattn the
    ``((B, 1, 1, S) padding, diag, left bound)`` form only while nothing was written: writes through the
    mask or its views move the mask's version counter (shared with its views), writes into the
    tensor :meth:`dense` returned move that one's. Inference tensors (made under
    ``torch.inference_mode``) have no version counters: there any op that may write the mask or
    return a view of it ends the compact form, and so does :meth:`dense`.
    """

    # Ops return plain tensors: only the mask function (and the views below) make this type.
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, padding: torch.Tensor, diag: int, q_length: int, left: int = -1,
                values: Optional[_Values] = None):
        B, S = padding.shape
        mask = torch.Tensor._make_wrapper_subclass(cls, (B, 1, q_length, S), dtype=torch.bool,
                                                   device=padding.device)
        mask._values = values = _Values(padding, diag, left) if values is None else values
        # the kernel's (left, right) window is around query i's own index (top-left): key j from
        # i - left_bound (-1: unbounded) to i + diag
        mask._compact = (padding[:, None, None, :], diag, -1 if values.left < 0 else values.left - diag)
        mask._sizes = (B, q_length, S)  # read on every attention call: cheaper than .shape on a subclass
        mask._start_version = _version_of(mask)
        return mask

    def __init__(self, *args, **kwargs):
        pass

    @property
    def padding(self) -> torch.Tensor:
        return self._values.padding

    @property
    def diag(self) -> int:
        return self._values.diag

    @property
    def left(self) -> int:
        return self._values.left

    def compact(self, sizes: Optional[tuple[int, int, int]] = None) -> Optional[tuple[torch.Tensor, int]]:
        """((B, 1, 1, S) padding, diag, left bound), or None once the mask's values were written (or when
        ``sizes``, (B, L, S), are not this mask's)."""
        if sizes is not None and sizes != self._sizes:
            return None
        values = self._values
        if values.written:
            return None
        if ((self._start_version is not None and self._version != self._start_version)
                or (values.dense_version is not None and values.dense._version != values.dense_version)):
            values.written = True
            return None
        return self._compact

    def dense(self) -> torch.Tensor:
        """The (B, 1, L, S) bool tensor ``sdpa_mask`` builds (contiguous), made on first use."""
        dense = self._materialize()
        if self._values.dense_version is None or self._start_version is None:
            self._values.written = True  # writes into it would go unseen (inference tensors)
        return dense

    def _materialize(self) -> torch.Tensor:
        values = self._values
        if values.dense is None:
            L, S = self._sizes[1], self._sizes[2]
            causal = torch.ones(L, S, dtype=torch.bool, device=values.padding.device).tril_(values.diag)
            if values.left >= 0:
                causal.triu_(values.diag - values.left)
            values.dense = causal & values.padding[:, None, None, :]
            values.dense_version = _version_of(values.dense)
        return values.dense

    def _same_values(self) -> "CausalPaddingMask":
        """A new mask with this one's values (for the ops that return a view of all of it)."""
        return CausalPaddingMask(self.padding, self.diag, self._sizes[1], values=self._values)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        mask = args[0] if args else None
        if type(mask) is cls and mask.compact() is not None:
            if func in (_aten.detach.default, _aten.alias.default):
                return mask._same_values()
            if func is _aten.slice.Tensor and _full_range(mask, *args[1:], **kwargs):
                return mask._same_values()
            if func is _aten._to_copy.default and _only_a_move(mask, kwargs):
                return CausalPaddingMask(mask.padding.to(kwargs["device"]), mask.diag, mask._sizes[1], mask.left)
        wrapper_of = {}  # id(dense) -> its mask: an op returning a mask it wrote returns that mask
        untracked = _aliases(func)  # and inference tensors: such an op ends the compact form

        def unwrap(x):
            if isinstance(x, CausalPaddingMask):
                dense = x._materialize()
                wrapper_of[id(dense)] = x
                if untracked and (x._start_version is None or x._values.dense_version is None):
                    x._values.written = True
                return dense
            return x

        args, kwargs = tree_map(unwrap, (args, kwargs))
        out = func(*args, **kwargs)
        return tree_map(lambda o: wrapper_of.get(id(o), o) if isinstance(o, torch.Tensor) else o, out)

    # torch.compile (a region compiled apart from the mask function, e.g. one decoder layer):
    # a traceable subclass whose ops trace through __torch_dispatch__.
    def __tensor_flatten__(self):
        if self.compact() is None:
            return ["padding", "_written_dense"], (self.diag, self._sizes[1], self.left)
        return ["padding"], (self.diag, self._sizes[1], self.left)

    @property
    def _written_dense(self) -> torch.Tensor:
        return self.dense()

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        diag, q_length, left = meta
        dense = inner.get("_written_dense")
        values = _Values(inner["padding"], diag, left, dense, written=dense is not None)
        return CausalPaddingMask(inner["padding"], diag, q_length, values=values)

    def __repr__(self):
        return repr(self.dense())

    # What reads a tensor's memory from Python rather than through an op reads the dense mask's.
    def tolist(self):
        return self.dense().tolist()

    def numpy(self, *, force: bool = False):
        return self.dense().numpy(force=force)

    def data_ptr(self) -> int:
        return self.dense().data_ptr()

    def untyped_storage(self):
        return self.dense().untyped_storage()

    def __deepcopy__(self, memo):
        if self.compact() is None:
            return self.dense().__deepcopy__(memo)
        return CausalPaddingMask(self.padding.__deepcopy__(memo), self.diag, self._sizes[1], self.left)

    def __reduce_ex__(self, protocol):
        if self.compact() is None:  # written: its values are the dense tensor's
            return self.dense().__reduce_ex__(protocol)
        return CausalPaddingMask, (self.padding, self.diag, self._sizes[1], self.left)


def _full_range(mask, dim=0, start=None, end=None, step=1) -> bool:
    size = mask.shape[dim]
    return step == 1 and (start is None or start == 0 or start <= -size) and (end is None or end >= size)


def _only_a_move(mask, kwargs) -> bool:
    """``_to_copy`` that changes the device only (``mask.to(device)``, ``mask.cuda()``)."""
    extra = set(kwargs) - {"dtype", "device", "layout", "non_blocking", "memory_format"}
    return (not extra and kwargs.get("dtype") in (None, torch.bool) and kwargs.get("layout") in (None, torch.strided)
            and kwargs.get("memory_format") in (None, torch.preserve_format) and kwargs.get("device") is not None)
