"""Exact k-th smallest value of a large tensor without sorting it.

TIES trims each delta at its kk-th smallest magnitude.  ``torch.kthvalue`` is
exact but slow on big tensors (and very slow on CUDA); ``torch.quantile``
refuses more than 2^24 elements.  Here a strided sample brackets the answer,
two counting passes confirm that the bracket holds rank kk, and an exact
``kthvalue`` runs on the few elements inside the bracket.  When the bracket
misses (adversarial data), it falls back to a full sort-based select, so the
answer is always the exact order statistic.
"""
from __future__ import annotations

import math

import torch

_SMALL = 1 << 16
_SAMPLE = 1 << 14


def kth_smallest(values: torch.Tensor, kk: int) -> torch.Tensor:
    """The kk-th smallest (1-based) element of a 1-D float tensor, as a 0-d tensor."""
    n = values.numel()
    if not 1 <= kk <= n:
        raise ValueError(f"rank {kk} outside 1..{n}")
    if n <= _SMALL:
        return _full_select(values, kk)
    stride = max(1, n // _SAMPLE)
    sample = values[::stride].sort().values
    m = sample.numel()
    q = kk / n
    margin = 4.0 * math.sqrt(m * q * (1.0 - q)) + 8.0
    lo_i = math.floor(q * m - margin)
    hi_i = math.ceil(q * m + margin)
    lo = sample[lo_i] if lo_i >= 0 else None
    hi = sample[hi_i] if hi_i < m else None
    below = int((values < lo).sum()) if lo is not None else 0
    at_most_hi = int((values <= hi).sum()) if hi is not None else n
    if not below < kk <= at_most_hi:
        return _full_select(values, kk)
    inside = values
    if lo is not None and hi is not None:
        inside = values[(values >= lo) & (values <= hi)]
    elif lo is not None:
        inside = values[values >= lo]
    elif hi is not None:
        inside = values[values <= hi]
    return _full_select(inside, kk - below)


def _full_select(values: torch.Tensor, kk: int) -> torch.Tensor:
    if values.device.type == "cpu":
        return torch.kthvalue(values, kk).values
    return values.sort().values[kk - 1]
