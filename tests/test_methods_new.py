"""Issue 12: DELLA, Breadcrumbs, Model Stock, geometric median, the unbiased rescale, masks that follow the model.

Every method is merged through the engine from real safetensors files and
checked against an independent float64 reference written here with numpy
(ranks, hash masks, thresholds, cosines, Weiszfeld); DELLA also by its
properties.  The references take the issue's formulas literally.
"""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lib_merge import MergeRecipe, merge_to_file, merge_to_memory, parallel
from lib_merge.della import della_taus, keep_probability, ranks
from lib_merge.errors import ParameterError
from lib_merge.hashing import sha256_file
from lib_merge.masks import MaskHasher, mask_salt
from lib_merge.recipe import stored_recipe_from_metadata

KEYS = ["model.diffusion_model.input_blocks.1.1.proj_in.weight",        # (20, 20, 1, 1)
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",   # (192, 48)
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",    # (20,): one row
        "model.diffusion_model.out.2.weight"]                           # (4, 20, 3, 3)
M32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------- float64 references

def ref_salt(seed: int, key: str, sha: str, occurrence: int = 0) -> int:
    ident = f"{sha}#{occurrence}"
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{key}\0{ident}".encode(), digest_size=4,
                                          person=b"dare-mask").digest(), "little")


def ref_r(salt: int, n: int, start: int = 0) -> np.ndarray:
    """The element hash's top 31 bits read signed, in numpy (uint64 arithmetic modulo 2^32)."""
    i = np.arange(start, start + n, dtype=np.uint64)
    x = ((i * np.uint64(0x9E3779B1)) & np.uint64(M32)) ^ np.uint64(salt)
    x = (x * np.uint64(0x7FEB352D)) & np.uint64(M32)
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & np.uint64(M32)
    signed = x.astype(np.int64)
    signed = np.where(signed >= 2 ** 31, signed - 2 ** 32, signed)
    return signed >> 1


def ref_della_keep(delta: np.ndarray, shape, p: float, eps: float, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, q) of one model's delta, flat: per-row stable ranks, q, the hash test against floor(q 2^31) - 2^30."""
    n = delta.size
    m = n // shape[0] if len(shape) >= 2 else n
    rows = np.abs(delta).reshape(-1, m)
    rank = np.empty_like(rows, dtype=np.int64)
    for r in range(rows.shape[0]):
        rank[r, np.argsort(rows[r], kind="stable")] = np.arange(m)
    if m == 1:
        q = np.full(rows.shape, 1.0 - p)
    else:
        q = rank.astype(np.float64) / float(m - 1) * (2.0 * eps) + ((1.0 - p) - eps)
    q = q.reshape(-1)
    limit = np.floor(q * 2.0 ** 31).astype(np.int64) - 2 ** 30
    return ref_r(salt, n) < limit, q


def ref_elect_merge(taus: list[np.ndarray], weights, elect: bool, merge: str, vote_sgn: bool = False):
    taus = [t * w for t, w in zip(taus, weights)]
    if not elect:
        total = sum(taus)
        return total / sum(weights) if merge == "mean" else total
    gamma = np.sign(sum(np.sign(t) for t in taus) if vote_sgn else sum(taus))
    agree = [(np.sign(t) == gamma) & (gamma != 0) for t in taus]
    total = sum(np.where(a, t, 0.0) for a, t in zip(agree, taus))
    if merge == "sum":
        return total
    count = sum(a * w for a, w in zip(agree, weights))
    return np.where(count > 0, total / np.where(count > 0, count, 1.0), 0.0)


def ref_kth(values: np.ndarray, rank: int) -> float:
    return float(np.sort(values)[rank - 1])


def inputs(sd1_set, key):
    base = load_file(sd1_set["base"])[key]
    models = [load_file(m)[key] for m in sd1_set["models"]]
    return base.double().numpy().reshape(-1), [m.double().numpy().reshape(-1) for m in models], tuple(base.shape)


