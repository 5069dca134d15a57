"""Shared batch geometry, written once and used by the variants (inside a training step)
and by the validation diagnostics.

- :mod:`~carrot.geometry.slots`: class slots of a batch, per-class sums, means and
  moments, L2 normalisation, pairwise distances;
- :mod:`~carrot.geometry.bhattacharyya`: Bhattacharyya distance and coefficient of
  diagonal Gaussians;
- :mod:`~carrot.geometry.spectra`: spectral entropy and effective rank, per matrix and for
  every class of a batch at once (one ``eigh`` on the CPU, a resolvent integral on CUDA);
- :mod:`~carrot.geometry.confusion`: soft confusion between classes;
- :mod:`~carrot.geometry.distributed`: batch statistics across data-parallel processes
  (autograd-aware gathers and sums; no-ops without a process group).

What a training step calls here is sync-free on CUDA (no ``torch.unique``, no boolean
indexing with data-dependent shapes, no ``.item()`` / ``.cpu()``, no ``eigh``: the per-class
spectra take the resolvent route of :mod:`~carrot.geometry.spectra` there). On the CPU a step
may read what the host has anyway (:func:`reads_on_host`, :func:`used_class_slots`,
:func:`kth_largest`); :func:`device_routes` runs the CUDA routes on CPU tensors, to check them
without a GPU.
Statistics are computed in float32 whatever the input dtype (inputs are cast inside, and
the matrix products run with autocast off, so bf16 autocast does not round them); the
per-class sums and means take a ``dtype`` for the float64 diagnostics.
"""
from carrot.geometry.bhattacharyya import bhattacharyya_diag, bhattacharyya_pairs, sample_pair_bhattacharyya
from carrot.geometry.confusion import soft_confusion, symmetric_confusion
from carrot.geometry.slots import (
    class_deviations, class_means, class_moments, class_slots, class_sums, compact_slots, device_routes, kth_largest,
    l2_normalize, no_autocast, pairwise_distance, pairwise_sq_distance, reads_on_host, rms_radius, slot_sums,
    slot_variance, stat_float, sq_distance_to_distance, used_class_slots,
)
from carrot.geometry.spectra import (
    BlockSpectrum, block_spectrum, class_centring_operator, effective_rank, resolvent_xlogx, spectral_entropy,
    symmetric_eigh, trace_terms, xlogx_sum,
)

__all__ = [
    "BlockSpectrum", "bhattacharyya_diag", "bhattacharyya_pairs", "block_spectrum", "class_centring_operator",
    "class_deviations", "class_means", "class_moments", "class_slots", "class_sums", "compact_slots", "device_routes",
    "effective_rank", "kth_largest", "l2_normalize", "no_autocast", "pairwise_distance", "pairwise_sq_distance",
    "reads_on_host", "resolvent_xlogx", "rms_radius", "sample_pair_bhattacharyya", "slot_sums", "slot_variance",
    "soft_confusion", "spectral_entropy", "sq_distance_to_distance", "stat_float", "symmetric_confusion",
    "symmetric_eigh", "trace_terms", "used_class_slots", "xlogx_sum",
]
