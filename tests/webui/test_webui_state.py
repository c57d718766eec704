"""A merge never leaks into the WebUI's own checkpoint state (issue 15), in a real A1111 / Forge.

What is checked, against WEBUI_ROOT (A1111 v1.10.1) and/or FORGE_ROOT (Forge f2):

1. a too-long or reserved ``save_name`` is refused with 400 *before* any merge;
2. the status describes what is loaded now, after the user switches checkpoints;
3. ``config.json`` never holds a merge's title (it holds the merge's base);
4. a checkpoint override on a plain request replaces a loaded merge cleanly: the image and its infotext
   are that checkpoint's, and the next plain request works (the merge's base is selected afterwards);
5. the DARE Merge section together with a checkpoint override: the named checkpoint is the merge's base
   for that image, and the infotext says so;
6. an X/Y/Z "Checkpoint name" axis with the section on is a base axis: one merge per named checkpoint.

The tests share one server per host and build on each other's state; run them with ``-x``::

    WEBUI_ROOT=... FORGE_ROOT=... HF_HOME=... flock /tmp/coord/webui.lock \\
        .venv/bin/python -m pytest -x -q tests/webui/test_webui_state.py
"""
from __future__ import annotations

import base64
import json
import os
import re

import pytest

from webui_support import png_pixels

pytestmark = pytest.mark.webui

# one fine-tune and add_difference: the cheapest merge on 2 CPU cores (the method is not what is tested)
RECIPE = {"base": "dm_base", "models": ["dm_ft1"], "method": "add_difference", "alpha": 0.5}
STATE: dict = {}


def params_of(infotext: str) -> dict[str, str]:
    """The last line of an infotext as a dict (quoted values unquoted)."""
    last = infotext.strip().splitlines()[-1]
    out = {}
    for key, value in re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last):
        value = value.strip()
        out[key] = json.loads(value) if value.startswith('"') else value
    return out


def generate(webui, seed: int = 1, **extra) -> list[tuple[bytes, dict]]:
    """txt2img (64x64, 2 steps) with extra request fields; [(pixels, infotext params)] per image."""
    body = {"prompt": "a photo of a cat", "negative_prompt": "", "width": 64, "height": 64, "steps": 2,
            "sampler_name": "Euler", "seed": seed, "cfg_scale": 7, "batch_size": 1, "n_iter": 1}
    body.update(extra)
    answer = webui.ok("POST", "/sdapi/v1/txt2img", body)
    texts = json.loads(answer["info"])["infotexts"]
    return [(png_pixels(base64.b64decode(img)), params_of(text)) for img, text in zip(answer["images"], texts)]


def titles(webui) -> dict[str, str]:
    """{"dm_base": title, "dm_ft1": ..., "dm_ft2": ...} and every other listed title under its own name."""
    out = {}
    for model in webui.ok("GET", "/sdapi/v1/sd-models"):
        out[os.path.splitext(os.path.basename(model["filename"]))[0]] = model["title"]
    return out


def section(base: str, models: list[str]) -> dict:
    # enabled, use_tab, base, models, method, p, k, alpha, lam, vote_sgn, seed, weights, split_alpha, a_unet, a_te
    return {"DARE Merge": {"args": [True, False, base, models, "add_difference", 0.5, 1.0, 0.5, 1.0, False, 42, "",
                                    False, 1.0, 1.0]}}


def same_checkpoint(title: str | None, stem: str) -> bool:
    """``title`` is the checkpoint ``stem`` (A1111 adds " [hash]" to a title once the hash is known)."""
    return bool(title) and title.split(" [")[0] in (stem, stem + ".safetensors")


def status(webui) -> dict:
    return webui.ok("GET", "/dare-merge/v1/status")


def saved_config(webui) -> dict:
    with open(os.path.join(webui.work, "config.json"), encoding="utf-8") as handle:
        return json.load(handle)


def assert_no_merge_listed(webui) -> None:
    listed = [t for t in titles(webui).values() if t.startswith("dare-merge-")]
    assert listed == [], f"a merge that is no longer loaded is still in the checkpoint list: {listed}"


def test_setup_small_merges(webui):
    # fp16 merges and a 1 GB input cache keep a CPU WebUI (fp32 model) within a small machine's RAM
    webui.ok("POST", "/sdapi/v1/options", {"dare_merge_precision": "fp16", "dare_merge_cache_mb": 1024})
    (_, info), = generate(webui)                  # loads the model (Forge loads lazily)
    assert info["Model"] == "dm_base", info
    STATE["titles"] = titles(webui)


def test_save_name_is_checked_before_merging(webui):
    before = status(webui)["merges_performed"]
    for name, expected in (("a" * 300, "too long"), ("あ" * 75, "too long"), ("nul.txt", "reserved"),
                           ("COM1", "reserved")):
        code, body = webui.request("POST", "/dare-merge/v1/merge",
                                   dict(RECIPE, hot_load=False, save=True, save_name=name))
        assert code == 400 and body["type"] == "OutputError" and expected in body["error"], (name, code, body)
        assert "\n" not in body["error"]
    assert status(webui)["merges_performed"] == before, "a merge ran before the name was refused"
    ckpt_dir = os.path.join(webui.work, "ckpt")
    assert not [f for f in os.listdir(ckpt_dir) if f.startswith((".a", "a" * 20))], os.listdir(ckpt_dir)