def merged(recipe, **kw) -> dict[str, torch.Tensor]:
    state, _ = merge_to_memory(recipe, out_dtype="fp32", device="cpu", **kw)
    return state


def close(ours: torch.Tensor, ref: np.ndarray, key: str) -> None:
    got = ours.double().numpy().reshape(-1)
    assert np.allclose(got, ref, rtol=1e-5, atol=2e-6), (key, float(np.abs(got - ref).max()))


# ----------------------------------------------------------------------------- DELLA

@pytest.mark.parametrize("method,p,eps,lam", [("della", 0.5, 0.1, 1.0), ("della_linear", 0.7, 0.3, 1.0),
                                              ("della", 0.3, 0.3, 0.5), ("della_linear", 0.4, 0.0, 1.0)])
def test_della_matches_a_float64_reference(sd1_set, method, p, eps, lam):
    r = MergeRecipe(method, sd1_set["base"], sd1_set["models"], p=p, epsilon=eps, lam=lam, alpha=0.8,
                    weights=[1.0, 0.5, 2.0], seed=11)
    state = merged(r)
    res = r.resolved()
    shas = [sha256_file(m) for m in sd1_set["models"]]
    for key in KEYS:
        base, models, shape = inputs(sd1_set, key)
        taus = []
        for sha, theta in zip(shas, models):
            delta = theta - base
            keep, q = ref_della_keep(delta, shape, p, eps, ref_salt(11, key, sha))
            taus.append(np.where(keep, delta / q ** lam, 0.0))
        ref = base + 0.8 * ref_elect_merge(taus, res.weights, res.spec.elect, res.merge)
        close(state[key], ref, key)


def test_della_linear_drops_exactly_the_reference_elements(sd1_set):
    """One model, merge = sum: the merged delta is zero exactly where the reference mask drops."""
    r = MergeRecipe("della_linear", sd1_set["base"], sd1_set["models"][:1], p=0.6, epsilon=0.2, seed=3)
    state = merged(r)
    sha = sha256_file(sd1_set["models"][0])
    for key in KEYS:
        base, models, shape = inputs(sd1_set, key)
        delta = models[0] - base
        keep, q = ref_della_keep(delta, shape, 0.6, 0.2, ref_salt(3, key, sha))
        got = state[key].double().numpy().reshape(-1) - base
        live = delta != 0
        assert np.array_equal(got[live] != 0, keep[live]), key
        # kept elements are delta / q_i (lambda = 1), to float32 rounding
        assert np.allclose(got[keep & live], (delta / q)[keep & live], rtol=1e-6, atol=1e-7)


def test_della_kept_elements_are_delta_over_q_and_kept_fraction_by_decile_matches_q():
    """Properties: at lambda = 1 a kept element is exactly delta / float32(q_i); per rank decile the kept
    fraction is the decile's mean q (sampling error of 64 x 4096 elements)."""
    gen = torch.Generator().manual_seed(0)
    rows, m = 64, 4096
    theta0 = torch.randn(rows * m, generator=gen)
    theta1 = theta0 + torch.randn(rows * m, generator=gen) * 0.01
    hasher = MaskHasher("cpu", max_chunk=1 << 15)
    salts = hasher.salts([mask_salt(5, "prop", "x#0")])
    p, eps = 0.5, 0.3
    tau = della_taus(theta0, [theta1], m, p, eps, 1.0, hasher, salts, 0)[0]
    delta = theta1 - theta0
    rank = ranks(delta.abs().view(1, -1), m)[0]
    q = keep_probability(rank, m, p, eps)
    kept = tau != 0
    assert torch.equal(tau[kept], delta[kept] / q[kept].float())
    decile = (rank * 10) // m
    for d in range(10):
        sel = decile == d
        want = float(q[sel].mean())
        got = float(kept[sel].float().mean())
        sigma = math.sqrt(want * (1 - want) / int(sel.sum()))
        assert abs(got - want) < 5 * sigma, (d, got, want)
    assert float(q.min()) == pytest.approx(1 - p - eps) and float(q.max()) == pytest.approx(1 - p + eps)


