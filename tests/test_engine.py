"""The streaming engine on real safetensors files with real SD key names."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_merge import (ArchitectureError, CancelToken, MergeCancelled, MergeRecipe, OutputError,
                       ParameterError, ShapeMismatchError, merge_to_file, merge_to_memory)
from lib_merge import kernels
from lib_merge.arch import component_of
from lib_merge.kernels import DeltaParams, DropMask
from lib_merge.hashing import sha256_file
from lib_merge.masks import MaskHasher, mask_salt, model_mask_ids

UNET_KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
TE_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
VAE_KEY = "first_stage_model.encoder.conv_in.weight"


def recipe(sd1_set, **kw):
    kw.setdefault("method", "dare_ties_soup")
    return MergeRecipe(base=sd1_set["base"], models=sd1_set["models"], **kw)


@pytest.mark.parametrize("method,extra", [
    ("dare_ties_soup", {"p": 0.5, "k": 1.0}),
    ("dare_ties", {"p": 0.3, "k": 0.3}),
    ("ties", {}),
    ("add_difference", {"p": 0.2}),
    ("weighted_sum", {"alpha": 0.7}),
])
def test_chunked_equals_whole_equals_streamed(sd1_set, method, extra):
    r = recipe(sd1_set, method=method, **extra)
    small, _ = merge_to_memory(r, device="cpu", chunk=4096)
    big, _ = merge_to_memory(r, device="cpu", chunk=1 << 22)
    assert small.keys() == big.keys()
    for key in small:
        assert torch.equal(small[key], big[key]), key
    # and the same bits as the kernel run on whole in-memory tensors
    base = load_file(sd1_set["base"])
    models = [load_file(m) for m in sd1_set["models"]]
    res = r.resolved()
    spec = res.spec
    for key in (UNET_KEY, TE_KEY):
        thetas = [m[key].reshape(-1) for m in models]
        if spec.kind == "weighted_sum":
            whole = kernels.weighted_sum(base[key].reshape(-1), thetas, res.weights, res.alpha)
        else:
            hasher = MaskHasher("cpu")
            ids = model_mask_ids([sha256_file(m) for m in sd1_set["models"]])   # masks follow the content
            masks = [DropMask(hasher, mask_salt(res.seed, key, ident)) for ident in ids]
            params = DeltaParams(res.p, res.k if spec.trim else 1.0, res.vote_sgn, res.lam, res.alpha,
                                 res.merge, spec.elect)
            whole = kernels.delta_merge(base[key].reshape(-1), thetas, res.weights, params, masks)
        assert torch.equal(whole.view(base[key].shape), small[key]), key


def test_file_output_equals_memory_output_and_components(sd1_set, tmp_path):
    r = recipe(sd1_set, p=0.5)
    out = str(tmp_path / "merged.safetensors")
    report = merge_to_file(r, out, device="cpu")
    written = load_file(out)
    memory, _ = merge_to_memory(r, out_dtype="fp16", device="cpu")
    assert written.keys() == memory.keys()
    for key in written:
        assert torch.equal(written[key], memory[key]), key
    base = load_file(sd1_set["base"])
    assert not any(component_of(k) == "ema" for k in written)            # EMA dropped
    assert torch.equal(written[VAE_KEY], base[VAE_KEY])                   # VAE from the base
    pos = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert written[pos].dtype == torch.int64 and torch.equal(written[pos], base[pos])
    assert written["alphas_cumprod"].dtype == torch.float32               # buffers keep their dtype
    assert not torch.equal(written[UNET_KEY], base[UNET_KEY])
    assert report.merged > 800 and report.vae_from_base == 248 and report.dropped == 2
    assert report.output == out


def test_vae_merge_option_and_component_alphas(sd1_set):
    r = recipe(sd1_set, method="add_difference", vae="merge", alpha_unet=0.0, alpha_te=1.0)
    state, report = merge_to_memory(r, out_dtype="fp32", device="cpu")
    base = load_file(sd1_set["base"])
    assert torch.equal(state[UNET_KEY], base[UNET_KEY].float())           # alpha 0 on the UNet
    assert not torch.equal(state[TE_KEY], base[TE_KEY].float())
    assert not torch.equal(state[VAE_KEY], base[VAE_KEY].float())         # VAE merged
    assert report.vae_from_base == 0


def test_block_weights_set_alpha_per_block(sd1_set):
    zeros_except_out11 = ",".join(["0"] * 25 + ["1"])
    r = recipe(sd1_set, method="ties_soup", block_alpha=zeros_except_out11)
    state, _ = merge_to_memory(r, out_dtype="fp32", device="cpu")
    base = load_file(sd1_set["base"])
    assert torch.equal(state[UNET_KEY], base[UNET_KEY].float())           # IN01 -> 0
    assert torch.equal(state[TE_KEY], base[TE_KEY].float())               # BASE -> 0
    out_key = "model.diffusion_model.out.2.weight"                        # final out -> OUT11
    assert not torch.equal(state[out_key], base[out_key].float())


def test_block_weights_of_wrong_length_or_range_are_refused(sd1_set):
    with pytest.raises(ParameterError, match="26 values"):
        merge_to_memory(recipe(sd1_set, block_alpha="1,1,1"), device="cpu")
    with pytest.raises(ParameterError, match="OUT11"):
        merge_to_memory(recipe(sd1_set, block_p=",".join(["0.1"] * 25 + ["1.0"])), device="cpu")


def test_architecture_mismatch_is_refused_naming_both(sd1_set, sdxl_base):
    with pytest.raises(ArchitectureError) as err:
        merge_to_memory(MergeRecipe("ties", sd1_set["base"], [sdxl_base]), device="cpu")
    message = str(err.value)
    assert "xl_base.safetensors" in message and "SDXL" in message and "SD1" in message


def test_missing_keys_are_reported_and_the_others_merged(sd1_set, tmp_path):
    partial = load_file(sd1_set["models"][0])
    del partial[UNET_KEY]
    path = str(tmp_path / "partial.safetensors")
    save_file(partial, path)
    r = MergeRecipe("ties_soup", sd1_set["base"], [path, sd1_set["models"][1]])
    state, report = merge_to_memory(r, out_dtype="fp32", device="cpu")
    assert report.missing == {"partial.safetensors": [UNET_KEY]}
    only_second = MergeRecipe("ties_soup", sd1_set["base"], [sd1_set["models"][1]])
    expected, _ = merge_to_memory(only_second, out_dtype="fp32", device="cpu")
    assert torch.equal(state[UNET_KEY], expected[UNET_KEY])
    assert "lacks 1 keys" in report.summary()


def test_inpainting_input_conv_merges_shared_channels(sd1_set, tmp_path):
    key = "model.diffusion_model.input_blocks.0.0.weight"
    inpaint = load_file(sd1_set["base"])
    w = inpaint[key]
    extra = torch.randn(w.shape[0], 5, *w.shape[2:]).to(w.dtype)
    inpaint[key] = torch.cat([w, extra], dim=1)                        # 9 input channels
    inpaint_path = str(tmp_path / "inpaint.safetensors")
    save_file(inpaint, inpaint_path)
    state, report = merge_to_memory(MergeRecipe("add_difference", inpaint_path, sd1_set["models"][:1]),
                                    out_dtype="fp32", device="cpu")
    assert state[key].shape[1] == 9
    assert torch.equal(state[key][:, 4:], extra.float())               # base's extra channels kept
    ft = load_file(sd1_set["models"][0])[key].float()
    torch.testing.assert_close(state[key][:, :4], ft)                  # 4 shared channels: alpha 1 -> model
    assert any("input channels" in m for m in report.mismatches)


def test_other_shape_mismatch_refused_or_skipped(sd1_set, tmp_path):
    bad = load_file(sd1_set["models"][0])
    bad[UNET_KEY] = torch.zeros(3, 3, dtype=torch.float16)
    path = str(tmp_path / "bad.safetensors")
    save_file(bad, path)
    with pytest.raises(ShapeMismatchError) as err:
        merge_to_memory(MergeRecipe("ties", sd1_set["base"], [path]), device="cpu")
    assert UNET_KEY in str(err.value) and "bad.safetensors" in str(err.value)
    state, report = merge_to_memory(MergeRecipe("ties", sd1_set["base"], [path], on_mismatch="skip"),
                                    out_dtype="fp32", device="cpu")
    assert torch.equal(state[UNET_KEY], load_file(sd1_set["base"])[UNET_KEY].float())
    assert any("skipped" in m for m in report.mismatches)


def test_cancel_stops_and_leaves_no_file(sd1_set, tmp_path):
    token = CancelToken()
    seen = []

    def progress(ev):
        seen.append(ev.keys_done)
        if ev.keys_done == 100:
            token.cancel()

    out = tmp_path / "cancelled.safetensors"
    with pytest.raises(MergeCancelled):
        merge_to_file(recipe(sd1_set), str(out), device="cpu", progress=progress, cancel=token)
    assert max(seen) == 100
    assert os.listdir(tmp_path) == []


def test_existing_output_is_not_overwritten_unless_asked(sd1_set, tmp_path):
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="exists"):
        merge_to_file(recipe(sd1_set), str(out), device="cpu")
    assert out.read_bytes() == b"precious"
    merge_to_file(recipe(sd1_set), str(out), device="cpu", overwrite=True)
    assert len(load_file(str(out))) > 1000
    assert sorted(os.listdir(tmp_path)) == ["exists.safetensors"]


def test_progress_reports_keys_and_bytes(sd1_set):
    events = []
    merge_to_memory(recipe(sd1_set), device="cpu", progress=events.append)
    assert events[-1].keys_done == events[-1].keys_total == len(events)
    assert events[-1].bytes_done == events[-1].bytes_total > 0
    assert all(a.bytes_done <= b.bytes_done for a, b in zip(events, events[1:]))


@pytest.mark.parametrize("kw,match", [
    ({"p": 1.0}, "p"), ({"k": 0.0}, "k"), ({"lam": 3.0}, "lambda"), ({"alpha": 5.0}, "alpha"),
    ({"weights": [1.0, -1.0, 1.0]}, "weight"), ({"weights": [1.0]}, "weights"),
    ({"method": "nope"}, "unknown method"), ({"seed": -1}, "seed"),
])
def test_bad_parameters_are_refused_before_any_work(sd1_set, kw, match, tmp_path):
    with pytest.raises(ParameterError, match=match):
        merge_to_file(recipe(sd1_set, **kw), str(tmp_path / "x.safetensors"), device="cpu")
    assert os.listdir(tmp_path) == []


def test_empty_model_list_and_slerp_arity_are_refused(sd1_set):
    with pytest.raises(ParameterError, match="at least one model"):
        merge_to_memory(MergeRecipe("ties", sd1_set["base"], []), device="cpu")
    with pytest.raises(ParameterError, match="exactly one model"):
        merge_to_memory(recipe(sd1_set, method="slerp"), device="cpu")


def test_base_as_model_and_duplicates_are_allowed_and_explained(sd1_set):
    r = MergeRecipe("ties_soup", sd1_set["base"], [sd1_set["models"][0], sd1_set["base"], sd1_set["models"][0]])
    notes = r.validate()
    assert any("is the base" in n for n in notes) and any("repeats model 1" in n for n in notes)
    _, report = merge_to_memory(r, device="cpu")
    assert any("is the base" in n for n in report.notes)


def test_block_weights_multiply_the_component_alpha(sd1_set):
    halves = ",".join(["0.5"] * 26)
    scaled, _ = merge_to_memory(recipe(sd1_set, method="add_difference", alpha=0.8, alpha_te=0.4,
                                       block_alpha=halves), out_dtype="fp32", device="cpu")
    direct, _ = merge_to_memory(recipe(sd1_set, method="add_difference", alpha=0.4, alpha_te=0.2),
                                out_dtype="fp32", device="cpu")
    assert torch.equal(scaled[UNET_KEY], direct[UNET_KEY]) and torch.equal(scaled[TE_KEY], direct[TE_KEY])


def test_block_p_and_k_replace_p_and_k_per_block(sd1_set):
    p_in01_only = ",".join(["0"] * 2 + ["0.9"] + ["0"] * 23)   # BASE, IN00, IN01=0.9, ...
    state, _ = merge_to_memory(recipe(sd1_set, method="dare_ties", p=0.0, block_p=p_in01_only),
                               out_dtype="fp32", device="cpu")
    plain, _ = merge_to_memory(recipe(sd1_set, method="dare_ties", p=0.0), out_dtype="fp32", device="cpu")
    assert not torch.equal(state[UNET_KEY], plain[UNET_KEY])          # IN01 dropped at p 0.9
    assert torch.equal(state[TE_KEY], plain[TE_KEY])                  # BASE untouched
