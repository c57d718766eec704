"""Several LoRAs on one base, read as one model: theta0 + sum_i c_i delta_i.

Where a method is linear in the task vectors (task arithmetic with no drop,
no trim and no sign election; the weighted sum), all it computes from N LoRAs
is sum_i w_i delta_i.  Read one by one, each LoRA costs a window of base +
delta (a pass over memory and a rank-r product) and a row in every kernel
chunk; baking 10 LoRAs cost about three 2-model merges that way.  Folded, the
LoRAs are one input whose weight is W = sum_i w_i and whose delta is
sum_i (w_i / W) delta_i: the kernels see one row, and on each key the plain
LoRAs' factors are stacked side by side, [c_1 s_1 up_1 | ... | c_N s_N up_N] @
[down_1; ...; down_N], one rank-(sum r) product per window instead of N
rank-r ones (a GEMM that big runs near the CPU's peak; N thin ones do not).
W times the folded delta is sum_i w_i delta_i up to float32 rounding, so the
result matches the unfolded merge to within a few ulps, not bit for bit.

LoCon's Tucker mid, LoHa, LoKr and DoRA modules do not stack; they are added
one by one onto the same window, as the single-LoRA reader does.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from .delta import is_plain, load_factors
from .reader import WINDOW, LoraInput, thread_buffer

_FOLD_CACHE = 16     # keys whose stacked factors stay built (a few keys ahead of every thread)


def linear_in_deltas(kind: str, elect: bool, p: float, k: float, beta: float) -> bool:
    """Whether a key's merge only sums weighted task vectors (nothing dropped, trimmed or elected)."""
    if kind == "weighted_sum":
        return True
    return kind == "delta" and not elect and p == 0.0 and k >= 1.0 and beta == 0.0


@dataclass
class _Stack:
    """The plain modules landing on rows [lo, hi) of a key, their factors side by side."""

    lo: int
    hi: int
    up: torch.Tensor      # [hi - lo, sum of ranks], each LoRA's coefficient and alpha/rank folded in
    down: torch.Tensor    # [sum of ranks, columns]
    owners: list[tuple[int, int, int]]   # (LoRA index, its first and last + 1 column of ``up``)
    uniform: bool         # every LoRA once, in order, all of one rank: the owners are a batch of equal blocks


@dataclass
class _KeyFold:
    stacks: list[_Stack]
    others: list[tuple[LoraInput, tuple, float]]   # (LoRA, its target entry, coefficient): added one by one
    whole: bool


