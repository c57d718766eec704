"""The kernels against the spec's reference behaviours and an independent float64 implementation."""
from __future__ import annotations

import math

import pytest
import torch

from lib_merge import kernels
from lib_merge.kernels import DeltaParams, DropMask
from lib_merge.masks import MaskHasher, keep_mask, mask_salt


def reference_merge(theta0, thetas, weights, p, k, vote_sgn, lam, alpha, merge, elect, seed=0, key="k"):
    """Straight from the spec, in float64, one step per line, with explicit masks."""
    theta0 = theta0.double().reshape(-1)
    taus = []
    for t, theta in enumerate(thetas):
        delta = theta.double().reshape(-1) - theta0
        if p > 0:
            delta = delta * keep_mask(seed, key, t, p, delta.numel()).double()
        if k < 1:
            n = delta.numel()
            kk = max(math.floor((1 - k) * n), 1)
            thr = torch.sort(delta.abs()).values[kk - 1]
            delta = delta * (delta.abs() >= thr).double()
        taus.append(weights[t] * delta)
    if elect:
        s = sum(torch.sign(t) for t in taus) if vote_sgn else sum(taus)
        gamma = torch.sign(s)
        agree = [((torch.sign(t) == gamma) & (gamma != 0)).double() for t in taus]
    else:
        agree = [torch.ones_like(theta0) for _ in taus]
    num = sum(a * t for a, t in zip(agree, taus))
    if merge == "mean":
        den = sum(a * w for a, w in zip(agree, weights))
        tau_m = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
    else:
        tau_m = num
    tau_m = tau_m * (1 - p) ** (-lam)
    return theta0 + alpha * tau_m


def ours(theta0, thetas, weights, params, seed=0, key="k"):
    hasher = MaskHasher("cpu", 1 << 12)
    masks = [DropMask(hasher, mask_salt(seed, key, t)) for t in range(len(thetas))]
    return kernels.delta_merge(theta0.reshape(-1), [t.reshape(-1) for t in thetas], weights, params, masks)


