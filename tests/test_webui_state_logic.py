"""The rules of lib_merge.webui.state as functions of plain values: a merge never leaks into the host's
checkpoint state (issue 15).

state.py's hooks read the host (``sd_models.checkpoint_aliases``, ``shared.opts.data``, the loaded
model) and call the functions tested here with what they read: an alias map (title/name/hash ->
CheckpointInfo), the options dict, a record of merge title -> base title, and whether an info is in
the model.  Checkpoint infos are plain namespaces for the real files and the real merged info that
:func:`lib_merge.webui.hotload_base.merged_info` makes from one.  No WebUI module is imitated: the
hooks themselves (wrapping ``select_checkpoint``, ``opts.save``, ``get_checkpoint_state_dict``,
unlisting a merge after a switch) run in a real A1111 and Forge in tests/webui/test_webui_state.py.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lib_merge.recipe import MergeRecipe
from lib_merge.webui import hotload_base, state, xyz

KEY, HASH_KEY = state.KEY, state.HASH_KEY


def info(title: str, filename: str, sha256: str | None = None) -> SimpleNamespace:
    """The fields of a host CheckpointInfo that merged_info copies and state.py reads."""
    name = title.split(" ")[0]
    return SimpleNamespace(title=title, filename=filename, sha256=sha256, name=name, ids=[title, name])


@pytest.fixture()
def world(tmp_path):
    base = info("base.safetensors [aaaa]", str(tmp_path / "base.safetensors"), sha256="a" * 64)
    ft = info("ft.safetensors [bbbb]", str(tmp_path / "ft.safetensors"), sha256="b" * 64)
    merged = hotload_base.merged_info(base, "dare-merge-ties-0123456789", "0123456789", {}, str(tmp_path))
    listed = {alias: i for i in (base, ft) for alias in i.ids}
    with_merge = dict(listed, **{alias: merged for alias in merged.ids})
    return SimpleNamespace(base=base, ft=ft, merged=merged, listed=listed, with_merge=with_merge)


def never(_info) -> bool:
    return False


def always(_info) -> bool:
    return True


def test_the_merged_info_names_its_base(world):
    assert world.merged.dare_merge["base_title"] == world.base.title
    assert world.merged.title == "dare-merge-ties-0123456789 [0123456789]"


def test_a_merge_title_maps_to_its_base_also_after_it_is_unlisted(world):
    bases: dict[str, str] = {}
    assert state.merge_base_title(world.merged.title, world.with_merge, bases) == world.base.title
    assert bases == {world.merged.title: world.base.title}, "a listed merge is recorded"
    assert state.merge_base_title(world.merged.title, world.listed, bases) == world.base.title
    assert state.merge_base_title(world.merged.title, world.listed, {}) is None
    for title in (world.base.title, world.ft.title, "no such model", "", None):
        assert state.merge_base_title(title, world.with_merge, bases) is None


def test_real_info_never_gives_a_merge(world):
    assert state.real_info(world.ft.title, world.with_merge) is world.ft
    assert state.real_info("ft.safetensors", world.with_merge) is world.ft
    assert state.real_info(world.merged.title, world.with_merge) is None
    assert state.real_info("0123456789", world.with_merge) is None
    assert state.real_info(None, world.with_merge) is None and state.real_info("x", world.with_merge) is None


def test_config_json_gets_the_base_while_the_options_keep_the_merge(world):
    data = {KEY: world.merged.title, HASH_KEY: world.merged.sha256, "samples_format": "png"}
    saved = state.persisted_options(data, world.with_merge, {})
    assert saved == {KEY: world.base.title, HASH_KEY: "a" * 64, "samples_format": "png"}
    assert data[KEY] == world.merged.title and data[HASH_KEY] == world.merged.sha256, \
        "the live options must keep the merge"


def test_config_json_gets_the_base_of_a_merge_that_is_no_longer_listed(world):
    bases = {world.merged.title: world.base.title}
    data = {KEY: world.merged.title, HASH_KEY: world.merged.sha256}
    assert state.persisted_options(data, world.listed, bases) == {KEY: world.base.title, HASH_KEY: "a" * 64}
    # a base the host no longer lists: its title, and no hash rather than the merge's
    assert state.persisted_options(data, {}, bases) == {KEY: world.base.title}


def test_options_naming_a_real_checkpoint_are_written_as_they_are(world):
    for data in ({KEY: world.ft.title, HASH_KEY: "b" * 64}, {"samples_format": "png"}, {KEY: "no such model"}):
        assert state.persisted_options(data, world.with_merge, {}) is data


def test_loading_another_checkpoint_moves_the_selection_off_the_merge(world):
    bases = {world.merged.title: world.base.title}
    title = state.selection_after_load(world.merged.title, world.ft, never, world.listed, bases)
    assert title == world.ft.title
    # nothing to do: the merge is still in the model, the selection is already what was loaded, or real
    assert state.selection_after_load(world.merged.title, world.ft, always, world.with_merge, bases) is None
    assert state.selection_after_load(world.ft.title, world.ft, never, world.listed, bases) is None
    assert state.selection_after_load(world.base.title, world.ft, never, world.listed, bases) is None
    assert state.selection_after_load(world.merged.title, None, never, world.listed, bases) is None


def test_a_restored_merge_title_selects_the_base_not_a_file(world):
    """process_images puts the selection it noted back after an override: the merge's title, which is no
    longer loaded nor listed.  select_checkpoint must give the base, never the merge."""
    asked = []

    def in_model(i) -> bool:
        asked.append(i)
        return False

    bases = {world.merged.title: world.base.title}
    assert state.base_for_unloaded_merge(world.merged.title, in_model, world.listed, bases) is world.base
    assert state.base_for_unloaded_merge(world.merged.title, in_model, world.with_merge, {}) is world.base
    assert asked == [None, world.merged], "whether it is in the model is asked about the merge's listing"


def test_the_loaded_merge_is_selected_as_itself(world):
    assert state.base_for_unloaded_merge(world.merged.title, lambda i: i is world.merged, world.with_merge, {}) \
        is None


def test_a_real_selection_is_left_to_the_host_without_asking_the_model(world):
    def in_model(_info) -> bool:
        raise AssertionError("a real checkpoint's selection must not ask which model is loaded")

    for selected in (world.ft.title, world.base.title, "no such model"):
        assert state.base_for_unloaded_merge(selected, in_model, world.with_merge, {}) is None


def test_an_unlisted_base_leaves_the_choice_to_the_host(world):
    bases = {world.merged.title: world.base.title}
    assert state.base_for_unloaded_merge(world.merged.title, never, {}, bases) is None


def test_a_merge_state_dict_comes_from_memory_or_a_clear_error(world):
    weights = {"model.diffusion_model.out.2.weight": torch.arange(6.0).reshape(2, 3)}
    got = state.merge_state_dict(world.merged, world.merged, weights)
    assert got == weights and got is not weights, "a copy of the held weights"
    other = hotload_base.merged_info(world.base, "dare-merge-ties-99", "99", {}, "/x")
    for registered, held in ((other, weights), (None, weights), (world.merged, None)):
        with pytest.raises(hotload_base.HotLoadError, match="no file to read") as caught:
            state.merge_state_dict(world.merged, registered, held)
        assert world.merged.title in str(caught.value) and "\n" not in str(caught.value)


def test_a_plain_override_makes_the_base_the_selection_to_come_back_to(world):
    assert state.base_after_override(world.ft.title, world.merged.title, world.with_merge, {}) is world.base
    assert state.base_after_override("ft.safetensors", world.merged.title, world.with_merge, {}) is world.base


@pytest.mark.parametrize("override", [None, "no such model", "merged", "merge hash"])
def test_overrides_that_do_not_replace_the_merge_change_nothing(world, override):
    value = {"merged": world.merged.title, "merge hash": "0123456789"}.get(override, override)
    assert state.base_after_override(value, world.merged.title, world.with_merge, {}) is None


def test_an_override_without_a_merge_selected_changes_nothing(world):
    assert state.base_after_override(world.ft.title, world.base.title, world.listed, {}) is None
    assert state.base_after_override(world.ft.title, None, world.listed, {}) is None


def test_with_a_merge_the_named_checkpoint_is_taken_out_of_the_overrides(world):
    overrides = {KEY: "ft.safetensors", "CLIP_stop_at_last_layers": 2}
    assert state.take_override(overrides, world.listed) is world.ft
    assert overrides == {"CLIP_stop_at_last_layers": 2}
    overrides = {KEY: "0123456789"}                                   # a merge's hash
    assert state.take_override(overrides, world.with_merge) is None and overrides == {}
    overrides = {KEY: "unknown"}
    assert state.take_override(overrides, world.with_merge) is None and overrides == {KEY: "unknown"}
    overrides = {"CLIP_stop_at_last_layers": 2}
    assert state.take_override(overrides, world.with_merge) is None and overrides == {"CLIP_stop_at_last_layers": 2}


def test_rebase_makes_the_named_checkpoint_the_base(sd1_set):
    recipe = MergeRecipe("ties", sd1_set["base"], [sd1_set["models"][0]], k=0.3)
    assert xyz.rebase(recipe, None) is recipe and xyz.rebase(recipe, sd1_set["base"]) is recipe
    moved = xyz.rebase(recipe, sd1_set["models"][1], "ft2")
    assert moved.base == sd1_set["models"][1] and moved.models == recipe.models and moved.k == 0.3
    assert recipe.base == sd1_set["base"], "the section's own recipe must not change"
