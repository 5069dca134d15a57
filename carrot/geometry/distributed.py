"""Batch statistics across data-parallel processes (``torch.distributed``).

Under DDP every rank holds a slice of the global batch, each rank's loss is back-propagated
on that rank, and DDP averages the parameter gradients over the W ranks. A variant matches
one process on the concatenated global batch (loss: the mean of the ranks' losses; gradients
equal after DDP's average) when each of its terms is one of two kinds:

- a mean over the rank's own samples (the cross-entropy, expansion's KL and auxiliary CE,
  nuisance's CE on the augmented rows): with equal batch sizes the mean over ranks of the
  per-rank means is the global mean, and its gradient on a rank's rows is W times that of
  the global mean, which DDP's 1/W average undoes. Nothing to gather.
- a function of batch statistics (class means and variances, spectra, confusion, the pairs
  of a batch): computed from all ranks' rows, gathered with :func:`gather_rows` (or per-class
  sums reduced with :func:`all_reduce_sum`), so every rank computes the same global value.
  The gather's backward sums what every rank sends back to each rank's rows, so a rank's
  embeddings get W times their share of the gradient, and DDP's average again gives exactly
  the single-process gradient.

Gathers that must carry gradients are autograd-aware (their backward is a collective too,
run by every rank in the same order as its forward). Without an initialised process group
every function returns its input and makes no collective call, so single-process results
are bit-identical. Ranks must hold equal batch sizes (the rows of rank r are
``r * B .. (r + 1) * B - 1`` of the gathered batch).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """A process group is initialised (with one rank or more: collectives are made)."""
    return dist.is_available() and dist.is_initialized()


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the ranks' gradients of this rank's rows.

    The backward all-reduces the whole (W B, ...) gradient and keeps this rank's slice, as
    ``torch.distributed.nn.functional.all_gather`` does with a reduce-scatter (deprecated in
    recent PyTorch, and emulated with all-to-all on gloo); an all-reduce works on every backend.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.start, ctx.rows = dist.get_rank() * x.shape[0], x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[ctx.start:ctx.start + ctx.rows]


def gather_rows(x: Tensor) -> Tensor:
    """All ranks' rows of ``x`` (B, ...) as one (W B, ...) tensor in rank order, with gradients.

    Autograd-aware: the backward sums, over the ranks, the gradient each rank computed for
    this rank's rows and returns it to this rank's ``x``. Returns ``x`` itself (no
    collective) when not distributed.
    """
    if not is_distributed():
        return x
    return _GatherRows.apply(x)


def gather_rows_no_grad(x: Tensor) -> Tensor:
    """All ranks' rows of ``x`` (labels, detached logits), without a gradient; ``x`` when not distributed."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, 0)


def local_rows(x_all: Tensor, rows: int) -> Tensor:
    """This rank's ``rows`` rows of a gathered (W B, ...) tensor (a slice: gradients flow back);
    ``x_all`` itself when not distributed."""
    if not is_distributed():
        return x_all
    start = dist.get_rank() * rows
    return x_all[start:start + rows]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the ranks' gradients too (each rank's input enters every rank's output)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.detach().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over the ranks, autograd-aware (returns ``x`` when not distributed)."""
    if not is_distributed():
        return x
    return _AllReduceSum.apply(x)


def all_reduce_sum_no_grad(x: Tensor) -> Tensor:
    """Sum of ``x`` over the ranks as a new tensor without a gradient (``x`` when not distributed)."""
    if not is_distributed():
        return x
    out = x.detach().clone()
    dist.all_reduce(out)
    return out


def all_reduce_mean_no_grad(x: Tensor) -> Tensor:
    """Mean of ``x`` over the ranks without a gradient (e.g. the global mean of per-rank means)."""
    if not is_distributed():
        return x
    return all_reduce_sum_no_grad(x) / dist.get_world_size()
