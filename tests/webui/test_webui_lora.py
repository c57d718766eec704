"""Issue 11 in a real WebUI: a LoRA from the Lora folder merged by the HTTP API, the merge saved as a LoRA
(save_lora), and that LoRA loaded unchanged by the WebUI's own Lora support.

The merge is the base plus the test LoRA dm_lora (rank 4, written by the fixture): its delta has rank 4,
so a LoRA of rank 8 holds all of it (retained energy 1 up to the fp16 save).  Then:

1. ``<lora:dm_roundtrip:1>`` on the base checkpoint (the WebUI applies the LoRA itself), and
2. the same merge hot-loaded as a checkpoint (no LoRA in the prompt)

give the same image up to the fp16 rounding of the saved factors: both hosts run here on the CPU in
float32 (``--no-half`` / ``--all-in-fp32``), where W + up @ down is computed in float32, so the only
difference between the two weight sets is the factors' fp16 rounding (relative 2**-11 of a delta that is
itself small against W); over 2 Euler steps at 64x64 that is at most a few levels of 255 per pixel.
The tolerance asserted is max |difference| <= 3 levels and mean <= 0.25, while the LoRA's own effect
(image with it vs without) is required to be larger than that.

A first run on A1111 (05:20 UTC) compared PNG-filtered bytes instead of pixels: mean difference 0.11 of
the filtered bytes, a max of 255 from a filter residual wrapping around; the LoRA's own effect was a mean
of 68.  Pixels are decoded now.

The WebUI runs with ``--lora-dir`` pointing at a folder of its own: the LoRA merged (dm_custom) lives only
there, the saved LoRA goes there and the WebUI's Lora extension finds it there; the fixture's
models/Lora/dm_lora (the default folder) must not be offered, nor a checkpoint dropped into the folder.
"""
from __future__ import annotations

import os
import shutil

import pytest
from webui_support import hosts, serve, write_lora

STATE: dict = {}
RECIPE = {"base": "dm_base", "models": ["LoRA: dm_custom.safetensors"], "method": "add_difference", "p": 0.0,
          "alpha": 1.0, "weights": [1.0]}


@pytest.fixture(scope="module", params=hosts())
def webui(request, synthetic_checkpoints, tmp_path_factory):
    """This module's WebUI, started with ``--lora-dir`` (a folder outside its models folder)."""
    kind, root = request.param
    folder = str(tmp_path_factory.mktemp(f"lora-dir-{kind}"))
    write_lora(os.path.join(folder, "dm_custom.safetensors"))
    os.symlink(synthetic_checkpoints["ft1"], os.path.join(folder, "not-a-lora.safetensors"))   # a checkpoint
    STATE["lora_dir"] = folder
    try:
        with serve(kind, root, synthetic_checkpoints, str(tmp_path_factory.mktemp(f"webui-{kind}")),
                   extra_flags=("--lora-dir", folder)) as server:
            yield server
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_loras_come_from_the_lora_dir_given_at_launch_by_content(webui):
    """The default models/Lora is not where this WebUI looks; a checkpoint in the Lora folder is no LoRA;
    a LoRA cannot be the base.  Each refused in one line before any merge."""
    for title in ("LoRA: dm_lora.safetensors", "LoRA: not-a-lora.safetensors"):
        status, body = webui.request("POST", "/dare-merge/v1/merge", dict(RECIPE, models=[title], hot_load=True))
        assert status == 400 and "no such LoRA" in body["error"], body
        assert os.path.basename(STATE["lora_dir"]) in body["error"], body                # names the folder
    status, body = webui.request("POST", "/dare-merge/v1/merge",
                                 dict(RECIPE, base="LoRA: dm_custom.safetensors", hot_load=True))
    assert status == 400 and "is a LoRA, not a full checkpoint" in body["error"], body


def _diff(a: bytes, b: bytes) -> tuple[int, float]:
    assert len(a) == len(b)
    d = [abs(x - y) for x, y in zip(a, b)]
    return max(d), sum(d) / len(d)


def _rgb(webui, seed: int, prompt: str = "a photo of a cat") -> tuple[bytes, str]:
    """Decoded RGB pixels (PNG rows are stored filtered: their bytes cannot be compared by value)."""
    import base64
    import io
    import json

    from PIL import Image
    answer = webui.ok("POST", "/sdapi/v1/txt2img", {
        "prompt": prompt, "negative_prompt": "", "width": 64, "height": 64, "steps": 2,
        "sampler_name": "Euler", "seed": seed, "cfg_scale": 7, "batch_size": 1, "n_iter": 1})
    image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB")
    return image.tobytes(), json.loads(answer["info"])["infotexts"][0]


def test_lora_is_merged_and_saved_as_a_lora(webui):
    STATE["base_pixels"], _ = _rgb(webui, seed=3)
    answer = webui.ok("POST", "/dare-merge/v1/merge",
                      dict(RECIPE, hot_load=False, save_lora="dm_roundtrip", lora_rank=8))
    saved = answer["saved_lora"]
    assert saved and os.path.isfile(saved["path"]) and saved["title"] == "LoRA: dm_roundtrip.safetensors", answer
    assert os.path.realpath(os.path.dirname(saved["path"])) == os.path.realpath(STATE["lora_dir"]), saved
    assert saved["worst_energy"] > 0.999, saved
    webui.request("POST", "/sdapi/v1/refresh-loras")        # the save refreshed it already; harmless twice
    status, loras = webui.request("GET", "/sdapi/v1/loras")
    if status == 200:
        assert any(item.get("name") == "dm_roundtrip" for item in loras), loras


def test_the_webui_applies_the_saved_lora_like_the_hot_loaded_merge(webui):
    with_lora, infotext = _rgb(webui, seed=3, prompt="a photo of a cat <lora:dm_roundtrip:1>")
    assert "dm_roundtrip" in infotext, infotext                        # the WebUI loaded and used it
    answer = webui.ok("POST", "/dare-merge/v1/merge", dict(RECIPE, hot_load=True))
    assert answer["hot_loaded"], answer
    merged, _ = _rgb(webui, seed=3)
    effect = _diff(with_lora, STATE["base_pixels"])
    gap = _diff(with_lora, merged)
    assert effect[0] > 3, f"the LoRA changed the image too little to tell: {effect}"
    assert gap[0] <= 3 and gap[1] <= 0.25, f"LoRA on the base vs hot-loaded merge: max/mean {gap}, effect {effect}"
    webui.ok("POST", "/dare-merge/v1/restore")
