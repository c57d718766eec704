"""LoRA files as merge inputs: real kohya/PEFT names on synthetic SD1/SDXL bases, checked in float64.

The expected deltas are computed here independently of lib_merge.lora: each
test names the checkpoint key (and rows) a LoRA module must land on by hand.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_merge import MergeRecipe, merge_to_file, merge_to_memory
from lib_merge.errors import ArchitectureError, CheckpointError, ShapeMismatchError

U = "model.diffusion_model."


def _factors(gen: torch.Generator, out: int, cols_shape: tuple[int, ...], rank: int, conv: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    down = torch.randn(rank, *cols_shape, generator=gen) * 0.1
    up = torch.randn(out, rank, *((1, 1) if conv else ()), generator=gen) * 0.1
    return down, up


def write_lora(path: str, base: dict[str, torch.Tensor], modules: list[dict], seed: int = 0,
               metadata: dict | None = None, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Write a LoRA; each module names its LoRA name, its target key (+ rows) and style.

    Returns the expected float64 delta per target key (strength 1).
    """
    gen = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for m in modules:
        target = base[m["key"]]
        rows = m.get("rows")
        out = (rows[1] - rows[0]) if rows else target.shape[0]
        conv = target.dim() == 4 and m.get("conv", True)
        cols_shape = tuple(target.shape[1:]) if conv else (int(torch.tensor(target.shape[1:]).prod()),)
        rank = m.get("rank", 4)
        down, up = _factors(gen, out, cols_shape, rank, conv)
        down, up = down.to(dtype), up.to(dtype)
        name = m["name"]
        if m.get("peft"):
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = down, up
        else:
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        alpha = m.get("alpha", float(rank) / 2)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
        scale = 1.0 if alpha is None else float(torch.tensor(alpha, dtype=dtype)) / rank
        delta = (up.double().reshape(out, rank) @ down.double().reshape(rank, -1)) * scale
        full = expected.setdefault(m["key"], torch.zeros(target.shape, dtype=torch.float64).reshape(target.shape[0], -1))
        if rows:
            full[rows[0]:rows[1]] += delta
        else:
            full += delta
    save_file(tensors, path, metadata=metadata)
    return {k: v.reshape(base[k].shape) for k, v in expected.items()}