def test_della_ranks_are_stable_on_ties():
    mag = torch.tensor([[0.5, 0.1, 0.5, 0.1, 0.0, 0.5]])
    assert ranks(mag, 6).tolist() == [[3, 1, 4, 2, 0, 5]]
    assert ranks(mag, 3).tolist() == [[1, 0, 2, 1, 0, 2]]   # two rows of 3


# ----------------------------------------------------------------------------- Breadcrumbs

@pytest.mark.parametrize("method,k,beta", [("breadcrumbs", 0.9, 0.01), ("breadcrumbs_ties", 0.3, 0.1),
                                           ("breadcrumbs", 1.0, 0.2), ("breadcrumbs_ties", 0.5, 0.0)])
def test_breadcrumbs_matches_a_float64_reference(sd1_set, method, k, beta):
    r = MergeRecipe(method, sd1_set["base"], sd1_set["models"], k=k, beta=beta, alpha=1.2, weights=[2.0, 1.0, 1.0])
    state = merged(r)
    res = r.resolved()
    for key in KEYS:
        base, models, _ = inputs(sd1_set, key)
        n = base.size
        nb = math.floor(beta * n)
        taus = []
        for theta in models:
            delta = theta - base
            mag = np.abs(delta)
            keep = np.ones(n, dtype=bool)
            if nb >= 1:
                keep &= mag <= ref_kth(mag, n - nb)
            if k < 1.0:
                keep &= mag >= ref_kth(mag, max(math.floor((1 - k) * n) - nb, 1))
            taus.append(np.where(keep, delta, 0.0))
        ref = base + 1.2 * ref_elect_merge(taus, res.weights, res.spec.elect, res.merge)
        close(state[key], ref, key)


# ----------------------------------------------------------------------------- Model Stock, geometric median

def test_model_stock_matches_a_float64_reference(sd1_set):
    r = MergeRecipe("model_stock", sd1_set["base"], sd1_set["models"], alpha=0.9)
    state = merged(r)
    for key in KEYS:
        base, models, _ = inputs(sd1_set, key)
        deltas = [m - base for m in models]
        cos = []
        for i in range(len(deltas)):
            for j in range(i + 1, len(deltas)):
                norm = np.linalg.norm(deltas[i]) * np.linalg.norm(deltas[j])
                cos.append(float(deltas[i] @ deltas[j]) / norm if norm > 0 else 0.0)
        c = min(1.0, max(-1.0, sum(cos) / len(cos)))
        big_n = len(deltas)
        t = 0.0 if abs(1 + (big_n - 1) * c) < 1e-6 else big_n * c / (1 + (big_n - 1) * c)
        close(state[key], base + 0.9 * t * sum(deltas) / big_n, key)


def test_model_stock_of_opposite_deltas_is_the_base_and_needs_two_models(sd1_set, tmp_path):
    with pytest.raises(ParameterError, match="at least 2 models"):
        MergeRecipe("model_stock", sd1_set["base"], sd1_set["models"][:1]).validate()


