"""Model Stock and the geometric median: per key, theta = theta0 + alpha * sum_t c_t delta_t.

Both methods only need the inner products of the inputs, not the inputs
themselves, to find their coefficients c_t:

* Model Stock (arXiv 2403.19522): c = mean cosine over all pairs of the
  flattened deltas (a zero delta has cosine 0 with everything), clamped to
  [-1, 1]; t = N c / (1 + (N - 1) c), and t = 0 where |1 + (N - 1) c| < 1e-6;
  c_t = t / N, i.e. theta = theta0 + alpha * t * mean(delta).
* Geometric median (Weiszfeld): z starts at the weighted mean of the models;
  z <- sum_t (w_t / d_t) theta_t / sum_t (w_t / d_t) with d_t = max(|theta_t - z|, 1e-6),
  up to 100 times, stopping once |z_new - z| < 1e-10 |z|.  Every iterate is
  theta0 + sum_t c_t delta_t, so the iteration runs on the N coefficients
  with distances from the Gram matrix, exactly the same maths without a pass
  over the tensors per iteration.

The Gram matrix of [theta0, delta_1, ..., delta_N] is summed in float64 over
fixed blocks (not the caller's chunks), so the coefficients, and every output
bit, are the same however a merge is chunked.  Memory: one block per model.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

GRAM_BLOCK = 1 << 18
WEISZFELD_ITERATIONS = 100
WEISZFELD_TOLERANCE = 1e-10
DISTANCE_FLOOR = 1e-6
STOCK_DENOMINATOR_FLOOR = 1e-6


def gram(theta0, models: Sequence, n: int) -> torch.Tensor:
    """(N+1)x(N+1) float64 Gram matrix of [theta0, delta_1..delta_N] over flat sources of n elements."""
    rows = len(models) + 1
    total = torch.zeros((rows, rows), dtype=torch.float64)
    for lo in range(0, n, GRAM_BLOCK):
        hi = min(n, lo + GRAM_BLOCK)
        base = theta0[lo:hi].to(device="cpu", dtype=torch.float64)
        block = torch.empty((rows, hi - lo), dtype=torch.float64)
        block[0] = base
        for t, model in enumerate(models):
            torch.sub(model[lo:hi].to(device="cpu", dtype=torch.float64), base, out=block[t + 1])
        total += block @ block.T
    return total


def model_stock_t(delta_gram: torch.Tensor) -> float:
    """Model Stock's interpolation ratio t from the deltas' Gram matrix (N x N)."""
    count = delta_gram.shape[0]
    if count < 2:
        return 0.0   # no pair to measure an angle with: the base is kept
    norms = [math.sqrt(max(float(delta_gram[i, i]), 0.0)) for i in range(count)]
    cosines = []
    for i in range(count):
        for j in range(i + 1, count):
            denom = norms[i] * norms[j]
            cosines.append(float(delta_gram[i, j]) / denom if denom > 0.0 else 0.0)
    c = max(-1.0, min(1.0, math.fsum(cosines) / len(cosines)))
    denominator = 1.0 + (count - 1) * c
    if abs(denominator) < STOCK_DENOMINATOR_FLOOR:
        return 0.0
    return count * c / denominator


def model_stock_coefficients(full_gram: torch.Tensor) -> list[float]:
    """c_t = t / N for each model (from :func:`gram`'s matrix)."""
    count = full_gram.shape[0] - 1
    t = model_stock_t(full_gram[1:, 1:])
    return [t / count] * count


def geometric_median_coefficients(full_gram: torch.Tensor, weights: Sequence[float]) -> list[float]:
    """Weiszfeld's iteration on the coefficients of z = theta0 + sum_t c_t delta_t.

    Plain Python floats (float64): N is a handful, and a small torch op per
    step would cost more than the arithmetic.
    """
    g = full_gram.to(torch.float64).tolist()
    count = len(g) - 1
    d_gram = [row[1:] for row in g[1:]]
    base_dot = g[0][1:]
    base_sq = g[0][0]
    w = [float(x) for x in weights]
    total = sum(w)
    c = [x / total for x in w]

    def quad(u: list[float], v: list[float]) -> float:
        return sum(u[i] * sum(d_gram[i][j] * v[j] for j in range(count)) for i in range(count))

    for _ in range(WEISZFELD_ITERATIONS):
        gc = [sum(d_gram[i][j] * c[j] for j in range(count)) for i in range(count)]
        csq = sum(c[i] * gc[i] for i in range(count))
        inv = [w[t] / max(math.sqrt(max(d_gram[t][t] - 2.0 * gc[t] + csq, 0.0)), DISTANCE_FLOOR)
               for t in range(count)]
        norm = sum(inv)
        c_new = [x / norm for x in inv]
        step = [c_new[i] - c[i] for i in range(count)]
        step_norm = math.sqrt(max(quad(step, step), 0.0))
        z_norm = math.sqrt(max(base_sq + 2.0 * sum(base_dot[i] * c_new[i] for i in range(count))
                               + quad(c_new, c_new), 0.0))
        c = c_new
        if step_norm < WEISZFELD_TOLERANCE * z_norm or step_norm == 0.0:
            break
    return c


def lincomb_apply(theta0: torch.Tensor, thetas: Sequence[torch.Tensor], coefficients: Sequence[float],
                  alpha: float, stats: torch.Tensor | None = None) -> torch.Tensor:
    """theta0 + alpha * sum_t c_t (theta_t - theta0), in float32, models added in order.

    ``stats`` ([4, models] float32, see kernels.STAT_MASS): row 0 gets |c_t delta_t| summed (the merge statistics).
    """
    base = theta0.to(torch.float32)
    total = torch.zeros_like(base)
    for t, (theta_t, c) in enumerate(zip(thetas, coefficients)):
        term = (theta_t.to(torch.float32) - base).mul_(c)
        if stats is not None:
            stats[0, t] = term.abs().sum()
        total.add_(term)
    return base + total.mul_(alpha)
