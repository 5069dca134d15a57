"""Shared batch geometry, written once and used by the variants (inside a training step)
and by the validation diagnostics.

- :mod:`~carrot.geometry.slots`: class slots of a batch, per-class sums, means and
  moments, L2 normalisation, pairwise distances;
- :mod:`~carrot.geometry.bhattacharyya`: Bhattacharyya distance and coefficient of
  diagonal Gaussians;
- :mod:`~carrot.geometry.spectra`: spectral entropy and effective rank, per matrix and per
  class from one eigendecomposition;
- :mod:`~carrot.geometry.confusion`: soft confusion between classes;
- :mod:`~carrot.geometry.distributed`: batch statistics across data-parallel processes
  (autograd-aware gathers and sums; no-ops without a process group).

Everything here is sync-free on CUDA (no ``torch.unique``, no boolean indexing with
data-dependent shapes, no ``.item()`` / ``.cpu()``) except the ``eigh`` of the spectra.
Statistics are computed in float32 whatever the input dtype (inputs are cast inside, and
the matrix products run with autocast off, so bf16 autocast does not round them); the
per-class sums and means take a ``dtype`` for the float64 diagnostics.
"""
from carrot.geometry.bhattacharyya import bhattacharyya_diag, bhattacharyya_pairs, sample_pair_bhattacharyya
from carrot.geometry.confusion import soft_confusion, symmetric_confusion
from carrot.geometry.slots import (
    class_means, class_moments, class_slots, class_sums, compact_slots, l2_normalize, no_autocast,
    pairwise_distance, rms_radius,
)
from carrot.geometry.spectra import (
    BlockSpectrum, block_spectrum, class_centring_operator, effective_rank, spectral_entropy, symmetric_eigh,
    trace_terms, xlogx_sum,
)

__all__ = [
    "BlockSpectrum", "bhattacharyya_diag", "bhattacharyya_pairs", "block_spectrum", "class_centring_operator",
    "class_means", "class_moments", "class_slots", "class_sums", "compact_slots", "effective_rank",
    "l2_normalize", "no_autocast", "pairwise_distance", "rms_radius", "sample_pair_bhattacharyya",
    "soft_confusion", "spectral_entropy", "symmetric_confusion", "symmetric_eigh", "trace_terms", "xlogx_sum",
]