class LoraSum:
    """The LoRAs of one merge (all bound to its base) folded into one input."""

    def __init__(self, loras: Sequence[LoraInput]) -> None:
        self.loras = list(loras)
        self._shared = self.loras[0]._shared
        self._folds: collections.OrderedDict[tuple, _KeyFold] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()

    def source(self, key: str, coefs: Sequence[float], device: torch.device) -> "FoldedSource":
        """What the engine slices chunk by chunk on ``key``: base + sum_i coefs[i] delta_i."""
        return FoldedSource(self, key, tuple(float(c) for c in coefs), torch.device(device))

    # -- windows of rows, built once per thread as the single-LoRA reader builds them
    def read_range(self, key: str, coefs: tuple[float, ...], device: torch.device, start: int,
                   stop: int) -> torch.Tensor:
        lora = self.loras[0]
        numel = lora.info(key).numel
        start, stop = max(0, start), min(stop, numel)
        if stop <= start:
            return torch.empty(0, dtype=torch.float32, device=device)
        if not any(lo.targets(key) for lo in self.loras):
            return self._shared.read(key, start, stop)
        cols = self._cols(key)
        r0, r1 = start // cols, -(-stop // cols)
        cached = getattr(self._local, "window", None)
        if cached is not None and cached[0] == (key, coefs, device) and cached[1] <= r0 and r1 <= cached[2]:
            w0, window = cached[1], cached[3]
        else:
            fold = self._fold(key, coefs, device)
            rows_total = lora.info(key).shape[0]
            w0, w1 = (0, rows_total) if fold.whole else (r0, min(rows_total, max(r1, r0 + max(1, WINDOW // cols))))
            window = self._window(key, fold, w0, w1, cols, device)
            self._local.window = ((key, coefs, device), w0, w1, window)
        return window.view(-1)[start - w0 * cols:stop - w0 * cols]

    def _cols(self, key: str) -> int:
        """Columns of ``key`` as a [rows, columns] matrix (a 1-D key: one column)."""
        info = self.loras[0].info(key)
        return max(1, info.numel // max(1, info.shape[0]))

    def _window(self, key: str, fold: _KeyFold, r0: int, r1: int, cols: int, device: torch.device) -> torch.Tensor:
        out = self._buffer((r1 - r0) * cols, device).view(r1 - r0, cols)
        out.view(-1).copy_(self._shared.read(key, r0 * cols, r1 * cols))
        for s in fold.stacks:
            a, b = max(r0, s.lo), min(r1, s.hi)
            if a < b:
                out[a - r0:b - r0].addmm_(s.up[a - s.lo:b - s.lo], s.down)
        for lora, target, coef in fold.others:
            lora.add_target_(out, key, target, r0, r1, device, weight=coef)
        return out

    def _buffer(self, n: int, device: torch.device) -> torch.Tensor:
        return thread_buffer(self._local, n, device)

    def _fold(self, key: str, coefs: tuple[float, ...], device: torch.device) -> _KeyFold:
        """The key's stacked factors for these coefficients (built once, kept for a few keys)."""
        cache_key = (key, coefs, device)
        with self._lock:
            fold = self._folds.get(cache_key)
            if fold is not None:
                self._folds.move_to_end(cache_key)
                return fold
        parts: dict[tuple[int, int], tuple[list[torch.Tensor], list[torch.Tensor], list[int]]] = {}
        others: list[tuple[LoraInput, tuple, float]] = []
        for index, (lora, coef) in enumerate(zip(self.loras, coefs)):
            for target in lora.targets(key):
                module, rows, m_rows, _ = target
                f = load_factors(lora.lora_file, module, device)   # once per key: no cache needed
                if not is_plain(f):
                    others.append((lora, target, coef))
                    continue
                up = f.t["up"].reshape(m_rows, -1)
                ups, downs, owners = parts.setdefault(rows or (0, m_rows), ([], [], []))
                ups.append(up * (f.scale * coef))
                downs.append(f.t["down"].reshape(up.shape[1], -1))
                owners.append(index)
        stacks = [_stack(lo, hi, ups, downs, owners, len(self.loras))
                  for (lo, hi), (ups, downs, owners) in parts.items()]
        fold = _KeyFold(stacks, others, any(lora.whole_key(key) for lora in self.loras))
        with self._lock:
            self._folds[cache_key] = fold
            while len(self._folds) > _FOLD_CACHE:
                self._folds.popitem(last=False)
        return fold


    def sampled_masses(self, key: str, coefs: tuple[float, ...], device: torch.device, start: int, stop: int,
                       stride: int) -> list[float] | None:
        """Per LoRA, c_i * sum |delta_i| over elements [start, stop) of ``key``, estimated from every
        ``stride``-th row the span covers (whole rows, scaled to the span); None where a module does not stack.

        The merge statistics' share of each LoRA, when they run folded: one batched product for all of them
        per span (counted per LoRA and per chunk, the small products' overhead cost as much as the fold saved).
        """
        fold = self._fold(key, coefs, device)
        if fold.others:
            return None
        cols = self._cols(key)
        r0, r1 = start // cols, -(-stop // cols)
        picked = torch.arange(r0, r1, max(1, stride), device=device)
        sums = torch.zeros(len(self.loras), dtype=torch.float64, device=device)
        for s in fold.stacks:
            sel = picked[(picked >= s.lo) & (picked < s.hi)] - s.lo
            if sel.numel() == 0:
                continue
            up = s.up[sel]
            if s.uniform:
                n = len(self.loras)
                prod = torch.bmm(up.view(sel.numel(), n, -1).transpose(0, 1), s.down.view(n, -1, cols))
                sums += prod.abs().sum((1, 2), dtype=torch.float64)
            else:
                for index, a, b in s.owners:
                    sums[index] += (up[:, a:b] @ s.down[a:b]).abs().sum(dtype=torch.float64)
        scale = (stop - start) / (picked.numel() * cols)
        return [float(x) * scale for x in sums.tolist()]


def _stack(lo: int, hi: int, ups: list[torch.Tensor], downs: list[torch.Tensor], owners: list[int],
           n_loras: int) -> _Stack:
    spans, at = [], 0
    for index, up in zip(owners, ups):
        spans.append((index, at, at + up.shape[1]))
        at += up.shape[1]
    uniform = owners == list(range(n_loras)) and len({up.shape[1] for up in ups}) == 1
    return _Stack(lo, hi, torch.cat(ups, 1), torch.cat(downs, 0), spans, uniform)


class FoldedSource:
    """One key of a :class:`LoraSum`, sliced by the engine like a checkpoint's key (see engine.RangeSource)."""

    __slots__ = ("_sum", "_key", "_coefs", "_device", "_n")

    def __init__(self, lora_sum: LoraSum, key: str, coefs: tuple[float, ...], device: torch.device) -> None:
        self._sum, self._key, self._coefs, self._device = lora_sum, key, coefs, device
        self._n = lora_sum.loras[0].info(key).numel

    def numel(self) -> int:
        return self._n

    def __getitem__(self, span: slice) -> torch.Tensor:
        start, stop, step = span.indices(self._n)
        if step != 1:
            raise ValueError("FoldedSource: only contiguous slices")
        return self._sum.read_range(self._key, self._coefs, self._device, start, stop)

    def sampled_masses(self, start: int, stop: int, stride: int) -> list[float] | None:
        """See :meth:`LoraSum.sampled_masses`."""
        if not any(lora.targets(self._key) for lora in self._sum.loras):
            return [0.0] * len(self._sum.loras)
        return self._sum.sampled_masses(self._key, self._coefs, self._device, start, stop, stride)


def lora_sum_of(models: Sequence[object]) -> tuple[list[int], LoraSum] | None:
    """The indices of the LoRA inputs among ``models`` and their :class:`LoraSum`, when there are two or more."""
    indices = [i for i, m in enumerate(models) if isinstance(m, LoraInput)]
    if len(indices) < 2:
        return None
    return indices, LoraSum([models[i] for i in indices])