def ref_weiszfeld(points: list[np.ndarray], weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    z = sum(wi * p for wi, p in zip(w, points)) / w.sum()
    for _ in range(100):
        d = np.array([max(np.linalg.norm(p - z), 1e-6) for p in points])
        coef = w / d
        new = sum(c * p for c, p in zip(coef, points)) / coef.sum()
        step = np.linalg.norm(new - z)
        z = new
        if step < 1e-10 * np.linalg.norm(z):
            break
    return z


def test_geometric_median_matches_a_float64_weiszfeld(sd1_set):
    weights = [1.0, 3.0, 0.5]
    r = MergeRecipe("geometric_median", sd1_set["base"], sd1_set["models"], alpha=0.7, weights=weights)
    state = merged(r)
    for key in KEYS:
        base, models, _ = inputs(sd1_set, key)
        median = ref_weiszfeld(models, weights)
        close(state[key], base + 0.7 * (median - base), key)


# ----------------------------------------------------------------------------- unbiased rescale

@pytest.mark.parametrize("p,k", [(0.5, 1.0), (0.8, 0.4)])
def test_unbiased_rescale_matches_a_float64_reference(sd1_set, p, k):
    r = MergeRecipe("dare_ties", sd1_set["base"], sd1_set["models"], p=p, k=k, rescale="unbiased", seed=2,
                    weights=[1.0, 2.0, 1.0], lam=0.3)   # lambda is not used by the unbiased rescale
    state = merged(r)
    res = r.resolved()
    shas = [sha256_file(m) for m in sd1_set["models"]]
    limit = 2 ** 30 - int(round(p * 2 ** 31))
    for key in KEYS[:2]:   # trim thresholds of float32 values: compared on keys without float ties
        base, models, _ = inputs(sd1_set, key)
        n = base.size
        dropped, whole = [], []
        for sha, theta in zip(shas, models):
            delta = theta - base
            keep = ref_r(ref_salt(2, key, sha), n) < limit
            d = np.where(keep, delta, 0.0)
            thr = ref_kth(np.abs(d), max(math.floor((1 - k) * n), 1)) if k < 1 else None
            if thr is not None:
                d = np.where(np.abs(d) >= thr, d, 0.0)
                delta = np.where(np.abs(delta) >= thr, delta, 0.0)
            dropped.append(d)
            whole.append(delta)
        weighted = [d * w for d, w in zip(dropped, res.weights)]
        gamma = np.sign(sum(weighted))
        j = sum(((np.sign(d) == gamma) & (gamma != 0)).astype(np.float64) for d in whole)
        tau = ref_elect_merge(dropped, res.weights, True, "mean")
        tau = np.where(j > 0, tau / (1 - p ** np.maximum(j, 1)), 0.0)
        close(state[key], base + tau, key)


def test_unbiased_rescale_is_refused_where_it_does_not_apply(sd1_set):
    for method, extra in (("dare_ties", {"merge": "sum"}), ("add_difference", {"merge": "mean"}),
                          ("della", {})):
        with pytest.raises(ParameterError, match="rescale unbiased"):
            MergeRecipe(method, sd1_set["base"], sd1_set["models"], rescale="unbiased", **extra).validate()
    with pytest.raises(ParameterError, match="rescale must be"):
        MergeRecipe("ties", sd1_set["base"], sd1_set["models"], rescale="biased").validate()


# ----------------------------------------------------------------------------- knobs

@pytest.mark.parametrize("p,eps,match", [(0.2, 0.3, "at most 1"), (0.8, 0.25, "above 0"),
                                         (0.5, -0.1, "outside"), (0.5, 0.5, "outside")])
def test_epsilon_outside_the_keep_range_is_refused(sd1_set, p, eps, match):
    with pytest.raises(ParameterError, match=match):
        MergeRecipe("della", sd1_set["base"], sd1_set["models"], p=p, epsilon=eps).validate()


def test_epsilon_against_a_block_p_is_refused(sd1_set):
    block_p = ",".join(["0.5"] * 25 + ["0.05"])
    with pytest.raises(ParameterError, match="OUT11.*epsilon"):
        merged(MergeRecipe("della", sd1_set["base"], sd1_set["models"], epsilon=0.1, block_p=block_p))


def test_beta_range_and_ignored_knobs_are_said(sd1_set):
    with pytest.raises(ParameterError, match="beta"):
        MergeRecipe("breadcrumbs", sd1_set["base"], sd1_set["models"], beta=1.0).validate()
    notes = MergeRecipe("breadcrumbs", sd1_set["base"], sd1_set["models"], p=0.3, epsilon=0.1).validate()
    assert any("p = 0.3 is ignored" in n for n in notes) and any("epsilon = 0.1 is ignored" in n for n in notes)


# ----------------------------------------------------------------------------- streaming, processes

NEW_METHODS = [("della", {"k": 0.6}), ("della_linear", {"p": 0.3, "epsilon": 0.2}),
               ("breadcrumbs", {}), ("breadcrumbs_ties", {"k": 0.4, "beta": 0.05}),
               ("model_stock", {}), ("geometric_median", {"weights": [1.0, 2.0, 1.0]}),
               ("dare_ties", {"p": 0.6, "k": 0.5, "rescale": "unbiased"})]


@pytest.mark.parametrize("method,extra", NEW_METHODS)
def test_any_chunking_gives_the_same_bits(sd1_set, method, extra):
    r = MergeRecipe(method, sd1_set["base"], sd1_set["models"], **extra)
    small = merged(r, chunk=4096)
    big = merged(r, chunk=1 << 22)
    odd = merged(r, chunk=5000)   # not a multiple of any row length
    for key in small:
        assert torch.equal(small[key], big[key]) and torch.equal(small[key], odd[key]), key


@pytest.mark.parametrize("method,extra", NEW_METHODS)
def test_two_processes_write_the_bytes_of_one(sd1_set, tmp_path, monkeypatch, method, extra):
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)
    monkeypatch.setattr(parallel, "GROUP_BYTES", 256 << 10)
    r = MergeRecipe(method, sd1_set["base"], sd1_set["models"], **extra)
    one, two = str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors")
    merge_to_file(r, one, device="cpu", processes=1)
    merge_to_file(r, two, device="cpu", processes=2)
    with open(one, "rb") as a, open(two, "rb") as b:
        assert a.read() == b.read()


