"""The merge maths, one function per step below (README.md: "The five knobs" and "Methods").

Notation: theta0 = base tensor, theta_t = model t, delta_t = theta_t - theta0.
Every function works on float32 tensors that are either a whole key or a
contiguous element range of it ("chunk"): all steps are elementwise except the
trim threshold (step 3) and slerp's angle, which the engine computes once over
the whole tensor.  Sums over models run in model order, so a chunked merge is
bit-identical to a whole one.

    1. delta_t = f32(theta_t) - f32(theta0)
    2. DARE (p > 0):   delta_t <- m_t * delta_t,   m_t ~ Bernoulli(1 - p)  (hash masks)
    3. trim (k < 1):   tau_t = delta_t * [|delta_t| >= kk-th smallest |delta_t|],
                       kk = max(floor((1 - k) n), 1)
    4. weights:        tau_t <- w_t tau_t
    5. elect:          gamma = sign(sum_t tau_t)          (vote_sgn off, TIES paper)
                       gamma = sign(sum_t sign(tau_t))    (vote_sgn on, "TIES-SOUP")
    6. agree:          A_t = [sign(tau_t) = gamma] and [gamma != 0]   (A_t = 1 without election)
    7. merge:          mean: tau_m = sum A_t tau_t / sum A_t w_t  (0 where the count is 0)
                       sum:  tau_m = sum A_t tau_t
    8. rescale:        tau_m <- (1 - p)^(-lambda) tau_m
    9. add back:       theta = theta0 + alpha tau_m
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .masks import MaskHasher
from .select import kth_smallest


@dataclass(frozen=True)
class DeltaParams:
    """The knobs of the delta-based methods for one key.

    Their ranges are ``lib_merge.recipe.RANGES``, checked by ``recipe.check_range``.
    """

    p: float = 0.0          # DARE drop probability
    k: float = 1.0          # TIES keep fraction
    vote_sgn: bool = False  # on = count signs
    lam: float = 1.0        # DARE rescale strength
    alpha: float = 1.0      # weight of the merged delta
    merge: str = "mean"     # "mean" (disjoint mean) or "sum"
    elect: bool = True      # TIES sign election (steps 5-6)
    epsilon: float = 0.0    # DELLA: spread of the keep probability around 1 - p (della.py)
    beta: float = 0.0       # Breadcrumbs: fraction of the largest |delta| dropped (step 3)
    rescale: str = "uniform"  # step 8: "uniform" (1-p)^-lambda, or "unbiased" 1/(1 - p^j) (mean only)


@dataclass(frozen=True)
class DropMask:
    """Where DARE's mask of one model at one key comes from (step 2)."""

    hasher: MaskHasher
    salt: int


# ----------------------------------------------------------------------------- steps

