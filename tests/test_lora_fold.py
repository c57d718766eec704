"""Several LoRAs folded into one input where the method only sums task vectors (lib_merge/lora/fold.py).

Checked against float64 references written independently here (test_lora.write_lora), against the same
merge with the fold switched off, and for the statistics each model's share.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_merge import MergeRecipe
from lib_merge.engine import MergePlan, iter_merge
from lib_merge.lora.reader import LoraInput

from test_lora import SD1_MODULES, XL_PEFT, _check, _xl_modules, write_lora


def _merge(recipe: MergeRecipe, fold: bool = True, stats: bool = False) -> tuple[dict, MergePlan]:
    plan = MergePlan(recipe, "fp32", stats=stats)
    try:
        if not fold:
            plan.lora_sum = None
        state = dict(iter_merge(plan, "cpu", workers=2, own_memory=True))
    finally:
        plan.close()
    return state, plan


def _count_windows(monkeypatch) -> list[str]:
    """Keys on which a LoRA built its own window of base + delta (the unfolded path)."""
    built: list[str] = []
    plain = LoraInput._theta

    def counting(self, key, *args):
        built.append(key)
        return plain(self, key, *args)
    monkeypatch.setattr(LoraInput, "_theta", counting)
    return built


@pytest.mark.parametrize("merge", ["sum", "mean"])
def test_baking_many_loras_folded_matches_float64(sd1_set, tmp_path, monkeypatch, merge):
    base = load_file(sd1_set["base"])
    weights = [1.0, 0.5, 0.75, 2.0]
    paths, expected = [], []
    for i in range(len(weights)):
        paths.append(str(tmp_path / f"l{i}.safetensors"))
        # different modules per LoRA: keys touched by some LoRAs only, and by all
        expected.append(write_lora(paths[-1], base, SD1_MODULES[i % 3:] , seed=40 + i))
    want = {}
    for w, exp in zip(weights, expected):
        for key, d in exp.items():
            want[key] = want.get(key, 0) + w * d
    if merge == "mean":
        want = {k: v / sum(weights) for k, v in want.items()}
    built = _count_windows(monkeypatch)
    state, _ = _merge(MergeRecipe("add_difference", sd1_set["base"], paths, weights=weights, p=0.0, merge=merge,
                                  vae="merge"))
    assert built == []   # folded: no LoRA built its own window
    _check(state, base, want, 1.0)


def test_fold_with_checkpoints_weighted_sum_and_other_adapter_kinds(sd1_set, tmp_path, monkeypatch):
    """Checkpoints stay rows of their own; LoHa and DoRA (not stackable) are added one by one in the fold."""
    base = load_file(sd1_set["base"])
    m = SD1_MODULES[0]
    plain = str(tmp_path / "plain.safetensors")
    write_lora(plain, base, SD1_MODULES, seed=50)
    out, cols = base[m["key"]].shape
    g = torch.Generator().manual_seed(51)
    loha = str(tmp_path / "loha.safetensors")
    save_file({f"{m['name']}.hada_w1_a": torch.randn(out, 3, generator=g) * 0.1,
               f"{m['name']}.hada_w1_b": torch.randn(3, cols, generator=g) * 0.1,
               f"{m['name']}.hada_w2_a": torch.randn(out, 3, generator=g) * 0.1,
               f"{m['name']}.hada_w2_b": torch.randn(3, cols, generator=g) * 0.1,
               f"{m['name']}.alpha": torch.tensor(1.5)}, loha)
    dora = str(tmp_path / "dora.safetensors")
    exp = write_lora(dora, base, [dict(m, alpha=4.0)], dtype=torch.float32, seed=52)
    tensors = load_file(dora)
    tensors[m["name"] + ".dora_scale"] = ((base[m["key"]].double() + exp[m["key"]]).norm(dim=1) * 1.1
                                          ).float().reshape(-1, 1)
    save_file(tensors, dora)
    models = [sd1_set["models"][0], plain, loha, sd1_set["models"][1], dora]
    for method in ("add_difference", "weighted_sum"):
        recipe = MergeRecipe(method, sd1_set["base"], models, weights=[0.3, 1.0, 0.7, 0.5, 1.2], p=0.0,
                             alpha=0.9, vae="merge")
        built = _count_windows(monkeypatch)
        folded, _ = _merge(recipe)
        assert built == [], method
        unfolded, _ = _merge(recipe, fold=False)
        assert built, method   # the reference really ran LoRA by LoRA
        for key, value in unfolded.items():
            if value.is_floating_point():
                scale = max(1.0, float(value.abs().max()))
                assert (folded[key] - value).abs().max().item() <= 2e-6 * scale, (method, key)


def test_sdxl_fold_stacks_te2_qkv_slices_and_peft(sdxl_base, tmp_path):
    base = load_file(sdxl_base)
    h = base["conditioner.embedders.1.model.transformer.resblocks.5.attn.in_proj_weight"].shape[0] // 3
    peft = [dict(m) for m in XL_PEFT]
    peft[2]["rows"] = (h, 2 * h)                       # k_proj = rows h:2h of in_proj
    peft.append(dict(peft[2], name=peft[2]["name"].replace("layers.1.", "layers.5."),
                     key=peft[2]["key"].replace("resblocks.1.", "resblocks.5.")))   # stacks with kohya's k on layer 5
    paths, want = [], {}
    for i, (mods, w) in enumerate([(_xl_modules(h), 1.0), (peft, 0.6), (_xl_modules(h)[:2], 0.4)]):
        paths.append(str(tmp_path / f"xl{i}.safetensors"))
        for key, d in write_lora(paths[-1], base, mods, seed=60 + i).items():
            want[key] = want.get(key, 0) + w * d
    state, _ = _merge(MergeRecipe("add_difference", sdxl_base, paths, weights=[1.0, 0.6, 0.4], p=0.0, vae="merge"))
    _check(state, base, want, 1.0)


def test_no_fold_where_the_method_needs_each_delta(sd1_set, tmp_path, monkeypatch):
    """DARE (p > 0), TIES (trim, election) and breadcrumbs read each LoRA on its own."""
    base = load_file(sd1_set["base"])
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"n{i}.safetensors"))
        write_lora(paths[-1], base, SD1_MODULES[:3], seed=70 + i)
    for recipe in (MergeRecipe("add_difference", sd1_set["base"], paths, p=0.3),
                   MergeRecipe("ties", sd1_set["base"], paths, k=1.0),
                   MergeRecipe("breadcrumbs", sd1_set["base"], paths)):
        built = _count_windows(monkeypatch)
        _merge(recipe)
        assert built, recipe.method


def test_statistics_of_folded_loras_match_the_unfolded_merge(sd1_set, tmp_path):
    """The tab always gathers statistics: each LoRA keeps its own share when the LoRAs run folded.

    The folded shares are estimates (sampled chunks, and the LoRAs' rows sampled within them); the reference
    is the unfolded merge counting every chunk (exact).
    """
    base = load_file(sd1_set["base"])
    paths = [sd1_set["models"][0]]
    for i in range(3):
        paths.append(str(tmp_path / f"s{i}.safetensors"))
        write_lora(paths[-1], base, SD1_MODULES[i:], seed=80 + i)
    paths.append(paths[1])   # the same LoRA twice: its two shares go by its two weights
    recipe = MergeRecipe("add_difference", sd1_set["base"], paths, weights=[0.5, 1.0, 2.0, 0.25, 3.0], p=0.0)
    folded, plan_a = _merge(recipe, stats=True)
    plan_b = MergePlan(recipe, "fp32", stats=True)
    plan_b.stats_every = 1
    try:
        for _ in iter_merge(plan_b, "cpu", workers=1):
            pass
    finally:
        plan_b.close()
    a, b = plan_a.report.stats, plan_b.report.stats
    assert a["models"] == b["models"]
    shares = list(a["overall_share"].values())
    exact = list(b["overall_share"].values())
    print("folded", [round(x, 4) for x in shares], "exact", [round(x, 4) for x in exact])
    for got, want in zip(shares, exact):
        assert got == pytest.approx(want, abs=0.02)
    assert shares[4] == pytest.approx(3 * shares[1], rel=1e-5)   # same LoRA, same rows sampled
    assert min(shares) > 0 and shares[2] > shares[1]


def test_inpainting_input_conv_with_loras_is_not_folded_across_its_channels(sd1_set, tmp_path):
    """A 9-channel base with a 4-channel model: the input conv is merged on the 4 shared channels from
    tensors read whole and sliced, so the LoRAs on it are read one by one there (and folded elsewhere)."""
    key = "model.diffusion_model.input_blocks.0.0.weight"
    base = load_file(sd1_set["base"])
    w = base[key]
    base[key] = torch.cat([w, torch.randn(w.shape[0], 5, *w.shape[2:]).to(w.dtype)], dim=1)
    base_path = str(tmp_path / "inpaint-base.safetensors")
    save_file(base, base_path)
    conv_in = {"name": "lora_unet_conv_in", "key": key}
    paths, expected = [], []
    for i in range(2):
        paths.append(str(tmp_path / f"c{i}.safetensors"))
        expected.append(write_lora(paths[-1], base, [conv_in, SD1_MODULES[0]], seed=90 + i))
    ft = sd1_set["models"][0]
    state, plan = _merge(MergeRecipe("add_difference", base_path, [ft, *paths], weights=[1.0, 0.5, 2.0], p=0.0,
                                     vae="merge"))
    model = load_file(ft)[key].double()
    b = base[key].double()
    want = b[:, :4] + (model - b[:, :4]) + 0.5 * expected[0][key][:, :4] + 2.0 * expected[1][key][:, :4]
    assert (state[key][:, :4].double() - want).abs().max() < 2e-5 * max(1.0, float(want.abs().max()))
    assert torch.equal(state[key][:, 4:], base[key][:, 4:].float())     # the base's own channels kept
    other = SD1_MODULES[0]["key"]
    want_other = base[other].double() + 0.5 * expected[0][other] + 2.0 * expected[1][other] \
        + (load_file(ft)[other].double() - base[other].double())
    assert (state[other].double() - want_other).abs().max() < 2e-5 * max(1.0, float(want_other.abs().max()))