# ----------------------------------------------------------------------------- masks follow the model

def test_masks_follow_the_model_not_its_place(sd1_set):
    """Reordering the models, or listing the base anywhere, leaves every mask as it was."""
    base, (a, b, c) = sd1_set["base"], sd1_set["models"]
    ab = merged(MergeRecipe("dare_ties", base, [a, b], p=0.5, seed=9))
    ba = merged(MergeRecipe("dare_ties", base, [b, a], p=0.5, seed=9))
    for key in KEYS:
        assert torch.equal(ab[key], ba[key]), key   # two models: sums commute exactly
    alone = merged(MergeRecipe("add_difference", base, [a], p=0.5, seed=9))
    for models in ([base, a], [a, base], [base, a, base]):
        with_base = merged(MergeRecipe("add_difference", base, models, p=0.5, seed=9))
        for key in KEYS:
            assert torch.equal(alone[key], with_base[key]), (models, key)
    # della too: a's drop pattern does not depend on c being listed before it
    solo = merged(MergeRecipe("della_linear", base, [a], p=0.5, seed=9))
    pair = merged(MergeRecipe("della_linear", base, [c, a], p=0.5, seed=9))
    only_c = merged(MergeRecipe("della_linear", base, [c], p=0.5, seed=9))
    ref = load_file(base)
    for key in KEYS:
        expect = solo[key] - ref[key].float() + only_c[key]
        assert torch.allclose(pair[key], expect, atol=1e-6), key


def test_a_file_listed_twice_gets_two_masks(sd1_set):
    base, a = sd1_set["base"], sd1_set["models"][0]
    once = merged(MergeRecipe("add_difference", base, [a], p=0.5, seed=1))
    twice = merged(MergeRecipe("add_difference", base, [a, a], p=0.5, seed=1))
    key = KEYS[1]
    doubled = 2 * (once[key] - load_file(base)[key].float())
    assert not torch.allclose(twice[key] - load_file(base)[key].float(), doubled)


def test_recipe_records_the_mask_scheme_and_an_older_file_says_it_will_differ(sd1_set, tmp_path, capsys):
    from lib_merge.cli import main
    out = str(tmp_path / "new.safetensors")
    merge_to_file(MergeRecipe("dare_ties", sd1_set["base"], sd1_set["models"], p=0.5), out, device="cpu")
    with safe_open(out, "pt") as handle:
        meta = handle.metadata()
    doc = json.loads(meta["dare_merge_recipe"])
    assert doc["mask_scheme"] == 2
    assert stored_recipe_from_metadata(meta).mask_scheme_note() is None
    doc.pop("mask_scheme")   # what a file merged before issue 12 holds
    old = dict(meta, dare_merge_recipe=json.dumps(doc))
    note = stored_recipe_from_metadata(old).mask_scheme_note()
    assert note and "will differ" in note
    # the CLI says so on a re-run of such a file
    from safetensors.torch import save_file
    older = str(tmp_path / "older.safetensors")
    save_file(load_file(out), older, metadata=old)
    code = main(["merge", "--recipe", older, "--out", str(tmp_path / "again.safetensors"), "--device", "cpu",
                 "--processes", "1", "--quiet"])
    assert code == 0
    assert "will differ" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the base listed as a model

