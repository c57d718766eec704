"""The tab without a browser: its controls, their titles, and how their values become a recipe.

Builds the real gradio Blocks with the gradio this environment has (3.41.2 in the project venv).
"""
from __future__ import annotations

import os

import pytest

from lib_merge.errors import MergeError, ParameterError
from lib_merge.methods import METHODS
from lib_merge.recipe import MergeRecipe
from lib_merge.ui.form import (DEFAULT_METHOD, FORM_FIELDS, PRESET_ORDER, PRESET_TITLES, FormValues, knob_is_live,
                               method_name, parse_seed, parse_weights, preset_values)
from lib_merge.ui.hints import load_titles, read_hints_js, standalone_script
from lib_merge.ui.host import FolderHost, TabHost

# Containers that only lay the tab out; everything else a user sees needs a hover title.
LAYOUT_IDS = {"dare_merge_layout", "dare_merge_left", "dare_merge_right", "dare_merge_base_row",
              "dare_merge_models_row", "dare_merge_save_group", "dare_merge_title"}


def _form(**over) -> FormValues:
    values = dict(base="base.safetensors", models=["a.safetensors", "sub/b.safetensors"], weights="", method="TIES",
                  p=0.1, k=0.2, alpha=0.9, lam=1.0, vote_sgn=False, seed=7.0, split_alpha=False, alpha_unet=0.3,
                  alpha_te=0.4, block_weights="", block_p="", block_k="", merge_mode="method default", vae="base",
                  skip_mismatched=False, epsilon=0.1, beta=0.01, rescale="uniform")
    values.update(over)
    return FormValues(*(values[f] for f in FORM_FIELDS))


def test_every_control_has_a_title_and_every_title_a_control(tmp_path):
    gr = pytest.importorskip("gradio")
    from lib_merge.ui.tab import build_tab
    tab = build_tab(FolderHost(str(tmp_path)))
    ids = {getattr(block, "elem_id", None) for block in tab.blocks.values()} - {None}
    ours = {i for i in ids if i.startswith("dare_merge_")}
    assert ours == ids, f"controls without the dare_merge_ prefix: {sorted(ids - ours)} (gradio {gr.__version__})"
    titles = load_titles()
    assert sorted(ours - LAYOUT_IDS - set(titles)) == [], "controls without a hover title"
    assert sorted(set(titles) - ours) == [], "titles for controls that do not exist"
    assert all(0 < len(t) <= 120 and "\n" not in t for t in titles.values()), "titles are one short line"


def test_hints_js_is_the_a1111_shape_and_the_standalone_script_wraps_it():
    js = read_hints_js()
    assert "onUiUpdate(dareMergeApplyTitles)" in js and "gradioApp()" in js
    script = standalone_script()
    assert script.startswith("() => {") and script.rstrip().endswith("}")
    assert js in script and "window.onUiUpdate" in script


def test_presets_set_the_methods_published_values():
    assert [PRESET_TITLES[n] for n in PRESET_ORDER][:4] == ["TIES", "TIES-SOUP", "DARE-TIES", "DARE-TIES-SOUP"]
    assert set(PRESET_ORDER) == set(METHODS)
    assert preset_values("DARE-TIES-SOUP") == {"p": 0.5, "k": 1.0, "alpha": 0.5, "lam": 1.0, "vote_sgn": True}
    assert preset_values("TIES") == {"p": 0.0, "k": 0.2, "alpha": 1.0, "lam": 1.0, "vote_sgn": False}
    assert preset_values("Slerp")["alpha"] == 0.5
    for name in METHODS:
        # a preset's sliders give the same recipe as leaving the knobs to the method
        values = preset_values(name)
        explicit = MergeRecipe(name, "b", ["m"], p=values["p"], k=values["k"], alpha=values["alpha"],
                               lam=values["lam"], vote_sgn=values["vote_sgn"]).resolved()
        assert explicit == MergeRecipe(name, "b", ["m"]).resolved(), name
    assert not knob_is_live("TIES-SOUP", "vote_sgn") and knob_is_live("TIES", "vote_sgn")
    assert not knob_is_live("Slerp", "p") and knob_is_live("DARE-TIES", "p")
    assert method_name(PRESET_TITLES[DEFAULT_METHOD]) == DEFAULT_METHOD


