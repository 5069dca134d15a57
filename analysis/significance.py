"""Per-sample significance tests of a variant against the baseline on the same test samples.

Pure NumPy/SciPy on arrays; :mod:`analysis.tables` feeds them the ``predictions.npz`` of the
final runs.

- McNemar's exact test: of the samples the two runs disagree on, ``b`` the variant gets right
  and the baseline wrong, ``c`` the reverse; under the null each discordant sample is a fair
  coin, so p = ``binomtest(b, b + c, 0.5)`` two-sided.
- Pooled over seeds (strata), exactly: under the null ``b_s ~ Binomial(b_s + c_s, 1/2)``
  independently given each stratum's discordant count, so ``sum b_s`` is
  ``Binomial(sum (b_s + c_s), 1/2)`` and one exact binomial test on the summed counts is an
  exact conditional test of "no difference in any stratum" (the exact form of the
  Mantel-Haenszel test for paired binary data).
- Holm's step-down correction over a family of p-values.
- A percentile bootstrap over test samples, seeded: the same resamples for every statistic
  of a dataset, so intervals of a variant and of its difference to the baseline are paired;
  exact integer sums, so the result does not depend on the BLAS library or its threads.

>>> discordant(np.array([1, 1, 0, 1], bool), np.array([0, 1, 1, 0], bool))
(2, 1)
>>> round(mcnemar_p(10, 2), 6)   # 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * 79 / 4096
0.038574
>>> holm([0.01, 0.04, 0.03]).round(6).tolist()
[0.03, 0.06, 0.06]
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
BOOTSTRAP_CHUNK = 250  # resamples drawn at once (memory: chunk x samples counts)


def discordant(variant_correct: np.ndarray, reference_correct: np.ndarray) -> tuple[int, int]:
    """(b, c): samples only the variant gets right, samples only the reference gets right."""
    v = np.asarray(variant_correct, dtype=bool)
    r = np.asarray(reference_correct, dtype=bool)
    if v.shape != r.shape:
        raise ValueError(f"paired arrays differ in shape: {v.shape} vs {r.shape}")
    return int((v & ~r).sum()), int((~v & r).sum())


def mcnemar_p(b: int, c: int) -> float:
    """McNemar's exact two-sided p: ``scipy.stats.binomtest(b, b + c, 0.5)``; 1 when the two
    runs never disagree."""
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    from scipy import stats

    return float(stats.binomtest(int(b), int(b + c), 0.5, alternative="two-sided").pvalue)


def stratified_mcnemar(strata: Iterable[tuple[int, int]]) -> tuple[int, int, float]:
    """(sum b, sum c, p) over strata (seeds): one exact binomial test on the summed discordant
    counts (see the module docstring for why this is exact)."""
    pairs = list(strata)
    b = sum(int(x) for x, _ in pairs)
    c = sum(int(y) for _, y in pairs)
    return b, c, mcnemar_p(b, c)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input order. NaN stays NaN and is not
    counted in the family size m."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    if not m:
        return out
    order = finite[np.argsort(p[finite], kind="stable")]  # ascending p
    scaled = (m - np.arange(m)) * p[order]  # (m - i) p_(i), i from 0
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def bootstrap_intervals(numerators: np.ndarray, divisors: Sequence[int] | int = 1, level: float = 0.95,
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Percentile bootstrap intervals of the means of several per-sample statistics.

    Row m's statistic is the mean over the N test samples of ``numerators[m] / divisors[m]``,
    with integer numerators: a 0/1 correctness (divisor 1), the number of seeds that got a
    sample right (divisor: the seeds, for a mean over seeds), or a sum over seeds of
    differences of correctness. Every row is resampled with the same draws of N samples with
    replacement (``numpy.random.default_rng(seed)``), and the resampled sums are exact integer
    products, so a row's interval depends only on its own data, ``resamples`` and ``seed``:
    never on the other rows, the BLAS library or its threads. Returns (M, 2) [low, high].
    """
    k = np.atleast_2d(np.asarray(numerators))
    if not (np.issubdtype(k.dtype, np.integer) or k.dtype == bool):
        raise TypeError(f"numerators must be integers (exact sums), got {k.dtype}")
    k = k.astype(np.int64)  # (M, N)
    m, n = k.shape
    div = np.broadcast_to(np.asarray(divisors, dtype=np.int64), (m,))  # (M,)
    out = np.full((m, 2), np.nan)
    if n == 0 or m == 0:
        return out
    rng = np.random.default_rng(seed)
    means = np.empty((m, resamples))  # (M, B)
    done = 0
    while done < resamples:
        size = min(BOOTSTRAP_CHUNK, resamples - done)
        draws = rng.integers(0, n, size=(size, n))  # (size, N) sample positions
        counts = np.bincount((np.arange(size)[:, None] * n + draws).ravel(), minlength=size * n)
        sums = counts.reshape(size, n) @ k.T  # (size, M) int64: exact, so independent of the other rows
        means[:, done:done + size] = sums.T / (n * div[:, None])
        done += size
    alpha = (1.0 - level) / 2
    return np.quantile(means, [alpha, 1.0 - alpha], axis=1).T