SD1_MODULES = [
    {"name": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     "key": U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"},
    {"name": "lora_unet_up_blocks_1_attentions_2_proj_in", "key": U + "output_blocks.5.1.proj_in.weight",
     "conv": False},                                                          # 1x1 conv, Linear-shaped factors
    {"name": "lora_unet_down_blocks_1_resnets_0_conv1", "key": U + "input_blocks.4.0.in_layers.2.weight"},
    {"name": "lora_unet_down_blocks_1_resnets_0_conv_shortcut", "key": U + "input_blocks.4.0.skip_connection.weight"},
    {"name": "lora_unet_up_blocks_0_upsamplers_0_conv", "key": U + "output_blocks.2.1.conv.weight", "rank": 8},
    {"name": "lora_unet_down_blocks_2_downsamplers_0_conv", "key": U + "input_blocks.9.0.op.weight"},
    {"name": "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
     "key": U + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight", "alpha": None},   # no alpha: scale 1
    {"name": "lora_unet_mid_block_resnets_1_time_emb_proj", "key": U + "middle_block.2.emb_layers.1.weight"},
    {"name": "lora_unet_input_blocks_7_1_transformer_blocks_0_attn2_to_k",                   # LDM-style name
     "key": U + "input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight"},
    {"name": "lora_unet_up_blocks_3_attentions_1_transformer_blocks_0_attn1_to_out_0",
     "key": U + "output_blocks.10.1.transformer_blocks.0.attn1.to_out.0.weight"},
    {"name": "lora_te_text_model_encoder_layers_3_mlp_fc1",
     "key": "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight"},
    {"name": "lora_te_text_model_encoder_layers_11_self_attn_v_proj",
     "key": "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.v_proj.weight"},
]

XL_TE2 = "conditioner.embedders.1.model.transformer.resblocks."


def _xl_modules(h: int) -> list[dict]:
    mods = [{"name": f"lora_te2_text_model_encoder_layers_5_self_attn_{x}_proj", "key": XL_TE2 + "5.attn.in_proj_weight",
             "rows": (i * h, (i + 1) * h)} for i, x in enumerate("qkv")]
    return mods + [
        {"name": "lora_te2_text_model_encoder_layers_5_self_attn_out_proj", "key": XL_TE2 + "5.attn.out_proj.weight"},
        {"name": "lora_te2_text_model_encoder_layers_7_mlp_fc2", "key": XL_TE2 + "7.mlp.c_proj.weight"},
        {"name": "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
         "key": "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"},
        {"name": "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_out_0",
         "key": U + "input_blocks.4.1.transformer_blocks.1.attn1.to_out.0.weight"},
        {"name": "lora_unet_input_blocks_4_0_in_layers_2", "key": U + "input_blocks.4.0.in_layers.2.weight"},
        {"name": "lora_unet_output_blocks_2_2_conv", "key": U + "output_blocks.2.2.conv.weight"},   # SDXL upsampler
        {"name": "lora_unet_label_emb_0_0", "key": U + "label_emb.0.0.weight"},
    ]


XL_PEFT = [
    {"name": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v", "peft": True, "alpha": None,
     "key": U + "input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"},
    {"name": "unet.up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2", "peft": True, "alpha": None,
     "key": U + "output_blocks.2.1.transformer_blocks.9.ff.net.2.weight"},
    {"name": "text_encoder_2.text_model.encoder.layers.1.self_attn.k_proj", "peft": True, "alpha": None,
     "key": XL_TE2 + "1.attn.in_proj_weight", "rows": None},
]


def _check(state: dict, base: dict, expected: dict, w: float, touched_only_tol: float = 2e-6) -> None:
    for key, value in state.items():
        b = base[key]
        if not b.is_floating_point():
            continue
        want = b.double() + w * expected[key] if key in expected else b.double()
        err = (value.double() - want).abs().max().item()
        assert err <= touched_only_tol * max(1.0, b.double().abs().max().item()), (key, err)


def _merge_add(base_path: str, models: list[str], weights: list[float], **kw) -> dict:
    r = MergeRecipe("add_difference", base_path, models, weights=weights, p=0.0, alpha=1.0, vae="merge", **kw)
    state, _ = merge_to_memory(r, out_dtype="fp32", device="cpu")
    return state


def test_sd1_kohya_lora_and_locon_land_on_the_right_keys(sd1_set, tmp_path):
    base = load_file(sd1_set["base"])
    path = str(tmp_path / "style.lora")                                 # recognised by content, not extension
    expected = write_lora(path, base, SD1_MODULES)
    state = _merge_add(sd1_set["base"], [path], [0.7])
    _check(state, base, expected, 0.7)
    for key in expected:
        assert not torch.equal(state[key], base[key].float()), key


def test_sdxl_te2_fused_qkv_slices_ldm_names_and_peft(sdxl_base, tmp_path):
    base = load_file(sdxl_base)
    h = base[XL_TE2 + "5.attn.in_proj_weight"].shape[0] // 3
    kohya = str(tmp_path / "xl_kohya.safetensors")
    exp1 = write_lora(kohya, base, _xl_modules(h), seed=1)
    peft_mods = [dict(m) for m in XL_PEFT]
    peft_mods[2]["rows"] = (h, 2 * h)                                   # k_proj = rows h:2h of in_proj
    peft = str(tmp_path / "xl_peft.safetensors")
    exp2 = write_lora(peft, base, peft_mods, seed=2, dtype=torch.float32)
    state = _merge_add(sdxl_base, [kohya, peft], [1.0, 0.5])
    expected = {k: exp1.get(k, 0) + 0.5 * exp2.get(k, 0) for k in {*exp1, *exp2}}
    _check(state, base, expected, 1.0)
    in_proj = state[XL_TE2 + "1.attn.in_proj_weight"]
    b = base[XL_TE2 + "1.attn.in_proj_weight"].float()
    assert torch.equal(in_proj[:h], b[:h]) and torch.equal(in_proj[2 * h:], b[2 * h:])   # only k's rows move
    assert not torch.equal(in_proj[h:2 * h], b[h:2 * h])


@pytest.mark.parametrize("processes", [1, 2])
def test_lora_mixed_with_checkpoints_in_worker_processes(sd1_set, tmp_path, processes, monkeypatch):
    import lib_merge.parallel as parallel
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)
    base = load_file(sd1_set["base"])
    path = str(tmp_path / "mix.safetensors")
    write_lora(path, base, SD1_MODULES, seed=3)
    for method in ("dare_ties_soup", "weighted_sum"):
        r = MergeRecipe(method, sd1_set["base"], [sd1_set["models"][0], path], weights=[1.0, 0.8])
        out = str(tmp_path / f"{method}-{processes}.safetensors")
        merge_to_file(r, out, device="cpu", processes=processes, out_dtype="fp32")
        memory, _ = merge_to_memory(r, out_dtype="fp32", device="cpu")
        written = load_file(out)
        for key in written:
            assert torch.equal(written[key], memory[key]), (method, key)
        assert not torch.equal(written[SD1_MODULES[0]["key"]], base[SD1_MODULES[0]["key"]].float())


def test_lora_among_checkpoints_with_every_method(sd1_set, tmp_path):
    """Every registered method runs on a list mixing a checkpoint and a LoRA, and the LoRA's layer moves."""
    from lib_merge.methods import METHODS
    base = load_file(sd1_set["base"])
    path = str(tmp_path / "every.safetensors")
    write_lora(path, base, SD1_MODULES[:1], seed=4)
    key = SD1_MODULES[0]["key"]
    for method in METHODS:
        models = [path] if method == "slerp" else [sd1_set["models"][0], path]
        state, _ = merge_to_memory(MergeRecipe(method, sd1_set["base"], models), out_dtype="fp32", device="cpu")
        assert bool(torch.isfinite(state[key]).all()), method
        assert not torch.equal(state[key], base[key].float()), method


def test_lora_is_zero_on_keys_it_does_not_touch_weighted_sum(sd1_set, tmp_path):
    """weighted_sum of base-only + LoRA: untouched keys equal the base exactly (delta zero there)."""
    base = load_file(sd1_set["base"])
    path = str(tmp_path / "one.safetensors")
    expected = write_lora(path, base, SD1_MODULES[:1])
    r = MergeRecipe("weighted_sum", sd1_set["base"], [path], alpha=0.5)
    state, _ = merge_to_memory(r, out_dtype="fp32", device="cpu")
    _check(state, base, expected, 0.5)


def test_alpha_zero_has_no_effect(sd1_set, tmp_path):
    base = load_file(sd1_set["base"])
    path = str(tmp_path / "a0.safetensors")
    write_lora(path, base, [dict(SD1_MODULES[0], alpha=0.0)])
    state = _merge_add(sd1_set["base"], [path], [1.0])
    key = SD1_MODULES[0]["key"]
    assert torch.equal(state[key], base[key].float())


def test_loha_and_lokr_are_merged(sd1_set, tmp_path):
    base = load_file(sd1_set["base"])
    key = SD1_MODULES[0]["key"]
    out, cols = base[key].shape
    g = torch.Generator().manual_seed(5)
    w1a, w1b, w2a, w2b = (torch.randn(out, 3, generator=g), torch.randn(3, cols, generator=g),
                          torch.randn(out, 3, generator=g), torch.randn(3, cols, generator=g))
    name = SD1_MODULES[0]["name"]
    loha = str(tmp_path / "loha.safetensors")
    save_file({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b, f"{name}.hada_w2_a": w2a,
               f"{name}.hada_w2_b": w2b, f"{name}.alpha": torch.tensor(1.5)}, loha)
    exp = ((w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double())) * 0.5
    state = _merge_add(sd1_set["base"], [loha], [1.0])
    _check(state, base, {key: exp}, 1.0)
    # LoKr: kron(w1, w2) with w2 = a @ b (rank 2), alpha 4 -> scale 2
    p = 2 if out % 2 == 0 else 1
    k1 = torch.randn(p, 1, generator=g)
    k2a, k2b = torch.randn(out // p, 2, generator=g), torch.randn(2, cols, generator=g)
    lokr = str(tmp_path / "lokr.safetensors")
    save_file({f"{name}.lokr_w1": k1, f"{name}.lokr_w2_a": k2a, f"{name}.lokr_w2_b": k2b,
               f"{name}.alpha": torch.tensor(4.0)}, lokr)
    exp = torch.kron(k1.double(), k2a.double() @ k2b.double()) * 2.0
    state = _merge_add(sd1_set["base"], [lokr], [1.0])
    _check(state, base, {key: exp}, 1.0)


def test_dora_scale_per_output_row(sd1_set, tmp_path):
    base = load_file(sd1_set["base"])
    m = SD1_MODULES[0]
    path = str(tmp_path / "dora.safetensors")
    exp = write_lora(path, base, [dict(m, alpha=4.0)], dtype=torch.float32)
    tensors = load_file(path)
    w = base[m["key"]].double()
    magnitude = (w + exp[m["key"]]).norm(dim=1) * 1.1
    tensors[m["name"] + ".dora_scale"] = magnitude.float().reshape(-1, 1)
    save_file(tensors, path)
    merged = w + exp[m["key"]]
    want = merged * (magnitude.reshape(-1, 1) / merged.norm(dim=1, keepdim=True)) - w
    state = _merge_add(sd1_set["base"], [path], [0.5])
    _check(state, base, {m["key"]: want}, 0.5)


# ----------------------------------------------------------------------------------------------- refusals

def _refused(base_path: str, lora: str, error: type, *words: str) -> str:
    with pytest.raises(error) as err:
        _merge_add(base_path, [lora], [1.0])
    message = str(err.value)
    assert "\n" not in message and os.path.basename(lora) in message
    for word in words:
        assert word in message, message
    return message


def test_unmatched_key_is_refused_naming_file_and_key(sd1_set, tmp_path):
    base = load_file(sd1_set["base"])
    path = str(tmp_path / "typo.safetensors")
    write_lora(path, base, SD1_MODULES[:2])
    t = load_file(path)
    t["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z.lora_down.weight"] = t.pop(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight")
    t["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z.lora_up.weight"] = t.pop(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight")
    t["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_z.alpha"] = t.pop(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
    save_file(t, path)
    _refused(sd1_set["base"], path, CheckpointError, "matches no key", "attn1_to_z")


def test_sdxl_lora_onto_sd1_is_refused(sd1_set, sdxl_base, tmp_path):
    xl = load_file(sdxl_base)
    path = str(tmp_path / "xl.safetensors")
    h = xl[XL_TE2 + "5.attn.in_proj_weight"].shape[0] // 3
    write_lora(path, xl, _xl_modules(h))
    _refused(sd1_set["base"], path, ArchitectureError, "SDXL", "SD1")


def test_factor_shapes_that_do_not_fit_are_refused(sd1_set, tmp_path):
    base = load_file(sd1_set["base"])
    path = str(tmp_path / "bad.safetensors")
    name = SD1_MODULES[0]["name"]
    out, cols = base[SD1_MODULES[0]["key"]].shape
    save_file({f"{name}.lora_down.weight": torch.zeros(4, cols + 1), f"{name}.lora_up.weight": torch.zeros(out, 4)},
              path)
    _refused(sd1_set["base"], path, ShapeMismatchError, "do not fit", name)
    save_file({f"{name}.lora_down.weight": torch.zeros(4, cols), f"{name}.lora_up.weight": torch.zeros(out, 3)}, path)
    _refused(sd1_set["base"], path, CheckpointError, "rank", name)


def test_unsupported_adapter_types_are_refused_by_name(sd1_set, tmp_path):
    name = SD1_MODULES[0]["name"]
    path = str(tmp_path / "oft.safetensors")
    save_file({f"{name}.oft_blocks": torch.zeros(4, 2, 2)}, path)
    _refused(sd1_set["base"], path, CheckpointError, "OFT", name)
    save_file({f"{name}.weight": torch.zeros(4), f"{name}.on_input": torch.zeros(1)}, path)
    _refused(sd1_set["base"], path, CheckpointError, "IA3")


def test_lora_as_base_is_refused(sd1_set, tmp_path):
    base = load_file(sd1_set["base"])
    path = str(tmp_path / "asbase.safetensors")
    write_lora(path, base, SD1_MODULES[:1])
    with pytest.raises(ArchitectureError, match="is a LoRA"):
        merge_to_memory(MergeRecipe("add_difference", path, [sd1_set["models"][0]]), device="cpu")


def test_sd2_openclip_lora_te_lands_on_in_proj_slices(tmp_path):
    from lib_merge.synth import write_synthetic
    base_path = str(tmp_path / "sd2.safetensors")
    write_synthetic(base_path, "sd2", "base", seed=0, scale_down=32)
    base = load_file(base_path)
    te = "cond_stage_model.model.transformer.resblocks."
    h = base[te + "2.attn.in_proj_weight"].shape[0] // 3
    mods = [{"name": "lora_te_text_model_encoder_layers_2_self_attn_v_proj", "key": te + "2.attn.in_proj_weight",
             "rows": (2 * h, 3 * h)},
            {"name": "lora_te_text_model_encoder_layers_2_mlp_fc1", "key": te + "2.mlp.c_fc.weight"},
            {"name": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
             "key": U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"}]
    path = str(tmp_path / "sd2_lora.safetensors")
    expected = write_lora(path, base, mods, metadata={"ss_v2": "True", "ss_base_model_version": "sd_v2"})
    _check(_merge_add(base_path, [path], [1.2]), base, expected, 1.2)


def test_sd2_lora_by_its_metadata_onto_sd1_is_refused(sd1_set, tmp_path):
    base = load_file(sd1_set["base"])
    path = str(tmp_path / "v2meta.safetensors")
    write_lora(path, base, SD1_MODULES[:1], metadata={"ss_v2": "True", "ss_base_model_version": "sd_v2"})
    _refused(sd1_set["base"], path, ArchitectureError, "SD2", "SD1")


def test_lora_through_the_xyz_input_cache(sd1_set, tmp_path):
    """X/Y/Z cells open inputs through the input cache: a LoRA there merges as from disk."""
    from lib_merge.engine import MergePlan, iter_merge
    from lib_merge.input_cache import InputCache
    base = load_file(sd1_set["base"])
    path = str(tmp_path / "cached.safetensors")
    write_lora(path, base, SD1_MODULES, seed=9)
    r = MergeRecipe("ties_soup", sd1_set["base"], [sd1_set["models"][0], path])
    direct, _ = merge_to_memory(r, out_dtype="fp32", device="cpu")
    cache = InputCache("cpu", ram_budget_mb=256)
    for _ in range(2):                                                  # second cell: served from memory
        cache.prepare_recipe(r)
        plan = MergePlan(r, "fp32", opener=cache.open)
        try:
            cached = dict(iter_merge(plan, "cpu", own_memory=True))
        finally:
            plan.close()
        for key in direct:
            assert torch.equal(direct[key], cached[key]), key


def test_sd1_te1_prefix_and_peft_text_encoder_names(sd1_set, tmp_path):
    """diffusers' convert_state_dict_to_kohya writes lora_te1_ even for SD1; PEFT writes text_encoder.…"""
    base = load_file(sd1_set["base"])
    te = "cond_stage_model.transformer.text_model.encoder.layers."
    mods = [{"name": "lora_te1_text_model_encoder_layers_2_self_attn_k_proj", "key": te + "2.self_attn.k_proj.weight"},
            {"name": "text_encoder.text_model.encoder.layers.4.mlp.fc2", "key": te + "4.mlp.fc2.weight", "peft": True,
             "alpha": None},
            {"name": "unet.up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_out.0", "peft": True, "alpha": None,
             "key": U + "output_blocks.7.1.transformer_blocks.0.attn2.to_out.0.weight"}]
    path = str(tmp_path / "te1.safetensors")
    expected = write_lora(path, base, mods, seed=11)
    _check(_merge_add(sd1_set["base"], [path], [1.0]), base, expected, 1.0)


def test_the_base_is_read_once_for_all_loras_not_once_per_lora(sd1_set, tmp_path):
    """Baking N LoRAs reads each base element about twice (the merge's own read, one shared by every LoRA's
    window), not N + 1 times: the base re-read per LoRA was a third of the time baking 10 SDXL LoRAs."""
    import collections
    from lib_merge.checkpoint import open_checkpoint
    from lib_merge.engine import MergePlan, iter_merge
    base = load_file(sd1_set["base"])
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"many{i}.safetensors"))
        write_lora(paths[-1], base, SD1_MODULES, seed=20 + i)
    read: collections.Counter = collections.Counter()

    def opener(path: str):
        ckpt = open_checkpoint(path)
        if path == sd1_set["base"]:
            plain_range, plain_flat = ckpt.read_range, ckpt.flat

            def read_range(key, start, stop):
                out = plain_range(key, start, stop)
                read[key] += out.numel()
                return out

            def flat(key):
                out = plain_flat(key)
                read[key] += out.numel()
                return out
            ckpt.read_range, ckpt.flat = read_range, flat
        return ckpt

    plan = MergePlan(MergeRecipe("add_difference", sd1_set["base"], paths, p=0.0, vae="merge"), "fp32", opener=opener)
    try:
        merged = dict(iter_merge(plan, "cpu", workers=1, own_memory=True))
    finally:
        plan.close()
    for m in SD1_MODULES:
        assert read[m["key"]] <= 2 * base[m["key"]].numel(), (m["key"], read[m["key"]] / base[m["key"]].numel())
        assert not torch.equal(merged[m["key"]], base[m["key"]].float())
    untouched = U + "out.2.weight"
    assert read[untouched] <= 2 * base[untouched].numel()


def test_what_loras_share_per_base_goes_with_the_base(sd1_set, tmp_path):
    """The per-base share (key map, last chunk read) must not keep a closed merge's base alive."""
    import gc
    import weakref
    from lib_merge.engine import MergePlan, iter_merge
    base = load_file(sd1_set["base"])
    path = str(tmp_path / "share.safetensors")
    write_lora(path, base, SD1_MODULES[:2], seed=30)
    plan = MergePlan(MergeRecipe("add_difference", sd1_set["base"], [path, path], p=0.0), "fp32")
    for _ in iter_merge(plan, "cpu", workers=1):
        pass
    plan.close()
    gone = weakref.ref(plan.base)
    del plan
    gc.collect()
    assert gone() is None
