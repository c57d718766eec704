"""lib_merge.webui.state without a WebUI: a merge never leaks into the host's checkpoint state (issue 15).

The host's ``modules.sd_models`` / ``modules.shared`` are small stand-ins
holding exactly what state.py touches (the alias map, the options with the
host's ``Options.save`` body, the loaded model); the merged CheckpointInfo is
the real one :func:`lib_merge.webui.hotload_base.merged_info` makes.  The
tests/webui/test_webui_state.py tests check the same rules in a real A1111 and Forge.
"""
from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import pytest

import lib_merge.webui as dare_merge
from lib_merge.recipe import MergeRecipe
from lib_merge.webui import host, hotload_base, state, xyz


class Info:
    """A CheckpointInfo stand-in (the attributes merged_info copies and state.py reads)."""

    def __init__(self, title: str, filename: str, sha256: str | None = None) -> None:
        self.title, self.filename, self.sha256 = title, filename, sha256
        self.name = title.split(" ")[0]
        self.ids = [title, self.name]

    def register(self) -> None:
        sd_models = sys.modules["modules.sd_models"]
        sd_models.checkpoints_list[self.title] = self
        for alias in self.ids:
            sd_models.checkpoint_aliases[alias] = self


class Options:
    def __init__(self, data: dict) -> None:
        self.data = data

    def save(self, filename):          # the body of A1111/Forge's Options.save
        with open(filename, "w", encoding="utf8") as file:
            json.dump(self.data, file, indent=4, ensure_ascii=False)


class Loader:
    def __init__(self, model) -> None:
        self.model = model
        self.registry = hotload_base.Registry()
        self.loaded_state = None

    def _info_is_loaded(self, info) -> bool:
        return self.model.sd_checkpoint_info is info

    def loaded_recipe_hash(self):
        info = self.model.sd_checkpoint_info
        return info.dare_merge["recipe_hash"] if host.is_merged_info(info) else None


@pytest.fixture()
def webui(monkeypatch, tmp_path):
    sd_models = types.ModuleType("modules.sd_models")
    sd_models.checkpoints_list, sd_models.checkpoint_aliases = {}, {}
    base = Info("base.safetensors [aaaa]", str(tmp_path / "base.safetensors"), sha256="a" * 64)
    ft = Info("ft.safetensors [bbbb]", str(tmp_path / "ft.safetensors"), sha256="b" * 64)
    shared = types.ModuleType("modules.shared")
    shared.opts = Options({"sd_model_checkpoint": base.title, "samples_format": "png"})
    sd_models.select_checkpoint = lambda: sd_models.checkpoint_aliases.get(shared.opts.data["sd_model_checkpoint"])
    sd_models.get_checkpoint_state_dict = lambda info, timer: {"read": info.filename}
    sd_models.model_data = SimpleNamespace(sd_model=SimpleNamespace(sd_checkpoint_info=base))
    package = types.ModuleType("modules")
    package.sd_models, package.shared = sd_models, shared
    for name, module in (("modules", package), ("modules.sd_models", sd_models), ("modules.shared", shared)):
        monkeypatch.setitem(sys.modules, name, module)
    for info in (base, ft):
        info.register()
    monkeypatch.setattr(host, "detect", lambda: host.A1111)
    model = sd_models.model_data.sd_model
    loader = Loader(model)
    session = SimpleNamespace(hot_loader=loader, hot_loaded=False)
    monkeypatch.setattr(dare_merge, "get_session", lambda: session)
    monkeypatch.setattr(state, "_merge_bases", {})
    merged = hotload_base.merged_info(base, "dare-merge-ties-0123456789", "0123456789", {}, str(tmp_path))
    yield SimpleNamespace(sd_models=sd_models, opts=shared.opts, base=base, ft=ft, merged=merged, model=model,
                          loader=loader, session=session, tmp=tmp_path)
    state.uninstall()


def hot_load(w) -> None:
    """What the hot-loaders leave behind: the merge in the model, listed, selected."""
    w.model.sd_checkpoint_info = w.merged
    w.loader.registry.register(w.merged)
    w.loader.loaded_state = {"merged": True}
    w.opts.data["sd_model_checkpoint"] = w.merged.title
    w.opts.data["sd_checkpoint_hash"] = w.merged.sha256
    state.on_model_loaded(w.model)


def load_real(w, info) -> None:
    """The host loads a real checkpoint (it writes its title, then calls on_model_loaded)."""
    w.model.sd_checkpoint_info = info
    w.opts.data["sd_model_checkpoint"] = info.title
    state.on_model_loaded(w.model)


