"""Exact k-th smallest magnitude of a large tensor without sorting it.

TIES trims each delta at its kk-th smallest magnitude.  ``torch.kthvalue`` is
exact but slow on big tensors (and very slow on CUDA); ``torch.quantile``
refuses more than 2^24 elements.  Magnitudes are non-negative floats, whose
int32 bit patterns sort exactly like the values, so a radix select finds the
exact order statistic: count the elements per value of the top 11 bits
(``bincount``), keep only the bin that holds rank kk, and repeat on the next
10 bits and the last 10.  A few passes over the tensor, the same answer as a
full sort, on CPU and CUDA alike.
"""
from __future__ import annotations

import torch

_SMALL = 1 << 16
# (shift, width) of the three digits of a 31-bit non-negative float pattern
_DIGITS = ((20, 11), (10, 10), (0, 10))


def kth_smallest(values: torch.Tensor, kk: int) -> torch.Tensor:
    """The kk-th smallest (1-based) of a 1-D tensor of non-negative floats, as a 0-d float32 tensor."""
    n = values.numel()
    if not 1 <= kk <= n:
        raise ValueError(f"rank {kk} outside 1..{n}")
    values = values.to(torch.float32).contiguous()
    if n <= _SMALL and values.device.type == "cpu":
        return torch.kthvalue(values, kk).values
    candidates = values.view(torch.int32)
    prefix = 0
    rank = kk
    for shift, width in _DIGITS:
        digit = torch.bitwise_right_shift(candidates, shift)
        if shift + width < 31:
            digit.bitwise_and_((1 << width) - 1)
        counts = torch.bincount(digit, minlength=1 << width).cumsum(0)
        chosen = int(torch.searchsorted(counts, torch.tensor([rank], device=counts.device)).item())
        below = int(counts[chosen - 1].item()) if chosen > 0 else 0
        rank -= below
        prefix |= chosen << shift
        if shift:
            candidates = candidates[digit == chosen]
    return torch.tensor([prefix], dtype=torch.int32, device=values.device).view(torch.float32)[0]