def test_status_follows_a_switch_to_another_checkpoint(webui):
    answer = webui.ok("POST", "/dare-merge/v1/merge", RECIPE)
    STATE.update(merge=answer["name"], hash=answer["recipe_hash"])
    now = status(webui)
    assert now["hot_loaded"] and now["loaded_recipe_hash"] == answer["recipe_hash"], now
    t = STATE["titles"]
    webui.ok("POST", "/sdapi/v1/options", {"sd_model_checkpoint": t["dm_ft1"]})
    (_, info), = generate(webui)
    assert info["Model"] == "dm_ft1" and "DARE hash" not in info, info
    now = status(webui)
    assert now["loaded_recipe_hash"] is None and same_checkpoint(now["loaded_model"], "dm_ft1"), now
    assert now["hot_loaded"] is False, f"status still says a merge is hot-loaded: {now}"
    assert_no_merge_listed(webui)


def test_config_json_never_holds_a_merge(webui):
    answer = webui.ok("POST", "/dare-merge/v1/merge", RECIPE)       # the merge is still in RAM: no new merge
    assert answer["reused"] and status(webui)["hot_loaded"], answer
    for fmt in ("jpg", "png"):                                       # any setting change writes config.json
        webui.ok("POST", "/sdapi/v1/options", {"samples_format": fmt})
    saved = saved_config(webui)
    assert saved["samples_format"] == "png"
    assert same_checkpoint(saved["sd_model_checkpoint"], "dm_base"), (
        f"config.json holds {saved['sd_model_checkpoint']!r}, not the merge's base")
    (_, info), = generate(webui)                                     # the running model is still the merge
    assert info["Model"] == STATE["merge"] and info["Model hash"] == STATE["hash"], info
    webui.ok("POST", "/dare-merge/v1/restore")
    assert same_checkpoint(saved_config(webui)["sd_model_checkpoint"], "dm_base")


def test_a_checkpoint_override_replaces_a_loaded_merge_cleanly(webui):
    t = STATE["titles"]
    webui.ok("POST", "/dare-merge/v1/merge", RECIPE)
    (_, info), = generate(webui, override_settings={"sd_model_checkpoint": t["dm_ft2"]})
    assert info["Model"] == "dm_ft2" and "DARE hash" not in info, info
    assert status(webui)["hot_loaded"] is False
    # the next plain request works (A1111 used to try to read the merge from disk: HTTP 500) and gets
    # the merge's base: the selection the override restores cannot be a merge that is no longer loaded
    (_, info), = generate(webui)
    assert info["Model"] == "dm_base" and "DARE hash" not in info, info
    now = status(webui)
    assert now["hot_loaded"] is False and now["loaded_recipe_hash"] is None, now
    assert same_checkpoint(now["loaded_model"], "dm_base"), now
    assert_no_merge_listed(webui)
    options = webui.ok("GET", "/sdapi/v1/options")
    assert same_checkpoint(options["sd_model_checkpoint"], "dm_base"), options["sd_model_checkpoint"]


def test_section_with_a_checkpoint_override_merges_onto_that_checkpoint(webui):
    t = STATE["titles"]
    (pixels, info), = generate(webui, alwayson_scripts=section(t["dm_base"], [t["dm_ft1"]]),
                               override_settings={"sd_model_checkpoint": t["dm_ft2"]})
    assert info.get("DARE base") == "dm_ft2", f"the named checkpoint is not the merge's base: {info}"
    assert info["DARE models"] == "dm_ft1" and info["Model hash"] == info["DARE hash"], info
    assert info["Model"].startswith("dare-merge-add_difference-"), info
    now = status(webui)
    assert now["loaded_recipe_hash"] == info["DARE hash"] and now["hot_loaded"], now
    assert now["current"]["base"] == "dm_ft2.safetensors", now["current"]
    # the image was made by that merge: the model keeps it, and a plain request makes the same image
    (again, plain), = generate(webui)
    assert plain["Model hash"] == info["DARE hash"] and again == pixels, plain
    STATE["ft2_based"] = info["DARE hash"]


def test_xyz_checkpoint_axis_with_the_section_is_a_base_axis(webui):
    t = STATE["titles"]
    infos = webui.ok("GET", "/sdapi/v1/script-info")
    xyz = next(s for s in infos if s["name"] == "x/y/z plot" and not s["is_img2img"])
    choices = [c[0] if isinstance(c, (list, tuple)) else c for c in xyz["args"][0]["choices"]]
    axis = choices.index("Checkpoint name")
    script_args = [axis, "", [t["dm_base"], t["dm_ft2"]], 0, "", [], 0, "", [],
                   True, True, False, False, False, False, False, 0, False]
    cells = generate(webui, script_name="x/y/z plot", script_args=script_args,
                     alwayson_scripts=section(t["dm_base"], [t["dm_ft1"]]))
    assert len(cells) == 3, f"{len(cells)} images for a 2-cell grid"
    (_, first), (_, second) = cells[1], cells[2]
    assert [first.get("DARE base"), second.get("DARE base")] == ["dm_base", "dm_ft2"], (first, second)
    for info in (first, second):
        assert info["Model hash"] == info["DARE hash"], info
    assert second["DARE hash"] == STATE["ft2_based"] and first["DARE hash"] != second["DARE hash"]
    # after the grid (default setting: put back what was loaded before it) a plain request still works
    # and is made by the merge loaded before the grid, which the last cell loaded again anyway
    (_, plain), = generate(webui)
    assert plain["Model hash"] == STATE["ft2_based"], plain
    assert status(webui)["loaded_recipe_hash"] == STATE["ft2_based"]
