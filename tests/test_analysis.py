"""Issue 13, the numbers: analyze() and the merge statistics, checked against direct computations.

Real safetensors files (lib_merge.synth, SD1 at 1/16 of its dimensions); the
expected figures are computed here from whole tensors in float64, and the
merge statistics from the readable reference steps of lib_merge.kernels.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_merge import MergeRecipe, engine, kernels, merge_to_file, merge_to_memory, parallel
from lib_merge.analysis import analyze
from lib_merge.analysis.stats import key_block, model_labels
from lib_merge.arch import block_labels
from lib_merge.engine import MergePlan
from lib_merge.masks import MaskHasher, mask_salt


def _float_deltas(base_path: str, model_paths: list[str]) -> dict[str, list[torch.Tensor]]:
    """key -> [float64 delta of each model], over the float keys of a figure block."""
    base = load_file(base_path)
    models = [load_file(p) for p in model_paths]
    out = {}
    for key, value in base.items():
        if not value.is_floating_point() or key_block(key, "sd1") is None:
            continue
        out[key] = [m[key].double() - value.double() for m in models]
    return out


def test_input_figures_match_a_direct_float64_computation(sd1_set):
    a = analyze(sd1_set["base"], sd1_set["models"])
    deltas = _float_deltas(sd1_set["base"], sd1_set["models"])
    names = [os.path.basename(p) for p in sd1_set["models"]]
    assert a["models"] == names and a["base"] == os.path.basename(sd1_set["base"]) and a["arch"] == "sd1"
    assert a["blocks"][:26] == block_labels("sd1") and a["blocks"][26:] == ["VAE"]   # synth fine-tunes change the VAE
    n = len(names)
    squares = {b: [0.0] * n for b in a["blocks"]}
    gram = [[0.0] * n for _ in range(n)]
    multi = {b: 0 for b in a["blocks"]}
    conflict = {b: 0 for b in a["blocks"]}
    for key, ds in deltas.items():
        block = key_block(key, "sd1")
        flat = torch.stack([d.reshape(-1) for d in ds])
        for i in range(n):
            squares[block][i] += float(flat[i] @ flat[i])
            for j in range(n):
                gram[i][j] += float(flat[i] @ flat[j])
        nonzero = (flat != 0).sum(0)
        mixed = (flat > 0).any(0) & (flat < 0).any(0)
        multi[block] += int((nonzero >= 2).sum())
        conflict[block] += int(mixed.sum())
    for i, name in enumerate(names):
        for block in a["blocks"]:
            assert a["delta_norm"][name][block] == pytest.approx(math.sqrt(squares[block][i]), rel=1e-9, abs=1e-12)
        assert a["whole_norm"][name] == pytest.approx(math.sqrt(gram[i][i]), rel=1e-9)
        for j in range(n):
            want = 1.0 if i == j else gram[i][j] / math.sqrt(gram[i][i] * gram[j][j])
            assert a["cosine"][i][j] == pytest.approx(want, abs=1e-9)
    for block in a["blocks"]:
        assert multi[block] > 0
        assert a["sign_conflict"][block] == pytest.approx(conflict[block] / multi[block], abs=1e-12)
    assert "share" not in a and "method" not in a   # no method: the inputs only
    json.dumps(a, allow_nan=False)


def test_block_norms_recombine_to_the_whole_norm(sd1_set):
    a = analyze(sd1_set["base"], sd1_set["models"][:2])
    for name in a["models"]:
        blocks = a["delta_norm"][name]
        assert set(blocks) == set(a["blocks"])
        assert math.sqrt(math.fsum(v * v for v in blocks.values())) == pytest.approx(a["whole_norm"][name], rel=1e-12)


def _scaled_copy(base_path: str, model_path: str, out: str, factor: float) -> str:
    """base + factor * (model - base), in float32 (exact for fp16 inputs and factor 2)."""
    base, model = load_file(base_path), load_file(model_path)
    save_file({k: (base[k].float() + factor * (model[k].float() - base[k].float())) if v.is_floating_point() else v
               for k, v in base.items()}, out)
    return out


def test_cosine_of_a_model_and_its_scaled_copy_is_all_ones(sd1_set, tmp_path):
    scaled = _scaled_copy(sd1_set["base"], sd1_set["models"][0], str(tmp_path / "twice.safetensors"), 2.0)
    a = analyze(sd1_set["base"], [sd1_set["models"][0], scaled])
    for row in a["cosine"]:
        for value in row:
            assert value == pytest.approx(1.0, abs=1e-12)
    first, second = a["models"]
    assert a["whole_norm"][second] == pytest.approx(2 * a["whole_norm"][first], rel=1e-12)
    for block in a["blocks"]:
        assert a["sign_conflict"][block] == 0.0   # same direction everywhere


def test_two_identical_models_never_conflict_and_get_distinct_names(sd1_set):
    model = sd1_set["models"][1]
    a = analyze(sd1_set["base"], [model, model])
    assert a["models"] == [f"{os.path.basename(model)} #1", f"{os.path.basename(model)} #2"]
    assert all(value == 0.0 for value in a["sign_conflict"].values())
    assert a["cosine"][0][1] == pytest.approx(1.0, abs=1e-12)


def test_model_labels_use_the_parent_folder_when_names_repeat():
    assert model_labels(["/a/x.safetensors", "/b/x.safetensors", "/b/y.safetensors"]) == \
        ["a/x.safetensors", "b/x.safetensors", "y.safetensors"]


def test_a_model_equal_to_the_base_has_null_cosines_and_zero_norms(sd1_set):
    a = analyze(sd1_set["base"], [sd1_set["models"][0], sd1_set["base"]])
    same = a["models"][1]
    assert a["whole_norm"][same] == 0.0 and all(v == 0.0 for v in a["delta_norm"][same].values())
    assert a["cosine"][1] == [None, None] and a["cosine"][0][1] is None


# ----------------------------------------------------------------------------- the merge's statistics

def _reference_stats(recipe: MergeRecipe) -> dict:
    """share / kept / elected_agreement recomputed key by key with the readable steps of kernels.py."""
    plan = MergePlan(recipe, "fp16")
    spec = plan.spec
    hasher = MaskHasher("cpu")
    base = load_file(recipe.base)
    models = [load_file(p) for p in recipe.models]
    n = len(models)
    sums = {}   # block -> [mass, nonzero, survived, agree] x models
    for task in plan.tasks:
        if task.action != "merge":
            continue
        block = key_block(task.key, plan.arch)
        params = task.params
        theta0 = base[task.key].reshape(-1)
        table = sums.setdefault(block, [[0.0] * n for _ in range(4)])
        taus = []
        for i in task.models:
            delta = kernels.task_delta(models[i][task.key].reshape(-1), theta0)
            table[1][i] += float((delta != 0).sum())
            if spec.kind == "delta":
                if params.p > 0:
                    mask = kernels.DropMask(hasher, mask_salt(plan.recipe.seed, task.key, plan.mask_ids[i]))
                    kernels.dare_drop_(delta, mask, 0, params.p)
                kernels.trim_(delta, kernels.trim_threshold(delta, params.k))
            table[2][i] += float((delta != 0).sum())
            taus.append(kernels.weigh_(delta, plan.recipe.weights[i]))
        gamma = kernels.elect_sign(taus, params.vote_sgn) if spec.kind == "delta" and params.elect else None
        for j, i in enumerate(task.models):
            if gamma is None:
                table[0][i] += float(taus[j].double().abs().sum())
            else:
                agree = kernels.agree_mask(taus[j], gamma)
                table[0][i] += float(torch.where(agree, taus[j], 0.0).double().abs().sum())
                table[3][i] += float(agree.sum())
    names = model_labels(recipe.models)
    share, kept, agreement = {m: {} for m in names}, {m: {} for m in names}, {}
    cuts = spec.kind == "delta" and (plan.recipe.p > 0 or (spec.trim and plan.recipe.k < 1))
    for block, table in sums.items():
        total = sum(table[0])
        for i, name in enumerate(names):
            share[name][block] = table[0][i] / total if total else None
            kept[name][block] = (table[2][i] / table[1][i] if table[1][i] else 1.0) if cuts else 1.0
        agreement[block] = sum(table[3]) / sum(table[2]) if gamma is not None and sum(table[2]) else None
    return {"share": share, "kept": kept, "elected_agreement": agreement}


def _close(got, want, rel=2e-5):
    if want is None or got is None:
        assert got is None and want is None
    else:
        assert got == pytest.approx(want, rel=rel, abs=1e-9)


@pytest.mark.parametrize("method,knobs", [
    ("ties", {"k": 0.2, "weights": [1.0, 0.5, 2.0]}),
    ("dare_ties", {"p": 0.5}),
    ("weighted_sum", {"weights": [1.0, 3.0, 0.5]}),
])
def test_merge_statistics_match_the_reference_steps(sd1_set, monkeypatch, method, knobs):
    monkeypatch.setattr(engine, "STATS_EVERY", 1)   # every chunk counted: exact
    recipe = MergeRecipe(method, sd1_set["base"], sd1_set["models"], **knobs)
    _, report = merge_to_memory(recipe, "fp16", device="cpu")
    stats = report.stats
    want = _reference_stats(recipe)
    assert stats["method"] == method and stats["models"] == model_labels(sd1_set["models"])
    assert stats["blocks"] == block_labels("sd1")   # the VAE is not merged (the base's)
    for name in stats["models"]:
        for block in stats["blocks"]:
            _close(stats["share"][name][block], want["share"][name][block])
            _close(stats["kept"][name][block], want["kept"][name][block])
    for block in stats["blocks"]:
        _close(stats["elected_agreement"][block], want["elected_agreement"][block])
        shares = [stats["share"][m][block] for m in stats["models"]]
        assert math.fsum(shares) == pytest.approx(1.0, abs=1e-9)
    if method == "ties":   # k = 0.2 keeps about a fifth of each model's deltas
        assert all(0.15 < v < 0.3 for m in stats["models"] for v in stats["kept"][m].values())
    if method == "weighted_sum":
        assert all(v == 1.0 for m in stats["models"] for v in stats["kept"][m].values())
    json.dumps(stats, allow_nan=False)
    assert "share of the merged delta:" in report.summary()


@pytest.mark.parametrize("method,knobs", [
    ("dare_ties_soup", {"p": 0.3}),
    ("ties", {"k": 0.3, "merge": "sum", "weights": [1.0, 0.5, 2.0]}),
    ("breadcrumbs_ties", {}),
    ("della", {"k": 0.5}),
    ("model_stock", {}),
    ("add_difference", {"p": 0.2, "rescale": None}),
])
def test_statistics_on_or_off_give_bit_identical_merges(sd1_set, method, knobs):
    recipe = MergeRecipe(method, sd1_set["base"], sd1_set["models"], **knobs)
    on, report_on = merge_to_memory(recipe, "fp16", device="cpu", stats=True)
    off, report_off = merge_to_memory(recipe, "fp16", device="cpu", stats=False)
    assert report_off.stats is None and report_on.stats is not None
    assert on.keys() == off.keys()
    for key in on:
        assert torch.equal(on[key], off[key]), key
    shares = [sum(v for v in report_on.stats["share"][m].values() if v is not None) for m in report_on.stats["models"]]
    assert all(s > 0 for s in shares)


def test_slerp_and_della_statistics(sd1_set):
    recipe = MergeRecipe("slerp", sd1_set["base"], sd1_set["models"][:1])
    _, report = merge_to_memory(recipe, "fp16", device="cpu")
    (name,) = report.stats["models"]
    assert all(v == 1.0 for v in report.stats["share"][name].values())
    assert all(v is None for v in report.stats["elected_agreement"].values())
    recipe = MergeRecipe("della", sd1_set["base"], sd1_set["models"], p=0.6, epsilon=0.2)
    _, report = merge_to_memory(recipe, "fp16", device="cpu")
    kept = [v for m in report.stats["models"] for v in report.stats["kept"][m].values()]
    assert all(0.3 < v < 0.5 for v in kept)   # DELLA keeps 1 - p on average
    assert all(0.5 < v <= 1.0 for v in report.stats["elected_agreement"].values())


@pytest.mark.parametrize("method,knobs", [("dare_ties", {"p": 0.5}), ("weighted_sum", {"weights": [1.0, 3.0, 0.5]})])
def test_sampled_counts_stay_close_to_every_chunk(sd1_set, monkeypatch, method, knobs):
    """The default counts every STATS_EVERY-th chunk (every key's first): within a percent of counting all."""
    recipe = MergeRecipe(method, sd1_set["base"], sd1_set["models"], **knobs)
    chunk = 1 << 12   # many chunks per key even in these small files, so the sample is a real sample
    _, sampled = merge_to_memory(recipe, "fp16", device="cpu", chunk=chunk)
    monkeypatch.setattr(engine, "STATS_EVERY", 1)
    _, every = merge_to_memory(recipe, "fp16", device="cpu", chunk=chunk)
    a, b = sampled.stats, every.stats
    for field in ("share", "kept"):
        for name in a["models"]:
            for block in a["blocks"]:
                assert a[field][name][block] == pytest.approx(b[field][name][block], abs=0.01), (field, block)
    for block in a["blocks"]:
        if b["elected_agreement"][block] is not None:
            assert a["elected_agreement"][block] == pytest.approx(b["elected_agreement"][block], abs=0.01)
    if method == "dare_ties":   # the elected share is summed over every chunk either way
        for name in a["models"]:
            assert a["share"][name]["IN04"] == pytest.approx(b["share"][name]["IN04"], rel=1e-6)
    # and it is a sample: some count differs from counting every chunk
    assert any(a["kept" if method == "dare_ties" else "share"][name][block] !=
               b["kept" if method == "dare_ties" else "share"][name][block]
               for name in a["models"] for block in a["blocks"])


def test_worker_processes_sum_to_the_same_statistics(sd1_set, tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)
    monkeypatch.setattr(parallel, "GROUP_BYTES", 256 << 10)
    recipe = MergeRecipe("dare_ties", sd1_set["base"], sd1_set["models"], p=0.4, k=0.5)
    one = merge_to_file(recipe, str(tmp_path / "one.safetensors"), device="cpu", processes=1).stats
    two = merge_to_file(recipe, str(tmp_path / "two.safetensors"), device="cpu", processes=2).stats
    assert one["blocks"] == two["blocks"] and one["models"] == two["models"]
    for field in ("share", "kept"):
        for name in one["models"]:
            for block in one["blocks"]:
                assert two[field][name][block] == pytest.approx(one[field][name][block], rel=1e-12)
    for block in one["blocks"]:
        assert two["elected_agreement"][block] == pytest.approx(one["elected_agreement"][block], rel=1e-12)


def test_merge_with_a_recipe_joins_the_merge_to_the_input_figures(sd1_set):
    recipe = MergeRecipe("ties", sd1_set["base"], sd1_set["models"], k=0.3)
    seen = []
    a = analyze(recipe=recipe, progress=seen.append)
    assert a["method"] == "ties" and a["recipe"]["k"] == 0.3
    assert a["blocks"][-1] == "VAE"   # the inputs' VAE differs; the merge copies the base's there
    for name in a["models"]:
        assert a["share"][name]["VAE"] is None and a["kept"][name]["VAE"] is None
        assert 0.2 < a["kept"][name]["IN04"] < 0.4
    assert a["elected_agreement"]["VAE"] is None and 0.5 < a["elected_agreement"]["M00"] <= 1.0
    assert seen[-1].keys_done == seen[-1].keys_total and seen[-1].bytes_done == seen[-1].bytes_total
    assert all(b.keys_done >= a_.keys_done for a_, b in zip(seen, seen[1:]))


@pytest.mark.parametrize("method,knobs", [("dare_ties", {"p": 0.5}), ("weighted_sum", {"weights": [1.0, 3.0, 0.5]})])
def test_analyze_counts_every_chunk_exactly(sd1_set, method, knobs):
    """A merge someone waits on samples its counts; an analysis must not: exact against the reference steps."""
    recipe = MergeRecipe(method, sd1_set["base"], sd1_set["models"], **knobs)
    want = _reference_stats(recipe)
    got = analyze(recipe=recipe)
    for name in got["models"]:
        for block in block_labels("sd1"):
            _close(got["share"][name][block], want["share"][name][block])
            _close(got["kept"][name][block], want["kept"][name][block])
    for block in block_labels("sd1"):
        _close(got["elected_agreement"][block], want["elected_agreement"][block])


def test_lora_inputs_read_as_base_plus_delta(sd1_set, tmp_path):
    from test_lora import SD1_MODULES, write_lora
    base = load_file(sd1_set["base"])
    lora = str(tmp_path / "style.safetensors")
    expected = write_lora(lora, base, SD1_MODULES)
    a = analyze(sd1_set["base"], [lora, sd1_set["models"][0]])
    name = a["models"][0]
    squares = {}
    for key, delta in expected.items():
        block = key_block(key, "sd1")
        squares[block] = squares.get(block, 0.0) + float((delta * delta).sum())
    for block in block_labels("sd1"):
        want = math.sqrt(squares.get(block, 0.0))
        assert a["delta_norm"][name][block] == pytest.approx(want, rel=1e-3, abs=1e-9), block
    assert "VAE" in a["blocks"] and a["delta_norm"][name]["VAE"] == 0.0


def test_cancel_stops_the_analysis(sd1_set):
    from lib_merge import CancelToken, MergeCancelled
    token = CancelToken()

    def cancel_at_tenth_key(ev):
        if ev.keys_done == 10:
            token.cancel()

    with pytest.raises(MergeCancelled):
        analyze(sd1_set["base"], sd1_set["models"], progress=cancel_at_tenth_key, cancel=token)


def test_a_model_lacking_keys_is_noted_and_counts_as_zero_there(sd1_set, tmp_path):
    model = load_file(sd1_set["models"][0])
    gone = [k for k in model if k.startswith("model.diffusion_model.middle_block.")]
    partial = str(tmp_path / "partial.safetensors")
    save_file({k: v for k, v in model.items() if k not in gone}, partial)
    a = analyze(sd1_set["base"], [partial, sd1_set["models"][0]])
    assert any("partial.safetensors lacks" in note for note in a["notes"])
    assert a["delta_norm"]["partial.safetensors"]["M00"] == 0.0
    assert a["delta_norm"]["partial.safetensors"]["IN04"] == a["delta_norm"][a["models"][1]]["IN04"]