@pytest.mark.parametrize("method,merge,says", [
    ("dare_ties", None, "neither the sign election nor the TIES mean"),
    ("add_difference", "mean", "N/(N + 1)"),
    ("add_difference", "sum", "changes nothing"),
    ("della_linear", "mean", "N/(N + 1)"),
    ("weighted_sum", None, "weighs in the weighted sum"),
    ("model_stock", None, "shrinks"),
])
def test_base_listed_as_a_model_message_is_true_per_method(sd1_set, method, merge, says):
    notes = MergeRecipe(method, sd1_set["base"], [sd1_set["base"], *sd1_set["models"][:2]],
                        merge=merge).validate()
    assert any(says in n for n in notes), notes


def test_base_listed_with_a_mean_without_election_really_shrinks_the_merge(sd1_set):
    base, a = sd1_set["base"], sd1_set["models"][0]
    key = KEYS[1]
    ref = load_file(base)[key].float()
    plain = merged(MergeRecipe("add_difference", base, [a], merge="mean"))[key] - ref
    listed = merged(MergeRecipe("add_difference", base, [base, a], merge="mean"))[key] - ref
    assert torch.allclose(listed, plain / 2, atol=1e-6)


# ----------------------------------------------------------------------------- X/Y/Z axes, infotext

def test_new_knobs_as_xyz_axes_and_infotext(sd1_set):
    from lib_merge.xyz_axes import AXES_BY_LABEL, apply_overrides, recipe_fields_from_infotext, recipe_infotext
    eps, beta, rescale = (AXES_BY_LABEL[f"[DARE] {n}"] for n in ("epsilon", "beta", "rescale"))
    assert eps.parse("0-0.2 (+0.1)") == [0.0, 0.1, 0.2]
    with pytest.raises(ValueError, match="epsilon"):
        eps.confirm([0.5])
    with pytest.raises(ValueError, match="beta"):
        beta.confirm([1.0])
    assert rescale.choices == ["uniform", "unbiased"] and rescale.coerce("Unbiased") == "unbiased"
    with pytest.raises(ValueError):
        rescale.coerce("biased")
    r = apply_overrides(MergeRecipe("della", sd1_set["base"], sd1_set["models"]), {"epsilon": 0.2, "p": 0.4})
    text = recipe_infotext(r)
    assert text["DARE epsilon"] == "0.2" and "DARE beta" not in text and "DARE rescale" not in text
    back = recipe_fields_from_infotext({**recipe_infotext(MergeRecipe("dare_ties", "b", ["m"], rescale="unbiased")),
                                        **text})
    assert back["epsilon"] == 0.2 and back["rescale"] == "unbiased"


def test_tab_form_passes_the_new_knobs_only_to_methods_that_use_them():
    from lib_merge.ui.form import FORM_FIELDS, FormValues, extra_preset_values, knob_is_live
    from lib_merge.ui.texts import used_text
    values = dict(base="b", models=["m1", "m2"], weights="", method="DELLA", p=0.4, k=1.0, alpha=1.0, lam=1.0,
                  vote_sgn=False, seed=1, split_alpha=False, alpha_unet=1.0, alpha_te=1.0, block_weights="",
                  block_p="", block_k="", merge_mode="method default", vae="base", skip_mismatched=False,
                  epsilon=0.2, beta=0.05, rescale="unbiased")
    r = FormValues(*(values[f] for f in FORM_FIELDS)).recipe(lambda t: t)
    assert (r.method, r.epsilon, r.beta, r.rescale) == ("della", 0.2, None, None)
    assert "ε 0.2" in used_text(r)
    values.update(method="DARE-TIES")
    r = FormValues(*(values[f] for f in FORM_FIELDS)).recipe(lambda t: t)
    assert (r.epsilon, r.beta, r.rescale) == (None, None, "unbiased") and "rescale unbiased" in used_text(r)
    values.update(method="Model Breadcrumbs")
    assert FormValues(*(values[f] for f in FORM_FIELDS)).recipe(lambda t: t).beta == 0.05
    assert extra_preset_values("della")["epsilon"] == 0.1 and extra_preset_values("breadcrumbs")["beta"] == 0.01
    assert knob_is_live("geometric_median", "weights") and not knob_is_live("model_stock", "p")