def test_config_json_gets_the_base_while_the_options_keep_the_merge(webui):
    state.install()
    hot_load(webui)
    path = webui.tmp / "config.json"
    webui.opts.save(str(path))
    saved = json.loads(path.read_text())
    assert saved["sd_model_checkpoint"] == webui.base.title and saved["sd_checkpoint_hash"] == "a" * 64
    assert saved["samples_format"] == "png"
    assert webui.opts.data["sd_model_checkpoint"] == webui.merged.title, "the live selection must stay the merge"
    load_real(webui, webui.ft)
    webui.opts.save(str(path))
    assert json.loads(path.read_text())["sd_model_checkpoint"] == webui.ft.title
    state.uninstall()
    assert "save" not in vars(webui.opts)


def test_without_the_guard_config_json_held_the_merge(webui):
    """The defect the guard fixes: the host's own save writes whatever the live options hold."""
    hot_load(webui)
    path = webui.tmp / "config.json"
    webui.opts.save(str(path))
    assert json.loads(path.read_text())["sd_model_checkpoint"] == webui.merged.title


def test_loading_another_checkpoint_unlists_the_merge_and_clears_hot_loaded(webui):
    hot_load(webui)
    assert webui.session.hot_loaded and webui.merged.title in webui.sd_models.checkpoints_list
    load_real(webui, webui.ft)
    assert webui.session.hot_loaded is False
    assert webui.merged.title not in webui.sd_models.checkpoints_list
    assert not any(host.is_merged_info(v) for v in webui.sd_models.checkpoint_aliases.values())


def test_a_restored_merge_title_selects_the_base_not_a_file(webui):
    """process_images puts the selection it noted back after an override: the merge's title, which is no
    longer loaded nor listed.  select_checkpoint must give the base, never the merge."""
    state.install()
    hot_load(webui)
    load_real(webui, webui.ft)                                   # the override's checkpoint
    webui.opts.data["sd_model_checkpoint"] = webui.merged.title  # the host restores the noted options
    assert webui.sd_models.select_checkpoint() is webui.base
    assert webui.opts.data["sd_model_checkpoint"] == webui.base.title


def test_the_loaded_merge_is_selected_as_itself(webui):
    state.install()
    hot_load(webui)
    assert webui.sd_models.select_checkpoint() is webui.merged


def test_a_merge_state_dict_comes_from_memory_or_a_clear_error(webui):
    state.install()
    hot_load(webui)
    assert webui.sd_models.get_checkpoint_state_dict(webui.merged, None) == {"merged": True}
    assert webui.sd_models.get_checkpoint_state_dict(webui.ft, None) == {"read": webui.ft.filename}
    load_real(webui, webui.ft)
    with pytest.raises(hotload_base.HotLoadError, match="no file to read"):
        webui.sd_models.get_checkpoint_state_dict(webui.merged, None)


def test_a_plain_override_makes_the_base_the_selection_to_come_back_to(webui):
    hot_load(webui)
    p = SimpleNamespace(override_settings={"sd_model_checkpoint": webui.ft.title})
    state.yield_to_override(p)
    assert webui.opts.data["sd_model_checkpoint"] == webui.base.title
    assert p.override_settings == {"sd_model_checkpoint": webui.ft.title}, "the override itself is the host's"


@pytest.mark.parametrize("override", [None, "no such model", "merged"])
def test_overrides_that_do_not_replace_the_merge_change_nothing(webui, override):
    hot_load(webui)
    value = webui.merged.title if override == "merged" else override
    p = SimpleNamespace(override_settings={} if value is None else {"sd_model_checkpoint": value})
    state.yield_to_override(p)
    assert webui.opts.data["sd_model_checkpoint"] == webui.merged.title


def test_with_a_merge_the_named_checkpoint_is_taken_out_of_the_overrides(webui):
    p = SimpleNamespace(override_settings={"sd_model_checkpoint": "ft.safetensors", "CLIP_stop_at_last_layers": 2})
    assert state.take_checkpoint_override(p) is webui.ft
    assert p.override_settings == {"CLIP_stop_at_last_layers": 2}
    hot_load(webui)
    p = SimpleNamespace(override_settings={"sd_model_checkpoint": "0123456789"})     # a merge's hash
    assert state.take_checkpoint_override(p) is None and p.override_settings == {}
    p = SimpleNamespace(override_settings={"sd_model_checkpoint": "unknown"})
    assert state.take_checkpoint_override(p) is None and p.override_settings == {"sd_model_checkpoint": "unknown"}


def test_rebase_makes_the_named_checkpoint_the_base(sd1_set):
    recipe = MergeRecipe("ties", sd1_set["base"], [sd1_set["models"][0]], k=0.3)
    assert xyz.rebase(recipe, None) is recipe and xyz.rebase(recipe, sd1_set["base"]) is recipe
    moved = xyz.rebase(recipe, sd1_set["models"][1], "ft2")
    assert moved.base == sd1_set["models"][1] and moved.models == recipe.models and moved.k == 0.3
    assert recipe.base == sd1_set["base"], "the section's own recipe must not change"
