"""Property-based tests of the kernels over random shapes, dtypes and parameters."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_merge import kernels
from lib_merge.kernels import DeltaParams, DropMask, Workspace
from lib_merge.masks import MaskHasher, mask_salt

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@st.composite
def merge_case(draw):
    n = draw(st.integers(1, 3000))
    n_models = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2 ** 31))
    scale = draw(st.sampled_from([1e-3, 1.0, 100.0]))
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * scale).to(dtype)
    thetas = [(base.float() + torch.randn(n, generator=g) * scale * draw(st.sampled_from([0.0, 0.01, 1.0])))
              .to(dtype) for _ in range(n_models)]
    weights = [draw(st.floats(0.01, 4.0)) for _ in range(n_models)]
    params = DeltaParams(
        p=draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 0.99])),
        k=draw(st.sampled_from([1.0, 0.5, 0.2, 0.01])),
        vote_sgn=draw(st.booleans()),
        lam=draw(st.sampled_from([0.0, 1.0, 2.0])),
        alpha=draw(st.floats(-1.0, 2.0)),
        merge=draw(st.sampled_from(["mean", "sum"])),
        elect=draw(st.booleans()),
    )
    chunk = draw(st.integers(1, n))
    return base, thetas, weights, params, seed, chunk


def masks_for(n_models, seed, hasher):
    return [DropMask(hasher, mask_salt(seed, "prop.key", t)) for t in range(n_models)]


@settings(max_examples=60, deadline=None)
@given(merge_case())
def test_finite_inputs_give_finite_outputs(case):
    base, thetas, weights, params, seed, _ = case
    out = kernels.delta_merge(base, thetas, weights, params, masks_for(len(thetas), seed, MaskHasher("cpu", 4096)))
    assert torch.isfinite(out).all()
    assert out.dtype == torch.float32 and out.shape == base.shape


@settings(max_examples=60, deadline=None)
@given(merge_case())
def test_chunked_equals_whole_bit_for_bit(case):
    base, thetas, weights, params, seed, chunk = case
    hasher = MaskHasher("cpu", 4096)
    masks = masks_for(len(thetas), seed, hasher)
    whole = kernels.delta_merge(base, thetas, weights, params, masks)
    thresholds = []
    for theta in thetas:
        delta = kernels.task_delta(theta, base)
        kernels.dare_drop_(delta, masks[len(thresholds)], 0, params.p)
        thresholds.append(kernels.trim_threshold(delta, params.k))
    ws = Workspace(len(thetas), chunk)
    parts = []
    for lo in range(0, base.numel(), chunk):
        hi = min(base.numel(), lo + chunk)
        parts.append(kernels.delta_merge_fused(base[lo:hi], [t[lo:hi] for t in thetas], weights, params, ws,
                                               masks, thresholds, lo).clone())
    assert torch.equal(torch.cat(parts), whole)


@settings(max_examples=40, deadline=None)
@given(merge_case())
def test_no_drop_no_trim_single_model_is_base_plus_alpha_delta(case):
    base, thetas, weights, params, seed, _ = case
    params = DeltaParams(0.0, 1.0, params.vote_sgn, params.lam, params.alpha, "mean", params.elect)
    out = kernels.delta_merge(base, thetas[:1], weights[:1], params)
    delta = thetas[0].float() - base.float()
    expected = base.float() + ((delta * weights[0]) / weights[0] if not params.elect else
                               torch.where(delta != 0, (delta * weights[0]) / weights[0], 0.0)) * params.alpha
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(merge_case())
def test_p_zero_k_one_is_invariant_to_the_seed(case):
    base, thetas, weights, params, seed, _ = case
    params = DeltaParams(0.0, 1.0, params.vote_sgn, params.lam, params.alpha, params.merge, params.elect)
    hasher = MaskHasher("cpu", 4096)
    a = kernels.delta_merge(base, thetas, weights, params, masks_for(len(thetas), seed, hasher))
    b = kernels.delta_merge(base, thetas, weights, params, masks_for(len(thetas), seed + 1, hasher))
    assert torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(merge_case())
def test_merged_delta_stays_within_the_models_range_for_ties_mean(case):
    """With election and the mean, each element lies between the base and the most extreme
    agreeing (rescaled, weighted-averaged) delta: never outside the hull of the models' deltas."""
    base, thetas, weights, params, seed, _ = case
    params = DeltaParams(0.0, params.k, params.vote_sgn, 1.0, 1.0, "mean", True)
    out = kernels.delta_merge(base, thetas, weights, params)
    deltas = torch.stack([t.float() - base.float() for t in thetas])
    lo = torch.minimum(deltas.min(0).values, torch.zeros(()))
    hi = torch.maximum(deltas.max(0).values, torch.zeros(()))
    merged = out - base.float()
    tol = 1e-5 * (1 + deltas.abs().max())
    assert bool(((merged >= lo - tol) & (merged <= hi + tol)).all())
