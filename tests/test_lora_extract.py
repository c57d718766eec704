"""--out-lora: any merge written as a kohya LoRA by truncated SVD, and read back by this merger."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lib_merge import MergeRecipe, merge_to_file, merge_to_memory
from lib_merge.errors import OutputError
from lib_merge.lora.extract import gram_svd, merge_to_lora, truncated_svd

from test_lora import SD1_MODULES, XL_TE2, _xl_modules, write_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U = "model.diffusion_model."
# layer weights the LoRA names (the rest, biases/norms/embeddings, are not LoRA layers)
NAMED = {U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
         U + "input_blocks.4.0.in_layers.2.weight": "lora_unet_down_blocks_1_resnets_0_conv1",
         U + "output_blocks.5.1.proj_in.weight": "lora_unet_up_blocks_1_attentions_2_proj_in",
         "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight":
         "lora_te_text_model_encoder_layers_3_mlp_fc1"}


def _data_sha256(path: str) -> str:
    with open(path, "rb") as handle:
        (n,) = struct.unpack("<Q", handle.read(8))
        handle.seek(8 + n)
        return hashlib.sha256(handle.read()).hexdigest()


def _metadata(path: str) -> dict:
    from lib_merge.checkpoint import open_checkpoint
    with open_checkpoint(path) as ckpt:
        return dict(ckpt.metadata)


@pytest.fixture(scope="module")
def lora_in(sd1_set, tmp_path_factory):
    base = load_file(sd1_set["base"])
    path = str(tmp_path_factory.mktemp("lin") / "in.safetensors")
    write_lora(path, base, SD1_MODULES, seed=7)
    return path


def test_full_rank_round_trip_gives_the_merge_back(sd1_set, lora_in, tmp_path):
    recipe = MergeRecipe("ties_soup", sd1_set["base"], [sd1_set["models"][0], lora_in], weights=[1.0, 0.8])
    out_lora = str(tmp_path / "full.safetensors")
    report, extract = merge_to_lora(recipe, out_lora, rank=4096, lora_dtype="fp32", device="cpu")
    assert extract.modules > 300 and extract.worst[1] > 1 - 1e-6
    merged, _ = merge_to_memory(recipe, out_dtype="fp32", device="cpu")
    baked, _ = merge_to_memory(MergeRecipe("add_difference", sd1_set["base"], [out_lora], p=0.0, alpha=1.0),
                               out_dtype="fp32", device="cpu")
    base = load_file(sd1_set["base"])
    checked = 0
    for key, name in NAMED.items():
        scale = merged[key].abs().max().item()
        assert (baked[key] - merged[key]).abs().max().item() <= 2e-5 * scale, key
        assert not torch.equal(merged[key], base[key].float())
        checked += 1
    lora = load_file(out_lora)
    for key in merged:                             # every layer the LoRA holds comes back, not just the few above
        if key.endswith(".weight") and merged[key].dim() in (2, 4) and not torch.equal(baked[key], base[key].float()):
            assert (baked[key] - merged[key]).abs().max().item() <= 2e-5 * merged[key].abs().max().item(), key
            checked += 1
    assert checked > 300
    assert lora[NAMED[U + "input_blocks.4.0.in_layers.2.weight"] + ".lora_down.weight"].dim() == 4   # LoCon
    assert "wrote LoRA" in report.summary()


def test_low_rank_energy_matches_an_exact_float64_svd(sd1_set, lora_in, tmp_path):
    recipe = MergeRecipe("dare_ties_soup", sd1_set["base"], [sd1_set["models"][0], lora_in])
    out_lora = str(tmp_path / "r4.safetensors")
    _, extract = merge_to_lora(recipe, out_lora, rank=4, conv_rank=2, device="cpu")
    merged, _ = merge_to_memory(recipe, out_dtype="fp32", device="cpu")
    base = load_file(sd1_set["base"])
    meta = _metadata(out_lora)
    info = json.loads(meta["dare_merge_lora"])
    for key, name in NAMED.items():
        delta = (merged[key].double() - base[key].double()).reshape(merged[key].shape[0], -1)
        s = torch.linalg.svdvals(delta)
        r = 2 if merged[key].dim() == 4 and merged[key].shape[-1] == 3 else 4
        want = float((s[:r] ** 2).sum() / (s ** 2).sum())
        assert abs(info["energy"][name] - want) < 1e-4, (name, info["energy"][name], want)
        assert abs(extract.energy[name] - want) < 1e-4
    worst = min(info["energy"].values())
    assert info["worst"]["energy"] == pytest.approx(worst, abs=1e-6) and worst < 0.9
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2"}
    assert meta["sshs_model_hash"] == _data_sha256(out_lora)
    assert json.loads(meta["dare_merge_recipe"])["method"] == "dare_ties_soup"
    lora = load_file(out_lora)
    down = lora["lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight"]
    assert down.dtype == torch.float16 and down.shape[0] == 2 and down.dim() == 4
    assert float(lora["lora_unet_down_blocks_1_resnets_0_conv1.alpha"]) == 2.0


def test_out_and_out_lora_together_write_the_same_checkpoint_as_a_plain_merge(sd1_set, lora_in, tmp_path):
    recipe = MergeRecipe("ties", sd1_set["base"], [sd1_set["models"][1], lora_in])
    plain = str(tmp_path / "plain.safetensors")
    merge_to_file(recipe, plain, device="cpu", processes=1)
    both = str(tmp_path / "both.safetensors")
    merge_to_lora(recipe, str(tmp_path / "both-lora.safetensors"), rank=8, out_path=both, device="cpu")
    a, b = load_file(plain), load_file(both)
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert _metadata(plain)["dare_merge_recipe"] == _metadata(both)["dare_merge_recipe"]


def test_sdxl_names_and_openclip_layers_complete(sdxl_base, tmp_path):
    xl = load_file(sdxl_base)
    h = xl[XL_TE2 + "5.attn.in_proj_weight"].shape[0] // 3
    mods = [m for m in _xl_modules(h) if m["name"].endswith(("_k_proj", "q_proj", "in_layers_2"))]
    src = str(tmp_path / "src.safetensors")
    write_lora(src, xl, mods)
    out_lora = str(tmp_path / "xl_out.safetensors")
    _, extract = merge_to_lora(MergeRecipe("add_difference", sdxl_base, [src], p=0.0), out_lora, rank=64,
                               lora_dtype="fp32", device="cpu")
    lora = load_file(out_lora)
    stem = "lora_te2_text_model_encoder_layers_5_self_attn_"
    for part in ("q_proj", "k_proj", "v_proj", "out_proj"):        # A1111 needs all four per OpenCLIP layer
        assert f"{stem}{part}.lora_up.weight" in lora, part
    assert not lora[f"{stem}v_proj.lora_up.weight"].any()           # v and out unchanged: zero modules
    assert lora[f"{stem}k_proj.lora_up.weight"].any()
    assert "lora_unet_input_blocks_4_0_in_layers_2.lora_down.weight" in lora          # SDXL: LDM names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in lora
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in lora)
    assert all(k.endswith((".alpha", ".lora_down.weight", ".lora_up.weight")) for k in lora)
    meta = _metadata(out_lora)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    # baked back: the te2 in_proj slices land where they came from
    baked, _ = merge_to_memory(MergeRecipe("add_difference", sdxl_base, [out_lora], p=0.0), out_dtype="fp32",
                               device="cpu")
    want, _ = merge_to_memory(MergeRecipe("add_difference", sdxl_base, [src], p=0.0), out_dtype="fp32",
                              device="cpu")
    key = XL_TE2 + "5.attn.in_proj_weight"
    assert (baked[key] - want[key]).abs().max() < 1e-5


def test_randomized_svd_keeps_the_energy_of_the_exact_one():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(640, 24, generator=g) @ torch.randn(24, 1280, generator=g)
    mat = low + 0.05 * torch.randn(640, 1280, generator=g)
    u, s, vh, randomized = truncated_svd(mat, 32)
    assert randomized
    exact = torch.linalg.svdvals(mat.double())
    energy_exact = float((exact[:32] ** 2).sum() / (exact ** 2).sum())
    approx = u @ torch.diag(s) @ vh
    energy = float(approx.double().pow(2).sum() / mat.double().pow(2).sum())
    assert energy == pytest.approx(energy_exact, abs=1e-3)
    noise = torch.randn(640, 640, generator=g)             # flat spectrum: the randomized one falls short,
    u, s, vh, randomized = truncated_svd(noise, 32)          # so the exact SVD is used
    exact = torch.linalg.svdvals(noise.double())
    assert not randomized
    assert float((s.double() ** 2).sum()) == pytest.approx(float((exact[:32] ** 2).sum()), rel=1e-4)


@pytest.mark.parametrize("shape", [(96, 700), (700, 96), (128, 128)])
def test_gram_svd_is_the_exact_truncated_svd(shape):
    """The Gram eigenvector SVD against LAPACK's in float64: same singular values, same energy, orthonormal
    factors, and at full rank the matrix back to float32 rounding (on a spectrum spanning 6 decades too)."""
    g = torch.Generator().manual_seed(sum(shape))
    m, n = shape
    short = min(shape)
    q1, _ = torch.linalg.qr(torch.randn(m, short, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, short, generator=g, dtype=torch.float64))
    for spectrum in (torch.ones(short, dtype=torch.float64) + 0.1 * torch.rand(short, generator=g, dtype=torch.float64),
                     torch.logspace(0, -6, short, dtype=torch.float64)):
        mat64 = (q1 * spectrum) @ q2.T
        mat = mat64.float()
        exact = torch.linalg.svdvals(mat.double())
        for rank in (8, 40, short, short + 5):
            u, s, vh = gram_svd(mat, rank)
            r = min(rank, short)
            assert u.shape == (m, r) and s.shape == (r,) and vh.shape == (r, n)
            # float32 squares the condition in the Gram matrix: singular values below a few % of the largest
            # lose digits (error ~ eps (s1/s)^2 of s; their energy is exact to 1e-6 below, and fp16 keeps less)
            big = exact[:r] >= 3e-2 * exact[0]
            assert torch.allclose(s.double()[big], exact[:r][big], rtol=1e-3)
            k = int(big.sum())   # (the vectors of the blurred tail are no better than their values)
            for f in (u.T, vh):
                assert torch.allclose(f[:k].double() @ f[:k].T.double(), torch.eye(k, dtype=torch.float64), atol=1e-3)
            low = (u * s) @ vh
            energy = 1 - float((mat.double() - low.double()).pow(2).sum() / mat.double().pow(2).sum())
            assert energy == pytest.approx(float((exact[:r] ** 2).sum() / (exact ** 2).sum()), abs=1e-6)
            if r == short:
                assert float((low.double() - mat.double()).abs().max()) <= 1e-5 * float(mat.abs().max())


def test_truncated_svd_picks_the_cheaper_exact_path_for_wide_layers():
    """A 640 x 5760 layer at rank 64 (a conv of a scaled SDXL): the Gram SVD costs less than the randomized
    one there, so it is used directly (exact, not randomized)."""
    g = torch.Generator().manual_seed(3)
    mat = torch.randn(640, 40, generator=g) @ torch.randn(40, 5760, generator=g)
    u, s, vh, randomized = truncated_svd(mat, 64)
    assert not randomized and s.shape == (64,)
    assert float(((u * s) @ vh - mat).abs().max()) <= 1e-4 * float(mat.abs().max())


def test_out_lora_refuses_an_input_and_bad_ranks(sd1_set, lora_in, tmp_path):
    recipe = MergeRecipe("ties", sd1_set["base"], [lora_in])
    with pytest.raises(OutputError, match="an input"):
        merge_to_lora(recipe, lora_in, rank=4, overwrite=True, device="cpu")
    from lib_merge.errors import ParameterError
    with pytest.raises(ParameterError, match="rank"):
        merge_to_lora(recipe, str(tmp_path / "x.safetensors"), rank=0, device="cpu")
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_cli_out_lora_without_out(sd1_set, lora_in, tmp_path):
    out_lora = str(tmp_path / "cli.safetensors")
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-m", "lib_merge", "merge", "--base", sd1_set["base"], "--models",
                          sd1_set["models"][0], lora_in, "--method", "ties", "--out-lora", out_lora,
                          "--lora-rank", "4", "--device", "cpu", "--quiet"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "wrote LoRA" in run.stdout and "worst" in run.stdout
    assert os.path.exists(out_lora) and len(os.listdir(tmp_path)) == 1
    run = subprocess.run([sys.executable, "-m", "lib_merge", "inspect", out_lora], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 0 and "LoRA: " in run.stdout and "rank 4" in run.stdout, run.stdout
    assert "made for SD1.x" in run.stdout and "worst retained energy" in run.stdout, run.stdout
    first = run.stdout.splitlines()[0]
    assert ": LoRA, " in first and "unknown" not in first, run.stdout   # was ": unknown, 1062 keys"
    run = subprocess.run([sys.executable, "-m", "lib_merge", "merge", "--base", sd1_set["base"], "--models",
                          lora_in, "--device", "cpu"], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "--out-lora" in run.stderr and "Traceback" not in run.stderr


def test_cli_out_lora_says_how_it_uses_processes(sd1_set, lora_in, tmp_path):
    """--processes with --out-lora was silently ignored: it is the merge's thread count there, and says so."""
    from lib_merge.parallel import usable_cores
    if usable_cores() < 2:
        pytest.skip("one core: --processes 2 is capped to 1")
    env = dict(os.environ, PYTHONPATH=ROOT)
    outs = {}
    for n in (1, 2):
        outs[n] = str(tmp_path / f"p{n}.safetensors")
        run = subprocess.run([sys.executable, "-m", "lib_merge", "merge", "--base", sd1_set["base"], "--models",
                              sd1_set["models"][0], lora_in, "--method", "ties", "--out-lora", outs[n],
                              "--lora-rank", "4", "--device", "cpu", "--quiet", "--processes", str(n)],
                             capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        noted = [line for line in run.stderr.splitlines() if "--out-lora merges in one process" in line]
        assert len(noted) == (1 if n == 2 else 0), run.stderr
    one, two = load_file(outs[1]), load_file(outs[2])
    assert one.keys() == two.keys()
    for key in (k for k in one if k.endswith(".lora_up.weight")):   # LAPACK's SVD rounds by its thread count
        stem = key[:-len(".lora_up.weight")]
        a, b = ((f[key].float().flatten(1) @ f[stem + ".lora_down.weight"].float().flatten(1)) for f in (one, two))
        assert (a - b).abs().max() <= 2e-3 * a.abs().max() + 1e-6, stem