def task_delta(theta_t: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
    """Step 1: the task vector, in float32 (never subtract in half precision)."""
    return theta_t.float() - theta0.float()


def dare_drop_(delta: torch.Tensor, mask: DropMask | None, start: int, p: float) -> torch.Tensor:
    """Step 2: drop each element with probability p (no rescale here: that is step 8)."""
    if p > 0.0 and mask is not None:
        for lo in range(0, delta.numel(), mask.hasher.max_chunk):
            part = delta[lo:lo + mask.hasher.max_chunk]
            mask.hasher.drop_into(part, mask.salt, start + lo, p)
    return delta


def trim_rank(numel: int, k: float) -> int:
    """Step 3: the 1-based rank kk of the threshold among the |delta| values."""
    return max(math.floor((1.0 - k) * numel), 1)


def trim_threshold(delta: torch.Tensor, k: float) -> torch.Tensor | None:
    """Step 3: kk-th smallest |delta| over the whole tensor (dropped zeros included)."""
    if k >= 1.0:
        return None
    flat = delta.reshape(-1)
    if flat.numel() == 0:
        return None   # an empty tensor has nothing to trim (and no rank-kk element)
    return kth_smallest(flat.abs(), trim_rank(flat.numel(), k))


def trim_(delta: torch.Tensor, threshold: torch.Tensor | None,
          upper: torch.Tensor | None = None) -> torch.Tensor:
    """Step 3: keep elements whose magnitude reaches the threshold (ties kept).

    ``upper`` (Breadcrumbs) also drops the elements above it: the largest
    beta fraction, see :func:`band_ranks`.
    """
    if threshold is not None:
        delta.masked_fill_(delta.abs() < threshold, 0.0)
    if upper is not None:
        delta.masked_fill_(delta.abs() > upper, 0.0)
    return delta


def band_ranks(numel: int, k: float, beta: float) -> tuple[int | None, int | None]:
    """Breadcrumbs' 1-based ranks (lower, upper) among the |delta| values; None where no cut.

    The largest nb = floor(beta n) magnitudes are dropped: keep |delta| <= the
    (n - nb)-th smallest.  Of the rest the next k fraction is kept: keep
    |delta| >= the max(floor((1 - k) n) - nb, 1)-th smallest (ties kept at both
    ends).  beta = 0 is the TIES trim.
    """
    nb = math.floor(beta * numel)
    upper = numel - nb if nb >= 1 else None
    lower = max(math.floor((1.0 - k) * numel) - nb, 1) if k < 1.0 else None
    if lower == 1:
        lower = None   # the smallest magnitude: nothing below it to drop
    return lower, upper


def unbiased_factor(j: torch.Tensor, p: float) -> torch.Tensor:
    """1 / (1 - p^j), and 0 where j = 0: the chance that at least one of j agreeing deltas survives DARE."""
    survive = 1.0 - torch.pow(torch.tensor(p, dtype=torch.float32, device=j.device), j)
    return torch.where(j > 0, 1.0 / survive.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def weigh_(tau: torch.Tensor, weight: float) -> torch.Tensor:
    """Step 4: the model's weight."""
    if weight != 1.0:
        tau.mul_(weight)
    return tau


def elect_sign(taus: Sequence[torch.Tensor], vote_sgn: bool) -> torch.Tensor:
    """Step 5: gamma = sign of the summed deltas (off) or of the summed signs (on)."""
    total = torch.zeros_like(taus[0])
    for tau in taus:
        total += torch.sign(tau) if vote_sgn else tau
    return torch.sign(total)


def agree_mask(tau: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Step 6: where a model's delta has the elected (non-zero) sign."""
    return (torch.sign(tau) == gamma) & (gamma != 0)


def disjoint_merge(taus: Sequence[torch.Tensor], weights: Sequence[float],
                   gamma: torch.Tensor | None, merge: str) -> torch.Tensor:
    """Steps 6-7: sum (or weighted mean) of the agreeing deltas.

    Without election (gamma None) every model agrees everywhere, which is
    task arithmetic (merge = sum) or a weighted average of deltas (mean).
    """
    total = torch.zeros_like(taus[0])
    if gamma is None:
        for tau in taus:
            total += tau
        return total / sum(weights) if merge == "mean" else total
    count = torch.zeros_like(taus[0]) if merge == "mean" else None
    for tau, weight in zip(taus, weights):
        agree = agree_mask(tau, gamma)
        total += torch.where(agree, tau, 0.0)
        if count is not None:
            count += agree.float() * weight
    if count is None:
        return total
    return torch.where(count > 0, total / count, 0.0)


def rescale_factor(p: float, lam: float) -> float:
    """Step 8: DARE's rescale (1 - p)^(-lambda); lambda = 1 is the paper's 1/(1 - p)."""
    return (1.0 - p) ** (-lam)


def add_back(theta0: torch.Tensor, tau_m: torch.Tensor, alpha: float) -> torch.Tensor:
    """Step 9: theta = theta0 + alpha * tau_m (float32)."""
    return theta0.float() + tau_m * alpha


# ----------------------------------------------------------------------------- methods

def delta_merge(theta0: torch.Tensor, thetas: Sequence[torch.Tensor], weights: Sequence[float],
                params: DeltaParams, masks: Sequence[DropMask | None] | None = None,
                thresholds: Sequence[torch.Tensor | None] | None = None,
                start: int = 0, nonfinite: list[str] | None = None,
                uppers: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Steps 1-9 on one chunk (or a whole flattened tensor) of every model.

    ``thresholds`` are the per-model trim thresholds of the whole tensor; when
    None they are computed from this chunk, which is right only when the chunk
    is the whole tensor.  ``uppers`` are Breadcrumbs' upper cuts (same rule).
    When ``nonfinite`` is a list, a NaN/Inf reaching the
    election is recorded in it (the election would otherwise hide it as a 0).
    """
    taus, kept = [], []
    unbiased = unbiased_applies(params)
    for t, theta_t in enumerate(thetas):
        delta = task_delta(theta_t, theta0)                                      # 1
        whole = delta.clone() if unbiased else None
        dare_drop_(delta, masks[t] if masks else None, start, params.p)           # 2
        threshold = thresholds[t] if thresholds is not None else trim_threshold(delta, params.k)
        upper = uppers[t] if uppers is not None else None
        trim_(delta, threshold, upper)                                            # 3
        if whole is not None:
            kept.append(trim_(whole, threshold, upper))
        taus.append(weigh_(delta, weights[t]))                                    # 4
    gamma = elect_sign(taus, params.vote_sgn) if params.elect else None          # 5
    if nonfinite is not None and gamma is not None and not bool(torch.isfinite(gamma).all()):
        nonfinite.append("a model's delta")
    tau_m = disjoint_merge(taus, weights, gamma, params.merge)                    # 6-7
    if unbiased:                                                                  # 8
        j = torch.zeros_like(tau_m)
        for whole in kept:
            j += agree_mask(whole, gamma).float()
        tau_m.mul_(unbiased_factor(j, params.p))
    else:
        tau_m.mul_(rescale_factor(params.p, params.lam))
    return add_back(theta0, tau_m, params.alpha)                                  # 9


def unbiased_applies(params: DeltaParams) -> bool:
    """The unbiased rescale replaces step 8 only for a disjoint mean with election and p > 0."""
    return params.rescale == "unbiased" and params.elect and params.merge == "mean" and params.p > 0.0


class Workspace:
    """Reusable buffers for the fused kernels on one device: a [models, chunk] block per role.

    Allocating fresh chunk-sized tensors for every step costs page faults and
    cache misses that dominate the arithmetic on CPU; the fused paths write
    every intermediate into these buffers instead.  Model rows live in one
    block so each step is one op over all models, not one per model.
    """

    def __init__(self, n_models: int, chunk: int, device: torch.device | str = "cpu") -> None:
        rows = max(1, n_models)
        self.chunk = chunk
        self.device = torch.device(device)
        self._taus = torch.empty(rows * chunk, dtype=torch.float32, device=device)
        self._rows_scratch = torch.empty(rows * chunk, dtype=torch.float32, device=device)
        self._bits = torch.empty(rows * chunk, dtype=torch.int32, device=device)
        self.theta0 = torch.empty(chunk, dtype=torch.float32, device=device)
        self.total = torch.empty(chunk, dtype=torch.float32, device=device)
        self.count = torch.empty(chunk, dtype=torch.float32, device=device)
        self.vote = torch.empty(chunk, dtype=torch.float32, device=device)

    def taus(self, rows: int, n: int) -> torch.Tensor:
        """A contiguous [rows, n] float32 block (rows of a short last chunk stay adjacent)."""
        return self._taus[:rows * n].view(rows, n)

    def rows_scratch(self, rows: int, n: int) -> torch.Tensor:
        return self._rows_scratch[:rows * n].view(rows, n)

    def bits(self, rows: int, n: int) -> torch.Tensor:
        return self._bits[:rows * n].view(rows, n)

    def extra(self, rows: int, n: int) -> torch.Tensor:
        """One more [rows, n] float32 block, allocated on first use (the unbiased rescale's undropped deltas)."""
        if getattr(self, "_extra", None) is None or self._extra.numel() < rows * n:
            self._extra = torch.empty(self._taus.numel(), dtype=torch.float32, device=self.device)
        return self._extra[:rows * n].view(rows, n)

    def stat_scratch(self, rows: int, n: int) -> torch.Tensor:
        """A [rows, n] float32 block for the merge statistics, allocated on first use (never when they are off)."""
        if getattr(self, "_stat", None) is None or self._stat.numel() < rows * n:
            self._stat = torch.empty(max(self._taus.numel(), rows * n), dtype=torch.float32, device=self.device)
        return self._stat[:rows * n].view(rows, n)


# Rows of the per-chunk statistics a fused kernel writes (see lib_merge/analysis/stats.py):
# 0 |A_t w_t tau_t| summed, 1 elements agreeing with the election, 2 non-zero deltas before drop/trim, 3 after.
# A kernel writes only the rows that apply into a zeroed block.  Rows that one sum fills are adjacent.
STAT_MASS, STAT_AGREE, STAT_NONZERO, STAT_SURVIVED = range(4)
STAT_FIELDS = 4


@dataclass(frozen=True)
class KeyConstants:
    """Per-key operands of :func:`delta_merge_fused` as device tensors, built once per key.

    salts: [models, 1] int32 (None without DARE); thr_minus_one: [models, 1]
    int32, bit pattern of each trim threshold minus one (None without trim);
    weights: [models, 1] float32 (None when every weight is 1).
    """

    hasher: MaskHasher | None
    salts: torch.Tensor | None
    thr_minus_one: torch.Tensor | None
    weights: torch.Tensor | None
    abs_bits: torch.Tensor | None   # 0x7FFFFFFF as a 0-d int32 tensor
    shift31: torch.Tensor | None
    upper_plus_one: torch.Tensor | None = None   # [models, 1] int32: Breadcrumbs' upper cut pattern + 1


def key_constants(masks: Sequence[DropMask | None] | None, thresholds: Sequence[torch.Tensor | None] | None,
                  weights: Sequence[float], device: torch.device | str,
                  uppers: Sequence[torch.Tensor | None] | None = None) -> KeyConstants:
    """Turn one key's masks, thresholds and weights into the tensors the fused kernel broadcasts."""
    hasher = salts = thr = w = abs_bits = shift31 = upper = None
    live = [m for m in masks or () if m is not None]
    if live and len(live) != len(masks):
        raise ValueError("DARE masks are needed for every model or for none")
    if live:
        hasher = live[0].hasher
        salts = hasher.salts([m.salt if m is not None else 0 for m in masks])
    if thresholds is not None and any(t is not None for t in thresholds):
        # a model without a threshold keeps everything: pattern 0 - 1 makes the keep test always true
        patterns = [int(t.to(torch.float32).reshape(1).cpu().view(torch.int32).item()) if t is not None else 0
                    for t in thresholds]
        thr = torch.tensor(patterns, dtype=torch.int32, device=device).sub_(1).reshape(-1, 1)
        abs_bits = torch.tensor(0x7FFFFFFF, dtype=torch.int32, device=device)
        shift31 = torch.tensor(31, dtype=torch.int32, device=device)
    if uppers is not None and any(u is not None for u in uppers):
        # a model without an upper cut keeps everything: 0x7FFFFFFF is above every |x| pattern but NaN's top
        patterns = [min(int(u.to(torch.float32).reshape(1).cpu().view(torch.int32).item()) + 1, 0x7FFFFFFF)
                    if u is not None else 0x7FFFFFFF for u in uppers]
        upper = torch.tensor(patterns, dtype=torch.int32, device=device).reshape(-1, 1)
        abs_bits = torch.tensor(0x7FFFFFFF, dtype=torch.int32, device=device)
        shift31 = torch.tensor(31, dtype=torch.int32, device=device)
    if any(weight != 1.0 for weight in weights):
        w = torch.tensor(list(weights), dtype=torch.float32, device=device).reshape(-1, 1)
    return KeyConstants(hasher, salts, thr, w, abs_bits, shift31, upper)


def cut_upper_bits_(taus: torch.Tensor, upper_plus_one: torch.Tensor, bits: torch.Tensor,
                    abs_bits: torch.Tensor, shift31: torch.Tensor) -> None:
    """Breadcrumbs' upper cut on bit patterns: keep |tau| <= u  <=>  bits(|tau|) - (bits(u) + 1) < 0."""
    torch.bitwise_and(taus.view(torch.int32), abs_bits, out=bits)
    bits.sub_(upper_plus_one)
    bits.bitwise_right_shift_(shift31)
    taus.view(torch.int32).bitwise_and_(bits)


def trim_bits_(taus: torch.Tensor, thr_minus_one: torch.Tensor, bits: torch.Tensor,
               abs_bits: torch.Tensor, shift31: torch.Tensor) -> None:
    """Step 3 on the float bit patterns of a [models, chunk] block: same result as :func:`trim_`.

    For non-negative floats the int32 bit patterns order like the values, so
    |tau| >= thr  <=>  (bits(thr) - 1 - bits(|tau|)) < 0, whose sign bit spread
    by an arithmetic shift is all ones exactly where tau is kept; an AND clears
    the others.  No mask tensor, no boolean ops.
    """
    torch.bitwise_and(taus.view(torch.int32), abs_bits, out=bits)
    torch.sub(thr_minus_one, bits, out=bits)
    bits.bitwise_right_shift_(shift31)
    taus.view(torch.int32).bitwise_and_(bits)


def _sum_rows(rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Row 0 + row 1 + ... in model order (as the readable steps add), into ``out``."""
    count = rows.shape[0]
    if count == 1:
        return out.copy_(rows[0])
    torch.add(rows[0], rows[1], out=out)
    for t in range(2, count):   # indexing, not iteration: Tensor.__iter__ costs ~10 us a call
        out.add_(rows[t])
    return out


def delta_merge_fused(theta0: torch.Tensor, thetas: Sequence[torch.Tensor], weights: Sequence[float],
                      params: DeltaParams, ws: Workspace, masks: Sequence[DropMask | None] | None = None,
                      thresholds: Sequence[torch.Tensor | None] | None = None, start: int = 0,
                      constants: KeyConstants | None = None, stats: torch.Tensor | None = None,
                      stat_counts: bool = True) -> torch.Tensor:
    """:func:`delta_merge` with every intermediate in ``ws``; the same bits, fewer passes.

    Steps 6-7 use the identity, for gamma in {-1, +1}:
        sum_t A_t tau_t = gamma * sum_t max(gamma tau_t, 0),   sum_t A_t w_t = sum_t w_t [gamma tau_t > 0]
    (a model agrees exactly where gamma * tau_t > 0), so each model costs a
    multiply and a clamp instead of a sign, a compare and a select.  IEEE
    rounding is symmetric in sign and the sums run in model order, so the
    result is bit-identical.  ``constants`` (from :func:`key_constants`) saves
    rebuilding the per-key tensors on every chunk.  Returns a view into ``ws``
    valid until the next call.

    ``stats``, when given, is a zeroed [STAT_FIELDS, models] float32 tensor this
    chunk's statistics are written into (the merge statistics: they only read
    the blocks, so the result's bits are the same with or without them).  With
    no drop/trim, row STAT_NONZERO is left for the caller (it equals STAT_SURVIVED).
    ``stat_counts`` False: only the elected mass (one sum), for the chunks the
    engine does not sample (see engine.STATS_EVERY).
    """
    n = theta0.numel()
    rows = len(thetas)
    if constants is None:
        constants = key_constants(masks if params.p > 0 else None, thresholds, weights, ws.device)
    base = ws.theta0[:n]
    base.copy_(theta0)
    taus = ws.taus(rows, n)
    for t, theta_t in enumerate(thetas):
        taus[t].copy_(theta_t)
    taus.sub_(base)                                                               # 1
    cuts = ((params.p > 0 and constants.salts is not None) or constants.thr_minus_one is not None
            or constants.upper_plus_one is not None or (thresholds is None and params.k < 1.0))
    flags = None
    counting = stats is not None and stat_counts
    if stats is not None:   # non-zero flags before (rows 0..) and after (rows rows..) drop/trim: one sum for both
        flags = ws.stat_scratch(2 * rows, n)
        if cuts and counting:   # a float compare + a float sum: several times cheaper than count_nonzero on a CPU
            torch.ne(taus, 0.0, out=flags[:rows])
    whole = None
    if unbiased_applies(params):   # the undropped deltas: how many models agree before the drop (step 8)
        whole = ws.extra(rows, n)
        whole.copy_(taus)
    if params.p > 0 and constants.salts is not None:                              # 2
        step = constants.hasher.max_chunk
        if n <= step:   # the hash lives in the blocks the later steps reuse: a smaller working set
            constants.hasher.drop_rows_(taus, constants.salts, start, params.p, ws.bits(rows, n),
                                        ws.rows_scratch(rows, n).view(torch.int32))
        else:
            for lo in range(0, n, step):
                constants.hasher.drop_rows_(taus[:, lo:lo + step], constants.salts, start + lo, params.p)
    for block in (taus, whole) if whole is not None else (taus,):
        if constants.thr_minus_one is not None:                                   # 3
            trim_bits_(block, constants.thr_minus_one, ws.bits(rows, n), constants.abs_bits, constants.shift31)
        if constants.upper_plus_one is not None:
            cut_upper_bits_(block, constants.upper_plus_one, ws.bits(rows, n), constants.abs_bits,
                            constants.shift31)
    if constants.thr_minus_one is None and thresholds is None and params.k < 1.0:
        for t in range(rows):   # a whole tensor in one chunk: thresholds from the chunk itself
            threshold = trim_threshold(taus[t], params.k)
            trim_(taus[t], threshold)
            if whole is not None:
                trim_(whole[t], threshold)
    if counting:
        if cuts:
            torch.ne(taus, 0.0, out=flags[rows:])
            torch.sum(flags, 1, out=stats[STAT_NONZERO:STAT_SURVIVED + 1].view(-1))
        elif params.elect:   # nothing dropped: before = after (the caller copies it), needed for the agreement
            torch.sum(torch.ne(taus, 0.0, out=flags[rows:]), 1, out=stats[STAT_SURVIVED])
    if constants.weights is not None:                                             # 4
        taus.mul_(constants.weights)
    total = ws.total[:n]
    if not params.elect:
        if counting:   # every model counts: |w_t tau_t|
            torch.sum(torch.abs(taus, out=flags[:rows]), 1, out=stats[STAT_MASS])
        _sum_rows(taus, total)
        if params.merge == "mean":
            total.div_(sum(weights))
    else:
        gamma = ws.vote[:n]                                                       # 5
        agreeing = ws.rows_scratch(rows, n) if stats is None else flags[:rows]
        if params.vote_sgn:
            _sum_rows(torch.sign(taus, out=agreeing), gamma)
        else:
            _sum_rows(taus, gamma)
        gamma.sign_()
        torch.mul(taus, gamma, out=agreeing)                                      # 6-7
        agreeing.clamp_min_(0.0)
        _sum_rows(agreeing, total)
        if counting:   # agreeing = |A_t w_t tau_t| and its signs (who agrees): one sum for both
            torch.sign(agreeing, out=flags[rows:])
            torch.sum(flags, 1, out=stats[STAT_MASS:STAT_AGREE + 1].view(-1))
        elif stats is not None:
            torch.sum(agreeing, 1, out=stats[STAT_MASS])
        if params.merge == "mean":
            count = ws.count[:n]
            agrees = flags[rows:] if counting else torch.sign(agreeing, out=taus)
            if constants.weights is not None:
                agrees.mul_(constants.weights)
            _sum_rows(agrees, count)
            count.clamp_min_(min(weights))   # where no model agrees the total is 0: 0 / w = 0
            total.div_(count)
        total.mul_(gamma)
    if whole is not None:                                                         # 8 (unbiased)
        torch.mul(whole, gamma, out=whole)
        whole.clamp_min_(0.0)
        torch.sign(whole, out=whole)
        total.mul_(unbiased_factor(_sum_rows(whole, whole[0]), params.p))
    scale = 1.0 if whole is not None else rescale_factor(params.p, params.lam)   # 8
    if scale != 1.0:
        total.mul_(scale)
    if params.alpha != 1.0:                                                       # 9
        total.mul_(params.alpha)
    base.add_(total)
    return base


def weighted_sum(theta0: torch.Tensor, thetas: Sequence[torch.Tensor], weights: Sequence[float],
                 alpha: float = 1.0) -> torch.Tensor:
    """Model soup: sum_t w_t theta_t / sum_t w_t, moved from the base by alpha (1 = all the way)."""
    total = torch.zeros_like(theta0, dtype=torch.float32)
    for theta_t, weight in zip(thetas, weights):
        total += theta_t.float() * weight if weight != 1.0 else theta_t.float()
    soup = total / sum(weights)
    if alpha == 1.0:
        return soup
    return torch.lerp(theta0.float(), soup, alpha)


def weighted_sum_fused(theta0: torch.Tensor, thetas: Sequence[torch.Tensor], weights: Sequence[float],
                       alpha: float, ws: Workspace, constants: KeyConstants | None = None,
                       stats: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`weighted_sum` with its intermediates in ``ws`` (same bits; a view valid until the next call).

    ``stats`` as in :func:`delta_merge_fused`: only the mass row, |w_t (theta_t - theta0)| summed.
    """
    n = theta0.numel()
    rows = ws.taus(len(thetas), n)
    for t, theta_t in enumerate(thetas):
        rows[t].copy_(theta_t)
    scaled = constants.weights if constants is not None else key_constants(None, None, weights, rows.device).weights
    if stats is not None:
        scratch = ws.stat_scratch(len(thetas), n)
        torch.sub(rows, ws.theta0[:n].copy_(theta0), out=scratch)
        torch.sum(scratch.abs_(), 1, out=stats[STAT_MASS])
        if scaled is not None:   # w_t > 0: |w_t tau_t| summed is w_t times |tau_t| summed
            stats[STAT_MASS].mul_(scaled.view(-1))
    if scaled is not None:
        rows.mul_(scaled)
    total = _sum_rows(rows, ws.total[:n])
    total.div_(sum(weights))
    if alpha == 1.0:
        return total
    base = ws.theta0[:n]
    base.copy_(theta0)
    return base.lerp_(total, alpha)


@dataclass(frozen=True)
class SlerpCoefficients:
    base: float
    model: float


def slerp_coefficients(dot: float, norm0: float, norm1: float, t: float,
                       eps: float = 1e-4) -> SlerpCoefficients:
    """Spherical interpolation weights from the whole tensors' dot product and norms.

    Falls back to linear interpolation where the angle is ~0 (or a norm is 0),
    where the spherical formula divides by ~sin 0.
    """
    if norm0 == 0.0 or norm1 == 0.0:
        return SlerpCoefficients(1.0 - t, t)
    cos = max(-1.0, min(1.0, dot / (norm0 * norm1)))
    omega = math.acos(cos)
    if math.sin(omega) < eps:
        return SlerpCoefficients(1.0 - t, t)
    sin_omega = math.sin(omega)
    return SlerpCoefficients(math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega)


def slerp_apply(theta0: torch.Tensor, theta1: torch.Tensor, coeffs: SlerpCoefficients) -> torch.Tensor:
    return theta0.float() * coeffs.base + theta1.float() * coeffs.model


_SLERP_BLOCK = 1 << 20


def slerp_stats(theta0: torch.Tensor, theta1: torch.Tensor) -> tuple[float, float, float]:
    """(dot, |theta0|, |theta1|) over whole flat tensors, in float64 over fixed blocks.

    The block size is fixed, not the caller's chunk size, so the angle (and
    hence every output bit) is the same however the merge is chunked.
    """
    dot = sq0 = sq1 = 0.0
    for lo in range(0, theta0.numel(), _SLERP_BLOCK):
        a = theta0[lo:lo + _SLERP_BLOCK].double()
        b = theta1[lo:lo + _SLERP_BLOCK].double()
        dot += float(a @ b)
        sq0 += float(a @ a)
        sq1 += float(b @ b)
    return dot, math.sqrt(sq0), math.sqrt(sq1)


def slerp(theta0: torch.Tensor, theta1: torch.Tensor, t: float) -> torch.Tensor:
    """Whole-tensor slerp between the base and one model."""
    coeffs = slerp_coefficients(*slerp_stats(theta0.reshape(-1), theta1.reshape(-1)), t)
    return slerp_apply(theta0, theta1, coeffs)
