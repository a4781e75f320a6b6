"""Memory the routed experts reuse from call to call: saved intermediates, backward scratch, gradients.

On CPU, every fresh buffer of more than a few MB is mmap-ed by glibc and page-faulted in on first
touch, and freed memory is handed back to the system after each backward; in
``benchmarks/nn_layer.py`` that was ~20,000 page faults per forward+backward before this module
(~30 ms of saved intermediates, ~20 ms of backward temporaries and gradients). A
:class:`Workspace` keeps that memory between calls, and lends it so that no caller ever sees data
another caller still uses.
"""

from __future__ import annotations

import sys
import threading
from typing import Optional

import torch

__all__ = ["Workspace"]


class _Lendable:
    """One flat buffer, grown on demand, lent to one user at a time."""

    def __init__(self) -> None:
        self.buffer: Optional[torch.Tensor] = None
        self.owner: Optional[object] = None

    def acquire(self, numel: int, dtype: torch.dtype, device: torch.device):
        if self.owner is not None:
            return None, None
        buf = self.buffer
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self.buffer = torch.empty(numel, dtype=dtype, device=device)
        token = object()
        self.owner = token
        return buf[:numel], token

    def release(self, token: object) -> None:
        if self.owner is token:
            self.owner = None

    @property
    def nbytes(self) -> int:
        buf = self.buffer
        return 0 if buf is None else buf.numel() * buf.element_size()


def _unshared(store: dict, name: str) -> bool:
    """True if nothing but ``store`` refers to the storage ``store[name]`` (no tensor, no other reference).

    Counts the C++ references to the storage (the Python storage object held in ``store`` is one)
    and the Python references to that object (a caller holding ``grad.untyped_storage()`` gets this
    very object), the latter against a storage object referenced the same way.
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # a PyTorch without the counter: never reuse
        return False
    storage = store[name]
    probe_store = {name: torch.UntypedStorage(0)}
    probe = probe_store[name]
    return use_count(storage._cdata) == 1 and sys.getrefcount(storage) == sys.getrefcount(probe)


class Workspace:
    """Memory reused from call to call by :func:`~moelab.nn.grouped.fused_moe_ffn`.

    Three kinds, each lent so that nobody sees data another user still needs:

    - **Saved intermediates** (``n_assign * (2 d_model + h_in + 2 d_ff)`` elements for SwiGLU
      experts): taken by a forward that records a graph and returned at the end of that graph's
      backward (or when the graph is freed without a backward). A forward that finds them lent (two
      forwards before one backward, activation recomputation, another thread) allocates fresh
      memory. If a graph kept with ``retain_graph=True`` is back-propagated again after a later
      forward reused the buffer, PyTorch's saved-tensor version check raises "modified by an
      inplace operation" instead of giving wrong gradients.
    - **Backward scratch** (one expert's temporaries, ``max_e n_e * (3 d_model + d_ff + h_in)``
      elements): taken and returned within one backward.
    - **Gradients** returned to autograd (of the expert weights and of the input): the memory of
      the previous call's gradient is handed out again only when no tensor and no storage object
      refers to it any more — e.g. after ``optimizer.zero_grad()`` (``set_to_none=True``) dropped
      ``.grad``, or after autograd added it into an existing ``.grad`` (gradient accumulation) and
      let it go. A gradient still held anywhere (``.grad`` kept, a result of
      ``torch.autograd.grad``, a hook's copy) is never written: a fresh one is allocated instead.

    The cost is memory: one forward's intermediates, one expert's scratch and one set of gradients
    stay allocated between calls; :meth:`clear` frees them. Not saved in state dicts; copies and
    pickles start empty.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._saved = _Lendable()
        self._scratch = _Lendable()
        self._grads: dict = {}

    def __reduce__(self):  # deepcopy / pickle: a fresh, empty workspace (no lock or buffer to copy)
        return (Workspace, ())

    @property
    def _buffer(self) -> Optional[torch.Tensor]:
        return self._saved.buffer

    @property
    def _owner(self) -> Optional[object]:
        return self._saved.owner

    @property
    def nbytes(self) -> int:
        """Bytes currently held (0 when empty)."""
        grads = sum(s.nbytes() for s in self._grads.values())
        return self._saved.nbytes + self._scratch.nbytes + grads

    def clear(self) -> None:
        """Drop all buffers (graphs and gradients still using them keep their memory until freed)."""
        with self._lock:
            self._saved.buffer = None
            self._scratch.buffer = None
            self._grads.clear()

    def acquire(self, numel: int, dtype: torch.dtype, device: torch.device):
        """Saved intermediates: ``(flat tensor of numel elements, token)``, or ``(None, None)`` if lent out."""
        with self._lock:
            return self._saved.acquire(numel, dtype, device)

    def release(self, token: object) -> None:
        """Return the saved-intermediates buffer lent with ``token`` (no-op for a stale token)."""
        with self._lock:
            self._saved.release(token)

    def acquire_scratch(self, numel: int, dtype: torch.dtype, device: torch.device):
        """Backward scratch: ``(flat tensor of numel elements, token)``, or ``(None, None)`` if lent out."""
        with self._lock:
            return self._scratch.acquire(numel, dtype, device)

    def release_scratch(self, token: object) -> None:
        """Return the scratch buffer lent with ``token`` (no-op for a stale token)."""
        with self._lock:
            self._scratch.release(token)

    def returned(self, name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised contiguous tensor of ``shape``, ``dtype`` and ``device`` to hand to the caller.

        It reuses the memory of the previous gradient handed out under ``name`` when nothing else
        refers to it any more (see the class docstring), else it is freshly allocated and
        remembered for the next call.
        """
        with self._lock:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            if (
                name in self._grads
                and self._grads[name].nbytes() == nbytes
                and self._grads[name].device == device
                and _unshared(self._grads, name)
            ):
                return torch.empty(0, dtype=dtype, device=device).set_(self._grads[name], 0, shape)
            # the storage object, not a tensor: autograd steals an unreferenced gradient tensor
            # for .grad (instead of copying it), and a caller's grad.untyped_storage() is this object
            self._grads[name] = torch.UntypedStorage(nbytes, device=device)
            return torch.empty(0, dtype=dtype, device=device).set_(self._grads[name], 0, shape)
