"""The operations of a step that would make the host wait for a CUDA device, found on any device.

:func:`sync_ops` runs a function under a ``TorchDispatchMode`` that records every operation
whose CUDA implementation reads a result back on the host:

- a tensor turned into a Python number or bool (``.item()``, ``int(t)``, ``if t:``);
- outputs whose shape depends on the data: ``nonzero``, ``unique``, ``masked_select``,
  boolean-mask indexing and assignment, ``repeat_interleave`` without ``output_size``,
  ``bincount``, ``histc``;
- linalg's error checks (``cholesky``, ``inv``, ``solve`` without ``_ex``), ``eigh``, ``svd``,
  ``eig`` and ``lstsq``;
- ``equal`` and ``allclose``;
- a tensor made from Python data in the step (``torch.tensor([...])``): on a GPU, a copy from
  the host that the host waits for.

With :func:`carrot.geometry.device_routes` a CPU runs the routes a CUDA step takes, so the
check covers them on a machine without a GPU. It sees what PyTorch dispatches, not a copy of
a CPU tensor to the host (``.cpu()``, ``.numpy()`` and ``.tolist()`` are free there and
dispatch nothing) nor what a CUDA kernel does inside: on a GPU,
``torch.cuda.set_sync_debug_mode("error")`` (``carrot bench --sync-debug``) is the check itself.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten operations that sync on CUDA whatever their arguments
SYNCING = frozenset({
    "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::argwhere", "aten::_unique",
    "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::unique_dim_consecutive",
    "aten::masked_select", "aten::bincount", "aten::histc", "aten::_linalg_check_errors", "aten::_linalg_eigh",
    "aten::linalg_eigvalsh", "aten::_linalg_svd", "aten::linalg_eig", "aten::linalg_eigvals", "aten::linalg_lstsq",
    "aten::equal", "aten::allclose",
    # a tensor made from Python data (torch.tensor([...])): on a GPU, a copy the host waits for
    "aten::lift_fresh", "aten::lift_fresh_copy",
})


def _bool_index(indices: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (indices or ()))


def syncs(func, args: tuple, kwargs: dict) -> bool:
    """Whether the aten operation ``func`` called with these arguments would sync on CUDA."""
    name = func._schema.name
    if name in SYNCING:
        return True
    if name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
        return _bool_index(args[1] if len(args) > 1 else kwargs.get("indices"))
    if name == "aten::repeat_interleave":  # tensor repeats: the output's length is their sum
        return func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
    return False


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if syncs(func, args, kwargs):
            self.found.append(func._schema.name)
        return func(*args, **kwargs)


def sync_ops(fn: Callable[[], object]) -> list[str]:
    """The syncing operations (:func:`syncs`) ``fn()`` dispatches, forward and backward, in order."""
    with _Recorder() as recorder:
        fn()
    return recorder.found
