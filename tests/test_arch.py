"""Architecture detection, components and block mapping on the real SD1/SD2/SDXL key lists."""
from __future__ import annotations

import collections

import pytest

from lib_merge.arch import (BLOCK_COUNTS, BLOCK_PRESETS, block_labels, block_of, block_preset, component_of,
                            detect_arch, parse_block_values, reference_keys)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_detects_each_architecture_from_its_real_keys(arch):
    shapes = {e["key"]: e["shape"] for e in reference_keys(arch)}
    assert detect_arch(shapes) == arch
    unet_only = {k: v for k, v in shapes.items() if k.startswith("model.diffusion_model.")}
    assert detect_arch(unet_only) == arch


def test_unknown_keys_are_not_an_architecture():
    assert detect_arch({"lora_up.weight": [4, 4]}) is None


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_every_unet_and_te_key_has_a_block_and_every_block_has_keys(arch):
    keys = [e["key"] for e in reference_keys(arch)]
    counts = collections.Counter()
    for key in keys:
        comp = component_of(key)
        block = block_of(key, arch)
        if comp in ("unet", "te"):
            assert block is not None, key
            counts[block] += 1
        else:
            assert block is None, key
    assert set(counts) == set(block_labels(arch))
    assert len(block_labels(arch)) == BLOCK_COUNTS[arch]


def test_sd1_block_mapping_of_real_key_names():
    a = "sd1"
    assert block_of("model.diffusion_model.time_embed.0.weight", a) == "IN00"
    assert block_of("model.diffusion_model.input_blocks.0.0.weight", a) == "IN00"
    assert block_of("model.diffusion_model.input_blocks.11.0.out_layers.3.weight", a) == "IN11"
    assert block_of("model.diffusion_model.middle_block.1.proj_in.weight", a) == "M00"
    assert block_of("model.diffusion_model.output_blocks.0.0.skip_connection.weight", a) == "OUT00"
    assert block_of("model.diffusion_model.output_blocks.11.1.proj_out.weight", a) == "OUT11"
    assert block_of("model.diffusion_model.out.2.weight", a) == "OUT11"
    assert block_of("cond_stage_model.transformer.text_model.final_layer_norm.weight", a) == "BASE"
    assert block_of("first_stage_model.decoder.conv_out.weight", a) is None


def test_sdxl_block_mapping_of_real_key_names():
    a = "sdxl"
    assert block_of("model.diffusion_model.label_emb.0.0.weight", a) == "IN00"
    assert block_of("model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn1.to_q.weight", a) == "IN08"
    assert block_of("model.diffusion_model.output_blocks.8.0.in_layers.2.weight", a) == "OUT08"
    assert block_of("model.diffusion_model.out.0.weight", a) == "OUT08"
    assert block_of("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", a) == "BASE"
    assert block_of("conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight", a) == "BASE"


def test_components():
    assert component_of("model_ema.decay") == "ema"
    assert component_of("first_stage_model.encoder.conv_in.bias") == "vae"
    assert component_of("alphas_cumprod") == "other"
    assert component_of("conditioner.embedders.1.model.ln_final.weight") == "te"


def test_block_values_parse_and_refuse_wrong_counts():
    values = parse_block_values(",".join(str(i / 25) for i in range(26)), "sd1")
    assert values["BASE"] == 0 and values["OUT11"] == 1 and values["M00"] == pytest.approx(13 / 25)
    with pytest.raises(ValueError, match="20 values"):
        parse_block_values("1," * 25 + "1", "sdxl")
    with pytest.raises(ValueError, match="not a list"):
        parse_block_values("a,b", "sd1")


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_block_presets_have_the_right_length(arch):
    for name in BLOCK_PRESETS:
        assert len(parse_block_values(block_preset(name, arch, 0.5), arch)) == BLOCK_COUNTS[arch]
