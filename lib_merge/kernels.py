"""The merge maths, one function per step of the spec (docs: "The merge kernels").

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
    """The knobs of the delta-based methods for one key (see params.py for ranges)."""

    p: float = 0.0          # DARE drop probability
    k: float = 1.0          # TIES keep fraction
    vote_sgn: bool = False  # on = count signs
    lam: float = 1.0        # DARE rescale strength
    alpha: float = 1.0      # weight of the merged delta
    merge: str = "mean"     # "mean" (disjoint mean) or "sum"
    elect: bool = True      # TIES sign election (steps 5-6)


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
    return kth_smallest(flat.abs(), trim_rank(flat.numel(), k))


def trim_(delta: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """Step 3: keep elements whose magnitude reaches the threshold (ties kept)."""
    if threshold is not None:
        delta.masked_fill_(delta.abs() < threshold, 0.0)
    return delta


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
                start: int = 0, nonfinite: list[str] | None = None) -> torch.Tensor:
    """Steps 1-9 on one chunk (or a whole flattened tensor) of every model.

    ``thresholds`` are the per-model trim thresholds of the whole tensor; when
    None they are computed from this chunk, which is right only when the chunk
    is the whole tensor.  When ``nonfinite`` is a list, a NaN/Inf reaching the
    election is recorded in it (the election would otherwise hide it as a 0).
    """
    taus = []
    for t, theta_t in enumerate(thetas):
        delta = task_delta(theta_t, theta0)                                      # 1
        dare_drop_(delta, masks[t] if masks else None, start, params.p)           # 2
        threshold = thresholds[t] if thresholds is not None else trim_threshold(delta, params.k)
        trim_(delta, threshold)                                                   # 3
        taus.append(weigh_(delta, weights[t]))                                    # 4
    gamma = elect_sign(taus, params.vote_sgn) if params.elect else None          # 5
    if nonfinite is not None and gamma is not None and not bool(torch.isfinite(gamma).all()):
        nonfinite.append("a model's delta")
    tau_m = disjoint_merge(taus, weights, gamma, params.merge)                    # 6-7
    tau_m.mul_(rescale_factor(params.p, params.lam))                              # 8
    return add_back(theta0, tau_m, params.alpha)                                  # 9


class Workspace:
    """Reusable float32 buffers for :func:`delta_merge_fused` on one device.

    Allocating fresh chunk-sized tensors for every step costs page faults and
    cache misses that dominate the arithmetic on CPU; the fused path writes
    every intermediate into these buffers instead.
    """

    def __init__(self, n_models: int, chunk: int, device: torch.device | str = "cpu") -> None:
        self.taus = torch.empty(max(1, n_models), chunk, dtype=torch.float32, device=device)
        self.theta0 = torch.empty(chunk, dtype=torch.float32, device=device)
        self.total = torch.empty(chunk, dtype=torch.float32, device=device)
        self.count = torch.empty(chunk, dtype=torch.float32, device=device)
        self.vote = torch.empty(chunk, dtype=torch.float32, device=device)
        self.scratch = torch.empty(chunk, dtype=torch.float32, device=device)
        self.bits = torch.empty(chunk, dtype=torch.int32, device=device)


def trim_bits_(tau: torch.Tensor, threshold: torch.Tensor, bits: torch.Tensor) -> None:
    """Step 3 on the float bit patterns: same result as :func:`trim_`, without a mask tensor.

    For non-negative floats the int32 bit patterns order like the values, so
    |tau| >= thr  <=>  (bits(|tau|) - bits(thr)) >= 0; ``(bits(thr) - 1 - bits(|tau|)) >> 31``
    is then all ones exactly where tau is kept, and an AND clears the others.
    """
    thr_bits = int(threshold.to(torch.float32).reshape(1).view(torch.int32).item())
    torch.bitwise_and(tau.view(torch.int32), 0x7FFFFFFF, out=bits)
    bits.neg_()
    bits.add_(thr_bits - 1)
    bits.bitwise_right_shift_(31)
    tau.view(torch.int32).bitwise_and_(bits)


def delta_merge_fused(theta0: torch.Tensor, thetas: Sequence[torch.Tensor], weights: Sequence[float],
                      params: DeltaParams, ws: Workspace, masks: Sequence[DropMask | None] | None = None,
                      thresholds: Sequence[torch.Tensor | None] | None = None, start: int = 0,
                      nonfinite: list[str] | None = None) -> torch.Tensor:
    """:func:`delta_merge` with every intermediate in ``ws``; the same bits, fewer passes.

    Steps 6-7 use the identity, for gamma in {-1, +1}:
        sum_t A_t tau_t = gamma * sum_t max(gamma tau_t, 0),   sum_t A_t w_t = sum_t w_t [gamma tau_t > 0]
    (a model agrees exactly where gamma * tau_t > 0), so each model costs a
    multiply, a clamp and two adds instead of a sign, a compare and a select.
    IEEE rounding is symmetric in sign, so the sums are bit-identical.
    Returns a view into ``ws`` valid until the next call.
    """
    n = theta0.numel()
    base = ws.theta0[:n]
    base.copy_(theta0)
    taus = []
    for t, theta_t in enumerate(thetas):
        tau = ws.taus[t, :n]
        tau.copy_(theta_t)
        tau.sub_(base)                                                            # 1
        dare_drop_(tau, masks[t] if masks else None, start, params.p)             # 2
        threshold = thresholds[t] if thresholds is not None else trim_threshold(tau, params.k)
        if threshold is not None:                                                 # 3
            trim_bits_(tau, threshold, ws.bits[:n])
        weigh_(tau, weights[t])                                                   # 4
        taus.append(tau)
    total = ws.total[:n]
    if not params.elect:
        total.copy_(taus[0])
        for tau in taus[1:]:
            total.add_(tau)
        if params.merge == "mean":
            total.div_(sum(weights))
    else:
        gamma = ws.vote[:n]                                                       # 5
        if params.vote_sgn:
            torch.sign(taus[0], out=gamma)
            for tau in taus[1:]:
                gamma.add_(torch.sign(tau, out=ws.scratch[:n]))
        else:
            gamma.copy_(taus[0])
            for tau in taus[1:]:
                gamma.add_(tau)
        if nonfinite is not None and not math.isfinite(float(gamma.sum())):
            if not bool(torch.isfinite(gamma).all()):
                nonfinite.append("a model's delta")
        gamma.sign_()
        total.zero_()                                                             # 6-7
        count = ws.count[:n] if params.merge == "mean" else None
        if count is not None:
            count.zero_()
        scratch = ws.scratch[:n]
        for tau, weight in zip(taus, weights):
            torch.mul(tau, gamma, out=scratch)
            scratch.clamp_min_(0.0)
            total.add_(scratch)
            if count is not None:
                scratch.sign_()
                if weight != 1.0:
                    scratch.mul_(weight)
                count.add_(scratch)
        if count is not None:
            count.clamp_min_(min(weights))   # where no model agrees the total is 0: 0 / w = 0
            total.div_(count)
        total.mul_(gamma)
    scale = rescale_factor(params.p, params.lam)                                  # 8
    if scale != 1.0:
        total.mul_(scale)
    total.mul_(params.alpha)                                                      # 9
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
                       alpha: float, ws: Workspace) -> torch.Tensor:
    """:func:`weighted_sum` with its intermediates in ``ws`` (same bits; a view valid until the next call)."""
    n = theta0.numel()
    total = ws.total[:n]
    scratch = ws.scratch[:n]
    for t, (theta_t, weight) in enumerate(zip(thetas, weights)):
        target = total if t == 0 else scratch
        target.copy_(theta_t)
        if weight != 1.0:
            target.mul_(weight)
        if t:
            total.add_(scratch)
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