def test_http_api_takes_the_new_knobs(sd1_set, monkeypatch):
    from types import SimpleNamespace

    from lib_merge.webui import api
    monkeypatch.setattr(api.host, "find_checkpoint", lambda name: SimpleNamespace(filename=name))
    body = {"base": sd1_set["base"], "models": sd1_set["models"], "method": "della", "p": 0.4, "epsilon": 0.3}
    r = api.recipe_from_payload(body)
    assert (r.method, r.epsilon) == ("della", 0.3)
    assert api.recipe_from_payload({**body, "method": "ties", "rescale": "unbiased", "epsilon": None}).rescale \
        == "unbiased"
    with pytest.raises(ParameterError, match="at most 1"):
        api.recipe_from_payload({**body, "epsilon": 0.45})
    with pytest.raises(ParameterError, match="beta"):
        api.recipe_from_payload({**body, "method": "breadcrumbs", "beta": 1.5})


@pytest.mark.parametrize("rows,m", [(66, 2880), (5, 1), (1, 7), (3, 1000)])
def test_della_row_order_is_the_stable_sort_of_magnitudes(rows, m):
    from lib_merge.della import row_order
    x = torch.randn(rows, m, generator=torch.Generator().manual_seed(rows * m)).half().float()   # many ties
    x[0, : min(m, 3)] = 0.0
    x[-1, -1] = -0.0
    assert torch.equal(row_order(x), torch.sort(x.abs(), dim=1, stable=True).indices)


def test_unbiased_rescale_says_lambda_is_not_used(sd1_set):
    notes = MergeRecipe("dare_ties", sd1_set["base"], sd1_set["models"], rescale="unbiased", lam=0.5).validate()
    assert any("lambda = 0.5 is not used" in n for n in notes)
    assert not any("lambda" in n for n in MergeRecipe("dare_ties", sd1_set["base"], sd1_set["models"],
                                                       rescale="unbiased").validate())


def test_files_are_hashed_for_masks_only_when_masks_are_drawn(sd1_set, monkeypatch):
    from lib_merge import hashing
    from lib_merge.engine import MergePlan

    def refuse(path):
        raise AssertionError(f"hashed {path}")
    monkeypatch.setattr(hashing, "sha256_file", refuse)
    for method, extra in (("ties", {}), ("breadcrumbs", {}), ("model_stock", {}), ("weighted_sum", {"p": 0.0})):
        plan = MergePlan(MergeRecipe(method, sd1_set["base"], sd1_set["models"], **extra))
        assert plan.mask_ids is None
        plan.close()
    with pytest.raises(AssertionError, match="hashed"):
        MergePlan(MergeRecipe("dare_ties", sd1_set["base"], sd1_set["models"], p=0.1))


def test_mask_identities_carried_by_a_recipe_are_used_only_for_the_same_models(sd1_set):
    from dataclasses import replace

    from lib_merge.engine import MergePlan
    plan = MergePlan(MergeRecipe("dare_ties", sd1_set["base"], sd1_set["models"], p=0.3))
    ids = plan.mask_ids
    plan.close()
    swapped = replace(plan.recipe, models=list(reversed(plan.recipe.models)))   # carries the old identities
    again = MergePlan(swapped)
    assert again.mask_ids == list(reversed(ids))
    again.close()