def make(n=5000, models=3, seed=0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    thetas = [(base.float() + 0.05 * torch.randn(n, generator=g)
               + (torch.rand(n, generator=g) < 0.05) * torch.randn(n, generator=g)).to(dtype)
              for _ in range(models)]
    return base, thetas


@pytest.mark.parametrize("p,k,vote,lam,alpha,merge", [
    (0.0, 1.0, False, 1.0, 1.0, "mean"),
    (0.0, 0.2, False, 1.0, 1.0, "mean"),
    (0.0, 1.0, True, 1.0, 0.7, "mean"),
    (0.5, 1.0, False, 1.0, 1.0, "mean"),
    (0.5, 1.0, True, 1.0, 0.5, "mean"),
    (0.1, 1.0, True, 0.0, 1.0, "mean"),
    (0.3, 0.4, True, 0.5, -0.5, "sum"),
    (0.9, 0.05, False, 2.0, 2.0, "mean"),
])
def test_ties_family_matches_reference(p, k, vote, lam, alpha, merge):
    base, thetas = make()
    weights = [1.0, 0.5, 2.0]
    got = ours(base, thetas, weights, DeltaParams(p, k, vote, lam, alpha, merge, elect=True))
    ref = reference_merge(base, thetas, weights, p, k, vote, lam, alpha, merge, elect=True)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p,lam,merge", [(0.0, 1.0, "sum"), (0.5, 1.0, "sum"), (0.5, 0.0, "mean")])
def test_task_arithmetic_matches_reference(p, lam, merge):
    base, thetas = make()
    weights = [1.0, 1.0, 0.25]
    got = ours(base, thetas, weights, DeltaParams(p, 1.0, False, lam, 0.8, merge, elect=False))
    ref = reference_merge(base, thetas, weights, p, 1.0, False, lam, 0.8, merge, elect=False)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vote", [False, True])
@pytest.mark.parametrize("alpha", [1.0, 0.3, -1.0])
def test_single_model_no_drop_no_trim_is_base_plus_alpha_delta(vote, alpha):
    base, thetas = make(models=1)
    got = ours(base, thetas, [1.0], DeltaParams(0.0, 1.0, vote, 1.0, alpha, "mean", elect=True))
    expected = base.float() + (thetas[0].float() - base.float()) * alpha
    assert torch.equal(got, expected)


def test_vote_sgn_differs_exactly_where_small_deltas_outvote_a_large_one():
    base = torch.zeros(4)
    # element 0: two small + and one large -; elements 1-3: all models agree
    m1 = torch.tensor([0.1, 0.2, -0.3, 0.4])
    m2 = torch.tensor([0.1, 0.1, -0.1, 0.2])
    m3 = torch.tensor([-1.0, 0.3, -0.2, 0.1])
    off = ours(base, [m1, m2, m3], [1, 1, 1], DeltaParams(vote_sgn=False))
    on = ours(base, [m1, m2, m3], [1, 1, 1], DeltaParams(vote_sgn=True))
    assert off[0].item() == pytest.approx(-1.0)   # sum elects the large one
    assert on[0].item() == pytest.approx(0.1)     # counting elects the two small ones
    assert torch.equal(off[1:], on[1:])


@pytest.mark.parametrize("vote", [False, True])
def test_zero_deltas_and_tied_votes_give_the_base(vote):
    base = torch.tensor([1.0, 2.0, 3.0])
    zero = ours(base, [base.clone(), base.clone()], [1, 1], DeltaParams(vote_sgn=vote))
    assert torch.equal(zero, base)
    tied = ours(base, [base + torch.tensor([0.5, -0.5, 0.0]), base + torch.tensor([-0.5, 0.5, 0.0])], [1, 1],
                DeltaParams(vote_sgn=vote))
    assert torch.equal(tied, base)


def test_base_listed_as_a_model_changes_nothing_in_ties():
    base, thetas = make(models=2)
    params = DeltaParams(p=0.0, k=0.5, vote_sgn=True)
    without = ours(base, thetas, [1, 1], params)
    hasher = MaskHasher("cpu", 1 << 12)
    masks = [DropMask(hasher, mask_salt(0, "k", t)) for t in (0, 1, 2)]
    with_base = kernels.delta_merge(base, [thetas[0], thetas[1], base], [1, 1, 1], params, masks)
    assert torch.equal(without, with_base)


@pytest.mark.parametrize("lam,expected_scale", [(1.0, 1.0), (0.0, 0.6)])
def test_dare_expectation_over_seeds(lam, expected_scale):
    """E[rescaled DARE(delta)] = delta for lambda = 1, (1 - p) delta for lambda = 0."""
    p, n, seeds = 0.4, 2000, 300
    g = torch.Generator().manual_seed(3)
    base = torch.randn(n, generator=g)
    theta = base + torch.randn(n, generator=g)
    delta = (theta - base).double()
    acc = torch.zeros(n, dtype=torch.float64)
    for seed in range(seeds):
        acc += ours(base, [theta], [1.0], DeltaParams(p, 1.0, False, lam, 1.0, "sum", elect=False),
                    seed=seed).double() - base.double()
    mean = acc / seeds
    # per element, the sample mean has std |delta| * sqrt(p/(1-p)/seeds) * scale; check the aggregate fit
    slope = float((mean * delta).sum() / (delta * delta).sum())
    assert slope == pytest.approx(expected_scale, abs=0.02)
    resid = (mean - expected_scale * delta).abs() / delta.abs().clamp_min(1e-3)
    assert float(resid.median()) < 0.1


def test_trim_keeps_ties_at_threshold_and_k_near_zero_keeps_the_largest():
    delta = torch.tensor([0.1, -0.5, 0.5, 0.2, -0.05])
    thr = kernels.trim_threshold(delta, k=0.6)   # kk = floor(0.4*5)=2 -> 2nd smallest |.| = 0.1
    assert thr.item() == pytest.approx(0.1)
    assert kernels.trim_(delta.clone(), thr).tolist() == pytest.approx([0.1, -0.5, 0.5, 0.2, 0.0])
    thr = kernels.trim_threshold(delta, k=1e-9)  # kk = 4 -> 0.5; both +-0.5 tie and are kept
    assert kernels.trim_(delta.clone(), thr).tolist() == pytest.approx([0, -0.5, 0.5, 0, 0])


def test_trim_threshold_is_exact_on_large_tensors():
    from lib_merge.select import kth_smallest
    g = torch.Generator().manual_seed(0)
    for values in (torch.randn(1_000_003, generator=g).abs(),
                   torch.randint(0, 50, (300_000,), generator=g).float(),   # heavy ties
                   torch.cat([torch.zeros(500_000), torch.rand(1000, generator=g)])):
        for kk in (1, 7, values.numel() // 3, values.numel() - 1, values.numel()):
            assert kth_smallest(values, kk).item() == torch.sort(values).values[kk - 1].item()


def test_weighted_sum_and_slerp():
    base, thetas = make(models=2, dtype=torch.float32)
    got = kernels.weighted_sum(base, thetas, [1.0, 3.0])
    torch.testing.assert_close(got, (thetas[0] + 3 * thetas[1]) / 4)
    assert torch.equal(kernels.weighted_sum(base, thetas, [1.0, 1.0], alpha=0.0), base)
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    mid = kernels.slerp(a, b, 0.5)
    torch.testing.assert_close(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    same = kernels.slerp(a, a * 2, 0.25)           # parallel: falls back to lerp
    torch.testing.assert_close(same, a * 1.25)


def test_rescale_and_alpha_equivalence_of_the_notes_recipe():
    """p = 0.5, alpha = 0.5 with rescale on equals alpha = 1 with lambda = 0."""
    base, thetas = make()
    a = ours(base, thetas, [1, 1, 1], DeltaParams(0.5, 1.0, True, 1.0, 0.5))
    b = ours(base, thetas, [1, 1, 1], DeltaParams(0.5, 1.0, True, 0.0, 1.0))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("p,k,vote,merge,elect", [
    (0.0, 1.0, False, "mean", True), (0.5, 0.3, True, "mean", True), (0.2, 1.0, False, "sum", True),
    (0.3, 1.0, False, "sum", False), (0.0, 1.0, False, "mean", False), (0.7, 0.5, True, "sum", True),
])
def test_fused_path_is_bit_identical_to_the_readable_steps(p, k, vote, merge, elect):
    base, thetas = make(n=7000, models=4)
    weights = [1.0, 0.3, 2.5, 1.0]
    params = DeltaParams(p, k, vote, 0.7, 0.8, merge, elect)
    hasher = MaskHasher("cpu", 1 << 12)
    masks = [DropMask(hasher, mask_salt(5, "key", t)) for t in range(4)]
    readable = kernels.delta_merge(base, thetas, weights, params, masks)
    ws = kernels.Workspace(4, 7000)
    fused = kernels.delta_merge_fused(base, thetas, weights, params, ws, masks)
    assert torch.equal(readable, fused)


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_fused_weighted_sum_is_bit_identical(alpha):
    base, thetas = make(n=5000, models=3)
    weights = [1.0, 0.25, 3.0]
    readable = kernels.weighted_sum(base, thetas, weights, alpha)
    fused = kernels.weighted_sum_fused(base, thetas, weights, alpha, kernels.Workspace(3, 5000))
    assert torch.equal(readable, fused)
