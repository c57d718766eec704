"""The standalone tab in a real headless Chromium: pick, preset, sliders, merge, save — then check the file.

The saved file must carry the recipe the UI showed and hold exactly the tensors the CLI writes for
that recipe (fp16, bit for bit).  Runs against gradio 3.41.2 (A1111's) and, when
``.venv-gradio4`` exists, gradio 4.40.0 (Forge's).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ui_support import ROOT, artifacts_dir, subprocess_env

from lib_merge.arch import block_preset
from lib_merge.recipe import RECIPE_METADATA_KEY
from lib_merge.ui.hints import load_titles

# What the test sets in the UI (strings as typed) and what the recipe must then say.
UI_P, UI_ALPHA, UI_LAMBDA, UI_SEED, UI_WEIGHTS = "0.35", "0.8", "1.1", "1234", "1, 0.5"
EXPECTED_KNOBS = {"method": "dare_ties_soup", "p": 0.35, "k": 1.0, "alpha": 0.8, "lam": 1.1, "vote_sgn": True,
                  "seed": 1234, "weights": [1.0, 0.5], "merge": "mean", "vae": "base", "alpha_unet": None,
                  "alpha_te": None, "block_alpha": None, "block_p": None, "block_k": None,
                  "on_mismatch": "error", "allow_nonfinite": False, "output_dtype": "fp16"}


def _cli_merge(models_dir: str, files: dict, out: str) -> subprocess.Popen:
    """The same recipe through `python -m lib_merge merge` (started early: it runs while the browser works)."""
    cmd = [sys.executable, "-m", "lib_merge", "merge", "--quiet", "--device", "cpu", "--dtype", "fp16",
           "--base", os.path.join(models_dir, files["base"]),
           "--models", os.path.join(models_dir, files["ft1"]), os.path.join(models_dir, files["ft2"]),
           "--method", "dare_ties_soup", "--p", UI_P, "--k", "1", "--alpha", UI_ALPHA, "--lambda", UI_LAMBDA,
           "--vote-sgn", "--seed", UI_SEED, "--weights", "1", "0.5", "--out", out]
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _recipe(path: str) -> dict:
    with safe_open(path, "pt") as handle:
        return json.loads(handle.metadata()[RECIPE_METADATA_KEY])


def _assert_bit_equal(a_path: str, b_path: str) -> int:
    a, b = load_file(a_path), load_file(b_path)
    assert sorted(a) == sorted(b), "the UI's file and the CLI's file hold different keys"
    for key in a:
        x, y = a[key], b[key]
        assert x.dtype == y.dtype and x.shape == y.shape, f"{key}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), f"{key} differs"
    return len(a)


def test_merge_and_save_from_the_browser(tab_page, server, ui_checkpoints, tmp_path):
    files = ui_checkpoints["files"]
    cli_out = str(tmp_path / "cli.safetensors")
    cli = _cli_merge(server.models_dir, files, cli_out)
    tag = "gradio" + server.gradio
    ui = tab_page.open(server.url)
    page = ui.page

    # hover titles are applied (the same map a WebUI gets from javascript/dare_merge_hints.js)
    titles = load_titles()
    for elem in ("dare_merge_p", "dare_merge_run", "dare_merge_save", "dare_merge_models"):
        page.wait_for_function("([id, t]) => document.querySelector('#' + id)?.title === t",
                               arg=[elem, titles[elem]], timeout=15_000)

    ui.reset_status()   # Cancel while idle

    ui.pick("dare_merge_base", files["base"])
    ui.pick("dare_merge_models", files["ft1"])
    ui.pick("dare_merge_models", files["ft2"])

    # presets set the sliders: TIES-SOUP has no DARE (p 0) and full alpha; vote_sgn is forced on
    ui.pick("dare_merge_method", "TIES-SOUP")
    ui.wait_number("dare_merge_p", 0.0)
    ui.wait_number("dare_merge_alpha", 1.0)
    assert page.is_disabled("#dare_merge_vote_sgn input")
    assert page.is_checked("#dare_merge_vote_sgn input")
    ui.pick("dare_merge_method", "DARE-TIES-SOUP")
    ui.wait_number("dare_merge_p", 0.5)
    ui.wait_number("dare_merge_alpha", 0.5)

    ui.set_number("dare_merge_p", UI_P)
    ui.set_number("dare_merge_alpha", UI_ALPHA)
    ui.set_number("dare_merge_lambda", UI_LAMBDA)
    ui.set_number("dare_merge_seed", UI_SEED)
    ui.type_text("dare_merge_weights", UI_WEIGHTS)
    ui.wait_number("dare_merge_p", 0.35)
    assert page.input_value("#dare_merge_p input[type=range]") == UI_P

    merged = ui.click_and_wait("dare_merge_run", "dare_ties_soup merge", timeout=180)
    assert merged.startswith("dare_ties_soup merge of a SD1.x model"), merged
    assert "Traceback" not in merged

    ui.type_text("dare_merge_save_name", "ui-merge")
    saved = ui.click_and_wait("dare_merge_save", "saved", timeout=180)
    target = os.path.join(server.models_dir, "ui-merge.safetensors")
    assert saved.startswith(f"saved {target}"), saved
    assert "written from the merge in memory" in saved, saved   # Save did not merge again
    page.screenshot(path=os.path.join(artifacts_dir(), f"ui-standalone-{tag}.png"), full_page=True)

    # the recipe in the file is what the UI showed
    assert os.path.isfile(target)
    recipe = _recipe(target)
    assert {k: recipe[k] for k in EXPECTED_KNOBS} == EXPECTED_KNOBS
    assert recipe["base"]["file"] == files["base"]
    assert [m["file"] for m in recipe["models"]] == [files["ft1"], files["ft2"]]

    # ... and its tensors are the CLI's for the same recipe, bit for bit
    out, _ = cli.communicate(timeout=300)
    assert cli.returncode == 0, out
    assert _recipe(cli_out)["recipe_hash"] == recipe["recipe_hash"]
    assert _assert_bit_equal(target, cli_out) > 1000

    # the new file is selectable at once (the lists were refreshed after saving)
    page.locator("#dare_merge_inspect").click()
    ui.pick("dare_merge_inspect_file", "ui-merge.safetensors")
    page.locator("#dare_merge_inspect_button").click()
    page.wait_for_function("() => document.querySelector('#dare_merge_inspect_output textarea')"
                           "?.value.includes('dare_ties_soup')", timeout=30_000)
    summary = page.input_value("#dare_merge_inspect_output textarea")
    assert summary.startswith("ui-merge.safetensors: SD1.x"), summary
    page.screenshot(path=os.path.join(artifacts_dir(), f"ui-standalone-{tag}-inspect.png"), full_page=True)

    # refusals are one-line messages, and nothing is written
    before = sorted(os.listdir(server.models_dir))
    ui.type_text("dare_merge_save_name", "ui-merge")
    refused = ui.click_and_wait("dare_merge_save", "error: ")
    assert "exists already" in refused and "\n" not in refused and "Traceback" not in refused, refused

    for bad in ("sub/evil", "..\\evil"):
        ui.type_text("dare_merge_save_name", bad)
        refused = ui.click_and_wait("dare_merge_save", "error: ")
        assert "plain file name" in refused and "\n" not in refused and "Traceback" not in refused, refused
    assert sorted(os.listdir(server.models_dir)) == before
    assert not os.path.exists(os.path.join(server.models_dir, "sub"))

    # with "Overwrite" ticked the same name is accepted
    ui.type_text("dare_merge_save_name", "ui-merge")
    page.locator("#dare_merge_save_overwrite input").check()
    assert ui.click_and_wait("dare_merge_save", "saved").startswith(f"saved {target}")
    assert _assert_bit_equal(target, cli_out) > 1000

    # changed settings: Save merges again first, and records the new values
    ui.set_number("dare_merge_p", "0.4")
    ui.wait_number("dare_merge_p", 0.4)
    ui.type_text("dare_merge_save_name", "ui-merge-2")
    saved = ui.click_and_wait("dare_merge_save", "saved", timeout=180)
    assert "merged first" in saved, saved
    assert _recipe(os.path.join(server.models_dir, "ui-merge-2.safetensors"))["p"] == 0.4
    assert "Traceback" not in server.log()


def test_advanced_controls_and_errors(tab_page, server, ui_checkpoints):
    """Block presets fill the block weights for the base's architecture; mistakes are one-line messages."""
    files = ui_checkpoints["files"]
    ui = tab_page.open(server.url)
    page = ui.page
    page.locator("#dare_merge_advanced").click()
    assert page.is_disabled("#dare_merge_alpha_unet input[type=number]")
    page.locator("#dare_merge_split_alpha input").check()
    page.wait_for_function("() => !document.querySelector('#dare_merge_alpha_unet input[type=number]').disabled",
                           timeout=15_000)
    ui.pick("dare_merge_block_preset", "unet only (BASE 0)")
    expected = block_preset("unet only (BASE 0)", "sd1")
    page.wait_for_function("(v) => document.querySelector('#dare_merge_block_weights textarea, "
                           "#dare_merge_block_weights input')?.value === v", arg=expected, timeout=15_000)
    assert len(expected.split(",")) == 26
    page.wait_for_timeout(500)  # let the option list finish closing
    page.screenshot(path=os.path.join(artifacts_dir(), f"ui-standalone-gradio{server.gradio}-advanced.png"),
                    full_page=True)
    ui.pick("dare_merge_block_preset", "off (no block weights)")
    page.locator("#dare_merge_split_alpha input").uncheck()
    text = ui.click_and_wait("dare_merge_run", "error: ")
    assert text == "error: pick a base checkpoint first"

    ui.pick("dare_merge_base", files["base"])
    ui.pick("dare_merge_models", files["ft1"])
    ui.pick("dare_merge_method", "Slerp")
    ui.pick("dare_merge_models", files["ft2"])   # slerp takes exactly one model
    text = ui.click_and_wait("dare_merge_run", "error: ")
    assert "slerp" in text and "exactly one model" in text and "\n" not in text, text

    ui.type_text("dare_merge_weights", "1, x")
    text = ui.click_and_wait("dare_merge_run", "error: ")
    assert "weights" in text and "\n" not in text, text