def test_form_values_become_the_recipe(tmp_path):
    resolve = lambda title: os.path.join(str(tmp_path), title)  # noqa: E731
    r = _form().recipe(resolve)
    assert (r.method, r.p, r.k, r.alpha, r.lam, r.vote_sgn, r.seed) == ("ties", 0.1, 0.2, 0.9, 1.0, False, 7)
    assert r.base == os.path.join(str(tmp_path), "base.safetensors")
    assert r.models[1] == os.path.join(str(tmp_path), "sub/b.safetensors")
    assert (r.weights, r.merge, r.alpha_unet, r.alpha_te, r.block_alpha, r.on_mismatch) == \
        (None, None, None, None, None, "error")
    r = _form(weights="1, 0.5", split_alpha=True, merge_mode="sum", block_weights=" 1,0 ", vae="merge",
              skip_mismatched=True).recipe(resolve)
    assert (r.weights, r.merge, r.alpha_unet, r.alpha_te, r.block_alpha, r.vae, r.on_mismatch) == \
        ([1.0, 0.5], "sum", 0.3, 0.4, "1,0", "merge", "skip")


def test_form_errors_are_user_messages():
    with pytest.raises(MergeError, match="pick a base"):
        _form(base=None).recipe(str)
    with pytest.raises(MergeError, match="at least one model"):
        _form(models=[]).recipe(str)
    with pytest.raises(ParameterError, match="weights"):
        parse_weights("1, x")
    assert parse_weights(" ") is None and parse_weights("2 3") == [2.0, 3.0]
    with pytest.raises(ParameterError, match="seed"):
        parse_seed(1.5)
    with pytest.raises(ParameterError, match="seed"):
        parse_seed(None)
    assert parse_seed(12.0) == 12


def test_folder_host_lists_checkpoints_and_stays_inside_its_folder(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "B.ckpt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.safetensors").write_bytes(b"")
    host = FolderHost(str(tmp_path), device="cpu")
    assert isinstance(host, TabHost)
    assert host.list_checkpoints() == ["a.safetensors", "sub/B.ckpt"]
    assert host.resolve("sub/B.ckpt") == str(tmp_path / "sub" / "B.ckpt")
    with pytest.raises(MergeError, match="outside"):
        host.resolve("../elsewhere.safetensors")
    assert host.default_device() == "cpu" and host.run_exclusive(lambda: 5) == 5
    (tmp_path / "c.safetensors").write_bytes(b"")
    host.refresh()
    assert "c.safetensors" in host.list_checkpoints()


def test_compat_keeps_only_known_dropdown_values():
    pytest.importorskip("gradio")
    from lib_merge.ui.compat import keep_known
    assert keep_known(["a", "gone"], ["a", "b"], True) == ["a"]
    assert keep_known("gone", ["a"], False) is None and keep_known("a", ["a"], False) == "a"
    assert keep_known(None, ["a"], True) == []


def test_cancel_stops_a_running_merge_and_reports_it_in_words(ui_checkpoints, tmp_path):
    """What the Cancel button does, without the button: the session's token stops the merge thread."""
    pytest.importorskip("gradio")
    from lib_merge.ui.tab import _stream
    from lib_merge.ui.texts import error_text

    class CancellingHost(FolderHost):
        events = 0

        def on_progress(self, event):
            self.events += 1
            if self.events == 3:
                assert self.session.cancel()

    host = CancellingHost(ui_checkpoints["dir"], device="cpu")
    files = ui_checkpoints["files"]
    recipe = MergeRecipe("dare_ties", host.resolve(files["base"]), [host.resolve(files["ft1"])], p=0.3)
    rows = list(_stream(host, lambda progress: host.session.merge(recipe, progress=progress), "merging"))
    text, result, error = rows[-1]
    assert result is None and error is not None
    assert error_text(error).startswith("cancelled:")
    assert rows[0][0].startswith("merging")
    assert host.session.result is None and not host.session.cancel()


def test_block_p_and_k_reach_the_recipe(tmp_path):
    r = _form(block_p=" 0.5," * 25 + "0.5", block_k="").recipe(lambda t: str(tmp_path / t))
    assert r.block_p.count("0.5") == 26 and r.block_k is None
