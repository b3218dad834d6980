"""Uncertainty for evaluation metrics: standard errors, 95% intervals, and the metric record layout.

Proportions (accuracy) get the Wilson score interval, which stays inside [0, 1] and behaves at small n
and at 0% or 100%; means of graded scores get a normal interval from the sample standard error; ratios
over documents (perplexity, bits per byte) get a seeded bootstrap over documents, because their tokens
are not independent draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for a proportion."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean with the sample standard deviation (ddof=1), as lm-eval reports it."""
    n = len(values)
    if n < 2:
        return 0.0
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1) / math.sqrt(n))


def normal_ci(mean: float, stderr: float, lo: float = -math.inf, hi: float = math.inf) -> tuple[float, float]:
    """mean ± 1.96 standard errors, clipped to the metric's range."""
    return (max(lo, mean - Z95 * stderr), min(hi, mean + Z95 * stderr))


def proportion(successes: int, n: int, baseline: float | None = None) -> dict[str, Any]:
    """A 0/1 metric: its mean, standard error, Wilson 95% interval and (optionally) a baseline."""
    value = successes / n if n else 0.0
    stderr = math.sqrt(value * (1 - value) / (n - 1)) if n > 1 else 0.0  # = mean_stderr of the 0/1 values
    return metric(value, stderr=stderr, ci95=wilson(successes, n), baseline=baseline)


def graded(values: Sequence[float], baseline: float | None = None, lo: float = 0.0, hi: float = 1.0) -> dict[str, Any]:
    """A mean of per-example scores (partial credit): normal 95% interval from the standard error."""
    value = float(np.mean(values)) if len(values) else 0.0
    stderr = mean_stderr(values)
    return metric(value, stderr=stderr, ci95=normal_ci(value, stderr, lo, hi), baseline=baseline)


def paired_difference(before: Sequence[bool], after: Sequence[bool]) -> dict[str, Any]:
    """Accuracy after minus before on the same problems: the difference, a 95% interval and McNemar's
    exact two-sided p-value. Pairing counts only the problems that changed (gained vs lost), so it sees
    a real change that two overlapping Wilson intervals would hide."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_difference needs two equally long, non-empty lists; got {len(before)} and {len(after)}")
    n = len(before)
    gained = sum(1 for b, a in zip(before, after) if a and not b)
    lost = sum(1 for b, a in zip(before, after) if b and not a)
    diff = (gained - lost) / n
    # Wald interval for a difference of paired proportions.
    stderr = math.sqrt(max(gained + lost - (gained - lost) ** 2 / n, 0.0)) / n
    discordant = gained + lost
    tail = sum(math.comb(discordant, k) for k in range(min(gained, lost) + 1)) / 2.0 ** discordant
    return {"n": n, "gained": gained, "lost": lost, "difference": diff,
            "ci95": normal_ci(diff, stderr, -1.0, 1.0), "p_value": min(1.0, 2 * tail)}


def bootstrap_ci(numerators: Sequence[float] | np.ndarray, denominators: Sequence[float] | np.ndarray,
                 statistic: Callable[[np.ndarray], np.ndarray], resamples: int = 1000,
                 seed: int = 0) -> tuple[float, float] | None:
    """95% percentile interval of `statistic(sum(num) / sum(den))` over documents resampled with
    replacement; None with fewer than two documents (there is nothing to resample)."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if len(num) < 2:
        return None
    rng = np.random.default_rng(seed)
    # Resample in blocks so a large corpus does not need a (resamples x documents) matrix at once.
    out = []
    block = max(1, 2_000_000 // len(num))
    for start in range(0, resamples, block):
        k = min(block, resamples - start)
        idx = rng.integers(0, len(num), size=(k, len(num)))
        out.append(statistic(num[idx].sum(axis=1) / np.maximum(den[idx].sum(axis=1), 1e-12)))
    values = np.concatenate(out)
    return (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))


def metric(value: float, *, stderr: float | None = None, ci95: tuple[float, float] | None = None,
           baseline: float | None = None, higher_is_better: bool = True) -> dict[str, Any]:
    """One metric as it appears in the results: value, stderr, ci95 [lo, hi], baseline, direction."""
    return {"value": float(value), "stderr": None if stderr is None else float(stderr),
            "ci95": None if ci95 is None else [float(ci95[0]), float(ci95[1])],
            "baseline": None if baseline is None else float(baseline), "higher_is_better": higher_is_better}


def flatten(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Metric records as a task's result holds them: one flat dict per field, keyed by metric name
    (`metrics` holds plain numbers; `baseline` only the metrics that have one)."""
    return {
        "metrics": {k: r["value"] for k, r in records.items()},
        "stderr": {k: r["stderr"] for k, r in records.items()},
        "ci95": {k: r["ci95"] for k, r in records.items()},
        "baseline": {k: r["baseline"] for k, r in records.items() if r["baseline"] is not None},
        "higher_is_better": {k: r["higher_is_better"] for k, r in records.items()},
    }
